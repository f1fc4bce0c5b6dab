"""Throughput of 1 vs N ranks per engine, and checkpoint save / load times, in one invocation.

    python bench/distributed.py [--engines ddp,fsdp2,ds_z2,ds_z3] [--ranks 2] [--steps 10] [--json]

Workload: full fine-tuning of a small random Qwen2 (hidden 256, 4 layers, 4 heads / 2 KV heads, MLP 1024, ~6 M
parameters with a 4096-token BPE vocabulary trained on the data), fp32 on CPU, 4 samples per rank per step, no
accumulation, AdamW at lr 1e-4, cutoff 256. Data: LLaMA-Factory's ``alpaca_en_demo.json`` from ../shared when
present, else the packaged identity dataset. Per-rank batch is fixed, so N ranks train N× the samples per
step: perfect scaling is a ratio of N.

Every (engine, ranks) runs as its own torchrun job (this script with ``--worker``) using tunesmith's own
pieces: ``create_engine`` → ``engine.setup`` → the loop's ``train_step`` over ``EpochLoader`` windows. After
2 warm-up steps, ``--steps`` steps are timed between barriers; tokens/s counts target tokens over all ranks.
Then one ``engine.save_checkpoint`` (timed, ending when the checkpoint is complete on disk) and one
``engine.load_checkpoint`` of it into the same model and optimizer. Torch threads per rank = CPU cores //
ranks, so a 1-rank run may use every core; ratios are against the 1-rank run of the same engine measured in
the same invocation (and the plain one-process ``single`` run). On a machine shared with other work, numbers
carry its load: the 1-minute load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"
ENGINES = {  # name in the table → config overrides
    "single": ["engine=single"],
    "ddp": ["engine=ddp"],
    "fsdp2": ["engine=fsdp2"],
    "ds_z2": ["deepspeed=ds_z2"],
    "ds_z3": ["deepspeed=ds_z3"],
    "ds_z2_offload": ["deepspeed=ds_z2_offload"],
}


# ------------------------------------------------------------------------------------------------ setup


def build_workload(root: Path) -> Path:
    """A small random Qwen2 with a BPE tokenizer trained on the data, and a config for it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    if SHARED_DATA.is_file():
        rows = json.loads(SHARED_DATA.read_text(encoding="utf-8"))
    else:
        from importlib import resources

        text = (resources.files("tunesmith") / "resources" / "demo" / "identity.json").read_text("utf-8")
        rows = [{**row, "output": row["output"].replace("{{name}}", "Tuney")} for row in json.loads(text)]
    data = root / "data.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator((" ".join(str(v) for v in row.values()) for row in rows), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    model_dir = root / "model"
    fast.save_pretrained(model_dir)
    config = Qwen2Config(
        vocab_size=len(fast),
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(0)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    cfg = {
        "model_name_or_path": str(model_dir),
        "template": "chatml",
        "dataset": str(data),
        "cutoff_len": 256,
        "finetuning_type": "full",
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-4,
        "device": "cpu",
        "logging_steps": 1000,
        "seed": 1,
    }
    path = root / "bench.yaml"
    path.write_text(json.dumps(cfg), encoding="utf-8")  # JSON is YAML
    return path


# ----------------------------------------------------------------------------------------------- worker


def worker(config: str, overrides: list[str], steps: int, result_file: str, checkpoint_root: str) -> None:
    import torch

    from tunesmith.config import load_config
    from tunesmith.data import prepare_datasets
    from tunesmith.data.loader import EpochLoader
    from tunesmith.logging import setup_logging
    from tunesmith.model.adapt import apply_finetuning
    from tunesmith.model.load import load_model, load_tokenizer
    from tunesmith.train.distributed import dist_info, shutdown_distributed
    from tunesmith.train.engines import create_engine
    from tunesmith.train.loop import seed_everything, train_step
    from tunesmith.train.objectives import create_objective
    from tunesmith.train.optim import build_scheduler
    from tunesmith.train.state import TrainState

    setup_logging()
    cfg = load_config(config, [*overrides, f"output_dir={checkpoint_root}", f"max_steps={steps + 2}"])
    world = dist_info().world_size
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    engine = create_engine(cfg, torch.device("cpu"))  # joins the process group (torchrun) unless single
    device = engine.device
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    data = prepare_datasets(cfg, tokenizer)
    model = apply_finetuning(load_model(cfg.model_name_or_path, dtype=torch.float32, device=device), cfg)
    total = steps + 2
    engine.setup(model, cfg, total)
    scheduler = build_scheduler(engine.optimizer, cfg, total)
    engine.model.train()
    loader = EpochLoader(
        data.train,
        cfg.per_device_train_batch_size,
        tokenizer.pad_token_id,
        cfg.seed,
        rank=engine.comm.rank,
        world_size=engine.comm.world_size,
    )
    windows = (window for epoch in range(1000) for _, window in loader.windows(epoch, 0, 1))
    objective = create_objective(cfg)

    def step() -> int:
        tokens = train_step(engine, objective, next(windows)).tokens
        scheduler.step()
        return tokens

    for _ in range(2):  # warm-up: allocations, DeepSpeed's first-step setup
        step()
    engine.comm.barrier()
    start = time.perf_counter()
    tokens = sum(step() for _ in range(steps))
    engine.comm.barrier()
    elapsed = time.perf_counter() - start

    state = TrainState(global_step=total, total_steps=total, world_size=engine.comm.world_size)
    engine.comm.barrier()
    start = time.perf_counter()
    path = engine.save_checkpoint(Path(checkpoint_root), tokenizer, scheduler, state)
    save_s = time.perf_counter() - start
    engine.comm.barrier()
    start = time.perf_counter()
    engine.load_checkpoint(path, scheduler)
    engine.comm.barrier()
    load_s = time.perf_counter() - start
    if engine.comm.is_main:
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        Path(result_file).write_text(
            json.dumps(
                {
                    "tokens_per_s": tokens / elapsed,
                    "step_ms": 1000 * elapsed / steps,
                    "save_s": save_s,
                    "load_s": load_s,
                    "checkpoint_mb": size / 2**20,
                }
            )
        )
    shutdown_distributed()


# ----------------------------------------------------------------------------------------------- parent


def run(config: Path, engine: str, ranks: int, steps: int, work: Path) -> dict:
    result = work / f"{engine}-{ranks}.json"
    checkpoints = work / f"ckpt-{engine}-{ranks}"
    worker_args = [
        str(Path(__file__).resolve()),
        "--worker",
        str(config),
        "--steps",
        str(steps),
        "--result",
        str(result),
        "--checkpoints",
        str(checkpoints),
        "--",
        *ENGINES[engine],
    ]
    if engine == "single":
        cmd = [sys.executable, *worker_args]
    else:
        from tunesmith.runenv import free_port

        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={ranks}",
            f"--master-port={free_port()}",
            *worker_args,
        ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(cmd, capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"}, cwd=work)
    if done.returncode != 0:
        raise SystemExit(f"{engine} on {ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    shutil.rmtree(checkpoints, ignore_errors=True)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--engines", default="ddp,fsdp2,ds_z2,ds_z3", help=f"comma list of {', '.join(ENGINES)}"
    )
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoints", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.overrides, args.steps, args.result, args.checkpoints)
        return

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # a CPU benchmark: no accelerator guess (and its warning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        parser.error(f"unknown engine(s) {unknown}; choose from {', '.join(ENGINES)}")
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-") as tmp:
        work = Path(tmp)
        config = build_workload(work)
        load_before = os.getloadavg()[0]
        results = {("single", 1): run(config, "single", 1, args.steps, work)}
        for engine in engines:
            for ranks in (1, args.ranks):
                print(f"running {engine} on {ranks} rank(s) ...", file=sys.stderr, flush=True)
                results[(engine, ranks)] = run(config, engine, ranks, args.steps, work)
        load_after = os.getloadavg()[0]

    rows = []
    base = results[("single", 1)]["tokens_per_s"]
    for (engine, ranks), r in results.items():
        one = results[(engine, 1)]["tokens_per_s"]
        rows.append(
            {
                "engine": engine,
                "ranks": ranks,
                **r,
                "vs_1_rank": r["tokens_per_s"] / one,
                "vs_single": r["tokens_per_s"] / base,
            }
        )
    if args.json:
        print(
            json.dumps(
                {"rows": rows, "load_avg": [load_before, load_after], "cores": os.cpu_count()}, indent=1
            )
        )
        return
    print(
        f"small Qwen2 (hidden 256, 4 layers, vocab 4096), full fine-tuning fp32, 4 samples/rank/step, "
        f"{args.steps} timed steps; {os.cpu_count()} CPU cores, load avg {load_before:.1f} → {load_after:.1f}"
    )
    print("| engine | ranks | tokens/s | × 1 rank | × single | step ms | save s | load s | checkpoint MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['engine']} | {r['ranks']} | {r['tokens_per_s']:.0f} | {r['vs_1_rank']:.2f} | "
            f"{r['vs_single']:.2f} | {r['step_ms']:.0f} | {r['save_s']:.2f} | {r['load_s']:.2f} | "
            f"{r['checkpoint_mb']:.1f} |"
        )


if __name__ == "__main__":
    main()
