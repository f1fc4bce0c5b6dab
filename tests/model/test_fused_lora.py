"""Fused LoRA layers (``fused_lora``): the base projection and the adapter in one GEMM output give PEFT's loss and
gradients, and every case the fusion does not cover runs PEFT's own forward."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tunesmith.model import fused_lora
from tunesmith.model.fused_lora import FusedLoraMixin, use_fused_lora
from tunesmith.model.load import load_model


def _lora_model(model_dir, dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    model = load_model(str(model_dir), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; a non-zero B makes the adapter's path count
            torch.nn.init.normal_(param, std=0.05)
    return model


def _loss_and_grads(model, ids, seed: int = 1, autocast: bool = False):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_gives_pefts_loss_and_gradients(tiny_model_dir, dropout, monkeypatch):
    peft_model = _lora_model(tiny_model_dir, dropout)
    fused = copy.deepcopy(peft_model)
    assert use_fused_lora(fused) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    ids = _ids(peft_model.config.vocab_size)
    loss, grads = _loss_and_grads(peft_model.train(), ids)
    fused_calls = []
    apply = fused_lora._LoraLinear.apply
    monkeypatch.setattr(fused_lora._LoraLinear, "apply", lambda *a: fused_calls.append(1) or apply(*a))
    fused_loss, fused_grads = _loss_and_grads(fused.train(), ids)
    assert len(fused_calls) == 2 * 7
    assert torch.allclose(fused_loss, loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == fused_grads.keys() and len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        assert torch.allclose(fused_grads[name], grad, rtol=1e-5, atol=1e-6), name


def test_fused_lora_under_bf16_autocast_keeps_float32_gradients_close_to_pefts(tiny_model_dir):
    peft_model = _lora_model(tiny_model_dir)
    fused = copy.deepcopy(peft_model)
    use_fused_lora(fused)
    ids = _ids(peft_model.config.vocab_size)
    loss, grads = _loss_and_grads(peft_model, ids, autocast=True)
    fused_loss, fused_grads = _loss_and_grads(fused, ids, autocast=True)
    assert abs(fused_loss.item() - loss.item()) < 2e-2 * abs(loss.item())
    for name, grad in grads.items():
        assert fused_grads[name].dtype == torch.float32
        assert torch.linalg.vector_norm(fused_grads[name] - grad) <= 0.05 * torch.linalg.vector_norm(grad), name


def test_fused_lora_leaves_the_state_dict_and_a_disabled_adapter_as_peft_has_them(tiny_model_dir):
    peft_model = _lora_model(tiny_model_dir).eval()
    fused = copy.deepcopy(peft_model)
    use_fused_lora(fused)
    assert list(fused.state_dict()) == list(peft_model.state_dict())
    ids = _ids(peft_model.config.vocab_size)
    with torch.no_grad():
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
        with fused.disable_adapter():
            fused_base = fused(input_ids=ids).logits
        adapted = fused(input_ids=ids).logits
    assert torch.equal(fused_base, base)
    assert not torch.allclose(adapted, base, atol=1e-4)  # the adapter counts again after the block


def test_fused_lora_runs_pefts_forward_where_the_base_layer_has_hooks_or_the_adapter_is_merged(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    use_fused_lora(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, FusedLoraMixin)
    x = torch.randn(3, layer.in_features)
    calls = []
    handle = layer.base_layer.register_forward_hook(lambda *_: calls.append(1))  # as ZeRO-3's gather would
    with torch.no_grad():
        hooked = layer(x)
    handle.remove()
    assert calls == [1]
    with torch.no_grad():
        fused = layer(x)
    assert calls == [1] and torch.allclose(fused, hooked, atol=1e-6)
    assert layer._fusable(x) is not None
    layer.merge()
    assert layer._fusable(x) is None
    with torch.no_grad():
        assert torch.allclose(layer(x), fused, atol=1e-5)
