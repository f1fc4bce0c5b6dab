"""apply_finetuning on the tiny Qwen2: which parameters train for full / freeze / lora, and adapter reloads."""

from __future__ import annotations

import re

import pytest
import torch
from peft import PeftModel
from torch import nn

from tunesmith.config.schema import Config
from tunesmith.errors import ModelError
from tunesmith.model.adapt import apply_finetuning, load_adapter, trainable_summary
from tunesmith.model.load import load_model, load_model_and_tokenizer

LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _cfg(model_dir, **kwargs) -> Config:
    return Config(model_name_or_path=str(model_dir), **kwargs)


def _trainable(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def _count(model, trainable_only: bool) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def test_full_trains_everything(tiny_model_dir):
    model = load_model(tiny_model_dir).requires_grad_(False)
    model = apply_finetuning(model, _cfg(tiny_model_dir, finetuning_type="full"))
    assert _count(model, True) == _count(model, False)
    assert re.fullmatch(r"trainable params: ([\d,]+) of \1 \(100\.0000%\)", trainable_summary(model))


@pytest.mark.parametrize(("layers", "trained"), [(1, 1), (-1, 0), (2, None)])
def test_freeze_trains_only_the_chosen_layers(tiny_model_dir, layers, trained):
    model = apply_finetuning(
        load_model(tiny_model_dir),
        _cfg(tiny_model_dir, finetuning_type="freeze", freeze_trainable_layers=layers),
    )
    names = _trainable(model)
    expected = {
        f"model.layers.{i}.{n}"
        for i in ([trained] if trained is not None else [0, 1])
        for n, _ in model.model.layers[i].named_parameters()
    }
    assert names == expected
    assert not model.model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad


def test_freeze_module_filter_and_bad_values(tiny_model_dir):
    cfg = _cfg(
        tiny_model_dir, finetuning_type="freeze", freeze_trainable_layers=1, freeze_trainable_modules="mlp"
    )
    names = _trainable(apply_finetuning(load_model(tiny_model_dir), cfg))
    assert names and all(name.startswith("model.layers.1.mlp.") for name in names)

    cfg = _cfg(tiny_model_dir, finetuning_type="freeze", freeze_trainable_modules="attention")
    with pytest.raises(ModelError, match="use all or names from: .*self_attn"):
        apply_finetuning(load_model(tiny_model_dir), cfg)
    with pytest.raises(ModelError, match="has 2 decoder layers"):
        apply_finetuning(
            load_model(tiny_model_dir),
            _cfg(tiny_model_dir, finetuning_type="freeze", freeze_trainable_layers=3),
        )


def test_lora_all_targets_every_linear_but_lm_head(tiny_model_dir):
    base = load_model(tiny_model_dir)
    # What LoRA r=4 on each linear layer adds: r × (in + out) per layer.
    expected = sum(
        4 * (m.in_features + m.out_features)
        for name, m in base.named_modules()
        if isinstance(m, nn.Linear) and name != "lm_head"
    )
    model = apply_finetuning(
        base, _cfg(tiny_model_dir, finetuning_type="lora", lora_rank=4, lora_dropout=0.1)
    )
    assert isinstance(model, PeftModel)
    config = model.peft_config["default"]
    assert set(config.target_modules) == LINEAR and config.lora_alpha == 8 and config.lora_dropout == 0.1
    assert type(model.base_model.model.lm_head) is nn.Linear  # not wrapped by a LoRA layer
    assert all("lora_" in name for name in _trainable(model))
    assert _count(model, True) == expected


def test_lora_target_list_and_unknown_target(tiny_model_dir):
    model = apply_finetuning(
        load_model(tiny_model_dir), _cfg(tiny_model_dir, finetuning_type="lora", lora_target="q_proj,v_proj")
    )
    assert {name.split(".")[-4] for name in _trainable(model)} == {"q_proj", "v_proj"}
    with pytest.raises(ModelError, match="lora_target qkv is not a linear layer"):
        apply_finetuning(load_model(tiny_model_dir), _cfg(tiny_model_dir, lora_target="qkv"))


def test_lora_with_gradient_checkpointing_backpropagates(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, finetuning_type="lora", gradient_checkpointing=True)
    model = apply_finetuning(load_model(tiny_model_dir), cfg)
    assert model.base_model.model.model.gradient_checkpointing
    ids = torch.tensor([[1, 5, 9, 14, 20]])
    model(input_ids=ids, labels=ids).loss.backward()
    # lora_B starts at zero, so only its gradients are non-zero after one backward.
    grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_adapter_continues_training_and_loads_frozen_for_inference(tiny_model_dir, tmp_path):
    trained = apply_finetuning(load_model(tiny_model_dir), _cfg(tiny_model_dir, lora_target="q_proj"))
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_()
    trained.save_pretrained(tmp_path / "adapter")
    saved = {n: p.detach().clone() for n, p in trained.named_parameters() if "lora_" in n}

    cfg = _cfg(tiny_model_dir, adapter_name_or_path=str(tmp_path / "adapter"))
    resumed = apply_finetuning(load_model(tiny_model_dir), cfg)
    assert _trainable(resumed) == set(saved)
    assert all(torch.equal(p, saved[n]) for n, p in resumed.named_parameters() if n in saved)

    inference, tokenizer = load_model_and_tokenizer(cfg)
    assert isinstance(inference, PeftModel) and not _trainable(inference) and tokenizer.pad_token
    assert _trainable(apply_finetuning(inference, cfg)) == set(saved)

    with pytest.raises(ModelError, match="finetuning_type: lora only"):
        apply_finetuning(load_model(tiny_model_dir), cfg.model_copy(update={"finetuning_type": "full"}))
    with pytest.raises(ModelError, match="no adapter_config.json"):
        load_adapter(load_model(tiny_model_dir), tmp_path)
