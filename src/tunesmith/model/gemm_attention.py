"""Causal attention of one short sample as GEMMs, for CPUs that compute in bf16.

Why. On a CPU, torch's flash-attention kernel tiles a sample into blocks of 32-64 queries and runs many small
GEMMs per head; on the few-hundred-token samples of a packed SFT batch it reaches a small fraction of what the
CPU's matmuls do (SmolLM2's 9 query / 3 key-value heads of 64, 2 threads of an avx512_bf16 EPYC, forward and
backward of one sample in float32, the precision attention by segments uses on CPUs: 1.7 ms for 142 tokens,
10.9 ms for 398, 18.1 ms for 512; here 1.1, 6.1 and 11.1 ms). Here the query heads that share a key/value head
(GQA) are stacked into the rows of one matrix, so each key/value head is one GEMM against all of its queries (no
repeated keys or values, and GEMMs ``groups`` times taller): ``scores = (Q_g / √d) · K_gᵀ`` in float32, the
causal mask added in place, a float32 softmax, ``P · V`` in bf16; the backward forms the scores' gradient from
the kept probabilities and the output (``dS = P ⊙ (dP − rowsum(dO ⊙ O))``, as flash attention does) and runs
its GEMMs in bf16. It scores the whole ``length × length`` square (the flash kernel skips the blocks above the
diagonal) and autograd keeps the bf16 probabilities, ``heads × length²`` values, for the backward: worth it only
for short samples, so :data:`MAX_LENGTH` bounds it (at 512 tokens the probabilities are 9 KB per token and layer
for SmolLM2) and longer samples keep the flash kernel.

Precision: what a GPU's flash attention does in bf16 — bf16 operands, float32 scores, softmax and accumulation,
probabilities and the scores' gradient rounded to bf16 for their GEMMs — except that the backward reads the
kept bf16 probabilities where flash attention recomputes them in float32. Used only under bf16 autocast on a CPU
with bf16 in hardware (:func:`autocast_dtype`), for samples without attention dropout (SDPA draws it) or a
sliding window shorter than them.
"""

from __future__ import annotations

from typing import Any

import torch

from tunesmith.runenv import cpu_has_fast_bf16

MAX_LENGTH = 512  # longest sample computed this way; the probabilities autograd keeps grow with length²

_masks: dict[torch.device, torch.Tensor] = {}


def usable(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether samples computed in ``dtype`` on ``device`` may take this path: bf16 on a CPU that multiplies
    bf16 in hardware (elsewhere bf16 GEMMs are emulated, slower than the float32 kernel)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and cpu_has_fast_bf16()


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype short samples on ``device`` attend in by this path right now: bf16 under bf16 autocast on a CPU
    with bf16 in hardware, else None (also for a module cast to bf16 without autocast, DeepSpeed's bf16, whose
    runs keep the float32 attention they were measured with against float32 runs)."""
    if device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return None
    dtype = torch.get_autocast_dtype("cpu")
    return dtype if usable(dtype, device) else None


def causal_gemm_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          scaling: float | None) -> torch.Tensor:
    """Causal attention of one sample: ``[1, H, L, D]`` queries over ``[1, H_kv, L, D]`` keys and values (all in
    the same dtype, ``L`` ≤ :data:`MAX_LENGTH`); ``[1, H, L, D]`` out, as SDPA with ``is_causal`` and GQA."""
    _, heads, length, dim = query.shape
    kv_heads = key.size(1)
    scale = dim**-0.5 if scaling is None else scaling
    # query head h reads key/value head h // groups (transformers' repeat_kv): stack each group's heads
    queries = query.reshape(kv_heads, heads // kv_heads * length, dim)
    out = _CausalGemmAttention.apply(queries, key[0], value[0], scale)
    return out.view(1, heads, length, dim)


class _CausalGemmAttention(torch.autograd.Function):
    """Scores and softmax in float32 (a CPU has no bf16 GEMM with a float32 output, and scores rounded to bf16
    would shift the probabilities by up to a few percent), the probabilities rounded to the inputs' dtype for
    their GEMM with V and kept only so for the backward, whose softmax gradient is formed in float32 from them and
    from the output, as flash attention's: ``dS = P ⊙ (dP − rowsum(dO ⊙ O))``. Few passes over the
    ``length²`` tensors: memory traffic, not the GEMMs, is what this costs beyond them."""

    @staticmethod
    def forward(ctx: Any, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                scale: float) -> torch.Tensor:
        kv_heads, rows, dim = queries.shape
        length = keys.size(1)
        scores = torch.bmm(queries.float() * scale, keys.float().transpose(1, 2))
        scores.view(kv_heads, rows // length, length, length).add_(_causal_mask(scores.device)[:length, :length])
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        out = torch.bmm(probs, values)
        ctx.scale = scale
        ctx.save_for_backward(queries, keys, values, probs, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        queries, keys, values, probs, out = ctx.saved_tensors
        grad_out = grad_out.to(values.dtype)
        grad_values = torch.bmm(probs.transpose(1, 2), grad_out)
        row_dot = (grad_out.float() * out.float()).sum(dim=-1, keepdim=True)  # rowsum(dP ⊙ P), from [rows, D]
        grad_scores = torch.bmm(grad_out, values.transpose(1, 2)).float().sub_(row_dot).mul_(probs)
        grad_scores = grad_scores.to(queries.dtype)
        # the scale goes on the [length, D] operands, not on the length² gradient
        grad_queries = torch.bmm(grad_scores, keys * ctx.scale)
        grad_keys = torch.bmm(grad_scores.transpose(1, 2), queries * ctx.scale)
        return grad_queries, grad_keys, grad_values, None


def _causal_mask(device: torch.device) -> torch.Tensor:
    """0 on and below the diagonal, -inf above it, float32; one ``MAX_LENGTH²`` tensor per device, sliced."""
    mask = _masks.get(device)
    if mask is None:
        mask = _masks[device] = torch.full((MAX_LENGTH, MAX_LENGTH), float("-inf"), device=device).triu(1)
    return mask
