"""stage: dpo on the loop: the reference of a LoRA policy is the policy with its adapter off (no second copy),
full fine-tuning keeps a frozen copy, every pref_loss trains, and DPO raises held-out reward accuracy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from train_helpers import assert_lf_example_trains, make_cfg, state_of, tiny_model

from tunesmith.data import prepare_datasets
from tunesmith.train import fit
from tunesmith.train.objectives import DPOObjective, create_objective
from tunesmith.train.observe import read_log

TOPICS = ["rivers", "bread", "winter", "music", "stars", "trains", "gardens", "books", "rain", "cities"]


def preference_rows(count: int) -> list[dict]:
    """A separable toy preference set: the chosen reply is always cheerful and on topic, the rejected one a
    refusal, so a policy can learn to prefer the first style whatever the topic."""
    rows = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        rows.append({
            "instruction": f"Tell me about {topic} number {i}.",
            "input": "",
            "chosen": f"Sure! Here is a happy fact about {topic}.",
            "rejected": "No. I will not talk about that.",
        })
    return rows


def write_preferences(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prefs.json").write_text(json.dumps(preference_rows(count)), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"prefs": {
        "file_name": "prefs.json", "ranking": True,
        "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"},
    }}), encoding="utf-8")
    return folder


def dpo_cfg(tmp_path: Path, model_dir: Path, **overrides):
    values = dict(stage="dpo", dataset=["prefs"], dataset_dir=str(write_preferences(tmp_path / "data", 60)),
                  template="qwen", cutoff_len=96, per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                  finetuning_type="lora", lora_rank=4, learning_rate=5e-3)
    values.update(overrides)
    return make_cfg(tmp_path / "run", model_dir, **values)


def run_dpo(cfg, model_dir, tokenizer, objective=None):
    data = prepare_datasets(cfg, tokenizer)
    model = tiny_model(model_dir, cfg)
    objective = objective or create_objective(cfg)
    fit(cfg, model, tokenizer, data.train, data.val, objective=objective, resume_from=None)
    return model, objective, read_log(Path(cfg.output_dir))


def test_a_lora_policy_is_its_own_reference_with_the_adapter_off(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                                   monkeypatch):
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")
    cfg = dpo_cfg(tmp_path, tiny_model_dir)
    model, objective, log = run_dpo(cfg, tiny_model_dir, tiny_tokenizer)
    first = next(entry for entry in log if "loss" in entry)
    # a fresh adapter changes nothing: policy = reference, so every margin is 0 and the loss is log 2
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert objective.reference.policy is model and objective.reference.frozen is None  # no second copy of the weights
    base = state_of(tiny_model(tiny_model_dir, make_cfg(tmp_path / "x", tiny_model_dir)))
    with model.disable_adapter():
        off = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
               for k, v in state_of(model).items() if "lora_" not in k}
    assert all(torch.equal(base[k], off[k]) for k in base)  # the reference is still exactly the base


def test_full_dpo_keeps_a_frozen_copy_as_reference(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")
    cfg = dpo_cfg(tmp_path, tiny_model_dir, finetuning_type="full", learning_rate=1e-3)
    initial = state_of(tiny_model(tiny_model_dir, cfg))
    model, objective, log = run_dpo(cfg, tiny_model_dir, tiny_tokenizer)
    assert objective.reference.frozen is not None and objective.reference.policy is None
    frozen, trained = state_of(objective.reference.frozen), state_of(model)
    assert all(torch.equal(initial[k], frozen[k]) for k in initial)
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)
    losses = [entry["loss"] for entry in log if "loss" in entry]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < losses[0]


@pytest.mark.parametrize("pref_loss", ["sigmoid", "ipo", "hinge", "orpo", "simpo"])
def test_every_pref_loss_lowers_its_loss(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch, pref_loss):
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")
    cfg = dpo_cfg(tmp_path, tiny_model_dir, pref_loss=pref_loss, max_steps=8, pref_ftx=0.1)
    _, objective, log = run_dpo(cfg, tiny_model_dir, tiny_tokenizer)
    losses = [entry["loss"] for entry in log if "loss" in entry]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0], losses
    needs_reference = pref_loss not in ("orpo", "simpo")
    assert (objective.reference.policy is not None) == needs_reference


def test_dpo_raises_held_out_reward_accuracy(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")
    cfg = dpo_cfg(tmp_path, tiny_model_dir, val_size=0.2, max_steps=24, eval_steps=4,
                  per_device_eval_batch_size=6)
    _, _, log = run_dpo(cfg, tiny_model_dir, tiny_tokenizer)
    evals = [entry for entry in log if "eval_rewards/accuracies" in entry]
    assert evals[-1]["eval_rewards/accuracies"] >= 0.9, evals
    assert evals[-1]["eval_rewards/margins"] > evals[0]["eval_rewards/margins"] > 0


def test_a_masked_filler_pair_adds_nothing(tiny_model_dir, tiny_tokenizer, tmp_path):
    """A rank without pairs in a window runs a masked copy: zero units, zero loss, zero gradient."""
    from tunesmith.data.pairs import PairCollator, PairSample

    cfg = make_cfg(tmp_path, tiny_model_dir, finetuning_type="lora", lora_rank=4)
    model = tiny_model(tiny_model_dir, cfg)
    objective = DPOObjective("sigmoid")
    objective.prepare_model(model)
    sample = PairSample([1, 2, 3], [4, 5], [6, 7, 8])
    batch = PairCollator(0).masked(sample)
    parts = objective.loss(lambda **inputs: model(**inputs, use_cache=False), batch)
    parts.loss.backward()
    assert objective.units(batch) == 0 and float(parts.loss) == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_llama_factory_dpo_example_runs_unchanged(tmp_path, tiny_model_dir, shared_dir):
    assert_lf_example_trains(shared_dir, "train_lora/qwen3_lora_dpo.yaml", tiny_model_dir, tmp_path,
                             {"rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"}, "dpo_en_demo: 300 preference pairs")


def test_skipping_the_prompts_logits_changes_no_log_probability(tiny_model_dir, tiny_tokenizer, tmp_path):
    """target_inputs asks the model for logits from the first position that predicts a reply token only: the
    sequence log-probabilities are those of the full logits."""
    from tunesmith.data.pairs import PairCollator, PairSample
    from tunesmith.train.objectives.reference import sequence_logps, supports_logits_to_keep, target_inputs

    model = tiny_model(tiny_model_dir, make_cfg(tmp_path, tiny_model_dir))
    assert supports_logits_to_keep(model)
    samples = [PairSample(list(range(5, 5 + n)), [40, 41, 42], [50, 51]) for n in (4, 9)]
    batch = PairCollator(0).collate(samples)
    full = sequence_logps(model(**batch.model_inputs()).logits, batch.labels)[0]
    inputs, labels = target_inputs(batch, trim=True)
    assert inputs["logits_to_keep"] == batch.labels.size(1) - 3  # from the shorter prompt's last token (position 3)
    trimmed = sequence_logps(model(**inputs).logits, labels)[0]
    assert torch.allclose(trimmed, full, atol=1e-5)
