"""Every stage (pt, rm, dpo, kto) trains with every method (full, freeze, LoRA, DoRA, QLoRA) on the single engine,
and every stage, interrupted and re-run, ends as the uninterrupted run (losses within 1e-5). The engines across
ranks: test_dpo_distributed.py and test_stages_distributed.py."""

from __future__ import annotations

import math

import pytest
from stage_data import STAGES, stage_values, write_stage_data
from test_checkpoint import Crash, crash_at
from train_helpers import make_cfg

from tunesmith.train import train
from tunesmith.train.observe import read_log

pytestmark = pytest.mark.slow

METHODS = {
    "full": dict(finetuning_type="full", learning_rate=1e-3),
    "freeze": dict(finetuning_type="freeze", freeze_trainable_layers=1, learning_rate=1e-3),
    "lora": dict(finetuning_type="lora", lora_rank=4, learning_rate=1e-2),
    "dora": dict(finetuning_type="lora", lora_rank=4, use_dora=True, learning_rate=1e-2),
    "qlora": dict(finetuning_type="lora", lora_rank=4, quantization_bit=4, learning_rate=1e-2),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_stage_data(tmp_path_factory.mktemp("stage-data"))


def _losses(folder) -> list[tuple[int, float]]:
    return [(entry["step"], entry["loss"]) for entry in read_log(folder) if "loss" in entry]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_trains_with_every_method(tmp_path, tiny_model_dir, data, monkeypatch, stage, method):
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")
    cfg = make_cfg(tmp_path / "run", tiny_model_dir, max_steps=6, per_device_train_batch_size=4,
                   **stage_values(stage, data), **METHODS[method])
    result = train(cfg)
    losses = [loss for _, loss in _losses(tmp_path / "run")]
    assert result.global_step == 6 and all(math.isfinite(loss) for loss in losses)
    assert min(losses[3:]) < losses[0], losses  # it learns


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_interrupted_and_rerun_equals_the_uninterrupted_run(tmp_path, tiny_model_dir, data,
                                                                        monkeypatch, stage):
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")
    values = dict(max_steps=5, save_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  lora_dropout=0.3, **stage_values(stage, data), **METHODS["lora"])
    train(make_cfg(tmp_path / "straight", tiny_model_dir, **values))
    cfg = make_cfg(tmp_path / "resumed", tiny_model_dir, **values)
    with pytest.raises(Crash):
        train(cfg, callbacks=[crash_at(3)])
    train(cfg)
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert [step for step, _ in resumed] == [1, 2, 3, 4, 5]
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in straight], abs=1e-5)
