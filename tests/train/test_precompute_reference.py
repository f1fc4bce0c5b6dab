"""precompute_ref_log_probs: the reference log-probs of every example computed once before the first step give the
losses of a run that asks the reference at every step (within 1e-5), for DPO and KTO, full and LoRA; afterwards
no step runs the reference, and a full fine-tune's frozen copy of the weights is gone."""

from __future__ import annotations

import json

import pytest
from test_dpo import dpo_cfg, run_dpo
from train_helpers import make_cfg

from tunesmith.train.objectives import create_objective
from tunesmith.train.objectives.reference import Reference


def _losses(log) -> list[float]:
    return [entry["loss"] for entry in log if "loss" in entry]


@pytest.fixture
def no_cache(monkeypatch):
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")


def _forbid_reference_forwards(monkeypatch):
    """Fail if any step asks the reference model (only precomputed values may be used)."""
    original = Reference.logps

    def guarded(self, model, batch, inputs, labels):
        assert batch.reference_logps is not None or guarded.precomputing, "a step ran the reference forward"
        return original(self, model, batch, inputs, labels)

    guarded.precomputing = True
    monkeypatch.setattr(Reference, "logps", guarded)
    return guarded


@pytest.mark.parametrize("method", [dict(finetuning_type="full", learning_rate=1e-3),
                                    dict(finetuning_type="lora", lora_rank=4)], ids=["full", "lora"])
def test_precomputed_dpo_matches_the_per_step_reference(tmp_path, tiny_model_dir, tiny_tokenizer, no_cache,
                                                        monkeypatch, method):
    values = dict(max_steps=5, val_size=0.2, eval_steps=5, **method)
    _, _, live = run_dpo(dpo_cfg(tmp_path / "live", tiny_model_dir, **values), tiny_model_dir, tiny_tokenizer)
    guard = _forbid_reference_forwards(monkeypatch)
    cfg = dpo_cfg(tmp_path / "pre", tiny_model_dir, precompute_ref_log_probs=True, **values)
    objective = create_objective(cfg)
    original_store = objective.store_precomputed

    def store_then_forbid(samples, computed):
        original_store(samples, computed)
        guard.precomputing = False

    objective.store_precomputed = store_then_forbid
    _, objective, pre = run_dpo(cfg, tiny_model_dir, tiny_tokenizer, objective)
    assert not guard.precomputing  # the values were stored before the first step ...
    assert objective.reference.frozen is None  # ... and a full fine-tune's copy is freed
    assert _losses(pre) == pytest.approx(_losses(live), abs=1e-5)
    evals = [[e["eval_loss"] for e in log if "eval_loss" in e] for log in (live, pre)]
    assert evals[1] == pytest.approx(evals[0], abs=1e-5) and evals[0]
    assert _losses(live)[0] != _losses(live)[-1]


def test_precomputed_kto_matches_the_per_step_reference(tmp_path, tiny_model_dir, tiny_tokenizer, no_cache):
    from train_helpers import tiny_model

    from tunesmith.data import prepare_datasets
    from tunesmith.train.loop import fit
    from tunesmith.train.observe import read_log

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rows = [{"instruction": f"Tell me about {i}.", "input": "", "output": f"Topic {i}{'!' * (i % 3)}",
             "kto_tag": i % 3 != 1} for i in range(16)]
    (data_dir / "fb.json").write_text(json.dumps(rows))
    (data_dir / "dataset_info.json").write_text(json.dumps({"fb": {"file_name": "fb.json", "columns": {
        "prompt": "instruction", "query": "input", "response": "output", "kto_tag": "kto_tag"}}}))
    logs = []
    for name, precompute in (("live", False), ("pre", True)):
        cfg = make_cfg(tmp_path / name, tiny_model_dir, stage="kto", dataset=["fb"], dataset_dir=str(data_dir),
                       template="qwen", cutoff_len=64, finetuning_type="full", max_steps=4,
                       precompute_ref_log_probs=precompute)
        data = prepare_datasets(cfg, tiny_tokenizer)
        fit(cfg, tiny_model(tiny_model_dir, cfg), tiny_tokenizer, data.train, data.val,
            objective=create_objective(cfg), resume_from=None)
        logs.append(read_log(tmp_path / name))
    assert _losses(logs[1]) == pytest.approx(_losses(logs[0]), abs=1e-5)
    assert [e["kl"] for e in logs[1] if "kl" in e] == pytest.approx([e["kl"] for e in logs[0] if "kl" in e],
                                                                    abs=1e-5)
