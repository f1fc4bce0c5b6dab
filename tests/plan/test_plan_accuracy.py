"""The plan against a real run: the tiny model's measured peak memory on CPU (bench/plan_accuracy.py measures
more models and engines)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.config import load_config
from tunesmith.plan import plan_config

WORKER = Path(__file__).with_name("plan_rss_worker.py")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def long_rows(path: Path, rows: int, repeats: int) -> Path:
    text = "The planner counts every byte of the run, and the run proves it right. " * repeats
    items = [{"instruction": f"Tell story {i}.", "input": "", "output": text} for i in range(rows)]
    path.write_text("\n".join(json.dumps(row) for row in items) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
def test_tiny_model_full_finetune_peak_memory_within_15_percent(tiny_model_dir, tmp_path):
    text = "The planner counts every byte of the run, and the run proves it right. " * 30
    rows = [{"instruction": f"Tell story {i}.", "input": "", "output": text} for i in range(16)]
    data = tmp_path / "long.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    args = [f"model_name_or_path={tiny_model_dir}", f"dataset={data}", f"output_dir={tmp_path / 'run'}",
            "template=chatml", "finetuning_type=full", "cutoff_len=256", "per_device_train_batch_size=2",
            "max_steps=2", "save_strategy=no", "eval_strategy=no", "device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNESMITH_DATA_CACHE": "0", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])["added"]
    predicted = plan_config(load_config(None, args)).peak
    assert predicted == pytest.approx(measured, rel=0.15), (predicted / 2**20, measured / 2**20)


def _two_ranks(args: list[str], out: Path) -> tuple[int, object]:
    """The worker on 2 processes under torchrun (gloo): the larger rank's measured peak, and the plan for them."""
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNESMITH_DATA_CACHE": "0", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PLAN_RSS_DIR": str(out)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", str(WORKER), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(out.glob("rank*.json"))]
    assert sorted(line["rank"] for line in lines) == [0, 1]
    measured = max(line["added"] for line in lines)
    return measured, plan_config(load_config(None, args), nproc_per_node=2)


@pytest.mark.slow
def test_sequence_parallel_two_ranks_peak_memory_within_15_percent(tiny_model_dir, tmp_path):
    # 2 processes under torchrun (gloo), one SP group: each rank holds half of every 4096-token row. The loss in
    # chunks of 4096 (the default before 512): at 512 the plan says 75 MiB against 99 measured, i.e. what peaks on
    # a sequence-parallel rank once the logits are small is not yet counted (an open planner gap, see the README)
    data = long_rows(tmp_path / "long.jsonl", rows=8, repeats=400)
    args = [f"model_name_or_path={tiny_model_dir}", f"dataset={data}", f"output_dir={tmp_path / 'run'}",
            "template=chatml", "finetuning_type=full", "engine=ddp", "sequence_parallel_size=2",
            "cutoff_len=4096", "per_device_train_batch_size=2", "max_steps=2", "save_strategy=no",
            "eval_strategy=no", "device=cpu", "loss_chunk_size=4096"]
    measured, report = _two_ranks(args, tmp_path / "peaks")
    assert report.setup.mesh == {"dp": 1, "sp": 2, "tp": 1, "pp": 1}
    assert report.peak == pytest.approx(measured, rel=0.15), (report.peak / 2**20, measured / 2**20)


@pytest.mark.slow
def test_tensor_parallel_two_ranks_peak_memory_within_15_percent(tiny_model_dir, tmp_path):
    # 2 processes under torchrun (gloo), one TP group on fsdp2's dp × tp mesh: each rank holds half of the heads,
    # the MLP width and the vocabulary, the vocab-parallel loss never gathers whole logits. Chunks of 4096, as in
    # the sequence-parallel test above: at 512 the plan says 75 MiB against 86-90 measured
    data = long_rows(tmp_path / "long.jsonl", rows=8, repeats=300)
    args = [f"model_name_or_path={tiny_model_dir}", f"dataset={data}", f"output_dir={tmp_path / 'run'}",
            "template=chatml", "finetuning_type=full", "tensor_parallel_size=2", "cutoff_len=2048",
            "per_device_train_batch_size=2", "max_steps=2", "save_strategy=no", "eval_strategy=no", "device=cpu",
            "loss_chunk_size=4096"]
    measured, report = _two_ranks(args, tmp_path / "peaks")
    assert report.setup.mesh == {"dp": 1, "sp": 1, "tp": 2, "pp": 1}
    assert report.peak == pytest.approx(measured, rel=0.15), (report.peak / 2**20, measured / 2**20)
