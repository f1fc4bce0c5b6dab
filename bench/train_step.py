"""Training throughput and memory: tunesmith's loop vs a plain ``transformers.Trainer`` on the demo workload.

    python bench/train_step.py [--steps 20] [--batch-size 8] [--json] [--threads N] [--hf-optim adamw_torch]
    python bench/train_step.py --stage dpo [...]   (tunesmith's DPO vs TRL's DPOTrainer: bench/dpo_step.py)

Workload (both sides): the demo's model (alias ``smollm2-135m-instruct``, fp32, CPU), the demo's LoRA config
(``demo.yaml``: all linear layers, r=16, alpha=32), the packaged identity dataset encoded by
``tunesmith.data.prepare_datasets`` (same ``Encoded`` samples), batch size, lr, cosine schedule with the same
warm-up, grad clipping 1.0, AdamW (same betas/eps, no weight decay), ``--steps`` optimizer steps, seed 42.

Each side runs in its own subprocess (this script with ``--side tunesmith|hf``), one after the other, so peak
RSS (``ru_maxrss``) belongs to one side only; the parent prints a table.

* tunesmith: ``tunesmith.train.train(cfg)`` on ``demo_config(...)`` with ``save_strategy=no`` and
  ``plot_loss=false`` (the HF side saves nothing either).
* hf: ``Trainer`` + ``DataCollatorForSeq2Seq(label_pad_token_id=-100, padding=True)``. The model is built the
  way ``train()`` builds it, in the same order after the same ``seed_everything(seed)``: tokenizer →
  ``prepare_datasets`` → ``load_model(fp32)`` → ``apply_finetuning`` (PEFT ``LoraConfig``), so both sides start
  from identical trainable params. In transformers 5.x ``TrainingArguments`` has no ``warmup_ratio``; a float
  ``warmup_steps`` < 1 is the ratio (both give ceil(ratio × steps)). ``--hf-optim`` defaults to
  ``adamw_torch``, the same ``torch.optim.AdamW`` implementation tunesmith uses (the HF default on torch ≥ 2.8
  is ``adamw_torch_fused``; pass that to see the difference).

Fair timing: model loading / GGUF conversion, data preparation and the first (warm-up) optimizer step are
excluded identically on both sides. Each side stamps ``time.perf_counter()`` once per optimizer step from its
own per-step hook — tunesmith's ``train(cfg, callbacks=[...])`` (runs after the step, its log line and
eval/save), HF's ``TrainerCallback.on_step_end`` (runs after the step, before HF's log) — and the train time is
stamp[N] − stamp[1], i.e. steps 2..N, including each side's own data collation, loss, backward, clipping,
optimizer, scheduler, logging and progress bar. (The windows differ by one log event, ~1 ms.)
Target tokens = label positions that are predicted after the causal shift (``labels[:, 1:] != -100``), counted
for the same steps 2..N: on HF inside ``training_step`` (a subclass that only counts), on tunesmith by replaying
its deterministic ``EpochLoader`` after training (no overhead in the loop). Padded tokens (batch × longest) are
in the JSON too. Data order: tunesmith draws ``torch.randperm`` from a generator seeded with seed + epoch, and
so does HF's sampler (accelerate's ``SeedableRandomSampler``), so with the same seed both sides see the same
batches; the parent checks the per-step target counts and says whether they matched.
Final loss: the last logged loss (mean over the last ``logging_steps`` steps) and the last step's loss of each
side. Same init, batches, lr and optimizer → equal up to float noise.

The machine may be shared: wall-clock numbers then carry other processes' load, and so do CPU-seconds (with
more busy threads than cores, torch's OpenMP threads spin while waiting for a descheduled peer; a run next to
another training job measured 7x the CPU-seconds per step). The table gives the median step time and target
tokens per CPU-second of the side's own process (``time.process_time()`` over the same window) besides the
mean, and the parent prints the 1-minute load average before and after each side: only compare runs made on
an otherwise idle machine. The sides run one after the other (tunesmith first), never at the same time.
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

SIDES = ("tunesmith", "hf")
DEMO_NAME, DEMO_AUTHOR = "Tuney", "the tunesmith team"


# ------------------------------------------------------------------------------------------------ shared


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build_config(steps: int, batch_size: int | None, output_dir: str) -> Any:
    from tunesmith.demo import demo_config

    # quoted: the override parser reads values as YAML, where a bare `no` is the boolean false
    overrides = ['save_strategy="no"', "plot_loss=false", "device=cpu", "overwrite_output_dir=true"]
    if batch_size is not None:
        overrides.append(f"per_device_train_batch_size={batch_size}")
    return demo_config(DEMO_NAME, DEMO_AUTHOR, steps, output_dir, overrides)


class _TrainableCapture:
    """Catches the 'trainable params: ...' line that apply_finetuning logs (both sides call it)."""

    def __init__(self) -> None:
        import logging

        self.text: str | None = None
        outer = self

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                message = record.getMessage()
                if "trainable params" in message:
                    outer.text = message.split("trainable params: ", 1)[-1]

        from tunesmith.logging import get_logger, setup_logging

        setup_logging()
        get_logger().addHandler(Handler())


def now() -> tuple[float, float]:
    """(wall clock, CPU seconds of this process, all threads): the per-step stamp of both sides."""
    return time.perf_counter(), time.process_time()


def common_result(cfg: Any, stamps: dict[int, tuple[float, float]], targets: list[int], padded: list[int],
                  peak: float, capture: _TrainableCapture) -> dict[str, Any]:
    import statistics

    import torch

    steps = cfg.max_steps
    seconds = stamps[steps][0] - stamps[1][0]
    cpu_seconds = stamps[steps][1] - stamps[1][1]
    step_seconds = [stamps[k][0] - stamps[k - 1][0] for k in range(2, steps + 1)]
    timed_targets = sum(targets[1:steps])
    timed_padded = sum(padded[1:steps])
    return {
        "steps": steps,
        "timed_steps": steps - 1,
        "batch_size": cfg.per_device_train_batch_size,
        "target_tokens": timed_targets,
        "padded_tokens": timed_padded,
        "train_seconds": seconds,
        "target_tokens_per_s": timed_targets / seconds,
        "padded_tokens_per_s": timed_padded / seconds,
        "seconds_per_step": seconds / (steps - 1),
        "median_step_seconds": statistics.median(step_seconds),
        "step_seconds": [round(x, 3) for x in step_seconds],
        "step_targets": targets[:steps],
        "cpu_seconds": cpu_seconds,
        "target_tokens_per_cpu_s": timed_targets / cpu_seconds,
        "peak_rss_mib": peak,
        "threads": torch.get_num_threads(),
        "trainable": capture.text,
    }


# ------------------------------------------------------------------------------------------- tunesmith side


def run_tunesmith(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import torch

    from tunesmith.train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    capture = _TrainableCapture()
    cfg = build_config(args.steps, args.batch_size, str(workdir / "tunesmith-run"))
    stamps: dict[int, tuple[float, float]] = {}

    def stamp(state: Any) -> None:
        stamps[state.global_step] = now()

    started = time.perf_counter()
    result = train(cfg, callbacks=[stamp])
    wall = time.perf_counter() - started
    peak = peak_rss_mib()  # before the replay below, which only adds a tokenizer

    targets, padded = replay_tunesmith_batches(cfg, result.global_step)
    out = common_result(cfg, stamps, targets, padded, peak, capture)
    log = [json.loads(line) for line in (Path(result.output_dir) / "trainer_log.jsonl").read_text().splitlines()]
    losses = [e for e in log if "loss" in e]
    out.update({
        "final_step_loss": result.final_loss,
        "final_logged_loss": losses[-1]["loss"] if losses else None,
        "loop_logged_tokens_per_s": [round(e["tokens_per_s"], 1) for e in losses],
        "wall_seconds_incl_setup": wall,
    })
    return out


def replay_tunesmith_batches(cfg: Any, steps: int) -> tuple[list[int], list[int]]:
    """Target / padded tokens per optimizer step, from the loop's own deterministic EpochLoader."""
    from tunesmith.data import prepare_datasets
    from tunesmith.data.loader import EpochLoader
    from tunesmith.model.load import load_tokenizer

    tokenizer = load_tokenizer(cfg.model_name_or_path, cache_dir=cfg.cache_dir)
    data = prepare_datasets(cfg, tokenizer).train
    loader = EpochLoader(data, cfg.per_device_train_batch_size, 0, cfg.seed)
    targets: list[int] = []
    padded: list[int] = []
    epoch = 0
    while len(targets) < steps:
        for _, window in loader.windows(epoch, 0, cfg.gradient_accumulation_steps):
            targets.append(sum(b.num_targets for b in window))
            padded.append(sum(b.input_ids.numel() for b in window))
            if len(targets) == steps:
                break
        epoch += 1
    return targets, padded


# -------------------------------------------------------------------------------------------------- HF side


def run_hf(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from tunesmith.data import prepare_datasets
    from tunesmith.model.adapt import apply_finetuning
    from tunesmith.model.load import load_model, load_tokenizer
    from tunesmith.train.loop import seed_everything

    if args.threads:
        torch.set_num_threads(args.threads)
    capture = _TrainableCapture()
    cfg = build_config(args.steps, args.batch_size, str(workdir / "hf-run"))

    started = time.perf_counter()
    # the same order as tunesmith.train.train(), so the LoRA init draws the same random numbers
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model_name_or_path, cache_dir=cfg.cache_dir)
    tokenizer.padding_side = "right"  # as tunesmith's collate (the tokenizer's default too)
    data = prepare_datasets(cfg, tokenizer)
    model = load_model(cfg.model_name_or_path, dtype=torch.float32, cache_dir=cfg.cache_dir, device="cpu")
    model = apply_finetuning(model, cfg)
    # plain lists: HF's collator pads python, numpy or torch objects, not tunesmith's int32 TokenIds arrays
    train_dataset = [{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in data.train]

    training_args = TrainingArguments(
        output_dir=str(workdir / "hf-run"),
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps > 0 else cfg.warmup_ratio,  # float < 1: a ratio
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_epsilon,
        max_grad_norm=cfg.max_grad_norm,
        optim=args.hf_optim,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=cfg.seed,
        label_names=["labels"],
    )
    stamps: dict[int, tuple[float, float]] = {}
    targets: list[int] = []
    padded: list[int] = []
    step_losses: list[Any] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps[state.global_step] = now()

    class CountingTrainer(Trainer):
        """A plain Trainer that only counts the tokens of each micro-batch (gradient accumulation 1 → per step)."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            labels = inputs["labels"]
            targets.append(int((labels[:, 1:] != -100).sum()))
            padded.append(inputs["input_ids"].numel())
            loss = super().training_step(model, inputs, num_items_in_batch)
            step_losses.append(loss)
            return loss

    trainer = CountingTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True),
        callbacks=[Stamp()],
    )
    trainer.train()
    wall = time.perf_counter() - started
    peak = peak_rss_mib()

    ga = cfg.gradient_accumulation_steps
    step_targets = [sum(targets[i : i + ga]) for i in range(0, len(targets), ga)]
    step_padded = [sum(padded[i : i + ga]) for i in range(0, len(padded), ga)]
    out = common_result(cfg, stamps, step_targets, step_padded, peak, capture)
    losses = [e for e in trainer.state.log_history if "loss" in e]
    out.update({
        "final_step_loss": float(sum(step_losses[-ga:])) if step_losses else None,
        "final_logged_loss": losses[-1]["loss"] if losses else None,
        "wall_seconds_incl_setup": wall,
        "hf_optim": args.hf_optim,
    })
    return out


# --------------------------------------------------------------------------------------------------- parent


def run_side(side: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    result_path = workdir / f"{side}.json"
    log_path = workdir / f"{side}.log"
    command = [sys.executable, os.path.abspath(__file__), "--side", side, "--workdir", str(workdir),
               "--steps", str(args.steps), "--hf-optim", args.hf_optim]
    if args.batch_size is not None:
        command += ["--batch-size", str(args.batch_size)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    result_path.unlink(missing_ok=True)  # a kept --workdir must not pass off an old result as this run's
    print(f"running {side} ({args.steps} steps)... log: {log_path}", file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]
    with log_path.open("w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0 or not result_path.is_file():
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise SystemExit(f"{side} side failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    result["load_avg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def print_table(results: dict[str, dict[str, Any]]) -> None:
    header = ("side", "steps", "timed", "target tok", "train s", "s/step", "median s/step", "target tok/s",
              "target tok/CPU-s", "peak RSS MiB", "final loss (logged / last step)")
    rows = [header]
    for side, r in results.items():
        rows.append((side, str(r["steps"]), str(r["timed_steps"]), str(r["target_tokens"]),
                     f"{r['train_seconds']:.2f}", f"{r['seconds_per_step']:.3f}",
                     f"{r['median_step_seconds']:.3f}", f"{r['target_tokens_per_s']:.1f}",
                     f"{r['target_tokens_per_cpu_s']:.2f}",
                     f"{r['peak_rss_mib']:.0f}", f"{_num(r['final_logged_loss'])} / {_num(r['final_step_loss'])}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths,
                                                                                                    strict=True))))
        if index == 0:
            print("  ".join("-" * w for w in widths))


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    ts, hf = results["tunesmith"], results["hf"]
    return {
        "target_tokens_per_s": ts["target_tokens_per_s"] / hf["target_tokens_per_s"],
        "padded_tokens_per_s": ts["padded_tokens_per_s"] / hf["padded_tokens_per_s"],
        "target_tokens_per_cpu_s": ts["target_tokens_per_cpu_s"] / hf["target_tokens_per_cpu_s"],
        "seconds_per_step": ts["seconds_per_step"] / hf["seconds_per_step"],
        "median_step_seconds": ts["median_step_seconds"] / hf["median_step_seconds"],
        "peak_rss": ts["peak_rss_mib"] / hf["peak_rss_mib"],
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--stage" in argv:  # another stage's comparison lives in its own script
        at = argv.index("--stage")
        stage, rest = argv[at + 1] if at + 1 < len(argv) else "", argv[:at] + argv[at + 2:]
        if stage == "dpo":
            sys.path.insert(0, str(Path(__file__).parent))
            from dpo_step import main as dpo_main

            return dpo_main(rest)
        if stage != "sft":
            raise SystemExit(f"--stage {stage!r}: sft (this script) or dpo (bench/dpo_step.py)")
        argv = rest
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per side (step 1 is not timed)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the demo config's")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON object")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads on both sides "
                        "(default: torch's default, the same on both)")
    parser.add_argument("--hf-optim", default="adamw_torch", help="TrainingArguments.optim of the HF side")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help="keep the run folders, logs and per-side results here "
                        "(default: a temporary folder, deleted)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (step 1 is the untimed warm-up)")

    if args.side:  # child: run one side, write its result file
        workdir = Path(args.workdir)
        result = (run_tunesmith if args.side == "tunesmith" else run_hf)(args, workdir)
        (workdir / f"{args.side}.json").write_text(json.dumps(result, indent=1))
        return 0

    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        results = {side: run_side(side, args, workdir) for side in SIDES}
    else:
        with tempfile.TemporaryDirectory(prefix="tunesmith-bench-") as tmp:
            results = {side: run_side(side, args, Path(tmp)) for side in SIDES}
    threads = {r["threads"] for r in results.values()}
    if len(threads) != 1:
        print(f"warning: the sides ran with different torch thread counts: {threads}", file=sys.stderr)
    trainable = {r["trainable"] for r in results.values()}
    print(f"\nSmolLM2-135M-Instruct LoRA (demo config), fp32 CPU, {results['hf']['threads']} torch threads, "
          f"batch size {results['hf']['batch_size']}, timed steps 2..{args.steps}; HF optim {args.hf_optim}")
    print("trainable: " + " | ".join(sorted(t or "?" for t in trainable)))
    print(f"1-min load average before → after each side ({os.cpu_count()} CPUs; this run adds ~"
          f"{results['hf']['threads']}): " + ", ".join(
              f"{side} {r['load_avg_1min'][0]} → {r['load_avg_1min'][1]}" for side, r in results.items()))
    same = results["tunesmith"]["step_targets"] == results["hf"]["step_targets"]
    print("same batches on both sides (per-step target counts): " + ("yes" if same else "NO"))
    print_table(results)
    r = ratios(results)
    print(f"\ntunesmith / HF: target tok/s ×{r['target_tokens_per_s']:.3f}, target tok/CPU-s "
          f"×{r['target_tokens_per_cpu_s']:.3f}, padded tok/s ×{r['padded_tokens_per_s']:.3f}, "
          f"s/step ×{r['seconds_per_step']:.3f}, median s/step ×{r['median_step_seconds']:.3f}, "
          f"peak RSS ×{r['peak_rss']:.3f}")
    print("tunesmith loop's own logged tokens/s per interval: "
          + ", ".join(str(v) for v in results["tunesmith"]["loop_logged_tokens_per_s"]))
    if args.json:
        print(json.dumps({"sides": results, "ratio_tunesmith_over_hf": r}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
