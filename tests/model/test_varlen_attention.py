"""The variable-length attention path (CUDA, fp16/bf16): the batch flattened into one call bounded by cumulative
offsets gives what the per-sample loop gives. The kernel itself needs a GPU (bench/gpu_varlen_check.py runs it);
here a CPU stand-in with ``torch.nn.attention.varlen.varlen_attn``'s contract checks everything around it: the
offsets, the flattening, GQA and the sliding window's mapping."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tunesmith.data.pack import row_segments
from tunesmith.model import varlen_attention
from tunesmith.model.segment_attention import compute_dtype, segment_runs, segment_sdpa
from tunesmith.model.varlen_attention import sequence_bounds, varlen_segments, varlen_usable


def _reference_varlen(query, key, value, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                      enable_gqa=False):
    """varlen_attn's documented contract on CPU: [T, H, D] tensors, sequence i is offsets[i]:offsets[i + 1];
    window_size (-1, 0) causal, (W, 0) causal over the token and the W before it."""
    assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k)
    assert enable_gqa or key.size(1) == query.size(1)
    bounds = cu_q.tolist()
    assert max_q == max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
    out = torch.empty_like(query)
    for start, end in zip(bounds, bounds[1:], strict=False):
        q, k, v = (x[start:end].transpose(0, 1) for x in (query, key, value))
        position = torch.arange(end - start)
        distance = position[:, None] - position[None, :]
        allowed = distance >= 0
        if window_size[0] >= 0:
            allowed &= distance <= window_size[0]
        groups = q.size(0) // k.size(0)
        k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
        out[start:end] = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale).transpose(0, 1)
    return out


def test_the_offsets_bound_each_sample_and_each_one_token_segment():
    runs = segment_runs(row_segments([[3, 1, 2], [4]], 8))  # row 0: 3, 1, 2 then 2 pads; row 1: 4 then 4 pads
    assert sequence_bounds(runs, 8) == ([0, 3, 4, 6, 7, 8, 12, 13, 14, 15, 16], 4)


@pytest.mark.parametrize("takes_gqa", [True, False])
@pytest.mark.parametrize(("kv_heads", "window"), [(2, None), (4, None), (2, 3)])
def test_one_varlen_call_equals_the_per_sample_loop(monkeypatch, takes_gqa, kv_heads, window):
    monkeypatch.setattr(varlen_attention, "varlen_kernel", lambda: (_reference_varlen, takes_gqa))
    gen = torch.Generator().manual_seed(0)
    runs = segment_runs(row_segments([[5, 1, 7, 2], [9, 3], [14]], 16))
    q = torch.randn(3, 4, 16, 8, generator=gen)
    k, v = (torch.randn(3, kv_heads, 16, 8, generator=gen) for _ in range(2))
    ours = varlen_segments(q, k, v, runs, scaling=0.3, sliding_window=window)
    assert ours.shape == q.shape
    assert torch.allclose(ours, segment_sdpa(q, k, v, runs, scaling=0.3, sliding_window=window), atol=1e-6)


def test_tensors_off_cuda_keep_the_loop_even_where_torch_has_the_kernel(monkeypatch):
    monkeypatch.setattr(varlen_attention, "varlen_kernel", lambda: (_reference_varlen, True))
    assert not varlen_usable(torch.zeros(1, 2, 4, 8, dtype=torch.bfloat16), 0.0)  # flash attention is CUDA's


def test_off_the_cpu_attention_by_segments_computes_in_autocasts_dtype(monkeypatch):
    # full fine-tuning under bf16 autocast hands the attention float32 queries (RoPE of a float32 residual
    # stream); on H200 the float32 per-sample loop made a step 8x slower than the bf16 varlen call
    gpu_query = SimpleNamespace(device=torch.device("meta"), dtype=torch.float32)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device: device == "meta")
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device: torch.bfloat16)
    assert compute_dtype(gpu_query) == torch.bfloat16
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device: False)
    assert compute_dtype(gpu_query) == torch.float32
    cpu_query = torch.zeros(1, dtype=torch.bfloat16)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device: True)
    assert compute_dtype(cpu_query) == torch.float32  # the CPU's bf16 attention backward is the slow one
