"""stage: pt end to end: continued pre-training on a raw-text file lowers held-out perplexity, and
LLaMA-Factory's own qwen3_lora_pretrain.yaml runs unchanged (model, dataset_dir, output_dir and steps swapped)."""

from __future__ import annotations

import pytest
from train_helpers import assert_lf_example_trains, make_cfg

from tunesmith.train.observe import read_log
from tunesmith.train.pipeline import train

SENTENCES = [
    "the cat sat on the mat and looked at the door.",
    "the dog ran to the park and barked at the birds.",
    "the bird flew over the hill and sang in the tree.",
    "the fish swam in the pond and hid under the rock.",
]


def test_continued_pretraining_on_a_raw_text_file_lowers_held_out_perplexity(tmp_path, tiny_model_dir):
    lines = [SENTENCES[i % 4] for i in range(240)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = make_cfg(
        tmp_path / "run", tiny_model_dir, stage="pt", dataset=[str(tmp_path / "corpus.txt")], template="qwen",
        cutoff_len=64, val_size=0.1, max_steps=40, eval_steps=1, logging_steps=1, learning_rate=3e-3,
        per_device_train_batch_size=4, per_device_eval_batch_size=4,
    )
    train(cfg)
    evals = [entry for entry in read_log(tmp_path / "run") if "eval_perplexity" in entry]
    assert len(evals) == 40
    first, last = evals[0], evals[-1]
    assert last["eval_perplexity"] < first["eval_perplexity"] / 4, (first, last)
    assert last["eval_perplexity"] == pytest.approx(2.718281828 ** last["eval_loss"], rel=1e-6)


@pytest.mark.slow
def test_llama_factory_pretrain_example_runs_unchanged(tmp_path, tiny_model_dir, shared_dir):
    assert_lf_example_trains(shared_dir, "train_lora/qwen3_lora_pretrain.yaml", tiny_model_dir, tmp_path,
                             set(), "c4_demo: 300 documents")
