"""Attention by segments: every sample of a row attends to itself with plain causal SDPA, no T×T mask built. The
same numbers as the block-diagonal mask, samples isolated, generation untouched, and models that cannot use it
left on the mask."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tunesmith.data.encode import TokenIds
from tunesmith.data.loader import IGNORE_INDEX, collate
from tunesmith.data.pack import block_causal, pack_samples, row_segments
from tunesmith.model.load import load_model
from tunesmith.model.segment_attention import (
    SEGMENT_ATTENTION,
    segment_runs,
    segment_sdpa,
    use_segment_attention,
)
from tunesmith.train.objectives.head import token_loss_sum


class Enc:
    def __init__(self, n: int, first: int) -> None:
        self.input_ids = TokenIds(3 + (first + i) % 90 for i in range(n))
        self.labels = TokenIds([IGNORE_INDEX] * (n // 2) + [3 + (first + i) % 90 for i in range(n // 2, n)])


def _masked_sdpa(q, k, v, segments, window=None):
    allowed = block_causal(segments)
    if window:
        position = torch.arange(segments.size(1))
        allowed &= (position[:, None] - position[None, :]) < window
    groups = q.size(1) // k.size(1)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                          attn_mask=allowed[:, None])


def test_runs_are_the_samples_and_runs_of_one_token_segments():
    segments = row_segments([[3, 1, 2], [4]], 8)  # row 0: samples of 3, 1, 2 then 2 pads; row 1: 4 then 4 pads
    assert segment_runs(segments) == [[(0, 3, True), (3, 4, False), (4, 6, True), (6, 8, False)],
                                      [(0, 4, True), (4, 8, False)]]


@pytest.mark.parametrize("window", [None, 3])
def test_segment_sdpa_equals_sdpa_under_the_block_diagonal_mask(window):
    gen = torch.Generator().manual_seed(0)
    lens = [[5, 1, 7, 2], [9, 3], [14]]
    segments = row_segments(lens, 16)
    q, k, v = (torch.randn(3, h, 16, 8, generator=gen) for h in (4, 2, 2))  # GQA: 2 query heads per key head
    ours = segment_sdpa(q, k, v, segment_runs(segments), sliding_window=window)
    assert torch.allclose(ours, _masked_sdpa(q, k, v, segments, window), atol=1e-6)  # pads too: each sees itself


@pytest.fixture(scope="module")
def packed_batch():
    rows, _ = pack_samples([Enc(n, 7 * i) for i, n in enumerate([37, 55, 20, 61, 12, 44, 9, 3])], 128)
    return collate(rows, pad_token_id=0)


def _loss_and_grads(model, inputs, labels):
    model.zero_grad()
    loss = token_loss_sum(model(**inputs, use_cache=False).logits, labels)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_a_model_attending_by_segments_has_the_masked_models_loss_and_gradients(tiny_model_dir, packed_batch):
    masked = load_model(tiny_model_dir)
    ours = copy.deepcopy(masked)
    assert use_segment_attention([ours]) and ours.config._attn_implementation == SEGMENT_ATTENTION
    inputs = packed_batch.model_inputs("segments")
    assert inputs["attention_mask"].shape == (packed_batch.input_ids.size(0), 1, 1, packed_batch.input_ids.size(1))
    want, want_grads = _loss_and_grads(masked, packed_batch.model_inputs("mask"), packed_batch.labels)
    got, got_grads = _loss_and_grads(ours, inputs, packed_batch.labels)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(got_grads, want_grads, strict=True)) < 1e-5


def test_a_packed_sample_is_not_seen_by_the_others(tiny_model_dir, packed_batch):
    model = load_model(tiny_model_dir)
    use_segment_attention([model])
    changed = copy.deepcopy(packed_batch)
    first = int((packed_batch.segments[0] == 0).sum())  # the first sample of row 0
    assert first < int(packed_batch.attention_mask[0].sum())  # others follow it in the row
    changed.input_ids[0, :first] = 5
    with torch.no_grad():
        before = model(**packed_batch.model_inputs("segments"), use_cache=False).logits
        after = model(**changed.model_inputs("segments"), use_cache=False).logits
    assert not torch.allclose(before[0, :first], after[0, :first])
    assert torch.equal(before[0, first:], after[0, first:]) and torch.equal(before[1:], after[1:])


def test_generation_of_a_left_padded_batch_is_unchanged(tiny_model_dir, tiny_tokenizer):
    plain = load_model(tiny_model_dir)
    ours = copy.deepcopy(plain)
    use_segment_attention([ours])
    tiny_tokenizer.padding_side = "left"
    try:
        prompts = tiny_tokenizer(["hello there", "a much longer prompt than the first one"], return_tensors="pt",
                                 padding=True)
    finally:
        tiny_tokenizer.padding_side = "right"
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    assert torch.equal(ours.generate(**prompts, **kwargs), plain.generate(**prompts, **kwargs))


def test_a_model_on_eager_attention_keeps_its_masks(tiny_model_dir):
    model = load_model(tiny_model_dir, attn_implementation="eager")
    assert not use_segment_attention([model]) and model.config._attn_implementation == "eager"
