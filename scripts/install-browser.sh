#!/usr/bin/env bash
# Installs headless Chromium and its WebDriver from Debian (idempotent; quiet; fast when already installed).
# tests/serve/test_chat_page.py drives the chat page with them; it skips, saying why, where they are absent.
# Never `playwright install`: that downloads a browser build of its own, which this project does not do.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser.sh: no apt-get here; install chromium and its chromedriver yourself (the page test skips)" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install-browser.sh: not root and no sudo; skipping the browser (the page test skips)" >&2
    exit 0
  fi
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
chromium --version
