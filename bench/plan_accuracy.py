"""How close `tunesmith plan` comes to reality: predicted vs measured peak memory of real CPU runs, the model-state
figures vs DeepSpeed's own estimators, and the 7B figures people quote.

    python bench/plan_accuracy.py [--models tiny,smollm2] [--runs full,lora,qlora,zero2,zero3,full_ckpt]
                                  [--json out.json] [--skip-measure]

Measured peak memory (one definition everywhere): per process, ``VmHWM`` (the kernel's high-water mark of
the resident set) at the end of the last training step, minus the resident set right after the imports (torch,
transformers, peft, tunesmith's train/data/model modules, deepspeed for ZeRO runs, and the modules PEFT's LoRA
dispatch imports on first use for LoRA runs). So it counts everything
a run adds: model load, tokenizer and data, weights, gradients, optimizer states, activations, buffers and
allocator slack; it excludes the final save. Runs with 2 ranks report the larger of the two ranks.

Workload: fp32 on CPU, 2 optimizer steps, micro-batch 2 × cutoff_len 256 tokens (``--batch``, ``--cutoff``; every
sample is longer than the cutoff, so each row is exactly cutoff_len tokens), no accumulation, AdamW. Models: ``tiny`` (the test fixture's random
Qwen2: 2 layers, hidden 64, vocab ~400; 125 K parameters) and ``smollm2`` (SmolLM2-135M-Instruct, the packaged
alias). Runs: full, LoRA (r 8, all linear layers), QLoRA (4-bit nf4 + double quantization via bitsandbytes),
ZeRO-2 and ZeRO-3 on 2 ranks (DeepSpeed presets ds_z2 / ds_z3, full fine-tuning), full with gradient checkpointing,
and (with ``--runs ...,ddp,fsdp2``) DDP and FSDP2 on 2 ranks. The mesh layouts: ``sp2``, ``sp2_lora``,
``sp2_fsdp2`` (sequence_parallel_size 2 on 2 ranks; measure them on long rows, e.g. ``--models tiny --runs
ddp,sp2,sp2_lora,sp2_fsdp2 --cutoff 4096``), and ``tp2``, ``tp2_lora`` (tensor_parallel_size 2 on 2 ranks) and
``dp2_tp2`` (4 ranks), which run once the engines run tensor parallel.
Each run is its own process (``--worker``); 2-rank runs go through torchrun exactly as ``tunesmith train
--nproc-per-node 2`` starts its workers (the worker calls ``tunesmith.train.train``, the function torchrun's
tunesmith workers run), with a step callback that reads the high-water mark.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 1024**2
RUNS = {  # name → (config overrides, ranks)
    "full": (["finetuning_type=full"], 1),
    "lora": (["finetuning_type=lora"], 1),
    "qlora": (["finetuning_type=lora", "quantization_bit=4"], 1),
    "zero2": (["finetuning_type=full", "deepspeed=ds_z2"], 2),
    "zero3": (["finetuning_type=full", "deepspeed=ds_z3"], 2),
    "full_ckpt": (["finetuning_type=full", "gradient_checkpointing=true"], 1),
    "ddp": (["finetuning_type=full", "engine=ddp"], 2),
    "fsdp2": (["finetuning_type=full", "engine=fsdp2"], 2),
    "ddp_lora": (["finetuning_type=lora", "engine=ddp"], 2),
    # sequence parallel (Ulysses): 2 ranks, one SP group, each holding half of every row
    "sp2": (["finetuning_type=full", "engine=ddp", "sequence_parallel_size=2"], 2),
    "sp2_lora": (["finetuning_type=lora", "engine=ddp", "sequence_parallel_size=2"], 2),
    "sp2_fsdp2": (["finetuning_type=full", "engine=fsdp2", "sequence_parallel_size=2"], 2),
    # tensor parallel on fsdp2's 2-D mesh: ready for when the engines run it (--runs tp2,tp2_lora,dp2_tp2)
    "tp2": (["finetuning_type=full", "tensor_parallel_size=2"], 2),
    "tp2_lora": (["finetuning_type=lora", "tensor_parallel_size=2"], 2),
    "dp2_tp2": (["finetuning_type=full", "tensor_parallel_size=2"], 4),
}
BASE = [
    "template=chatml", "gradient_accumulation_steps=1",
    "max_steps=2", "save_strategy=no", "eval_strategy=no", "logging_steps=1", "device=cpu",
    "learning_rate=1e-4", "overwrite_output_dir=true", "lora_target=all",
]


def rss_now() -> int:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss() -> int:
    """VmHWM, the peak resident set of this process's own memory (``ru_maxrss`` would carry over an exec the
    parent's size at fork time)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------------- worker


def worker(config: str, overrides: list[str], out: str) -> None:
    """One training process: baseline after imports, train, high-water mark after the last step."""
    import gc

    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import tunesmith.data  # noqa: F401
    import tunesmith.model.adapt  # noqa: F401
    import tunesmith.model.load  # noqa: F401
    from tunesmith.config import load_config
    from tunesmith.train import pipeline

    cfg = load_config(config, overrides)
    if cfg.engine == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed  # noqa: F401
    if cfg.finetuning_type == "lora":
        _import_peft_dispatch()
    gc.collect()
    baseline = rss_now()
    marks: list[int] = []

    def record(_state) -> None:
        marks.append(maxrss())

    how = "tunesmith.train.train"
    if cfg.quantization_bit and "quantiz" not in _source(pipeline.train):
        how = "load_model(quantization=...) + apply_finetuning + fit (train() does not quantize yet)"
        _train_qlora(cfg, record)
    else:
        pipeline.train(cfg, callbacks=[record])
    rank = os.environ.get("RANK", "0")
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({
        "baseline": baseline, "peak": marks[-1], "steps": len(marks), "how": how,
    }))


def _import_peft_dispatch() -> None:
    """PEFT imports its LoRA layer dispatchers' backends on the first ``get_peft_model`` (with gptqmodel installed,
    as scripts/setup.sh does, that import adds ~83 MiB of modules): an import, so it belongs to the baseline."""
    import peft
    import torch

    peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), peft.LoraConfig(r=1, target_modules=["0"]))


def _source(fn) -> str:
    import inspect

    return inspect.getsource(fn)


def _train_qlora(cfg, record) -> None:
    """QLoRA through tunesmith's pieces where train() does not pass quantization on yet."""
    from tunesmith.data import prepare_datasets
    from tunesmith.model.adapt import apply_finetuning
    from tunesmith.model.load import load_model, load_tokenizer, quantization_from_config
    from tunesmith.train.loop import fit

    tokenizer = load_tokenizer(cfg.model_name_or_path)
    data = prepare_datasets(cfg, tokenizer)
    model = load_model(cfg.model_name_or_path, device="cpu", quantization=quantization_from_config(cfg, "fp32"))
    model = apply_finetuning(model, cfg)
    fit(cfg, model, tokenizer, data.train, data.val, device="cpu", resume_from=None, callbacks=[record])


# ----------------------------------------------------------------------------------------------- driver


def make_data(path: Path, cutoff: int, rows: int = 64) -> Path:
    """Rows whose answers are longer than the cutoff, so every sample is exactly cutoff_len tokens (no longer
    than needed: the tokenizer's own memory grows with the text it encodes, and that counts in the runtime)."""
    repeats = max(40, cutoff // 10 + 10)  # one sentence is ~17 SmolLM2 tokens
    text = ("The quick brown fox jumps over the lazy dog while the planner counts every byte. " * repeats).strip()
    items = [{"instruction": f"Question {i}: write a long story.", "input": "", "output": f"{i}. {text}"}
             for i in range(rows)]
    path.write_text("\n".join(json.dumps(item) for item in items) + "\n", encoding="utf-8")
    return path


def model_path(name: str, work: Path) -> str:
    if name == "smollm2":
        return "smollm2-135m-instruct"
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_model  # the fixture's own builder: the same tiny model the tests use

    target = work / "tiny-qwen2"
    if not (target / "config.json").is_file():
        build_tiny_model(target)
    return str(target)


def measure(model: str, run: str, work: Path, shape: list[str]) -> dict:
    overrides, ranks = RUNS[run]
    config = work / "bench.yaml"
    out = work / f"{Path(model).name}-{run}"
    args = [f"model_name_or_path={model}", f"dataset={work / 'data.jsonl'}", f"output_dir={out}-run", *BASE,
            *shape, *overrides]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "TUNESMITH_DATA_CACHE": "0", "HF_HUB_OFFLINE": "1"}
    me = [str(Path(__file__).resolve()), "--worker", str(config), str(out), *args]
    if ranks == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--master-port",
               str(29600 + hash(run) % 300), *me]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}
    shutil.rmtree(f"{out}-run", ignore_errors=True)  # the saved model: up to 0.5 GB per SmolLM2 run
    ranks_data = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(ranks)]
    measured = max(d["peak"] - d["baseline"] for d in ranks_data)
    row = {"measured": measured, "seconds": round(time.perf_counter() - start, 1), "how": ranks_data[0]["how"],
           "args": args, "ranks": ranks, "per_rank": ranks_data}
    return {**row, **predict(args, ranks)}


def predict(args: list[str], ranks: int) -> dict:
    from tunesmith.config import load_config
    from tunesmith.plan import plan_config

    cfg = load_config(None, args)
    report = plan_config(cfg, nproc_per_node=ranks)
    return {"predicted": report.peak,
            "breakdown": {k: v for k, v in report.to_dict()["bytes_per_device"].items() if v}}


def deepspeed_table() -> list[dict]:
    """Model states per GPU (and host RAM) vs DeepSpeed's estimators, for the seed models."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from tunesmith.plan import Setup, estimate, lookup_builtin

    rows = []
    for name in ("Qwen/Qwen-7B-Chat", "internlm/internlm2-chat-20b", "Qwen/Qwen2.5-1.5B-Instruct"):
        arch = lookup_builtin(name)
        for gpus, stage, opt, par in ((4, 2, False, False), (4, 2, True, False), (8, 3, False, False),
                                      (8, 3, True, False), (8, 3, True, True)):
            s = Setup(arch=arch, method="full", engine="deepspeed", zero_stage=stage, offload_optimizer=opt,
                      offload_param=par, precision="bf16", world_size=gpus, ranks_per_node=gpus)
            ours = estimate(s)
            if stage == 2:
                cpu, gpu = estimate_zero2_model_states_mem_needs(arch.total_params, gpus, 1, cpu_offload=opt)
            else:
                cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                    arch.total_params, arch.largest_module_params, gpus, 1, cpu_offload=opt,
                    cpu_offload_params=par, zero_init=False)
            rows.append({"model": name, "gpus": gpus, "stage": stage, "offload": "+".join(
                x for x, on in (("opt", opt), ("param", par)) if on) or "-",
                "ours_gpu": ours.model_states, "ds_gpu": gpu, "ours_host": ours.host_per_node * 1.5, "ds_host": cpu})
    return rows


def seven_b_table() -> list[dict]:
    """LLaMA-Factory's hardware table for 7B (GB): Full AMP 120, Full 16-bit 60, Freeze 20, LoRA 16, QLoRA 8-bit
    10, QLoRA 4-bit 6; assumptions: one GPU, batch 1, 512 tokens, gradient checkpointing on (LLaMA-Factory's
    default), bf16."""
    from tunesmith.plan import Setup, estimate, lookup_builtin

    rows = []
    for model in ("meta-llama/Llama-2-7b-hf", "Qwen/Qwen-7B-Chat"):
        arch = lookup_builtin(model)
        common = dict(arch=arch, precision="bf16", micro_batch=1, seq_len=512, grad_ckpt=True)
        cases = [
            ("Full AMP", 120, Setup(method="full", **common)),
            ("LoRA 16-bit", 16, Setup(method="lora", **common)),
            ("QLoRA 8-bit", 10, Setup(method="lora", quant_bits=8, **common)),
            ("QLoRA 4-bit", 6, Setup(method="lora", quant_bits=4, **common)),
            ("Freeze (2 layers)", 20, Setup(method="freeze", freeze_layers=2, **common)),
        ]
        for label, quoted, s in cases:
            b = estimate(s)
            rows.append({"model": model, "method": label, "quoted_gb": quoted, "ours_gb": b.peak / 1e9,
                         "ratio": b.peak / 1e9 / quoted})
    return rows


def guide001_table() -> list[dict]:
    from tunesmith.config import load_config
    from tunesmith.plan import plan_config

    seed = REPO.parent / "shared" / "seeds" / "ds_config_seed001.json"
    rows = []
    for label, ds in (("ZeRO-2 (no offload)", "ds_z2"), ("ZeRO-2 + CPU optimizer offload (guide 001)", str(seed)),
                      ("ZeRO-3 (no offload)", "ds_z3"), ("ZeRO-3 + optimizer/param offload", "ds_z3_offload")):
        if not Path(ds).is_file() and ds.startswith("/"):
            continue
        cfg = load_config(None, ["model_name_or_path=Qwen/Qwen-7B-Chat", "finetuning_type=full", "fp16=true",
                                 f"deepspeed={ds}", "cutoff_len=128", "per_device_train_batch_size=1"])
        r = plan_config(cfg, gpus="4x24GB")
        rows.append({"setup": label, "peak_gib": r.peak / 1024**3, "fits": r.fits, "suggestion": r.suggestion})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--runs", default="full,lora,qlora,zero2,zero3,full_ckpt")
    parser.add_argument("--cutoff", type=int, default=256, help="cutoff_len (every sample fills it)")
    parser.add_argument("--batch", type=int, default=2, help="per_device_train_batch_size")
    parser.add_argument("--skip-measure", action="store_true", help="only the estimator and 7B tables")
    parser.add_argument("--json", help="also write all numbers to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (tiny model, data, results)")
    parser.add_argument("--repredict", metavar="JSON", help="re-run only the predictions for a --json file's runs")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        worker(args.worker[0], [*args.worker[2:], *rest], args.worker[1])
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.repredict:
        repredict(Path(args.repredict))
        return
    results: dict = {"load_avg_1m": os.getloadavg()[0]}
    if not args.skip_measure:
        results["measured"] = measure_all(args)
    results.update(print_reference_tables())
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _print_row(row: dict) -> None:
    print(f"{row['model']:<9}{row['run']:<11}{row['predicted'] / MIB:>14.0f}{row['measured'] / MIB:>14.0f}"
          f"{row['predicted'] / row['measured']:>8.2f}" + (f"{row['seconds']:>7.0f}" if "seconds" in row else ""),
          flush=True)


def repredict(path: Path) -> None:
    """Re-run only the predictions for the runs of an earlier --json file."""
    old = json.loads(path.read_text())
    for row in old.get("measured", []):
        if "error" in row or not Path(row["args"][0].split("=", 1)[1]).exists() and "tiny" in row["model"]:
            continue
        row.update(predict(row["args"], row["ranks"]))
        _print_row({k: v for k, v in row.items() if k != "seconds"})


def measure_all(args: argparse.Namespace) -> list[dict]:
    """Every (model, run): the measured peak against the prediction."""
    work = Path(tempfile.mkdtemp(prefix="plan-accuracy-"))
    make_data(work / "data.jsonl", args.cutoff)
    (work / "bench.yaml").write_text("{}\n")
    measured = []
    shape = [f"cutoff_len={args.cutoff}", f"per_device_train_batch_size={args.batch}"]
    print(f"{'model':<9}{'run':<11}{'predicted MiB':>14}{'measured MiB':>14}{'ratio':>8}{'s':>7}", flush=True)
    for model in args.models.split(","):
        path = model_path(model, work)
        for run in args.runs.split(","):
            row = {"model": model, "run": run, **measure(path, run, work, shape)}
            measured.append(row)
            if "error" in row:
                print(f"{model:<9}{run:<11} failed: {row['error']}", flush=True)
                continue
            row["ratio"] = row["predicted"] / row["measured"]
            _print_row(row)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return measured


def print_reference_tables() -> dict:
    """DeepSpeed's estimators, the quoted 7B figures and guide 001's verdicts, printed and returned."""
    results = {"deepspeed": deepspeed_table()}
    print("\nmodel states per GPU vs DeepSpeed's estimators (GiB; host RAM × 1.5, DeepSpeed's buffer factor)")
    print(f"{'model':<30}{'gpus':>5}{'stage':>6}{'offload':>10}{'ours':>9}{'DeepSpeed':>10}{'host ours':>10}"
          f"{'host DS':>9}")
    for r in results["deepspeed"]:
        print(f"{r['model']:<30}{r['gpus']:>5}{r['stage']:>6}{r['offload']:>10}{r['ours_gpu'] / 1024**3:>9.2f}"
              f"{r['ds_gpu'] / 1024**3:>10.2f}{r['ours_host'] / 1024**3:>10.1f}{r['ds_host'] / 1024**3:>9.1f}")
    results["seven_b"] = seven_b_table()
    print("\n7B figures (LLaMA-Factory's table; ours: 1 GPU, batch 1 × 512 tokens, gradient checkpointing, bf16)")
    print(f"{'model':<26}{'method':<20}{'quoted GB':>10}{'ours GB':>9}{'ratio':>7}")
    for r in results["seven_b"]:
        print(f"{r['model']:<26}{r['method']:<20}{r['quoted_gb']:>10}{r['ours_gb']:>9.1f}{r['ratio']:>7.2f}")
    results["guide001"] = guide001_table()
    print("\nguide 001: Qwen-7B-Chat full fine-tune, fp16, batch 1 × 128 tokens, 4 × 24GB")
    for r in results["guide001"]:
        print(f"  {r['setup']:<45}{r['peak_gib']:>7.1f} GiB  {'fits' if r['fits'] else 'does not fit'}")
    return results


if __name__ == "__main__":
    main()
