"""Lean activations (``lean_activations``): Llama-style RMSNorms and SiLU MLPs that keep only their inputs for the
backward give transformers' loss and gradients, keep less, and leave every other module alone."""

from __future__ import annotations

import copy

import pytest
import torch
from model_helpers import spread_norms_model
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaMLP, GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tunesmith.model.fused_lora import use_fused_lora
from tunesmith.model.lean_activations import (
    LeanRMSNorm,
    LeanSwiGLU,
    lean_activation_count,
    use_lean_activations,
)


def _model(model_dir, lora: bool = False) -> nn.Module:
    return spread_norms_model(model_dir, lora)


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 40), generator=torch.Generator().manual_seed(5))


def _loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _saved_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the activations autograd keeps for the backward (parameters excluded, each storage once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids).loss  # noqa: B018 (the forward records what the backward keeps)
    return sum(kept.values())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_lean_norms_and_mlps_give_transformers_loss_and_gradients(tiny_model_dir, lora):
    model = _model(tiny_model_dir, lora)
    lean = copy.deepcopy(model)
    assert use_lean_activations(lean) == {"norms": 5, "mlps": 2}  # 2 layers × 2 norms + the final norm
    ids = _ids(model.config.vocab_size)
    loss, grads = _loss_and_grads(model, ids)
    lean_loss, lean_grads = _loss_and_grads(lean, ids)
    assert lean_loss == pytest.approx(loss.item(), abs=1e-6)
    assert grads.keys() == lean_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.allclose(lean_grads[name], grad, atol=1e-5, rtol=1e-5), name


def test_full_fine_tuning_keeps_a_hidden_vector_per_norm_and_an_intermediate_one_per_mlp_less(tiny_model_dir):
    model = _model(tiny_model_dir)
    lean = copy.deepcopy(model)
    use_lean_activations(lean)
    ids = _ids(model.config.vocab_size)
    config, tokens = model.config, ids.numel()
    layers = config.num_hidden_layers
    # each decoder layer: two normalized hidden vectors and silu(gate); the final norm: one more hidden vector
    spared = tokens * 4 * (layers * (2 * config.hidden_size + config.intermediate_size) + config.hidden_size)
    assert _saved_bytes(model, ids) - _saved_bytes(lean, ids) == spared


def test_the_norm_under_bf16_stays_within_bf16_rounding_of_transformers():
    norm = LlamaRMSNorm(64, eps=1e-6)
    nn.init.normal_(norm.weight, mean=1.0, std=0.2)
    lean = copy.deepcopy(norm)
    use_lean_activations(lean)
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(1))
    results = []
    for module in (norm, lean):
        module.to(torch.bfloat16).zero_grad(set_to_none=True)
        given = x.to(torch.bfloat16).requires_grad_()
        out = module(given)
        (out.float() * torch.linspace(-1, 1, 64)).sum().backward()
        results.append((out, given.grad, module.weight.grad))
    for ours, theirs in zip(results[1], results[0], strict=True):
        assert ours.dtype == theirs.dtype == torch.bfloat16
        assert torch.allclose(ours.float(), theirs.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "fused-lora"])
def test_under_autocast_a_layers_norms_hand_their_projections_one_bf16_copy_instead_of_five(tiny_model_dir, lora):
    lean = _model(tiny_model_dir, lora)
    if lora:  # (PEFT's own LoRA layer casts its input to the adapter's float32 first, so autocast casts it again)
        use_fused_lora(lean)
    use_lean_activations(lean)
    casting = copy.deepcopy(lean)  # the same lean model, its outputs cast by autocast in each projection
    for module in casting.modules():
        if isinstance(module, LeanRMSNorm):
            module.feeds_linears = False
    dtypes: dict[str, torch.dtype] = {}
    for name, module in lean.named_modules():
        if isinstance(module, LeanRMSNorm):
            module.register_forward_hook(lambda mod, args, out, name=name: dtypes.__setitem__(name, out.dtype))
    ids = _ids(lean.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(lean, ids)
        cast_loss, cast_grads = _loss_and_grads(casting, ids)
        kept, cast_kept = _saved_bytes(lean, ids), _saved_bytes(casting, ids)
    # the layers' norms hand out bf16, the final norm (read by the head, not only by linear layers) float32
    assert {n: d for n, d in dtypes.items() if d == torch.bfloat16}.keys() == {
        n for n in dtypes if n.endswith(("input_layernorm", "post_attention_layernorm"))}
    assert dtypes[next(n for n in dtypes if n.endswith("model.norm"))] == torch.float32
    assert torch.equal(loss, cast_loss)  # the same bits autocast would have made
    # q, k, v, gate and up each kept their own bf16 copy of a norm's output: now the two norms' outputs, shared
    config, tokens = lean.config, ids.numel()
    assert cast_kept - kept == tokens * 2 * config.hidden_size * 3 * config.num_hidden_layers
    # the projections' input gradients now add up in bf16 before the norm's backward (float32 before)
    for name, grad in cast_grads.items():
        scale = grad.abs().max().item()
        assert (grads[name] - grad).abs().max().item() <= 1e-2 * scale, name


def test_only_llama_style_norms_and_silu_mlps_change_and_the_state_dict_stays(tiny_model_dir):
    gemma_norm = GemmaRMSNorm(64)  # 1 + weight: another formula
    gemma_mlp = GemmaMLP(type("C", (), {"hidden_size": 8, "intermediate_size": 16, "hidden_activation": None,
                                        "hidden_act": "gelu_pytorch_tanh"})())
    silu_gemma_shape = copy.deepcopy(gemma_mlp)
    silu_gemma_shape.act_fn = nn.SiLU()  # Gemma's MLP code is Llama's: with SiLU it is a SwiGLU
    holder = nn.ModuleList([gemma_norm, gemma_mlp, silu_gemma_shape])
    assert use_lean_activations(holder) == {"norms": 0, "mlps": 1}
    assert type(gemma_norm) is GemmaRMSNorm and type(gemma_mlp) is GemmaMLP
    assert isinstance(silu_gemma_shape, GemmaMLP) and isinstance(silu_gemma_shape, LeanSwiGLU)

    model = _model(tiny_model_dir)
    keys = list(model.state_dict())
    use_lean_activations(model)
    assert use_lean_activations(model) == {"norms": 0, "mlps": 0}  # swapping twice changes nothing more
    assert list(model.state_dict()) == keys
    assert lean_activation_count(model) == {"norms": 5, "mlps": 2}
    assert all(isinstance(m, LeanRMSNorm) for m in model.modules() if type(m).__name__.endswith("RMSNorm"))
