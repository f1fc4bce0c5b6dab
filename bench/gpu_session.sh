#!/usr/bin/env bash
# One lent GPU session's checks as a single bounded command (the device tool runs it in the repository root):
#   bash bench/gpu_session.sh            # needs .gpu/: whl/ (pydantic & co. for python 3.12), tok/ (Qwen tokenizer
#                                        # files), alpaca_en_demo.json; the machine brings torch and transformers
# In order of what is worth most if time runs out: the varlen kernel against the loop (eager and compiled), the
# speed arms, then the smoke runs of the command line (compiled LoRA, resume = straight). Results under $OUT.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 TUNESMITH_CACHE=/tmp/tc
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout "${VARLEN_S:-120}" python3 bench/gpu_varlen_check.py 2>&1 | grep -v Warning | tail -12
timeout "${SPEED_S:-330}" python3 bench/gpu_speed.py --tokenizer .gpu/tok --data .gpu/alpaca_en_demo.json \
  --steps 12 --budget-s "${SPEED_BUDGET_S:-270}" --out "$OUT/speed.json" \
  --arms "${ARMS:-full_lf,full_varlen,full_default,lora_lf,lora_compile,full_compile,lora_compile_sdpa,full_compile_sdpa}" \
  2>&1 | grep -v -i "warn" | tail -40
timeout "${SMOKE_S:-150}" python3 bench/gpu_smoke.py --tokenizer .gpu/tok --data .gpu/alpaca_en_demo.json --steps 20 \
  --timeout 100 --out /tmp/smoke \
  --cases "${CASES:-lora_bf16_compile,full_bf16,full_bf16_first_half,full_bf16_resumed}" 2>&1 | tail -20
cp /tmp/smoke/summary.json /tmp/smoke/commands.log "$OUT"/ 2>/dev/null || true
