"""Training on packed rows: the loop feeds position ids and the 4-D mask to the model, the loss goes down, and a resumed run ends where an uninterrupted one does;
``packing: true`` in a config packs the training split in prepare_datasets."""

from __future__ import annotations

import torch
from file_helpers import write_json
from train_helpers import encode_pairs, make_cfg, max_diff, state_of, tiny_model

from tunesmith.data import prepare_datasets
from tunesmith.data.pack import PackedSample, pack_samples
from tunesmith.train import fit
from tunesmith.train.observe import read_log


def test_training_with_packing_lowers_the_loss(tmp_path, tiny_model_dir, tiny_tokenizer):
    rows, stats = pack_samples(encode_pairs(tiny_tokenizer), 128)
    assert stats.rows < stats.samples
    cfg = make_cfg(
        tmp_path / "run", tiny_model_dir, max_steps=20, per_device_train_batch_size=2, packing=True
    )
    result = fit(cfg, tiny_model(tiny_model_dir, cfg), tiny_tokenizer, rows)
    losses = [e["loss"] for e in read_log(tmp_path / "run") if "loss" in e]
    assert result.global_step == 20
    assert sum(losses[-3:]) / 3 < losses[0] - 0.4, losses


def test_packing_config_packs_the_training_split_only(tmp_path, tiny_model_dir, tiny_tokenizer):
    rows = [
        {"instruction": f"Question {i}?", "input": "", "output": f"Answer number {i}."} for i in range(12)
    ]
    data = write_json(tmp_path / "d.json", rows)
    common = dict(dataset=[str(data)], template="chatml", cutoff_len=128, val_size=2)
    plain = prepare_datasets(make_cfg(tmp_path / "a", tiny_model_dir, **common), tiny_tokenizer)
    packed = prepare_datasets(
        make_cfg(tmp_path / "b", tiny_model_dir, packing=True, **common), tiny_tokenizer
    )
    neat = prepare_datasets(
        make_cfg(tmp_path / "c", tiny_model_dir, neat_packing=True, **common), tiny_tokenizer
    )
    assert all(isinstance(r, PackedSample) for r in packed.train) and len(packed.train) < len(plain.train)
    assert sum(len(r.seq_lens) for r in packed.train) == len(plain.train)
    assert packed.val == plain.val
    assert [r.input_ids for r in neat.train] == [r.input_ids for r in packed.train]


def test_packed_training_resumes_exactly(tmp_path, tiny_model_dir, tiny_tokenizer):
    """The packed rows are just the dataset: a run stopped at step 2 and resumed ends where an uninterrupted one
    does (same rows, same seeded order, same data position)."""
    rows, _ = pack_samples(encode_pairs(tiny_tokenizer), 128)
    common = dict(per_device_train_batch_size=2, lr_scheduler_type="constant", save_steps=2, packing=True)
    whole_cfg = make_cfg(tmp_path / "whole", tiny_model_dir, max_steps=4, **common)
    whole = tiny_model(tiny_model_dir, whole_cfg)
    fit(whole_cfg, whole, tiny_tokenizer, rows)
    first_cfg = make_cfg(tmp_path / "parts", tiny_model_dir, max_steps=2, **common)
    fit(first_cfg, tiny_model(tiny_model_dir, first_cfg), tiny_tokenizer, rows)
    second_cfg = make_cfg(tmp_path / "parts", tiny_model_dir, max_steps=4, **common)
    resumed = tiny_model(tiny_model_dir, second_cfg)
    with torch.no_grad():  # only a real resume (weights from checkpoint-2) can undo this
        for param in resumed.parameters():
            param.add_(0.01)
    result = fit(second_cfg, resumed, tiny_tokenizer, rows)
    assert result.global_step == 4
    assert max_diff(state_of(whole), state_of(resumed)) < 1e-5
