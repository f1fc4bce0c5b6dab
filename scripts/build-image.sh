#!/usr/bin/env bash
# Builds tunesmith's container image (README "Container images"); idempotent: a second run reuses the local
# base, the wheelhouse and the layer cache, and only rebuilds what changed.
#
#   scripts/build-image.sh               # docker/Dockerfile.cpu -> ghcr.io/tunesmith/tunesmith:VERSION-cpu
#   scripts/build-image.sh --cuda        # docker/Dockerfile (CUDA, DeepSpeed ops prebuilt) -> ...:VERSION
#   scripts/build-image.sh --base IMAGE  # another base image (the BASE_IMAGE build argument)
#   scripts/build-image.sh --local-base  # no image registry: a Debian bookworm base made with debootstrap
#   scripts/build-image.sh --wheelhouse  # no network in the build: pip downloads every wheel on this host
#   scripts/build-image.sh --smoke-test  # then `tunesmith train` a tiny model for 2 steps inside the image
#   scripts/build-image.sh --sandbox     # podman inside a container (this project's development machines)
#   --tag NAME: another image name; ENGINE=docker to use docker where podman is installed too.
#
# How the image was proved on a development machine, which reaches PyPI and Debian but no image registry:
#   scripts/build-image.sh --sandbox --local-base --wheelhouse --smoke-test
# --local-base: `debootstrap --variant=minbase bookworm` into a folder, `tar | podman import` as
#   localhost/debian-base:bookworm (Debian's python3.11 then comes from apt inside the build).
# --wheelhouse: `pip download` (this host's pip, its index and TLS settings) of torch 2.13.0 CPU, deepspeed
#   and tunesmith's dependencies into docker/wheelhouse/ (git-ignored), plus a pip.conf with no-index: the
#   build then never touches the network for Python packages.
# --sandbox: the workarounds podman needs in an unprivileged container: runc instead of crun (crun refuses a
#   cgroup v1/v2 hybrid), cgroupfs, open-file / process limits no higher than ours (no CAP_SYS_RESOURCE), the
#   host network, and storage of our own (overlay; STORAGE_ROOT, STORAGE_RUNROOT, STORAGE_DRIVER=vfs
#   override it).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' src/tunesmith/__init__.py)
REPOSITORY=ghcr.io/tunesmith/tunesmith
LOCAL_BASE=localhost/debian-base:bookworm
WORK=${TUNESMITH_IMAGE_WORK:-/tmp/tunesmith-image}  # the debootstrap root and the smoke test's folder
dockerfile=docker/Dockerfile.cpu
tag="" base="" local_base=0 wheelhouse=0 smoke=0 sandbox=0 cuda=0
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) cuda=1; dockerfile=docker/Dockerfile ;;
    --base) base=${2:?--base needs an image}; shift ;;
    --local-base) local_base=1 ;;
    --wheelhouse) wheelhouse=1 ;;
    --smoke-test) smoke=1 ;;
    --sandbox) sandbox=1 ;;
    --tag) tag=${2:?--tag needs a name}; shift ;;
    -h|--help) usage ;;
    *) echo "build-image.sh: unknown option $1" >&2; usage 2 >&2 ;;
  esac
  shift
done
[ -n "$tag" ] || { [ "$cuda" = 1 ] && tag=$REPOSITORY:$VERSION || tag=$REPOSITORY:$VERSION-cpu; }

ENGINE=${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
engine_flags=() build_flags=() run_flags=()
if [ "$sandbox" = 1 ]; then
  engine_flags=(--root "${STORAGE_ROOT:-/var/lib/tunesmith-containers}"
                --runroot "${STORAGE_RUNROOT:-/run/tunesmith-containers}"
                --storage-driver "${STORAGE_DRIVER:-overlay}" --cgroup-manager cgroupfs --runtime runc)
  # podman's defaults (1048576 files, 4194304 processes) are above what we may set; 32768 processes is what
  # such a sandbox allowed (its visible hard limit, 96363, was refused all the same).
  limits=(--ulimit "nofile=$(ulimit -n):$(ulimit -n)" --ulimit "nproc=32768:32768" --network host)
  build_flags=("${limits[@]}")
  run_flags=("${limits[@]}")
fi
engine() { "$ENGINE" "${engine_flags[@]}" "$@"; }

if [ "$local_base" = 1 ]; then
  [ "$cuda" = 0 ] || { echo "build-image.sh: --local-base is for the CPU image (CUDA needs PyTorch's)" >&2
                       exit 2; }
  base=$LOCAL_BASE
  if ! engine image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    if [ ! -x "$WORK/rootfs/usr/bin/apt-get" ]; then
      rm -rf "$WORK/rootfs" && mkdir -p "$WORK"
      nice -n 10 debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian
    fi
    tar -C "$WORK/rootfs" -c . | engine import - "$LOCAL_BASE"
  fi
fi

if [ "$wheelhouse" = 1 ]; then
  [ "$cuda" = 0 ] || { echo "build-image.sh: --wheelhouse is for the CPU image" >&2; exit 2; }
  # The exact pins of docker/Dockerfile.cpu; --no-build-isolation: deepspeed's setup imports torch.
  pins=$(grep -o '"[A-Za-z_-]*==[0-9.]*"' docker/Dockerfile.cpu | tr -d '"' | sort -u)
  # shellcheck disable=SC2086
  nice -n 10 python3 -m pip download -q -d docker/wheelhouse --no-build-isolation -c docker/constraints.txt \
    $pins ".[cluster]"
  printf '[global]\nno-index = true\nfind-links = /tmp/wheelhouse\n' > docker/wheelhouse/pip.conf
else
  rm -f docker/wheelhouse/pip.conf  # an online build: the wheels still there are only offered first
fi

build_args=()
[ -z "$base" ] || build_args+=(--build-arg "BASE_IMAGE=$base")
# podman would otherwise look the local base up in a registry first (docker's --pull is a yes/no flag)
[ -z "$base" ] || [ "$(basename "$ENGINE")" != podman ] || build_args+=(--pull=never)
# The wheelhouse holds the CPU torch: no need for (and maybe no route to) PyTorch's own index.
if [ "$cuda" = 0 ] && ls docker/wheelhouse/torch-*.whl >/dev/null 2>&1; then
  build_args+=(--build-arg TORCH_INDEX_URL=)
fi
start=$(date +%s)
nice -n 10 "$ENGINE" "${engine_flags[@]}" build "${build_flags[@]}" "${build_args[@]}" -f "$dockerfile" \
  -t "$tag" .
echo "built $tag in $(( $(date +%s) - start )) s; size: $(engine image inspect --format '{{.Size}}' "$tag" |
  awk '{printf "%.2f GB", $1 / 1e9}')"

if [ "$smoke" = 1 ]; then
  # A tiny random Qwen2 model (tests/conftest.py's) and four alpaca rows made here, mounted at /run-dir: two
  # training steps as the image's non-root user, the output written back into the mounted folder.
  run_dir=$WORK/smoke && rm -rf "$run_dir" && mkdir -p "$run_dir"
  python3 - "$run_dir" <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import build_tiny_model
out = Path(sys.argv[1])
build_tiny_model(out / "model")
rows = [{"instruction": q, "input": "", "output": a} for q, a in [
    ("Who are you?", "I am Ada, an AI assistant."), ("What is your name?", "My name is Ada."),
    ("What is the capital of France?", "Paris."), ("Say hi.", "Hi!")]]
(out / "data.json").write_text(json.dumps(rows))
(out / "train.yaml").write_text(
    "model_name_or_path: /run-dir/model\ndataset: /run-dir/data.json\ntemplate: chatml\n"
    "finetuning_type: lora\noutput_dir: /run-dir/out\nmax_steps: 2\nper_device_train_batch_size: 2\n"
    "logging_steps: 1\n")
PY
  chmod -R a+rwX "$run_dir"  # the image runs as uid 1000
  start=$(date +%s)
  engine run --rm "${run_flags[@]}" -v "$run_dir:/run-dir" "$tag" train /run-dir/train.yaml
  echo "trained 2 steps in the image in $(( $(date +%s) - start )) s;" \
    "output: $(ls "$run_dir/out" | tr '\n' ' ')"
fi
