#!/usr/bin/env bash
# Installs a Slurm controller, a Slurm node daemon, the Slurm client tools and MUNGE from Debian (idempotent;
# quiet; fast when already installed). tests/launch/test_slurm_job.py starts them on 127.0.0.1 with a slurm.conf
# of its own (tests/launch/slurm_helpers.py) and submits real jobs; it skips, saying why, where they are absent.
# The packages' own services are not started or configured here: the tests run private daemons in a temp dir.
set -euo pipefail
if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
    && command -v munged >/dev/null 2>&1 && command -v sbatch >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-slurm.sh: no apt-get here; install slurmctld, slurmd, slurm-client and munge yourself" \
       "(the Slurm job tests skip)" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install-slurm.sh: not root and no sudo; skipping Slurm (the Slurm job tests skip)" >&2
    exit 0
  fi
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
# policy-rc.d exit 101 is Debian's way to keep a package's postinst from starting its service; the tests start
# their own daemons, and a stock slurmctld started against the default (empty) config would only log errors.
POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=0
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod +x "$POLICY"
  ADDED_POLICY=1
fi
trap '[ "$ADDED_POLICY" = 1 ] && $SUDO rm -f "$POLICY"' EXIT
$SUDO apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
slurmd -V
