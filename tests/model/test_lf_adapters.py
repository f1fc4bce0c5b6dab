"""OFT and PiSSA through PEFT: the keys reach PEFT's configs, load_adapter loads (and merges) OFT adapters and
checks they fit, PiSSA's start is reproducible from the seed, and pissa_convert's adapter is PEFT's conversion and
applies to the unmodified base."""

from __future__ import annotations

import json

import pytest
import torch
from peft import OFTConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from tunesmith.config.schema import Config
from tunesmith.errors import ModelError
from tunesmith.model.adapt import apply_finetuning, load_adapter
from tunesmith.model.load import load_model
from tunesmith.model.pissa import convert_saved_adapter, initial_adapter

IDS = torch.randint(3, 390, (2, 15), generator=torch.Generator().manual_seed(1))


def _cfg(model_dir, **values) -> Config:
    return Config(model_name_or_path=str(model_dir), **values)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _train_a_little(model, steps: int = 3):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


# ------------------------------------------------------------------------------------------------------ OFT


def test_the_oft_keys_reach_peft_oft_config(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, finetuning_type="oft", oft_block_size=16, oft_target="q_proj,up_proj",
               module_dropout=0.1)
    model = apply_finetuning(load_model(tiny_model_dir), cfg)
    config = model.peft_config["default"]
    assert isinstance(config, OFTConfig)
    assert (config.oft_block_size, config.r, config.module_dropout) == (16, 0, 0.1)
    assert set(config.target_modules) == {"q_proj", "up_proj"}
    rotations = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
    # q_proj has 64 inputs: 4 blocks of 16 × 16, each trained as its 120 strictly upper values
    assert rotations["base_model.model.model.layers.0.self_attn.q_proj.oft_R.default.weight"] == (4, 120)
    assert len(rotations) == 4  # 2 layers × 2 targets, nothing else trains


def test_oft_rank_instead_of_the_block_size_reaches_peft(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, finetuning_type="oft", oft_rank=2, oft_block_size=0, oft_target="all")
    model = apply_finetuning(load_model(tiny_model_dir), cfg)
    assert model.peft_config["default"].r == 2
    assert len(model.peft_config["default"].target_modules) == 7  # every linear layer but lm_head
    shape = dict(model.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.oft_R.default.weight"]
    assert shape.shape == (2, 32 * 31 // 2)


def test_a_trained_oft_adapter_loads_and_merges_into_the_base_with_the_same_logits(tmp_path, tiny_model_dir):
    model = apply_finetuning(load_model(tiny_model_dir), _cfg(tiny_model_dir, finetuning_type="oft"))
    _train_a_little(model)
    trained = _logits(model)
    assert (trained - _logits(load_model(tiny_model_dir))).abs().max() > 1e-3  # it learned something
    model.save_pretrained(tmp_path / "oft")
    loaded = load_adapter(load_model(tiny_model_dir), tmp_path / "oft")
    assert torch.allclose(_logits(loaded), trained, atol=1e-5)
    assert torch.allclose(_logits(loaded.merge_and_unload()), trained, atol=1e-4)


def test_an_oft_adapter_for_other_input_sizes_is_refused_in_one_sentence(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, Qwen2Config

    other = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=400, hidden_size=96, intermediate_size=128,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2))
    wrapped = get_peft_model(other, OFTConfig(oft_block_size=32, r=0, target_modules=["q_proj"]))
    wrapped.save_pretrained(tmp_path / "oft")
    with pytest.raises(ModelError, match=r"rotates 96 inputs of model\.layers\.0\.self_attn\.q_proj but this "
                                         r"model's has 64"):
        load_adapter(load_model(tiny_model_dir), tmp_path / "oft")


def test_load_adapter_still_refuses_other_peft_types(tmp_path, tiny_model_dir):
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ModelError, match="IA3 adapter; tunesmith loads and merges LoRA and OFT adapters only"):
        load_adapter(load_model(tiny_model_dir), tmp_path / "ia3")


# ---------------------------------------------------------------------------------------------------- PiSSA


@pytest.mark.parametrize(("pissa_iter", "init"), [(16, "pissa_niter_16"), (-1, "pissa")])
def test_pissa_keys_reach_peft_and_the_residual_base_keeps_the_function(tiny_model_dir, pissa_iter, init):
    base = load_model(tiny_model_dir)
    before = _logits(base)
    q_proj = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    cfg = _cfg(tiny_model_dir, lora_rank=4, pissa_init=True, pissa_iter=pissa_iter)
    model = apply_finetuning(base, cfg)
    assert model.peft_config["default"].init_lora_weights == init
    residual = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert (residual - q_proj).abs().max() > 1e-3  # PiSSA moved the principal part into the adapter ...
    assert torch.allclose(_logits(model), before, atol=1e-4)  # ... so the model computes the same
    lora_b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert lora_b.abs().max() > 0  # not LoRA's zero start


def test_the_randomised_pissa_start_depends_on_the_seed_only(tiny_model_dir):
    def start(seed: int, draw_first: bool):
        if draw_first:
            torch.rand(1000)  # whatever the global generator did before
        model = apply_finetuning(load_model(tiny_model_dir), _cfg(tiny_model_dir, pissa_init=True, seed=seed))
        return get_peft_model_state_dict(model)

    first, again, other = start(3, False), start(3, True), start(4, False)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first)


def test_pissa_convert_keeps_the_initial_adapter_only_when_asked(tiny_model_dir):
    plain = apply_finetuning(load_model(tiny_model_dir), _cfg(tiny_model_dir, pissa_init=True))
    converting = apply_finetuning(load_model(tiny_model_dir),
                                  _cfg(tiny_model_dir, pissa_init=True, pissa_convert=True))
    assert initial_adapter(plain) is None
    kept = initial_adapter(converting)
    assert kept.keys() == get_peft_model_state_dict(converting).keys()


@pytest.mark.parametrize("rslora", [False, True])
def test_the_converted_adapter_is_peft_s_conversion_and_applies_to_the_unmodified_base(tmp_path, tiny_model_dir,
                                                                                       rslora):
    cfg = _cfg(tiny_model_dir, lora_rank=4, lora_target="q_proj,v_proj,down_proj", pissa_init=True,
               pissa_convert=True, use_rslora=rslora)
    model = apply_finetuning(load_model(tiny_model_dir), cfg)
    _train_a_little(model)
    trained = _logits(model)
    model.save_pretrained(tmp_path / "ours")
    convert_saved_adapter(tmp_path / "ours", initial_adapter(model))
    # PEFT's own mechanism: the initial adapter in a folder, then save_pretrained(path_initial_model_…)
    (tmp_path / "pissa_init").mkdir()
    save_file(initial_adapter(model), str(tmp_path / "pissa_init" / "adapter_model.safetensors"))
    model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "pissa_init"))
    ours, peft = load_file(tmp_path / "ours" / "adapter_model.safetensors"), load_file(
        tmp_path / "peft" / "adapter_model.safetensors")
    assert ours.keys() == peft.keys() and all(torch.equal(ours[key], peft[key]) for key in ours)
    ours_config, peft_config = (json.loads((tmp_path / name / "adapter_config.json").read_text())
                                for name in ("ours", "peft"))
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora"):
        assert ours_config[key] == pytest.approx(peft_config[key]), key
    assert ours_config["r"] == 8 and ours_config["init_lora_weights"] is True
    loaded = load_adapter(load_model(tiny_model_dir), tmp_path / "ours")  # the base as it is on disk
    assert torch.allclose(_logits(loaded), trained, atol=1e-4)
    assert torch.allclose(_logits(loaded.merge_and_unload()), trained, atol=1e-4)


def test_an_unconverted_randomised_pissa_adapter_loads_with_a_warning(tmp_path, tiny_model_dir, caplog):
    model = apply_finetuning(load_model(tiny_model_dir), _cfg(tiny_model_dir, pissa_init=True))
    model.save_pretrained(tmp_path / "raw")
    with caplog.at_level("WARNING", logger="tunesmith"):
        assert isinstance(load_adapter(load_model(tiny_model_dir), tmp_path / "raw"), PeftModel)
    assert "unconverted PiSSA adapter (pissa_niter_16)" in caplog.text and "pissa_convert: true" in caplog.text
