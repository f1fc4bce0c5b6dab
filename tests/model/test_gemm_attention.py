"""Short samples on a CPU in bf16 attend as two GEMMs: the same function as causal SDPA (exactly in float32, within
bf16's rounding in bf16), samples still isolated, and long samples, dropout and sliding windows left to SDPA."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tunesmith.data.encode import TokenIds
from tunesmith.data.loader import IGNORE_INDEX, collate
from tunesmith.data.pack import pack_samples, row_segments
from tunesmith.model import gemm_attention
from tunesmith.model.gemm_attention import causal_gemm_attention
from tunesmith.model.load import load_model
from tunesmith.model.segment_attention import attend_by_segments, segment_runs, use_segment_attention
from tunesmith.train.objectives.head import token_loss_sum


def _qkv(length: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # queries as a model's attention makes them: a [1, T, H, D] projection seen as [1, H, T, D]
    q = torch.randn(1, length, 6, 16, generator=gen).transpose(1, 2)
    k, v = (torch.randn(1, 2, length, 16, generator=gen) for _ in range(2))  # GQA: 3 query heads per key head
    return [x.to(dtype).requires_grad_(True) for x in (q, k, v)]


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _out_and_grads(fn, q, k, v):
    out = fn(q, k, v)
    grads = torch.autograd.grad((out.float() * torch.linspace(-1, 1, out.size(-1))).sum(), (q, k, v))
    return out.detach().float(), [g.float() for g in grads]


@pytest.mark.parametrize("length", [1, 7, 64])
def test_in_float32_it_is_causal_sdpa_with_grouped_heads(length):
    q, k, v = _qkv(length, torch.float32)
    want, want_grads = _out_and_grads(_sdpa, q, k, v)
    got, got_grads = _out_and_grads(lambda *x: causal_gemm_attention(*x, None), q, k, v)
    assert (got - want).abs().max() < 1e-6
    assert max((a - b).abs().max().item() for a, b in zip(got_grads, want_grads, strict=True)) < 1e-5


def test_in_bf16_it_is_float32_sdpa_within_bf16_rounding():
    q, k, v = _qkv(200, torch.bfloat16)
    exact = [x.detach().float().requires_grad_(True) for x in (q, k, v)]
    want, want_grads = _out_and_grads(lambda *x: F.scaled_dot_product_attention(*x, is_causal=True, enable_gqa=True,
                                                                                scale=0.2), *exact)
    got, got_grads = _out_and_grads(lambda *x: causal_gemm_attention(*x, 0.2), q, k, v)
    assert (got - want).abs().max() < 2e-2  # bf16 keeps 8 bits: 2^-7 of values around 1
    for a, b in zip(got_grads, want_grads, strict=True):
        assert (a - b).norm() <= 1e-2 * b.norm()
    unscaled, _ = _out_and_grads(_sdpa, *exact)
    assert (got - unscaled).abs().max() > 0.1  # it used the scaling it was given, not 1/√d


class Enc:
    def __init__(self, n: int, first: int) -> None:
        self.input_ids = TokenIds(3 + (first + i) % 90 for i in range(n))
        self.labels = TokenIds([IGNORE_INDEX] * (n // 2) + [3 + (first + i) % 90 for i in range(n // 2, n)])


@pytest.fixture(scope="module")
def packed_batch():
    rows, _ = pack_samples([Enc(n, 7 * i) for i, n in enumerate([37, 55, 20, 61, 12, 44, 9, 3])], 128)
    return collate(rows, pad_token_id=0)


def _bf16_loss_and_grads(model, batch):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(**batch.model_inputs("segments"), use_cache=False).logits
    loss = token_loss_sum(logits.float(), batch.labels)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.fixture
def fast_bf16(monkeypatch):
    """The path's own condition (a CPU with bf16 in hardware) met on any CPU: the arithmetic is the same."""
    monkeypatch.setattr(gemm_attention, "cpu_has_fast_bf16", lambda: True)


def test_a_model_under_bf16_autocast_trains_as_with_float32_attention(tiny_model_dir, packed_batch, monkeypatch,
                                                                      fast_bf16):
    model = load_model(tiny_model_dir)
    use_segment_attention([model])
    calls = []
    real = gemm_attention.causal_gemm_attention
    monkeypatch.setattr(gemm_attention, "causal_gemm_attention", lambda *a: calls.append(a[0].dtype) or real(*a))
    got, got_grads = _bf16_loss_and_grads(model, packed_batch)
    assert calls and set(calls) == {torch.bfloat16}  # every sample of the batch took the GEMM path, in bf16
    monkeypatch.setattr(gemm_attention, "autocast_dtype", lambda device: None)  # float32 flash attention, as before
    want, want_grads = _bf16_loss_and_grads(copy.deepcopy(model), packed_batch)
    assert abs(got - want) / want < 1e-2
    for a, b in zip(got_grads, want_grads, strict=True):
        assert (a - b).norm() <= 3e-2 * b.norm() + 1e-6


def test_under_bf16_a_packed_sample_is_still_not_seen_by_the_others(tiny_model_dir, packed_batch, fast_bf16):
    model = load_model(tiny_model_dir)
    use_segment_attention([model])
    changed = copy.deepcopy(packed_batch)
    first = int((packed_batch.segments[0] == 0).sum())
    changed.input_ids[0, :first] = 5
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(**packed_batch.model_inputs("segments"), use_cache=False).logits
        after = model(**changed.model_inputs("segments"), use_cache=False).logits
    assert not torch.allclose(before[0, :first], after[0, :first])
    assert torch.equal(before[0, first:], after[0, first:]) and torch.equal(before[1:], after[1:])


@pytest.mark.parametrize("dropout, window", [(0.0, None), (0.1, None), (0.0, 4)])
def test_long_samples_dropout_and_sliding_windows_keep_float32_sdpa(monkeypatch, fast_bf16, dropout, window):
    monkeypatch.setattr(gemm_attention, "MAX_LENGTH", 8)
    calls = []
    real = gemm_attention.causal_gemm_attention
    monkeypatch.setattr(gemm_attention, "causal_gemm_attention", lambda *a: calls.append(a[0].size(2)) or real(*a))
    lengths = [[3, 8, 9]]  # a short sample, one at the bound, one past it
    q, k, v = (torch.randn(1, h, 20, 16, dtype=torch.bfloat16) for h in (6, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend_by_segments(q, k, v, segment_runs(row_segments(lengths, 20)), dropout=dropout,
                                 sliding_window=window)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert calls == ([] if dropout else [3] if window else [3, 8])


def test_a_model_cast_to_bf16_without_autocast_keeps_float32_sdpa(monkeypatch, fast_bf16):
    """DeepSpeed's bf16 casts the module itself: everything else there already rounds to bf16, and its runs were
    measured against float32 with this attention (tests/train/test_deepspeed.py); only autocast runs take the path."""
    calls = []
    monkeypatch.setattr(gemm_attention, "causal_gemm_attention", lambda *a: calls.append(a) or None)
    q, k, v = (torch.randn(1, h, 20, 16, dtype=torch.bfloat16) for h in (6, 2, 2))
    out = attend_by_segments(q, k, v, segment_runs(row_segments([[3, 8, 9]], 20)))
    assert not calls and out.dtype == torch.bfloat16


@pytest.mark.parametrize("fast", [True, False])
def test_only_a_cpu_with_bf16_in_hardware_takes_the_gemm_path(monkeypatch, fast):
    monkeypatch.setattr(gemm_attention, "cpu_has_fast_bf16", lambda: fast)
    cpu = torch.device("cpu")
    assert gemm_attention.usable(torch.bfloat16, cpu) is fast
    assert not gemm_attention.usable(torch.float32, cpu)
    assert not gemm_attention.usable(torch.float16, cpu)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm_attention.autocast_dtype(cpu) == (torch.bfloat16 if fast else None)
    assert gemm_attention.autocast_dtype(cpu) is None  # no autocast: a module cast to bf16 keeps float32 SDPA
