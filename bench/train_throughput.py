"""Packed vs unpacked training throughput: target tokens per second and padding waste.

    python bench/train_throughput.py [--steps 6] [--batch-size 4] [--cutoff-len 1024] [--max-samples 200]
                                     [--data /work/shared/data/alpaca_en_demo.json] [--json]

Workload: SmolLM2-135M-Instruct (alias ``smollm2-135m-instruct``, fp32, CPU) with LoRA on all linear layers
(r=8), ``template: chatml``, the alpaca demo file, ``--steps`` optimizer steps of ``--batch-size`` rows, seed 42;
once with one sample per row and once with ``packing: true``. Both runs go through ``tunesmith.train.train``.

Timing: steps 2..N (step 1 warms up), from the per-step ``elapsed`` and ``tokens_per_s`` of trainer_log.jsonl
(``logging_steps: 1``): target tokens = label positions predicted after the causal shift. Padding waste = the
fraction of pad positions in the batches those steps ran (the EpochLoader's deterministic order replayed);
epoch waste = the same over every batch of the first epoch (a property of the rows, not of the steps sampled).
Packed rows hold more samples per step, so compare tokens/s, not steps/s. On a shared machine the absolute
numbers carry other processes' load; the ratio is the point.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def run(mode: str, args: argparse.Namespace, out_dir: Path) -> dict:
    from tunesmith.config import Config
    from tunesmith.data import prepare_datasets
    from tunesmith.data.loader import EpochLoader
    from tunesmith.model.load import load_tokenizer
    from tunesmith.train import train
    from tunesmith.train.observe import read_log

    cfg = Config(
        model_name_or_path="smollm2-135m-instruct",
        finetuning_type="lora",
        lora_target="all",
        template="chatml",
        dataset=[args.data],
        max_samples=args.max_samples,
        cutoff_len=args.cutoff_len,
        packing=mode == "packed",
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        output_dir=str(out_dir / mode),
        device="cpu",
        seed=42,
    )
    train(cfg)
    log = [e for e in read_log(out_dir / mode) if "tokens_per_s" in e]
    timed = log[1:]  # step 1 warms up
    seconds = sum(b["elapsed"] - a["elapsed"] for a, b in zip(log, log[1:], strict=False))
    targets = sum(
        e["tokens_per_s"] * (b["elapsed"] - a["elapsed"])
        for a, b, e in zip(log, log[1:], timed, strict=False)
    )
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    rows = prepare_datasets(cfg, tokenizer).train  # the automatic cache: no second preprocessing
    loader = EpochLoader(rows, args.batch_size, 0, cfg.seed)
    real = padded = samples = 0
    for ids in loader.batch_indices(0)[1 : args.steps]:  # the batches of steps 2..N (no accumulation)
        lengths = [len(rows[i].input_ids) for i in ids]
        real += sum(lengths)
        padded += max(lengths) * len(lengths)
        samples += sum(len(getattr(rows[i], "seq_lens", [0])) for i in ids)
    epoch_real = epoch_padded = 0
    for ids in loader.batch_indices(0):  # every batch of the first epoch: the data property, not a sample
        lengths = [len(rows[i].input_ids) for i in ids]
        epoch_real += sum(lengths)
        epoch_padded += max(lengths) * len(lengths)
    return {
        "mode": mode,
        "rows": len(rows),
        "samples_per_step": samples / max(len(timed), 1),
        "target_tokens_per_s": targets / max(seconds, 1e-9),
        "padding_waste": 1 - real / max(padded, 1),
        "epoch_padding_waste": 1 - epoch_real / max(epoch_padded, 1),
        "step_s": seconds / max(len(timed), 1),
        "final_loss": log[-1]["loss"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cutoff-len", type=int, default=1024)
    parser.add_argument("--max-samples", type=int, default=200)
    parser.add_argument("--data", default="/work/shared/data/alpaca_en_demo.json")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(mode, args, Path(tmp)) for mode in ("unpacked", "packed")]
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(
        f"{'mode':<10} {'rows':>6} {'samples/step':>13} {'target tok/s':>13} {'pad waste':>10} "
        f"{'epoch waste':>12} {'s/step':>8}"
    )
    for r in results:
        print(
            f"{r['mode']:<10} {r['rows']:>6} {r['samples_per_step']:>13.1f} {r['target_tokens_per_s']:>13.1f} "
            f"{r['padding_waste']:>10.1%} {r['epoch_padding_waste']:>12.1%} {r['step_s']:>8.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
