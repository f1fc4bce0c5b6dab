"""bf16 over a whole run: 100 optimizer steps with bf16 autocast (float32 master weights; on CPUs with bf16 in
hardware, LoRA's frozen base stored in bf16) follow the float32 loss curve within a stated tolerance, and learn as
much. The same comparison on SmolLM2-135M: bench/bf16_curve.py (figures in the README)."""

from __future__ import annotations

import pytest
from test_pipeline import write_run_config

from tunesmith.config import load_config
from tunesmith.train import train
from tunesmith.train.observe import read_log

pytestmark = pytest.mark.slow
# per logged step, |bf16 − fp32| / fp32; measured 0.5% for full fine-tuning (LoRA on this tiny model: < 0.01%, so
# the test runs the more sensitive full fine-tuning only; the SmolLM2 LoRA figures come from the bench)
MAX_REL_DIFF = 0.02


def _curve(folder, tiny_model_dir, rows, **keys) -> list[float]:
    folder.mkdir(parents=True, exist_ok=True)
    config = write_run_config(folder, tiny_model_dir, rows, **keys)
    train(load_config(config))
    return [e["loss"] for e in read_log(load_config(config).output_dir) if "loss" in e]


def test_a_hundred_bf16_steps_follow_the_fp32_loss_curve(tmp_path, tiny_model_dir, identity_rows):
    common = dict(finetuning_type="full", max_steps=100, logging_steps=5, learning_rate=1e-3, save_strategy="no",
                  plot_loss=False)
    fp32 = _curve(tmp_path / "fp32", tiny_model_dir, identity_rows * 3, **common)
    bf16 = _curve(tmp_path / "bf16", tiny_model_dir, identity_rows * 3, bf16=True, **common)
    relative = [abs(a - b) / a for a, b in zip(fp32, bf16, strict=True)]
    assert len(fp32) == 20 and max(relative) < MAX_REL_DIFF, (max(relative), fp32, bf16)
    assert fp32[-1] < fp32[0] - 1.0  # it learns, and bf16 learns as much
    assert bf16[-1] < fp32[-1] * (1 + MAX_REL_DIFF)
