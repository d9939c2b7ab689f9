#!/usr/bin/env bash
# System packages the Python environment cannot provide, installed only when asked (`make system-deps`;
# .ci/run calls it before `make test`). Today one: a Chrome/Chromium for kaleido's static PNG export.
# Debian's `chromium` works offline here (apt-get update + install took about 90 s). Needs apt-get and
# root; elsewhere it says what to install and exits 0, and the PNG tests skip with that reason.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
    || command -v google-chrome >/dev/null 2>&1; then
  echo "system-deps: a Chrome/Chromium is already installed"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
  echo "system-deps: install a Chrome/Chromium yourself for PNG export (e.g. \`sudo apt-get install chromium\`);" \
       "without it PNG tests skip and figures are written as HTML only" >&2
  exit 0
fi
echo "system-deps: installing Debian's chromium (apt-get; about 90 s)"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
echo "system-deps: $(chromium --version 2>/dev/null || echo chromium installed)"
