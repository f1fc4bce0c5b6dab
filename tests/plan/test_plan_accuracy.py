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
