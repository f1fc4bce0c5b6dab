"""The target-only and chunked LM heads equal the full head: loss and gradients within 1e-5 in float32."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunesmith.data.loader import IGNORE_INDEX
from tunesmith.train.objectives.head import LinearCrossEntropy, LMHead
from tunesmith.train.objectives.sft import token_loss_sum


class PlainCall:
    """The model as objectives call it, without an engine."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.device = torch.device("cpu")

    def __call__(self, **inputs):
        return self.model(**inputs, use_cache=False)


def _batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 24 tokens: prompts masked, padding masked, one row with no target at all."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 24), generator=gen)
    labels = ids.clone()
    labels[0, :10] = IGNORE_INDEX
    labels[1, :4] = IGNORE_INDEX
    labels[1, 18:] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX
    return ids, labels


def _loss_and_grads(model: torch.nn.Module, head: LMHead | None, ids, labels):
    model.zero_grad(set_to_none=True)
    call = PlainCall(model)
    if head is None:
        loss = token_loss_sum(call(input_ids=ids).logits, labels)
    else:
        loss = head.loss_sum(call, {"input_ids": ids}, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def tiny_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.mark.parametrize("chunk_size", [0, 7, 1000])
def test_the_target_only_head_gives_the_full_heads_loss_and_gradients(tiny_model, chunk_size):
    ids, labels = _batch(tiny_model.config.vocab_size)
    want_loss, want_grads = _loss_and_grads(tiny_model, None, ids, labels)
    head = LMHead(target_only=True, chunk_size=chunk_size)
    head.install(tiny_model)
    assert head.mode == ("chunked" if chunk_size else "targets")
    loss, grads = _loss_and_grads(tiny_model, head, ids, labels)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_the_chunked_loss_equals_the_plain_cross_entropy_with_bias_and_tied_weights():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    want = torch.nn.functional.cross_entropy(hidden @ weight.t() + bias, targets, reduction="sum")
    want_grads = torch.autograd.grad(want * 0.5, (hidden, weight, bias))
    got = LinearCrossEntropy.apply(hidden, weight, bias, targets, 8, True, torch.float32)
    got_grads = torch.autograd.grad(got * 0.5, (hidden, weight, bias))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_the_chunked_loss_under_bf16_autocast_stays_close_to_the_full_head(tiny_model):
    ids, labels = _batch(tiny_model.config.vocab_size, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want_grads = _loss_and_grads(tiny_model, None, ids, labels)
        head = LMHead(chunk_size=16)
        head.install(tiny_model)
        loss, grads = _loss_and_grads(tiny_model, head, ids, labels)
    torch.testing.assert_close(loss, want_loss, rtol=2e-3, atol=2e-3)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=5e-2, atol=5e-3, msg=name)


def test_a_call_without_a_request_returns_every_positions_logits(tiny_model):
    ids, _ = _batch(tiny_model.config.vocab_size)
    want = tiny_model(input_ids=ids).logits
    LMHead(chunk_size=8).install(tiny_model)
    torch.testing.assert_close(tiny_model(input_ids=ids).logits, want)


def test_a_frozen_copy_of_the_model_gets_a_head_of_its_own(tiny_model):
    head = LMHead(target_only=True)
    head.install(tiny_model)
    frozen = copy.deepcopy(tiny_model)
    with torch.no_grad():
        frozen.get_output_embeddings().weight.zero_()
    ids, labels = _batch(tiny_model.config.vocab_size)
    logits = head.target_logits(PlainCall(tiny_model), {"input_ids": ids}, labels)
    assert logits.abs().sum() > 0  # the policy's own weights, not the zeroed copy's
    assert frozen(input_ids=ids).logits.abs().sum() == 0


def test_a_forward_that_fails_leaves_no_request_for_the_next_call(tiny_model):
    head = LMHead(target_only=True)
    head.install(tiny_model)
    ids, labels = _batch(tiny_model.config.vocab_size)
    with pytest.raises(RuntimeError):  # float ids: the embedding refuses them, before the head is reached
        head.target_logits(PlainCall(tiny_model), {"input_ids": ids.float()}, labels)
    assert tiny_model(input_ids=ids).logits.shape == (*ids.shape, tiny_model.config.vocab_size)


def test_a_model_that_scales_its_logits_falls_back_from_the_fused_loss(tiny_model):
    tiny_model.config.final_logit_softcapping = 30.0
    head = LMHead(chunk_size=8)
    head.install(tiny_model)
    assert head.mode == "targets"
