"""precompute_ref_log_probs, cached with the data: the reference log-probs are computed once; a second run with the
same config, and a resumed run, read them from ``<cache>/reference_logps/`` without a reference forward and train
to the same losses; anything the reference depends on (ref_model, its files, the precision, the samples) makes
a new entry, while what only the training steps depend on (output_dir, learning_rate, max_steps) does not."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
from stage_data import stage_values, write_stage_data
from test_dpo import write_preferences
from train_helpers import make_cfg

from tunesmith.train import train
from tunesmith.train.objectives import DPOObjective, KTOObjective, create_objective
from tunesmith.train.observe import read_log
from tunesmith.train.precompute import reference_key

pytestmark = pytest.mark.usefixtures("cache_root")  # a cache of this test's own (conftest)


@pytest.fixture
def model_dir(tmp_path, tiny_model_dir):
    """A copy of the tiny model whose files a test may touch."""
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def _counting_precompute(monkeypatch, cls) -> list:
    """Count the reference forwards of the precompute (the values are still computed)."""
    calls: list = []
    real = cls.precompute

    def counted(self, model, batch):
        calls.append(1)
        return real(self, model, batch)

    monkeypatch.setattr(cls, "precompute", counted)
    return calls


def _forbid_precompute(monkeypatch, cls) -> None:
    def fail(self, model, batch):
        raise AssertionError("the reference ran although its precomputed log-probs are cached")

    monkeypatch.setattr(cls, "precompute", fail)


def _losses(output_dir, key="loss") -> dict[int, float]:
    return {e["step"]: e[key] for e in read_log(output_dir) if key in e}


def _dpo_cfg(tmp_path, model_dir, name: str, **overrides):
    values = dict(stage="dpo", dataset=["prefs"], dataset_dir=str(write_preferences(tmp_path / "data", 24)),
                  template="qwen", cutoff_len=64, max_steps=4, save_steps=2, val_size=0.25, eval_steps=2,
                  finetuning_type="full", learning_rate=1e-3, precompute_ref_log_probs=True)
    values.update(overrides)
    return make_cfg(tmp_path / name, model_dir, **values)


def test_a_second_run_and_a_resume_reuse_the_cached_reference_log_probs(tmp_path, model_dir, cache_root,
                                                                         monkeypatch, caplog):
    computed = _counting_precompute(monkeypatch, DPOObjective)
    with caplog.at_level(logging.INFO, logger="tunesmith"):
        train(_dpo_cfg(tmp_path, model_dir, "first"))
    assert computed and "precomputed the reference log-probs of 24 examples" in caplog.text
    stored = list((cache_root / "reference_logps").iterdir())
    assert len(stored) == 1 and stored[0].suffix == ".npz" and f"cached at {stored[0]}" in caplog.text
    first = _losses(tmp_path / "first")

    _forbid_precompute(monkeypatch, DPOObjective)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tunesmith"):
        train(_dpo_cfg(tmp_path, model_dir, "second"))  # a fresh run: only output_dir differs
    assert f"reused the precomputed reference log-probs of 24 examples from {stored[0]}" in caplog.text
    second = _losses(tmp_path / "second")
    assert list(second) == [1, 2, 3, 4] and second == pytest.approx(first, abs=1e-6)
    assert _losses(tmp_path / "second", "eval_loss") == pytest.approx(_losses(tmp_path / "first", "eval_loss"),
                                                                      abs=1e-6)

    shutil.rmtree(tmp_path / "first" / "checkpoint-4")  # as if killed after checkpoint-2: resume from there
    for name in os.listdir(tmp_path / "first"):
        if name.endswith((".safetensors", ".json")):  # the final model
            (tmp_path / "first" / name).unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tunesmith"):
        train(_dpo_cfg(tmp_path, model_dir, "first"))
    assert "resuming from" in caplog.text and "reused the precomputed reference log-probs" in caplog.text
    resumed = _losses(tmp_path / "first")
    assert list(resumed) == [1, 2, 3, 4] and resumed == pytest.approx(first, abs=1e-6)
    assert len(list((cache_root / "reference_logps").iterdir())) == 1


def test_kto_reuses_its_cached_reference_log_probs(tmp_path, model_dir, monkeypatch):
    data = write_stage_data(tmp_path / "data", count=12)
    values = dict(**stage_values("kto", data), max_steps=3, finetuning_type="lora", lora_rank=4, learning_rate=1e-2,
                  precompute_ref_log_probs=True)
    computed = _counting_precompute(monkeypatch, KTOObjective)
    train(make_cfg(tmp_path / "first", model_dir, **values))
    assert computed
    _forbid_precompute(monkeypatch, KTOObjective)
    train(make_cfg(tmp_path / "second", model_dir, **values))
    for key in ("loss", "kl"):
        assert _losses(tmp_path / "second", key) == pytest.approx(_losses(tmp_path / "first", key), abs=1e-6)


def test_changing_the_reference_or_its_precision_computes_again(tmp_path, model_dir, cache_root, monkeypatch):
    computed = _counting_precompute(monkeypatch, DPOObjective)
    ref_dir = shutil.copytree(model_dir, tmp_path / "ref-model")
    runs = [("base", {}), ("same", {}), ("bf16", {"bf16": True}), ("ref", {"ref_model": str(ref_dir)}),
            ("ref-again", {"ref_model": str(ref_dir)})]
    counts = []
    for name, overrides in runs:
        if name == "ref-again":  # the reference's weights were rewritten (same bytes, a new mtime)
            os.utime(ref_dir / "model.safetensors", ns=(1, 1))
        train(_dpo_cfg(tmp_path, model_dir, name, max_steps=1, val_size=0.0, **overrides))
        counts.append(len(computed))
    assert [b - a for a, b in zip([0, *counts], counts, strict=False)] == [counts[0], 0, counts[0], counts[0],
                                                                           counts[0]]
    assert len(list((cache_root / "reference_logps").iterdir())) == 4


def test_the_key_follows_the_reference_and_not_the_training_keys(tmp_path, model_dir, tiny_tokenizer):
    from tunesmith.data import prepare_datasets
    from tunesmith.train.engines import create_engine

    base = _dpo_cfg(tmp_path, model_dir, "run")
    samples = prepare_datasets(base, tiny_tokenizer)
    samples = [*samples.train, *samples.val]

    def key(cfg, chosen=samples):
        return reference_key(cfg, create_engine(cfg, "cpu"), create_objective(cfg), chosen)

    original = key(base)
    same = [base.model_copy(update=u) for u in ({"output_dir": str(tmp_path / "other")}, {"learning_rate": 0.5},
                                                  {"max_steps": 9}, {"resume_from_checkpoint": "checkpoint-2"})]
    assert {key(cfg) for cfg in same} == {original}
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    changed = [base.model_copy(update=u) for u in (
        {"ref_model": str(model_dir)}, {"ref_model_adapters": str(adapter)}, {"adapter_name_or_path": str(adapter)},
        {"pref_loss": "ipo"}, {"fp16": True}, {"pure_bf16": True}, {"lora_rank": 4}, {"flash_attn": "sdpa"})]
    keys = {key(cfg) for cfg in changed}
    assert len(keys) == len(changed) and original not in keys
    (adapter / "adapter_config.json").write_text('{"r": 8}')  # an adapter file changed: a new key
    assert key(changed[1]) not in keys
    moved = [samples[1], samples[0], *samples[2:]]  # other samples (here: another order) → a new key
    assert key(base, moved) != original


def test_the_cache_is_used_only_when_every_rank_found_it(tmp_path, model_dir, monkeypatch, caplog):
    """A rank that would compute alone would wait forever in a sharded forward: one rank without the cached
    values (here a second rank that reports a miss) makes every rank compute."""
    from tunesmith.train.distributed import Collectives

    train(_dpo_cfg(tmp_path, model_dir, "first", max_steps=1))
    real = Collectives.all_gather_object

    def one_rank_missed(self, value):
        gathered = real(self, value)
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], bool):  # the cache decision
            return [*gathered, (value[0], False)]
        return gathered

    monkeypatch.setattr(Collectives, "all_gather_object", one_rank_missed)
    computed = _counting_precompute(monkeypatch, DPOObjective)
    with caplog.at_level(logging.INFO, logger="tunesmith"):
        train(_dpo_cfg(tmp_path, model_dir, "second", max_steps=1))
    assert computed and "reused" not in caplog.text
