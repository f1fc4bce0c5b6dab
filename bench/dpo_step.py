"""DPO throughput and memory: tunesmith's ``stage: dpo`` vs TRL's ``DPOTrainer`` on the same model, data and batch.

    python bench/train_step.py --stage dpo [--steps 8] [--batch-size 4] [--pairs 64] [--json]
    python bench/dpo_step.py [same options]

Workload (both sides): SmolLM2-135M-Instruct (alias ``smollm2-135m-instruct``, fp32, CPU), LoRA on all linear
layers (r=16, alpha=32), sigmoid DPO with beta 0.1, the reference being the policy with its adapter switched off
on both sides (TRL does the same for a PEFT model), no gradient checkpointing, AdamW, constant lr. The pairs are
LLaMA-Factory's dpo_en_demo (``../shared/lf/data``) filtered to those short enough (≤ ``--max-chars``) that neither
side truncates, or, without ../shared, a synthetic set. The prompt is rendered with the chatml template for both
(TRL gets the rendered prompt text and the replies followed by ``<|im_end|>\\n``), so both see the same text.

Each side runs in its own subprocess (peak RSS = ``ru_maxrss`` of that side alone), one after the other. Timed:
optimizer steps 2..N (stamped after each step by each side's own per-step hook); tokens = the real (non-pad)
tokens of the policy's chosen and rejected rows of those steps, counted by each side on its own batches.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIDES = ("tunesmith", "trl")
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "lf" / "data" / "dpo_en_demo.json"


def pairs(count: int, max_chars: int) -> list[dict[str, str]]:
    """(question, chosen, rejected) texts: dpo_en_demo's short pairs, or synthetic ones without ../shared."""
    rows: list[dict[str, str]] = []
    if SHARED.is_file():
        for row in json.loads(SHARED.read_text(encoding="utf-8")):
            question = row["conversations"][-1]["value"]
            chosen, rejected = row["chosen"]["value"], row["rejected"]["value"]
            if len(row["conversations"]) == 1 and len(question) + max(len(chosen), len(rejected)) <= max_chars:
                rows.append({"question": question, "chosen": chosen, "rejected": rejected})
    while len(rows) < count:
        i = len(rows)
        rows.append({"question": f"Describe item number {i} in two sentences.",
                     "chosen": f"Item {i} is a small, sturdy object. It is useful in many everyday situations.",
                     "rejected": "I don't know."})
    return rows[:count]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def result(stamps: dict[int, float], tokens: list[int], steps: int, final_loss: float) -> dict[str, Any]:
    seconds = stamps[steps] - stamps[1]
    timed = sum(tokens[1:steps])
    return {"steps": steps, "train_seconds": seconds, "tokens": timed, "tokens_per_s": timed / seconds,
            "seconds_per_step": seconds / (steps - 1), "peak_rss_mib": peak_rss_mib(), "final_loss": final_loss,
            "step_tokens": tokens[:steps]}


def run_tunesmith(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from tunesmith.config import load_config
    from tunesmith.data import prepare_datasets
    from tunesmith.data.loader import EpochLoader
    from tunesmith.data.pairs import PairCollator
    from tunesmith.model.load import load_tokenizer
    from tunesmith.train import train

    data = workdir / "data"
    data.mkdir(exist_ok=True)
    rows = [{"instruction": r["question"], "input": "", "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in pairs(args.pairs, args.max_chars)]
    (data / "prefs.json").write_text(json.dumps(rows), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"prefs": {"file_name": "prefs.json", "ranking": True}}))
    cfg = load_config(None, [
        "model_name_or_path=smollm2-135m-instruct", "stage=dpo", "finetuning_type=lora", "lora_target=all",
        "lora_rank=16", "lora_alpha=32", "template=chatml", "dataset=prefs", f"dataset_dir={data}",
        f"cutoff_len={args.cutoff}", f"per_device_train_batch_size={args.batch_size}", f"max_steps={args.steps}",
        "learning_rate=5e-6", "lr_scheduler_type=constant", "pref_beta=0.1", "logging_steps=1",
        'save_strategy="no"', "device=cpu", f"output_dir={workdir / 'tunesmith-run'}", "overwrite_output_dir=true",
    ])
    stamps: dict[int, float] = {}
    outcome = train(cfg, callbacks=[lambda state: stamps.__setitem__(state.global_step, time.perf_counter())])
    peak = peak_rss_mib()
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    loader = EpochLoader(prepare_datasets(cfg, tokenizer).train, args.batch_size, seed=cfg.seed,
                         collator=PairCollator(tokenizer.pad_token_id or 0))
    tokens = [int(window[0].attention_mask.sum()) for _, window in loader.windows(0, 0, 1)]
    out = result(stamps, tokens, args.steps, outcome.final_loss)
    out["peak_rss_mib"] = peak
    return out


def run_trl(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from tunesmith.model.resolve import resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct", None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = [{"prompt": f"<|im_start|>user\n{r['question']}<|im_end|>\n<|im_start|>assistant\n",
             "chosen": r["chosen"] + "<|im_end|>\n", "rejected": r["rejected"] + "<|im_end|>\n"}
            for r in pairs(args.pairs, args.max_chars)]
    tokens: list[int] = []
    stamps: dict[int, float] = {}

    class Counting(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
            tokens.append(int(inputs["attention_mask"].sum()))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class Stamp(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):  # noqa: ANN001
            stamps[state.global_step] = time.perf_counter()

    config = DPOConfig(output_dir=str(workdir / "trl-run"), beta=0.1, loss_type=["sigmoid"], learning_rate=5e-6,
                       lr_scheduler_type="constant", per_device_train_batch_size=args.batch_size,
                       max_steps=args.steps, max_length=args.cutoff, use_cpu=True, bf16=False, fp16=False,
                       gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no",
                       seed=42, dataloader_num_workers=0)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = Counting(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                       processing_class=tokenizer, peft_config=lora, callbacks=[Stamp()])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return result(stamps, tokens, args.steps, losses[-1] if losses else float("nan"))


def run_side(side: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--side", side, "--workdir", str(workdir),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--pairs", str(args.pairs),
               "--max-chars", str(args.max_chars), "--cutoff", str(args.cutoff)]
    log_path = workdir / f"{side}.log"
    print(f"running {side} ({args.steps} steps)... log: {log_path}", file=sys.stderr, flush=True)
    with log_path.open("w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise SystemExit(f"{side} side failed (exit {proc.returncode}):\n{tail}")
    return json.loads((workdir / f"{side}.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per side (step 1 is not timed)")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--pairs", type=int, default=64, help="pairs in the dataset")
    parser.add_argument("--max-chars", type=int, default=1200, help="longest prompt + reply kept from dpo_en_demo")
    parser.add_argument("--cutoff", type=int, default=1024, help="cutoff_len / max_length (nothing reaches it)")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        workdir = Path(args.workdir)
        out = (run_tunesmith if args.side == "tunesmith" else run_trl)(args, workdir)
        (workdir / f"{args.side}.json").write_text(json.dumps(out, indent=1))
        return 0
    with tempfile.TemporaryDirectory(prefix="tunesmith-dpo-bench-") as tmp:
        results = {side: run_side(side, args, Path(tmp)) for side in SIDES}
    print(f"\nDPO (sigmoid, beta 0.1), SmolLM2-135M-Instruct LoRA r16 all-linear, fp32 CPU, {args.batch_size} pairs "
          f"per step, timed steps 2..{args.steps}, {args.pairs} pairs"
          f"{' from dpo_en_demo' if SHARED.is_file() else ' (synthetic)'}")
    print(f"{'side':10} {'tokens':>8} {'s/step':>8} {'tokens/s':>9} {'peak RSS MiB':>13} {'final loss':>10}")
    for side, r in results.items():
        print(f"{side:10} {r['tokens']:>8} {r['seconds_per_step']:>8.2f} {r['tokens_per_s']:>9.1f} "
              f"{r['peak_rss_mib']:>13.0f} {r['final_loss']:>10.4f}")
    ts, trl = results["tunesmith"], results["trl"]
    print(f"\ntunesmith / TRL: tokens/s ×{ts['tokens_per_s'] / trl['tokens_per_s']:.3f}, "
          f"peak RSS ×{ts['peak_rss_mib'] / trl['peak_rss_mib']:.3f}")
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
