"""train(cfg): config → real data and model layers → fit; and the `python -m tunesmith.train` entry point."""

from __future__ import annotations

import pytest
from file_helpers import write_run_config  # noqa: F401 - other test files import it from here

from tunesmith.config import load_config
from tunesmith.train import train
from tunesmith.train.__main__ import main
from tunesmith.train.observe import read_log


def test_train_runs_the_whole_pipeline(tmp_path, tiny_model_dir, identity_rows):
    config = write_run_config(
        tmp_path,
        tiny_model_dir,
        identity_rows * 5,
        finetuning_type="lora",
        max_steps=10,
        val_size=4,
        eval_steps=5,
        plot_loss=True,
    )
    result = train(load_config(config))
    out = tmp_path / "run"
    assert result.output_dir == out and result.global_step == 10
    assert [p.name for p in result.checkpoints] == ["checkpoint-5", "checkpoint-10"]
    losses = [e["loss"] for e in read_log(out) if "loss" in e]
    assert result.final_loss == pytest.approx(losses[-1]) and losses[-1] < losses[0]
    assert [e["step"] for e in read_log(out) if "eval_loss" in e] == [5, 10] and result.eval_loss is not None
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "config.yaml",
        "versions.json",
        "trainer_log.jsonl",
        "training_loss.png",
        "tokenizer_config.json",
    ):
        assert (out / name).is_file(), name

    # the same command again: resumes from checkpoint-10, which is already the end
    again = train(load_config(config))
    assert again.global_step == 10 and again.final_loss == pytest.approx(result.final_loss)


def test_module_entry_point_reports_user_errors_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 1e-4\n")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tunesmith: error:") and "learning_rate" in err[0]
