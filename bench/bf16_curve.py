"""bf16 against fp32 over a whole run: the demo's LoRA config (SmolLM2-135M-Instruct, identity data), 100 optimizer
steps, once with ``bf16: true`` (autocast, float32 master weights, and on CPUs with bf16 in hardware the frozen base
stored in bf16) and once in float32, same seed and batches. Prints both loss curves' summary: the largest and the
mean absolute difference per logged step, relative to the fp32 loss, and the final losses.

    python bench/bf16_curve.py [--steps 100] [--method lora|full] [--json]

The evidence the speed issue asks for before bf16 may become a default on such CPUs; not part of the tests (the
tests run the same comparison on the tiny model: tests/train/test_bf16_curve.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def run(precision: str, steps: int, method: str, folder: Path) -> tuple[list[float], float]:
    from tunesmith.demo import demo_config
    from tunesmith.train import train
    from tunesmith.train.observe import read_log

    overrides = [f"bf16={precision == 'bf16'}", "logging_steps=1", "save_strategy=no", "plot_loss=false",
                 f"finetuning_type={method}", "report_to=none"]
    cfg = demo_config("Tuney", "the tunesmith team", steps, str(folder / precision), overrides)
    started = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - started
    return [e["loss"] for e in read_log(cfg.output_dir) if "loss" in e], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fp32, fp32_s = run("fp32", args.steps, args.method, Path(tmp))
        bf16, bf16_s = run("bf16", args.steps, args.method, Path(tmp))
    gaps = [abs(a - b) for a, b in zip(fp32, bf16, strict=True)]
    relative = [gap / abs(a) for gap, a in zip(gaps, fp32, strict=True)]
    result = {
        "steps": len(fp32), "method": args.method,
        "max_abs_diff": max(gaps), "mean_abs_diff": statistics.fmean(gaps), "max_rel_diff": max(relative),
        "first_loss": {"fp32": fp32[0], "bf16": bf16[0]}, "final_loss": {"fp32": fp32[-1], "bf16": bf16[-1]},
        "seconds": {"fp32": round(fp32_s, 1), "bf16": round(bf16_s, 1)},
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.method}, {len(fp32)} steps: loss {fp32[0]:.4f} → {fp32[-1]:.4f} (fp32), "
          f"{bf16[0]:.4f} → {bf16[-1]:.4f} (bf16)")
    print(f"|bf16 − fp32| per step: max {max(gaps):.4f} (max relative {max(relative):.2%}), "
          f"mean {statistics.fmean(gaps):.4f}; wall {fp32_s:.0f} s fp32, {bf16_s:.0f} s bf16")


if __name__ == "__main__":
    main()
