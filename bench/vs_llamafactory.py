"""tunesmith against LLaMA-Factory on this machine: the same YAML, model and data, in one invocation.

    python bench/vs_llamafactory.py [--methods lora,full] [--settings default,best_fp32,best] [--runs 3]
                                    [--samples 16,96] [--tools tunesmith,llamafactory] [--json OUT]
                                    [--tunesmith-extra KEY=VALUE ...] [--llamafactory-env KEY=VALUE ...]

Workload (issue 15): SmolLM2-135M-Instruct (the folder tunesmith converts from the packaged GGUF into its cache;
LLaMA-Factory loads it as an HF model), LLaMA-Factory's ``alpaca_en_demo`` from ``../shared/lf/data``,
``template: chatml``, cutoff_len 512, per-device batch 4, one epoch over the first 16 and over the first 96
samples, lr 1e-4 cosine, no saving, no evaluation. LoRA: rank 8 on all linear layers; full: every weight.

Settings, the same keys given to both tools:

* ``default``: nothing more (each tool's defaults: LLaMA-Factory checkpoints activations, tunesmith does not);
* ``best_fp32``: ``packing: true``, ``neat_packing: true`` (no attention across packed samples) and
  ``disable_gradient_checkpointing: true``;
* ``best``: ``best_fp32`` plus ``bf16: true``.

Samples/s come from the difference of the two epochs' wall-clock times, (96 − 16) / (t96 − t16), so process
start-up, imports, model loading and tokenisation cancel. The "loop ratio" column does the same with each tool's
own training-loop time (``train_results.json``: tunesmith's ``train_runtime_s``, HF Trainer's ``train_runtime``),
which leaves out whatever a process does before and after its loop and so moves less from run to run. Peak RSS is ``ru_maxrss`` of the tool's process (from
``os.wait4``), at the 96-sample run. Each cell is the median over ``--runs`` repetitions; the tools alternate
run by run, so slow drift of the machine hits both alike. Only compare runs made on an otherwise idle machine.

On CPU, ``tunesmith train`` restarts itself under tcmalloc where it is installed, with OpenMP threads that spin
between operations (``host_allocator``); LLaMA-Factory runs as its users get it.
``--llamafactory-env LD_PRELOAD=libtcmalloc_minimal.so.4 OMP_WAIT_POLICY=active`` gives LLaMA-Factory the same
process settings, to tell what they give from what the rest of tunesmith does.

LLaMA-Factory 0.9.5 is installed once into its own venv (``~/.cache/tunesmith/bench/lf-0.9.5``; not part of
``make test``): ``pip install torch==2.13.0 llamafactory==0.9.5``, then torchvision/torchaudio are removed again
(the PyPI builds do not work beside this torch) and an empty ``torchaudio`` package stands in (LLaMA-Factory
imports it at start and uses it only for audio data).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

LF_VERSION = "0.9.5"
VENV = Path.home() / ".cache" / "tunesmith" / "bench" / f"lf-{LF_VERSION}"
DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "lf" / "data"
SETTINGS = {
    "default": {},
    "best_fp32": {"packing": True, "neat_packing": True, "disable_gradient_checkpointing": True},
    "best": {"packing": True, "neat_packing": True, "disable_gradient_checkpointing": True, "bf16": True},
}
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "DISABLE_VERSION_CHECK": "1", "WANDB_DISABLED": "true", "TOKENIZERS_PARALLELISM": "false"}


def ensure_llamafactory() -> Path:
    """The venv's ``llamafactory-cli``, installing it the first time."""
    cli = VENV / "bin" / "llamafactory-cli"
    if cli.exists():
        return cli
    print(f"installing LLaMA-Factory {LF_VERSION} into {VENV} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0", f"llamafactory=={LF_VERSION}"], check=True)
    subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio"],
                   check=True)
    site = subprocess.run([str(VENV / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    stub = Path(site) / "torchaudio"
    stub.mkdir(exist_ok=True)
    (stub / "__init__.py").write_text("# empty stand-in: LLaMA-Factory imports torchaudio only for audio data\n")
    return cli


def smollm2_folder() -> Path:
    from tunesmith.model.resolve import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")


def config(method: str, setting: str, samples: int, model: Path, out: Path, extra: dict) -> dict:
    cfg = {
        "model_name_or_path": str(model),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": method,
        "dataset": "alpaca_en_demo",
        "dataset_dir": str(DATA_DIR),
        "template": "chatml",
        "cutoff_len": 512,
        "max_samples": samples,
        "overwrite_cache": True,
        "preprocessing_num_workers": 1,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "logging_steps": 5,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,  # transformers refuses bf16 on a machine without a GPU unless use_cpu is set
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4,
        "num_train_epochs": 1.0,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
        "seed": 42,
        **SETTINGS[setting],
    }
    if method == "lora":
        cfg.update(lora_rank=8, lora_target="all")
    return {**cfg, **extra}


def run_once(tool: str, cfg: dict, work: Path, lf_cli: Path | None, lf_env: dict | None = None
             ) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in GB, seconds in the training loop as the tool reports it) of one process."""
    path = work / f"{tool}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    if tool == "tunesmith":
        command = [shutil.which("tunesmith") or "tunesmith", "train", str(path)]
    else:
        assert lf_cli is not None
        command = [str(lf_cli), "train", str(path)]
    env = {**os.environ, **OFFLINE}
    if tool == "llamafactory":
        env.update(lf_env or {})
    log = (work / f"{tool}.log").open("w")
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    log.close()
    if os.waitstatus_to_exitcode(status) != 0:
        tail = (work / f"{tool}.log").read_text()[-3000:]
        raise SystemExit(f"{tool} failed ({' '.join(command)}):\n{tail}")
    return elapsed, usage.ru_maxrss / 1024**2, loop_seconds(Path(cfg["output_dir"]))  # kB → GB


def loop_seconds(output_dir: Path) -> float:
    """The training loop's own duration from the run folder's ``train_results.json``: tunesmith's
    ``train_runtime_s``, or HF Trainer's ``train_runtime`` (LLaMA-Factory); both time the loop, not start-up."""
    results = json.loads((output_dir / "train_results.json").read_text())
    return float(results.get("train_runtime_s", results.get("train_runtime", "nan")))


def measure(args: argparse.Namespace) -> list[dict]:
    lf_cli = ensure_llamafactory() if "llamafactory" in args.tools else None
    model = smollm2_folder()
    small, large = args.samples
    rows = []
    for method in args.methods:
        for setting in args.settings:
            times: dict[str, dict[int, list[float]]] = {t: {small: [], large: []} for t in args.tools}
            loops: dict[str, dict[int, list[float]]] = {t: {small: [], large: []} for t in args.tools}
            rss: dict[str, list[float]] = {t: [] for t in args.tools}
            for _ in range(args.runs):
                for tool in args.tools:
                    for samples in (small, large):
                        with tempfile.TemporaryDirectory() as tmp:
                            extra = args.tunesmith_extra if tool == "tunesmith" else {}
                            cfg = config(method, setting, samples, model, Path(tmp) / "out", extra)
                            seconds, peak, loop = run_once(tool, cfg, Path(tmp), lf_cli, args.llamafactory_env)
                        times[tool][samples].append(seconds)
                        loops[tool][samples].append(loop)
                        if samples == large:
                            rss[tool].append(peak)
                        print(f"  {method:4} {setting:9} {tool:12} {samples:3} samples: {seconds:7.1f} s, "
                              f"peak RSS {peak:.2f} GB, training loop {loop:.1f} s", flush=True)
            for tool in args.tools:
                runs = _rates(large - small, times[tool][small], times[tool][large])
                loop_runs = _rates(large - small, loops[tool][small], loops[tool][large])
                rows.append({"method": method, "setting": setting, "tool": tool,
                             "samples_per_s": statistics.median(runs), "runs": runs,
                             "loop_samples_per_s": statistics.median(loop_runs), "loop_runs": loop_runs,
                             "peak_rss_gb": statistics.median(rss[tool])})
    return rows


def _rates(samples: int, small_runs: list[float], large_runs: list[float]) -> list[float]:
    return [samples / (large - small) for small, large in zip(small_runs, large_runs, strict=True)]


def table(rows: list[dict]) -> str:
    """The README's table; "loop ratio" compares the training loops alone (each tool's own runtime), which
    start-up noise (imports, model loading, the tool's data preparation) cannot move."""
    lines = ["| method | setting | tunesmith samples/s | LLaMA-Factory samples/s | speed ratio | loop ratio "
             "| tunesmith peak RSS | LLaMA-Factory peak RSS | RSS ratio |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    keyed = {(r["method"], r["setting"], r["tool"]): r for r in rows}
    for method, setting in dict.fromkeys((r["method"], r["setting"]) for r in rows):
        ours, theirs = keyed.get((method, setting, "tunesmith")), keyed.get((method, setting, "llamafactory"))
        cells = [method, setting, _cell(ours, "samples_per_s", "{:.3f}"), _cell(theirs, "samples_per_s", "{:.3f}"),
                 _ratio(ours, theirs, "samples_per_s"), _ratio(ours, theirs, "loop_samples_per_s"),
                 _cell(ours, "peak_rss_gb", "{:.2f} GB"), _cell(theirs, "peak_rss_gb", "{:.2f} GB"),
                 _ratio(ours, theirs, "peak_rss_gb")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(row: dict | None, key: str, form: str) -> str:
    return form.format(row[key]) if row else "—"


def _ratio(ours: dict | None, theirs: dict | None, key: str) -> str:
    return f"{ours[key] / theirs[key]:.2f}×" if ours and theirs else "—"


def _key_value(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    return key, yaml.safe_load(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="lora,full", type=lambda s: s.split(","))
    parser.add_argument("--settings", default="default,best_fp32,best", type=lambda s: s.split(","))
    parser.add_argument("--tools", default="tunesmith,llamafactory", type=lambda s: s.split(","))
    parser.add_argument("--samples", default="16,96", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tunesmith-extra", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra keys for tunesmith only (to measure one lever alone)")
    parser.add_argument("--llamafactory-env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="environment for LLaMA-Factory's processes (e.g. LD_PRELOAD=libtcmalloc_minimal.so.4)")
    parser.add_argument("--json", metavar="OUT", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    args.tunesmith_extra = dict(_key_value(item) for item in args.tunesmith_extra)
    args.llamafactory_env = dict(item.split("=", 1) for item in args.llamafactory_env)
    if not (DATA_DIR / "alpaca_en_demo.json").is_file():
        raise SystemExit(f"{DATA_DIR}/alpaca_en_demo.json not found: this bench reads ../shared/lf/data")
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    rows = measure(args)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
