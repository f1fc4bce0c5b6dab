"""The variable-length attention path (CUDA, fp16/bf16): the batch flattened into one call bounded by cumulative
offsets gives what the per-sample loop gives. The kernel itself needs a GPU (bench/gpu_varlen_check.py runs it);
here a CPU stand-in with ``torch.nn.attention.varlen.varlen_attn``'s contract checks everything around it: the
offsets, the flattening, GQA and the sliding window's mapping, and that compiled blocks trace the call whole
when the batch brings its offsets (``segment_offsets``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tunesmith.config.schema import Config
from tunesmith.data.loader import Batch
from tunesmith.data.pack import row_segments, sequence_offsets
from tunesmith.model import segment_attention, varlen_attention
from tunesmith.model.segment_attention import compute_dtype, segment_runs, segment_sdpa, use_segment_attention
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
    segments = row_segments([[3, 1, 2], [4]], 8)  # row 0: 3, 1, 2 then 2 pads; row 1: 4 then 4 pads
    expected = [0, 3, 4, 6, 7, 8, 12, 13, 14, 15, 16]
    assert sequence_bounds(segment_runs(segments), 8) == (expected, 4)
    offsets, longest = sequence_offsets(segments)  # the batch's own offsets (segment_offsets), from the ids alone
    assert offsets.dtype == torch.int32 and offsets.tolist() == expected and longest == 4


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


# --- compiled blocks: a custom-op stand-in, since dynamo can only trace the real kernel as the op it is ---------


@torch.library.custom_op("tunesmith_test::varlen_forward", mutates_args=())
def _standin_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, longest: int,
                     scale: float, left: int, gqa: bool) -> torch.Tensor:
    return _reference_varlen(q, k, v, offsets, offsets, longest, longest, scale=scale, window_size=(left, 0),
                             enable_gqa=gqa)


@_standin_forward.register_fake
def _(q, k, v, offsets, longest, scale, left, gqa):
    return torch.empty_like(q)


@torch.library.custom_op("tunesmith_test::varlen_backward", mutates_args=())
def _standin_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
                      longest: int, scale: float, left: int, gqa: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """The attention backward written out per sequence (autograd does not record inside a custom op)."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    groups = q.size(1) // k.size(1)
    bounds = offsets.tolist()
    for start, end in zip(bounds, bounds[1:], strict=False):
        qs, ks, vs, gs = (x[start:end].transpose(0, 1) for x in (q, k, v, grad))  # [H, L, D]
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        position = torch.arange(end - start)
        distance = position[:, None] - position[None, :]
        allowed = (distance >= 0) & ((distance <= left) if left >= 0 else True)
        probs = (qs @ ks.transpose(1, 2) * scale).masked_fill(~allowed, float("-inf")).softmax(-1)
        d_probs = gs @ vs.transpose(1, 2)
        d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdim=True))
        dq[start:end] = (d_scores @ ks * scale).transpose(0, 1)
        fold = (lambda x: x.unflatten(0, (k.size(1), groups)).sum(1))  # noqa: E731 - the query heads of a kv head
        dk[start:end] = fold(d_scores.transpose(1, 2) @ qs * scale).transpose(0, 1)
        dv[start:end] = fold(probs.transpose(1, 2) @ gs).transpose(0, 1)
    return dq, dk, dv


@_standin_backward.register_fake
def _(grad, q, k, v, offsets, longest, scale, left, gqa):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.options = inputs[4:]


def _backward(ctx, grad):
    return (*_standin_backward(grad, *ctx.saved_tensors, *ctx.options), None, None, None, None, None)


_standin_forward.register_autograd(_backward, setup_context=_save)


def _standin_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """varlen_attn's signature around the custom op (as torch's own wraps torch_attn::_varlen_attn)."""
    return _standin_forward(q, k, v, cu_q, max_q, scale if scale is not None else q.size(-1) ** -0.5,
                            window_size[0], enable_gqa)


def _packed_batch(lengths: list[list[int]], width: int, vocab: int, seed: int) -> Batch:
    from tunesmith.data.pack import packed_positions

    ids = torch.randint(3, vocab, (len(lengths), width), generator=torch.Generator().manual_seed(seed))
    return Batch(ids, ids.clone(), torch.ones_like(ids), packed_positions(lengths, width),
                 segments=row_segments(lengths, width))


def _loss_and_grads(model, batch: Batch, attention: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    logits = model(**batch.model_inputs(attention)).logits
    loss = logits.float().square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_compiled_blocks_trace_the_varlen_call_whole_and_equal_the_eager_loop(monkeypatch, tiny_model_dir):
    # On CUDA in half precision the batch brings its samples' offsets, so the attention inside a compiled block is
    # one op: no graph break, and one graph for batches of any shape (rows, widths, samples, longest sample).
    from tunesmith.train.compile import compile_blocks

    monkeypatch.setattr(varlen_attention, "varlen_kernel", lambda: (_standin_kernel, True))
    monkeypatch.setattr(segment_attention, "varlen_usable", lambda query, dropout: not dropout)
    torch.manual_seed(0)
    eager, compiled = (AutoModelForCausalLM.from_pretrained(tiny_model_dir).train() for _ in range(2))
    for model in (eager, compiled):
        model.config.use_cache = False  # as in training: no KV cache whose state the graphs would guard on
    assert use_segment_attention([eager, compiled])
    vocab = eager.config.vocab_size
    # (more than one row, and widths and longest samples other than the model's sizes: dynamo specializes a size
    # of 1, and at first gives equal sizes one symbol; either costs one more graph, not one per batch)
    batches = [_packed_batch([[5, 9, 2], [12]], 18, vocab, 1), _packed_batch([[7, 7], [3, 11], [20]], 24, vocab, 2),
               _packed_batch([[1, 4, 6, 3], [9]], 14, vocab, 3)]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    config = Config(torch_compile=True, torch_compile_backend="aot_eager")
    assert compile_blocks(compiled, config, "single", torch.device("cpu")).blocks == 2
    try:
        for batch in batches:
            want_loss, want_grads = _loss_and_grads(eager, batch, "segments")  # the per-sample loop, eagerly
            loss, grads = _loss_and_grads(compiled, batch, "segment_offsets")
            assert torch.allclose(loss, want_loss, rtol=1e-5)
            for got, want in zip(grads, want_grads, strict=True):
                assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
        assert not torch._dynamo.utils.counters["graph_break"]
        # the setup's probe, then one graph for both blocks and all three batches
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    finally:
        torch._dynamo.reset()
