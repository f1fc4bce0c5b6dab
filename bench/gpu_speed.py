"""The speed levers on a GPU: tokens/s, MFU and peak memory of tunesmith's training loop, one lever at a time.

    python bench/gpu_speed.py --tokenizer DIR --data FILE [--steps 15] [--cutoff-len 2048] [--batch-size 8]
                              [--arms lora_lf,lora_head,...] [--budget-s 420] [--out FILE.json]

Workload: a random-weight model of Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads / 2 KV heads, MLP 4864,
its 151,936-token vocabulary, tied head) around the real Qwen tokenizer in ``--tokenizer``; the alpaca rows of
``--data`` with ``template: qwen``, ``packing: true``, bf16 autocast over float32 weights, AdamW. Each arm is one
``tunesmith.train.train`` call in this process on ``device: auto`` (CUDA here):

* ``lora_lf``: LoRA r16 on all linear layers as LLaMA-Factory runs it: the full LM head, PEFT's LoRA layers,
  SDPA with a block-diagonal mask for the packed rows;
* ``lora_head`` (+ the LM head only where there are targets, unfused), ``lora_fused`` (+ fused LoRA),
  ``lora_varlen`` (+ ``flash_attn: auto``: attention by samples, one varlen flash-attention call per layer on
  CUDA), ``lora_default`` (+ the fused chunked loss, ``loss_chunk_size: 4096``: tunesmith's default),
  ``lora_liger`` (``enable_liger_kernel`` instead), ``lora_compile`` (default + ``torch_compile``: the compiled
  blocks keep the varlen call), ``lora_compile_sdpa`` (+ ``torch_compile`` with ``flash_attn: sdpa``, the masked
  SDPA inside the graphs);
* ``full_lf`` / ``full_varlen`` / ``full_default`` / ``full_liger`` / ``full_compile`` / ``full_compile_sdpa``: the
  same for full fine-tuning.

Each row also gives its speed and peak memory against the LLaMA-Factory-like arm of its method, when that ran.

Steps 1-3 warm up (and compile); the timed steps are 4..``--steps``, each stamped after a CUDA synchronize.
Tokens are the real (unpadded) tokens of the timed steps' rows, replayed from the loader's deterministic order.
MFU = model FLOPs / time / 989 TFLOP/s (the H100/H200 dense bf16 peak): 6·N per token for full fine-tuning and 4·N
for LoRA (frozen weights get no weight gradient), N the parameters that multiply (the head counted, the embedding
lookup not), plus causal attention, 6·layers·hidden·Σ(sample length²) over the packed samples. The arms' final
losses are printed too: a lever changes speed, not what is learned (bf16 rounding aside).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PEAK_TFLOPS = 989.0
LF_LIKE = {"target_only_head": False, "fused_lora": False, "flash_attn": "sdpa"}
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora_lf": ("lora", LF_LIKE),
    "lora_head": ("lora", {**LF_LIKE, "target_only_head": True, "loss_chunk_size": 0}),
    "lora_fused": ("lora", {**LF_LIKE, "target_only_head": True, "loss_chunk_size": 0, "fused_lora": True}),
    "lora_varlen": ("lora", {"loss_chunk_size": 0}),
    "lora_default": ("lora", {}),
    "lora_liger": ("lora", {"enable_liger_kernel": True}),
    "lora_compile": ("lora", {"torch_compile": True}),
    "lora_compile_sdpa": ("lora", {"torch_compile": True, "flash_attn": "sdpa"}),
    "full_lf": ("full", LF_LIKE),
    "full_varlen": ("full", {"loss_chunk_size": 0}),
    "full_default": ("full", {}),
    "full_liger": ("full", {"enable_liger_kernel": True}),
    "full_compile": ("full", {"torch_compile": True}),
    "full_compile_sdpa": ("full", {"torch_compile": True, "flash_attn": "sdpa"}),
}


def build_model(tokenizer_dir: Path, out: Path) -> Path:
    from gpu_smoke import build_model as random_qwen2  # bench/ is on sys.path when this file runs as a script

    return random_qwen2(tokenizer_dir, out, 896, 24, vocab_size=151936, intermediate_size=4864,
                        num_attention_heads=14, max_position_embeddings=32768, rope_theta=1e6)


def matmul_params(model_dir: Path) -> tuple[int, int, int]:
    """(parameters that multiply per token, layers, hidden) of the model in ``model_dir``."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    head_dim = c.hidden_size // c.num_attention_heads
    attn = c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * (attn + mlp) + c.vocab_size * c.hidden_size, c.num_hidden_layers, c.hidden_size


def step_rows(cfg: Any, steps: int) -> list[list[list[int]]]:
    """For each step 1..steps, the sample lengths of each of its rows (one rank, no accumulation)."""
    from tunesmith.data import prepare_datasets
    from tunesmith.data.loader import EpochLoader
    from tunesmith.model.load import load_tokenizer

    rows = prepare_datasets(cfg, load_tokenizer(cfg.model_name_or_path)).train  # the cache the run filled
    loader = EpochLoader(rows, cfg.per_device_train_batch_size, 0, cfg.seed)
    order: list[list[int]] = []
    epoch = 0
    while len(order) < steps:
        order += loader.batch_indices(epoch)
        epoch += 1
    return [[list(getattr(rows[i], "seq_lens", None) or [len(rows[i].input_ids)]) for i in ids]
            for ids in order[:steps]]


def run_arm(name: str, args: argparse.Namespace, model_dir: Path, work: Path) -> dict[str, Any]:
    import torch

    from tunesmith.config import Config
    from tunesmith.train import train
    from tunesmith.train.observe import read_log

    method, levers = ARMS[name]
    cfg = Config(
        model_name_or_path=str(model_dir), template="qwen", dataset=[str(args.data)], cutoff_len=args.cutoff_len,
        packing=True, per_device_train_batch_size=args.batch_size, max_steps=args.steps, bf16=True,
        finetuning_type=method, lora_rank=16, lora_target="all", learning_rate=1e-4 if method == "lora" else 1e-5,
        logging_steps=1, save_strategy="no", plot_loss=False, output_dir=str(work / name), seed=42, **levers,
    )
    stamps: dict[int, float] = {}

    def stamp(state: Any) -> None:
        torch.cuda.synchronize()
        stamps[state.global_step] = time.perf_counter()

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    train(cfg, callbacks=[stamp])
    wall = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30
    timed = range(4, args.steps + 1)
    seconds = stamps[args.steps] - stamps[3]
    lengths = step_rows(cfg, args.steps)
    tokens = sum(sum(sum(row) for row in lengths[s - 1]) for s in timed)
    square = sum(sum(n * n for row in lengths[s - 1] for n in row) for s in timed)
    params, layers, hidden = matmul_params(model_dir)
    flops = (4 if method == "lora" else 6) * params * tokens + 6 * layers * hidden * square
    losses = [e["loss"] for e in read_log(work / name) if "loss" in e]
    return {
        "arm": name, "tokens_per_s": tokens / seconds, "mfu": flops / seconds / (PEAK_TFLOPS * 1e12),
        "step_ms": 1000 * seconds / len(timed), "peak_gib": peak, "warmup_s": stamps[3] - started,
        "wall_s": wall, "last_loss": losses[-1] if losses else None,
    }


def matmul_tflops() -> float:
    """The bf16 matrix rate this GPU reaches on an 8192³ product: the ceiling MFU's peak stands for."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--cutoff-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma list of the arms, in order")
    parser.add_argument("--budget-s", type=float, default=420, help="start no arm after this many seconds")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    args.data = args.data.resolve()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: this bench measures the levers on a GPU")
        return 1
    from tunesmith.logging import setup_logging

    setup_logging()  # the runs' own lines (speed features, compile warm-up) go to stderr
    began = time.perf_counter()
    print(f"{torch.cuda.get_device_name()}: bf16 8192³ matmul {matmul_tflops():.0f} TFLOP/s; torch {torch.__version__}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_model(args.tokenizer, work / "model")
        print(f"{'arm':<14}{'tokens/s':>10}{'MFU':>7}{'step ms':>9}{'peak GiB':>10}{'warm-up s':>11}{'last loss':>11}"
              f"{'speed vs lf':>13}{'memory vs lf':>14}")
        for name in args.arms.split(","):
            if time.perf_counter() - began > args.budget_s:
                print(f"{name:<14} skipped: the {args.budget_s:.0f} s budget is spent")
                continue
            try:
                row = run_arm(name, args, model_dir, work)
            except Exception as err:  # one arm's failure must not hide the others' figures
                print(f"{name:<14} failed: {type(err).__name__}: {str(err)[:300]}")
                continue
            results.append(row)
            lf = next((r for r in results if r["arm"] == ARMS[name][0] + "_lf"), row)
            print(f"{name:<14}{row['tokens_per_s']:>10.0f}{row['mfu']:>7.1%}{row['step_ms']:>9.1f}"
                  f"{row['peak_gib']:>10.2f}{row['warmup_s']:>11.1f}{row['last_loss'] or float('nan'):>11.4f}"
                  f"{row['tokens_per_s'] / lf['tokens_per_s']:>12.2f}×{row['peak_gib'] / lf['peak_gib']:>13.2f}×",
                  flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
