"""ref_model and ref_model_adapters (LLaMA-Factory's keys): the reference a DPO run measures its policy against.

The usual LLaMA-Factory flow trains an SFT adapter, then DPO from it (adapter_name_or_path). With the adapter off,
the reference is the bare base; with the same adapter as ref_model_adapters it is the SFT model itself, so the
first step sees no margin at all (loss log 2). ref_model points at another model altogether."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_dpo import dpo_cfg
from train_helpers import make_cfg

from tunesmith.config import Config
from tunesmith.errors import ConfigError
from tunesmith.train import train
from tunesmith.train.observe import read_log


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter from a short SFT run (the policy DPO starts from)."""
    root = tmp_path_factory.mktemp("sft")
    rows = [{"instruction": f"Tell me about topic {i}.", "input": "", "output": f"Topic {i} is great!"}
            for i in range(8)]
    (root / "sft.json").write_text(json.dumps(rows))
    (root / "dataset_info.json").write_text(json.dumps({"sft": {"file_name": "sft.json"}}))
    cfg = make_cfg(root / "run", tiny_model_dir, dataset=["sft"], dataset_dir=str(root), template="qwen",
                   finetuning_type="lora", lora_rank=4, learning_rate=5e-2, max_steps=4, save_steps=100)
    train(cfg)
    return root / "run"


def _first_step(cfg) -> dict:
    train(cfg)
    return next(entry for entry in read_log(cfg.output_dir) if "loss" in entry)


def test_the_sft_adapter_as_ref_model_adapters_is_the_reference_the_policy_starts_at(
    tmp_path, tiny_model_dir, sft_adapter, monkeypatch
):
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")
    start = dict(adapter_name_or_path=str(sft_adapter), max_steps=1)
    bare = _first_step(dpo_cfg(tmp_path / "bare", tiny_model_dir, **start))
    same = _first_step(dpo_cfg(tmp_path / "same", tiny_model_dir, ref_model_adapters=str(sft_adapter), **start))
    assert same["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert same["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert abs(bare["rewards/chosen"]) > 1e-3  # the adapter-off reference is the bare base, not the SFT model


def test_ref_model_points_at_another_model(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")
    other = tmp_path / "other"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    own = _first_step(dpo_cfg(tmp_path / "own", tiny_model_dir, max_steps=1))
    against = _first_step(dpo_cfg(tmp_path / "against", tiny_model_dir, ref_model=str(other), max_steps=1))
    assert own["rewards/chosen"] == 0.0 and abs(against["rewards/chosen"]) > 1e-3


@pytest.mark.parametrize("values, message", [
    (dict(stage="sft", ref_model="x"), "ref_model is for stage: dpo and kto"),
    (dict(stage="dpo", pref_loss="simpo", ref_model_adapters="x"), "pref_loss: simpo needs no reference model"),
])
def test_a_reference_where_none_is_used_is_refused(values, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        Config(model_name_or_path="m", **values)
