"""Saved tensors kept as recipes (``saved_as_recipes``): the lean norms' and SwiGLUs' outputs are recomputed for
the backward instead of kept, which gives bitwise the same gradients, keeps less, and never silently uses a
tensor that changed in place."""

from __future__ import annotations

import copy

import pytest
import torch
from model_helpers import spread_norms_model
from torch import nn

from tunesmith.data.encode import Encoded
from tunesmith.data.loader import collate
from tunesmith.data.pack import pack_samples
from tunesmith.model.fused_lora import use_fused_lora
from tunesmith.model.lean_activations import use_lean_activations
from tunesmith.model.saved_recipes import remember, saved_as_recipes
from tunesmith.model.segment_attention import use_segment_attention


def _lean_model(model_dir, lora: bool = False) -> nn.Module:
    model = spread_norms_model(model_dir, lora)
    if lora:
        use_fused_lora(model)
    use_lean_activations(model)
    return model


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 40), generator=torch.Generator().manual_seed(5))


def _packed_inputs() -> dict[str, torch.Tensor]:
    """Three rows of 64 tokens packed from six samples, a row ending in padding, as segment attention reads them."""
    samples = [Encoded(list(range(3 + i, 3 + i + n)), list(range(3 + i, 3 + i + n))) for i, n in
               enumerate([37, 20, 27, 50, 9, 30])]
    rows, _ = pack_samples(samples, 64)
    batch = collate(rows, pad_token_id=0)
    return {**batch.model_inputs("segments"), "labels": batch.labels}


def _forward(model: nn.Module, ids: torch.Tensor | dict) -> torch.Tensor:
    inputs = ids if isinstance(ids, dict) else {"input_ids": ids, "labels": ids}
    return model(**inputs, use_cache=False).loss


def _loss_and_grads(model: nn.Module, ids: torch.Tensor | dict, recipes: bool) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    if recipes:
        with saved_as_recipes():
            loss = _forward(model, ids)
    else:
        loss = _forward(model, ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _kept_bytes(model: nn.Module, ids: torch.Tensor | dict, recipes: bool) -> int:
    """Bytes of the activations autograd keeps for the backward (parameters excluded, each storage once; a
    recipe keeps tensors that are saved anyway, and a copy of a norm's weight)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def count(packed: object) -> object:
        if isinstance(packed, torch.Tensor) and packed.untyped_storage().data_ptr() not in params:
            kept[packed.untyped_storage().data_ptr()] = packed.untyped_storage().nbytes()
        return packed

    with saved_as_recipes() as hooks:
        pack = hooks.pack if recipes else (lambda tensor: tensor)
        with torch.autograd.graph.saved_tensors_hooks(lambda tensor: count(pack(tensor)), hooks.unpack):
            _forward(model, ids)  # the forward records what the backward keeps
    return sum(kept.values())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "fused-lora"])
def test_recomputed_norm_and_mlp_outputs_give_bitwise_the_same_loss_and_gradients(tiny_model_dir, lora):
    model = _lean_model(tiny_model_dir, lora)
    ids = _ids(model.config.vocab_size)
    loss, grads = _loss_and_grads(model, ids, recipes=False)
    kept_loss, kept_grads = _loss_and_grads(model, ids, recipes=True)
    assert torch.equal(loss, kept_loss)
    assert grads.keys() == kept_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.equal(kept_grads[name], grad), name


@pytest.mark.parametrize("lora", [False, True], ids=["full", "fused-lora"])
def test_the_norm_outputs_and_the_mlp_products_are_no_longer_kept(tiny_model_dir, lora):
    model = _lean_model(tiny_model_dir, lora)
    ids = _ids(model.config.vocab_size)
    config, tokens = model.config, ids.numel()
    # each decoder layer: its two norms' outputs and silu(gate) * up; with a trained LM head, the final norm's
    # output (its input) as well. The first layer's norm output counts under LoRA too, where the embedding and the
    # norm are frozen: it is saved for the adapters' gradients.
    layers, head = config.num_hidden_layers, (0 if lora else config.hidden_size)
    spared = tokens * 4 * (layers * (2 * config.hidden_size + config.intermediate_size) + head)
    assert _kept_bytes(model, ids, recipes=False) - _kept_bytes(model, ids, recipes=True) == spared


@pytest.mark.parametrize("lora", [False, True], ids=["full", "fused-lora"])
def test_packed_rows_attending_by_segments_also_remake_the_attention_output_for_its_projection(tiny_model_dir,
                                                                                              lora):
    model = _lean_model(tiny_model_dir, lora)
    assert use_segment_attention([model])
    inputs = _packed_inputs()
    loss, grads = _loss_and_grads(model, inputs, recipes=False)
    kept_loss, kept_grads = _loss_and_grads(model, inputs, recipes=True)
    assert torch.equal(loss, kept_loss)
    for name, grad in grads.items():
        assert torch.equal(kept_grads[name], grad), name
    config, tokens = model.config, inputs["input_ids"].numel()
    # as above, and the joined attention output (the output projection's input), remade from the runs' outputs
    attention = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    layers, head = config.num_hidden_layers, (0 if lora else config.hidden_size)
    spared = tokens * 4 * (layers * (2 * config.hidden_size + config.intermediate_size + attention) + head)
    assert _kept_bytes(model, inputs, recipes=False) - _kept_bytes(model, inputs, recipes=True) == spared


def test_without_the_context_or_without_gradients_nothing_is_remembered(tiny_model_dir):
    model = _lean_model(tiny_model_dir)
    ids = _ids(model.config.vocab_size)
    with saved_as_recipes() as hooks, torch.no_grad():
        model(input_ids=ids)
        assert hooks.outputs == {}
    out = torch.ones(3, requires_grad=True) * 2
    remember(out, torch.mul, torch.ones(3), torch.full((3,), 2.0))  # outside the context: a no-op
    with saved_as_recipes() as hooks:
        assert hooks.outputs == {}


def test_an_output_changed_in_place_before_it_is_saved_is_saved_as_it_is():
    base = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(3, 3, requires_grad=True)
    with saved_as_recipes():
        doubled = base * 2
        remember(doubled, lambda t: t * 2, base)
        doubled.add_(1)  # the recipe no longer describes it
        (doubled @ weight).sum().backward()
    assert torch.equal(weight.grad, (base.detach() * 2 + 1).T @ torch.ones(4, 3))


def test_a_recipe_input_changed_in_place_before_the_backward_raises_instead_of_giving_wrong_gradients():
    base = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(3, 3, requires_grad=True)
    source = base.detach().clone()
    with saved_as_recipes():
        doubled = source * 2 + base * 0  # requires grad, equals source * 2
        remember(doubled, lambda t: t * 2, source)
        loss = (doubled @ weight).sum()
    source.add_(1)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


def test_inside_activation_checkpointing_the_checkpoint_decides_and_gradients_stay_the_same(tiny_model_dir):
    model = _lean_model(tiny_model_dir)
    ids = _ids(model.config.vocab_size)
    loss, grads = _loss_and_grads(model, ids, recipes=False)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed.train()
    kept_loss, kept_grads = _loss_and_grads(checkpointed, ids, recipes=True)
    assert torch.equal(loss, kept_loss)
    for name, grad in grads.items():
        assert torch.equal(kept_grads[name], grad), name
