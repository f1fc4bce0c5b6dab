"""Resume exactness for real: SIGKILL a training process after checkpoint-4, re-run the same command, and get the
same final weights and loss as a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_pipeline import write_run_config
from train_helpers import kill_when

from tunesmith.config import load_config
from tunesmith.train import train
from tunesmith.train.observe import read_log

# Trains like `python -m tunesmith.train`, but sleeps after each step so the test can kill it mid-run.
SLOW_TRAIN = """
import sys, time
from tunesmith.config import load_config
from tunesmith.logging import setup_logging
from tunesmith.train import train
setup_logging()
train(load_config(sys.argv[1], sys.argv[2:]), callbacks=[lambda state: time.sleep(0.25)])
"""


def test_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, identity_rows):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    config = write_run_config(
        tmp_path,
        tiny_model_dir,
        identity_rows * 5,
        finetuning_type="full",
        max_steps=12,
        save_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        weight_decay=0.1,
    )
    killed_dir, ref_dir = tmp_path / "run", tmp_path / "reference"

    script = tmp_path / "slow_train.py"
    script.write_text(SLOW_TRAIN)
    proc = subprocess.Popen(
        [sys.executable, str(script), config],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    kill_when(proc, killed_dir / "checkpoint-4" / "checkpoint_complete", "checkpoint-4", timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed_dir / "train_results.json").exists() and not (killed_dir / "checkpoint-12").exists()

    # the very same command resumes (announcing it) and finishes
    rerun = subprocess.run(
        [sys.executable, "-m", "tunesmith.train", config],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stderr and "checkpoint-" in rerun.stderr

    reference = train(load_config(config, [f"output_dir={ref_dir}"]))

    resumed_loss = [e for e in read_log(killed_dir) if "loss" in e]
    ref_loss = [e for e in read_log(ref_dir) if "loss" in e]
    assert [e["step"] for e in resumed_loss] == list(range(1, 13))
    assert resumed_loss[-1]["loss"] == pytest.approx(ref_loss[-1]["loss"], abs=1e-5)
    assert reference.final_loss == pytest.approx(ref_loss[-1]["loss"])
    resumed_w, ref_w = load_file(killed_dir / "model.safetensors"), load_file(ref_dir / "model.safetensors")
    assert resumed_w.keys() == ref_w.keys()
    assert max(float((resumed_w[k] - ref_w[k]).abs().max()) for k in ref_w) < 1e-5
    start = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(start[k], ref_w[k]) for k in ref_w)  # it did train
