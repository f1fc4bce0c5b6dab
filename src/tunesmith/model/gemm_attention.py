"""Causal attention of one short sample as two batched GEMMs, for CPUs that compute in bf16.

Why. On a CPU, torch's flash-attention kernel tiles a sample into blocks of 32-64 queries and runs many small
GEMMs per head; on the few-hundred-token samples of a packed SFT batch it reaches a small fraction of what the
CPU's bf16 matmul does (SmolLM2's 9 query / 3 key-value heads of 64, 2 threads of an avx512_bf16 EPYC, forward and
backward of one sample: 2.03 ms for 142 tokens and 20.2 ms for 512 in float32, the precision attention by segments
used on CPUs; 1.06 and 8.1 ms here in bf16). Here the query heads that share a key/value head (GQA) are stacked
into the rows of one matrix, so each key/value head is one GEMM against all of its queries (no repeated keys or
values, and GEMMs ``groups`` times taller): ``scores = Q_g · (K / √d)ᵀ`` for each key/value head ``g``, the causal
mask added in place, a softmax, ``P · V``. It scores the whole ``length × length`` square (the flash kernel skips
the blocks above the diagonal) and autograd keeps the probabilities, ``heads × length²`` values, for the
backward: worth it only for short samples, so :data:`MAX_LENGTH` bounds it (at 512 tokens the probabilities are
9 KB per token and layer for SmolLM2, in bf16) and longer samples keep the flash kernel.

Precision: the GEMMs take bf16 operands and accumulate in float32, the softmax computes in float32 and stores bf16
probabilities: what a GPU's flash attention does in bf16 (it also rounds the probabilities to bf16 before their
GEMM with ``V``). Used only where the model computes in bf16 on a CPU with bf16 in hardware (:func:`usable`).
"""

from __future__ import annotations

import torch

from tunesmith.runenv import cpu_has_fast_bf16

MAX_LENGTH = 512  # longest sample computed this way; the probabilities autograd keeps grow with length²

_masks: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def usable(dtype: torch.dtype, device: torch.device, dropout: float, window: bool) -> bool:
    """Whether samples computed in ``dtype`` on ``device`` may take this path: bf16 on a CPU that multiplies
    bf16 in hardware (elsewhere bf16 GEMMs are emulated, slower than the float32 kernel), no attention dropout
    (SDPA draws it) and no sliding window shorter than the sample."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and not dropout and not window
            and cpu_has_fast_bf16())


def causal_gemm_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          scaling: float | None) -> torch.Tensor:
    """Causal attention of one sample: ``[1, H, L, D]`` queries over ``[1, H_kv, L, D]`` keys and values (all in
    the same dtype, ``L`` ≤ :data:`MAX_LENGTH`); ``[1, H, L, D]`` out, as SDPA with ``is_causal`` and GQA."""
    _, heads, length, dim = query.shape
    kv_heads = key.size(1)
    groups = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    # query head h reads key/value head h // groups (transformers' repeat_kv): stack each group's heads
    queries = query.reshape(kv_heads, groups * length, dim)
    scores = torch.bmm(queries, key[0].transpose(1, 2) * scale)
    scores.view(kv_heads, groups, length, length).add_(_causal_mask(query.dtype, query.device)[:length, :length])
    return torch.bmm(torch.softmax(scores, dim=-1), value[0]).view(1, heads, length, dim)


def _causal_mask(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """0 on and below the diagonal, -inf above it; one ``MAX_LENGTH²`` tensor per dtype and device, sliced."""
    mask = _masks.get((dtype, device))
    if mask is None:
        mask = _masks[(dtype, device)] = torch.full((MAX_LENGTH, MAX_LENGTH), float("-inf"), dtype=dtype,
                                                   device=device).triu(1)
    return mask
