"""Where the validation loss comes from: a split of dataset (val_size) or a separate eval_dataset, as in
LLaMA-Factory; and eval_on_start, which logs the untrained model's validation metrics and answers as step 0."""

from __future__ import annotations

import json

import pytest
from file_helpers import write_json
from test_pipeline import write_run_config

from tunesmith.config import load_config
from tunesmith.errors import ConfigError
from tunesmith.train import train
from tunesmith.train.observe import read_log


def _held_out(tmp_path, rows) -> None:
    """A second dataset beside the pipeline's `identity`: `held`, with rows of its own."""
    data_dir = tmp_path / "data"
    write_json(data_dir / "held.json", rows)
    info = json.loads((data_dir / "dataset_info.json").read_text())
    info["held"] = {"file_name": "held.json"}
    (data_dir / "dataset_info.json").write_text(json.dumps(info))


def test_eval_dataset_is_the_validation_set_and_all_of_dataset_trains(tmp_path, tiny_model_dir, identity_rows,
                                                                      monkeypatch, caplog):
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")
    config = write_run_config(tmp_path, tiny_model_dir, identity_rows * 2, finetuning_type="lora",
                              max_steps=4, eval_steps=2, eval_dataset="held")
    _held_out(tmp_path, identity_rows[:3])
    with caplog.at_level("INFO", logger="tunesmith"):
        result = train(load_config(config))
    evals = [entry for entry in read_log(tmp_path / "run") if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [2, 4] and result.eval_loss == pytest.approx(evals[-1]["eval_loss"])
    assert f"training {len(identity_rows) * 2} samples" in caplog.text  # nothing of dataset was split off
    assert "3 validation samples" in caplog.text


def test_eval_dataset_changes_the_cache_key(tmp_path, tiny_model_dir, identity_rows, tiny_tokenizer):
    from tunesmith.data.cache import cache_key
    from tunesmith.data.templates import get_template

    config = write_run_config(tmp_path, tiny_model_dir, identity_rows)
    _held_out(tmp_path, identity_rows[:3])
    template = get_template("chatml", tiny_tokenizer)
    keys = {cache_key(load_config(config, extra), tiny_tokenizer, template) for extra in ([], ["eval_dataset=held"])}
    assert len(keys) == 2


def test_val_size_and_eval_dataset_together_are_refused(tmp_path, tiny_model_dir, identity_rows):
    config = write_run_config(tmp_path, tiny_model_dir, identity_rows, val_size=0.1, eval_dataset="held")
    with pytest.raises(ConfigError, match="val_size and eval_dataset are both set"):
        load_config(config)


def test_eval_on_start_logs_the_untrained_model_as_step_zero(tmp_path, tiny_model_dir, identity_rows, monkeypatch):
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")
    config = write_run_config(tmp_path, tiny_model_dir, identity_rows * 4, finetuning_type="lora", max_steps=3,
                              val_size=4, eval_steps=3, eval_on_start=True, evaluation_inputs=["Who are you?"],
                              max_new_tokens=4, learning_rate=5e-2)
    train(load_config(config))
    log = read_log(tmp_path / "run")
    evals = [entry for entry in log if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [0, 3]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]  # a baseline the trained model is measured against
    assert [entry["step"] for entry in log if "sample_generations" in entry] == [0, 3]
    assert log.index(evals[0]) < min(i for i, entry in enumerate(log) if "loss" in entry)
