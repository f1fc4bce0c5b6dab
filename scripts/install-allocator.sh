#!/usr/bin/env bash
# Installs tcmalloc from Debian (libtcmalloc-minimal4; idempotent, quiet, fast when already installed). On CPU,
# `tunesmith train` runs under it when it is there (config key host_allocator, src/tunesmith/launch/host_allocator.py):
# less peak memory and faster steps than glibc's malloc. Without apt-get or root it says so and changes nothing:
# training then runs under glibc's malloc, saying so in its log.
set -euo pipefail
if ldconfig -p 2>/dev/null | grep -q "libtcmalloc_minimal.so"; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-allocator.sh: no apt-get here; install tcmalloc (gperftools) yourself for less memory on CPU" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install-allocator.sh: not root and no sudo; CPU training runs under glibc's malloc" >&2
    exit 0
  fi
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4 >/dev/null
