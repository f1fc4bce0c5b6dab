"""The preprocessing cache: a warm load returns the very same samples without reading the data again, and any
change to what the samples depend on (file bytes, tokenizer, template, settings) builds a new cache."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from file_helpers import write_json

import tunesmith.data as data_mod
from tunesmith.config import Config
from tunesmith.data import prepare_datasets

ROWS = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer number {i}."} for i in range(10)]


pytestmark = pytest.mark.usefixtures("cache_root")  # a cache of this test's own (conftest)


def cfg_for(tmp_path, **kw) -> Config:
    values = dict(dataset=["d.json"], dataset_dir=str(tmp_path), template="chatml", cutoff_len=64, val_size=2)
    values.update(kw)
    return Config(**values)


def _no_reading(monkeypatch):
    def fail(cfg, bad):
        raise AssertionError("the data was read again instead of coming from the cache")

    monkeypatch.setattr(data_mod, "read_conversations", fail)


def _rows(prepared):
    return [(s.input_ids, s.labels, getattr(s, "seq_lens", None)) for s in prepared.train + prepared.val]


@pytest.mark.parametrize("packing", [False, True])
def test_warm_load_returns_the_same_samples(tmp_path, tiny_tokenizer, cache_root, monkeypatch, packing):
    write_json(tmp_path / "d.json", ROWS)
    cold = prepare_datasets(cfg_for(tmp_path, packing=packing), tiny_tokenizer)
    assert len(list((cache_root / "datasets").iterdir())) == 1
    _no_reading(monkeypatch)
    warm = prepare_datasets(cfg_for(tmp_path, packing=packing), tiny_tokenizer)
    assert _rows(warm) == _rows(cold) and type(warm.train[0]) is type(cold.train[0])
    assert warm.report == cold.report
    assert not [p for p in (cache_root / "datasets").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_changed_file_bytes_rebuild(tmp_path, tiny_tokenizer):
    write_json(tmp_path / "d.json", ROWS)
    first = prepare_datasets(cfg_for(tmp_path), tiny_tokenizer)
    write_json(tmp_path / "d.json", [{**r, "output": r["output"] + " Sure."} for r in ROWS])
    second = prepare_datasets(cfg_for(tmp_path), tiny_tokenizer)
    assert _rows(first) != _rows(second)


def test_changed_tokenizer_template_or_settings_never_reuse(
    tmp_path, tiny_tokenizer, tiny_model_dir, monkeypatch
):
    from transformers import AutoTokenizer

    write_json(tmp_path / "d.json", ROWS)
    prepare_datasets(cfg_for(tmp_path), tiny_tokenizer)
    other_dir = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, other_dir)
    tok_json = json.loads((other_dir / "tokenizer.json").read_text())
    tok_json["model"]["merges"] = tok_json["model"]["merges"][:-40]  # a different tokenizer, same specials
    (other_dir / "tokenizer.json").write_text(json.dumps(tok_json))
    other_tok = AutoTokenizer.from_pretrained(other_dir)
    calls = []
    real = data_mod.read_conversations
    monkeypatch.setattr(data_mod, "read_conversations", lambda cfg, bad: calls.append(1) or real(cfg, bad))
    prepare_datasets(cfg_for(tmp_path), other_tok)
    prepare_datasets(cfg_for(tmp_path, template="auto"), tiny_tokenizer)
    prepare_datasets(cfg_for(tmp_path, default_system="Be brief."), tiny_tokenizer)
    prepare_datasets(cfg_for(tmp_path, cutoff_len=32), tiny_tokenizer)
    prepare_datasets(cfg_for(tmp_path, seed=1), tiny_tokenizer)
    prepare_datasets(cfg_for(tmp_path, placeholders={"name": "Ada"}), tiny_tokenizer)
    assert len(calls) == 6  # every change missed the cache
    prepare_datasets(cfg_for(tmp_path, seed=1), tiny_tokenizer)
    assert len(calls) == 6  # ... and the same settings again hit it


def test_tokenized_path_saves_loads_and_rebuilds_when_stale(tmp_path, tiny_tokenizer, cache_root, caplog):
    write_json(tmp_path / "d.json", ROWS)
    path = tmp_path / "tokenized"
    first = prepare_datasets(cfg_for(tmp_path, tokenized_path=str(path)), tiny_tokenizer)
    assert (path / "meta.json").is_file() and (path / "train.npz").is_file()
    assert not (cache_root / "datasets").exists()  # tokenized_path replaces the automatic cache
    write_json(tmp_path / "d.json", ROWS[:6])
    with caplog.at_level(logging.WARNING, logger="tunesmith"):
        second = prepare_datasets(cfg_for(tmp_path, tokenized_path=str(path)), tiny_tokenizer)
    assert "rebuilding it" in caplog.text
    assert len(second.train) + len(second.val) == 6 != len(first.train) + len(first.val)
    third = prepare_datasets(cfg_for(tmp_path, tokenized_path=str(path)), tiny_tokenizer)
    assert _rows(third) == _rows(second)


def test_overwrite_cache_and_switch_off(tmp_path, tiny_tokenizer, cache_root, monkeypatch):
    write_json(tmp_path / "d.json", ROWS)
    prepare_datasets(cfg_for(tmp_path), tiny_tokenizer)
    calls = []
    real = data_mod.read_conversations
    monkeypatch.setattr(data_mod, "read_conversations", lambda cfg, bad: calls.append(1) or real(cfg, bad))
    prepare_datasets(cfg_for(tmp_path, overwrite_cache=True), tiny_tokenizer)
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")
    shutil.rmtree(cache_root)
    prepare_datasets(cfg_for(tmp_path), tiny_tokenizer)
    assert len(calls) == 2 and not cache_root.exists()


def test_speed_settings_share_the_cache_and_mixing_settings_do_not(tmp_path, tiny_tokenizer, monkeypatch):
    write_json(tmp_path / "d.json", ROWS)
    write_json(tmp_path / "e.json", ROWS[:4])
    two = dict(dataset=["d.json", "e.json"])
    first = prepare_datasets(cfg_for(tmp_path, **two), tiny_tokenizer)
    calls = []
    real = data_mod.read_conversations
    monkeypatch.setattr(data_mod, "read_conversations", lambda cfg, bad: calls.append(1) or real(cfg, bad))
    # workers and batch size change only the speed: the very same samples, straight from the cache
    fast = cfg_for(tmp_path, preprocessing_num_workers=2, preprocessing_batch_size=3, **two)
    assert _rows(prepare_datasets(fast, tiny_tokenizer)) == _rows(first) and calls == []
    # how datasets are mixed changes which samples there are: never the cache of another mix
    prepare_datasets(cfg_for(tmp_path, mix_strategy="interleave_under", **two), tiny_tokenizer)
    prepare_datasets(
        cfg_for(tmp_path, mix_strategy="interleave_under", interleave_probs=[0.9, 0.1], **two), tiny_tokenizer
    )
    prepare_datasets(cfg_for(tmp_path, max_samples=5, **two), tiny_tokenizer)
    assert len(calls) == 3


def test_cache_is_compact_int32(tmp_path, tiny_tokenizer, cache_root):
    import numpy as np

    write_json(tmp_path / "d.json", ROWS)
    cold = prepare_datasets(cfg_for(tmp_path, packing=True), tiny_tokenizer)
    (folder,) = (cache_root / "datasets").iterdir()
    with np.load(folder / "train.npz") as train:
        assert train["input_ids"].dtype == np.int32 and train["labels"].dtype == np.int32
        assert len(train["input_ids"]) == sum(len(r.input_ids) for r in cold.train)
