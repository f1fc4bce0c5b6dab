"""stage: kto end to end: LLaMA-Factory's feedback layout (a boolean kto_tag column) → examples with their
mismatched KL completions; training separates the rewards of desirable and undesirable replies; LLaMA-Factory's
qwen3_lora_kto.yaml runs unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import assert_lf_example_trains, make_cfg, tiny_model

from tunesmith.config import Config
from tunesmith.data import get_template, prepare_datasets
from tunesmith.data.feedback import FeedbackCollator, encode_feedback, read_feedback
from tunesmith.data.loader import IGNORE_INDEX
from tunesmith.data.sources import BadRows
from tunesmith.errors import DataError
from tunesmith.train import fit
from tunesmith.train.objectives import create_objective
from tunesmith.train.observe import read_log


def feedback_rows(count: int) -> list[dict]:
    rows = []
    for i in range(count):
        good = i % 2 == 0
        reply = f"Sure! Here is a happy fact number {i}." if good else "No. I will not talk about that."
        rows.append({"messages": [{"role": "user", "content": f"Tell me something, number {i}."},
                                  {"role": "assistant", "content": reply}], "label": good})
    return rows


def write_feedback(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fb.json").write_text(json.dumps(rows), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"fb": {
        "file_name": "fb.json", "formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    }}), encoding="utf-8")
    return folder


def test_feedback_rows_become_examples_with_a_mismatched_kl_completion(tmp_path, tiny_tokenizer):
    cfg = Config(stage="kto", dataset="fb", dataset_dir=str(write_feedback(tmp_path, feedback_rows(3))),
                 template="chatml")
    items = list(read_feedback(cfg, BadRows(False)))
    assert [item.desirable for item in items] == [True, False, True]
    samples, report = encode_feedback(items, tiny_tokenizer, get_template("chatml", tiny_tokenizer), cfg)
    assert report.kept == 3
    assert [list(s.kl_completion) for s in samples] == [list(samples[i - 1].completion) for i in range(3)]
    batch = FeedbackCollator(0).collate(samples)
    assert batch.input_ids.size(0) == 6 and batch.desirable.tolist() == [True, False, True]
    reply = tiny_tokenizer.decode([t for t in batch.labels[1].tolist() if t != IGNORE_INDEX])
    assert reply.startswith("No. I will not")


@pytest.mark.parametrize("label, problem", [(None, "is null"), ("yes", "is a str"), (1, "is a int")])
def test_a_tag_that_is_not_true_or_false_is_a_bad_row(tmp_path, label, problem):
    rows = feedback_rows(2)
    rows[1]["label"] = label
    cfg = Config(stage="kto", dataset="fb", dataset_dir=str(write_feedback(tmp_path, rows)))
    with pytest.raises(DataError, match=rf"fb\.json:row 2: column 'label' {problem}, expected true or false"):
        list(read_feedback(cfg, BadRows(False)))


def test_kto_separates_desirable_from_undesirable_rewards(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")
    data_dir = write_feedback(tmp_path / "data", feedback_rows(40))
    cfg = make_cfg(tmp_path / "run", tiny_model_dir, stage="kto", dataset=["fb"], dataset_dir=str(data_dir),
                   template="chatml", cutoff_len=64, finetuning_type="lora", lora_rank=4, learning_rate=1e-2,
                   max_steps=16, per_device_train_batch_size=4, logging_steps=1, val_size=0.2, eval_steps=16,
                   per_device_eval_batch_size=4)
    data = prepare_datasets(cfg, tiny_tokenizer)
    fit(cfg, tiny_model(tiny_model_dir, cfg), tiny_tokenizer, data.train, data.val,
        objective=create_objective(cfg), resume_from=None)
    log = read_log(tmp_path / "run")
    steps = [entry for entry in log if "loss" in entry]
    assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # a fresh adapter: every log-ratio and the KL are 0
    assert steps[-1]["loss"] < 0.45
    final = next(entry for entry in log if "eval_loss" in entry)
    assert final["eval_rewards/chosen"] > 0 > final["eval_rewards/rejected"]


@pytest.mark.slow
def test_llama_factory_kto_example_runs_unchanged(tmp_path, tiny_model_dir, shared_dir):
    assert_lf_example_trains(shared_dir, "train_lora/qwen3_lora_kto.yaml", tiny_model_dir, tmp_path,
                             {"rewards/chosen", "rewards/rejected", "kl"}, "kto_en_demo: 300 feedback examples")
