"""Training attention by segments (``tunesmith_segments``): each sample of a row attends to itself with plain causal
SDPA, and no ``T × T`` mask is ever built.

Why. A packed row holds several samples, which must not see each other; transformers would turn that into a
block-diagonal ``[B, 1, T, T]`` mask, and SDPA then scores every query against every key of the row (the mask only
zeroes the pairs afterwards). Attending sample by sample scores only the pairs inside each sample: on alpaca rows
packed to 512 tokens, three samples a row, that is about a third of the work, and the mask (1 GiB as float for one
16k-token row) is never made. Right padding is a run of one-token segments whose output is their own value vector
(a softmax over one key), so pads cost nothing either.

How the segments reach the attention. The collated rows' segment ids (:func:`tunesmith.data.pack.row_segments`:
sample ``k`` of a row is segment ``k``, each pad a segment of its own) go into the ``attention_mask`` slot as a
``[B, 1, 1, T]`` integer tensor (:func:`segment_carrier`). transformers passes a 4-D ``attention_mask`` through
untouched to every attention call, in every model that uses its attention interface, also under activation
checkpointing and the engines' wrappers. A real mask is boolean or floating point, so the two cannot be confused;
anything else (generation's masks, a 2-D padding mask) goes to transformers' own SDPA, so the same model still
generates and evaluates as before.

Precision. On CPU the attention is computed in float32 even under bf16 autocast: on a CPU without native bf16
(AVX2 only) torch's CPU flash-attention backward in bfloat16 is about 5× slower than in float32 (323 against 68 ms
for 512 tokens and 9 heads); with avx512_bf16 (torch 2.13) the two take the same time (one 492-token sample, 9 / 3
heads, 2 threads: forward 4.2 / 4.4 ms, backward 11.8 / 12.3 ms float32 / bf16), and float32 is the more exact.
The exception: under bf16 autocast on a CPU with bf16 in hardware, samples of up to
:data:`~tunesmith.model.gemm_attention.MAX_LENGTH` tokens attend as GEMMs instead
(:mod:`tunesmith.model.gemm_attention`: 1.5-1.8× as fast as that float32 kernel on them). Elsewhere it runs in
autocast's dtype when autocast is on (as SDPA would), else in the dtype it is given.

On CUDA in fp16 / bf16 the loop becomes one variable-length flash-attention call per layer over all the
batch's samples (:mod:`tunesmith.model.varlen_attention`): there, launching one SDPA per sample is what a
step waits for. There the batch also brings the samples' offsets as model inputs (``segment_offsets``), so this
function reads no data-dependent bounds itself and torch.compile traces it whole inside a compiled block; the loop
stays eager (a graph break), which is why compiled runs elsewhere keep the masked SDPA.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from tunesmith.data.pack import LONGEST_KWARG, OFFSETS_KWARG, Runs, segment_carrier, segment_runs
from tunesmith.logging import get_logger
from tunesmith.model import gemm_attention
from tunesmith.model.eager import eager_only
from tunesmith.model.saved_recipes import remember
from tunesmith.model.varlen_attention import varlen_attend, varlen_segments, varlen_usable

log = get_logger("model")

SEGMENT_ATTENTION = "tunesmith_segments"  # the name registered with transformers' AttentionInterface

__all__ = [
    "SEGMENT_ATTENTION",
    "Runs",
    "SegmentAttention",
    "attend_by_segments",
    "compute_dtype",
    "is_carrier",
    "segment_attention",
    "segment_carrier",
    "segment_runs",
    "segment_sdpa",
    "use_segment_attention",
]


def is_carrier(mask: Any) -> bool:
    """Whether ``mask`` is segment ids from :func:`segment_carrier` rather than a real mask (bool or float)."""
    return (isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.size(2) == 1
            and not mask.dtype.is_floating_point and mask.dtype != torch.bool)


def _window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    position = torch.arange(length, device=device)
    distance = position[:, None] - position[None, :]
    return (distance >= 0) & (distance < window)


def segment_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    runs: Runs,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of ``[B, H, T, D]`` queries over ``[B, H_kv, T, D]`` keys and values within each run of
    ``runs``; ``[B, H, T, D]`` out (a view of a ``[B, T, H, D]`` tensor, as the model's output projection reads
    it). Key/value heads are shared by ``H / H_kv`` query heads each (GQA)."""
    parts = _segment_outputs(query, key, value, runs, scaling, dropout, sliding_window)
    return _joined(len(runs), None, *parts).transpose(1, 2)


def _segment_outputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, runs: Runs,
                     scaling: float | None, dropout: float, sliding_window: int | None,
                     gemm_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Each run's ``[1, H, length, D]`` output, row by row. With ``gemm_dtype`` (bf16 on a CPU), the samples of
    at most :data:`~tunesmith.model.gemm_attention.MAX_LENGTH` tokens (and no shorter sliding window) are computed
    as GEMMs in it (:func:`~tunesmith.model.gemm_attention.causal_gemm_attention`), the others by SDPA in
    float32."""
    groups = query.size(1) // key.size(1)
    parts = []
    # split, not slices: a slice's backward writes its gradient into a zeroed copy of the whole tensor, once per
    # sample and layer (here 66 against 47.5 ms for one layer of 4 × 512 tokens); a split's backward is one concatenation
    for row_runs, *row in zip(runs, *(x.split(1, dim=0) for x in (query, key, value)), strict=True):
        lengths = [end - start for start, end, _ in row_runs]
        for (_, _, sample), q, k, v in zip(row_runs, *(x.split(lengths, dim=2) for x in row), strict=True):
            if not sample:  # one-token segments: each attends to itself only, so its output is its value
                parts.append(v.repeat_interleave(groups, dim=1) if groups > 1 else v)
                continue
            length = q.size(2)
            window = sliding_window is not None and length > sliding_window
            if gemm_dtype is not None:
                if length <= gemm_attention.MAX_LENGTH and not window:
                    parts.append(gemm_attention.causal_gemm_attention(*(x.to(gemm_dtype) for x in (q, k, v)), scaling))
                    continue
                q, k, v = (x.to(torch.float32) for x in (q, k, v))
            parts.append(F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=_window_mask(length, sliding_window, q.device) if window else None,
                dropout_p=dropout, is_causal=not window, scale=scaling, enable_gqa=groups > 1,
            ))
    return parts


def _joined(rows: int, dtype: torch.dtype | None, *parts: torch.Tensor) -> torch.Tensor:
    """The runs' outputs as one contiguous ``[B, T, H, D]`` tensor (in ``dtype``, if given)."""
    joined = torch.cat([part.transpose(1, 2) for part in parts], dim=1)
    joined = joined.view(rows, joined.size(1) // rows, *joined.shape[2:])
    return joined if dtype is None or joined.dtype == dtype else joined.to(dtype)


def attend_by_segments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, runs: Runs,
                       **options: Any) -> torch.Tensor:
    """:func:`segment_sdpa` in float32 on CPU (see the module docstring; short samples as GEMMs under bf16
    autocast on a CPU with bf16 in hardware), outside autocast; the result in the queries' dtype.
    Elsewhere in :func:`compute_dtype`, and on CUDA in half precision as one variable-length flash-attention call
    instead of the loop (:mod:`tunesmith.model.varlen_attention`). ``options``: its ``scaling``, ``dropout`` and
    ``sliding_window``."""
    given, dtype = query.dtype, compute_dtype(query)
    # attention dropout is SDPA's to draw: then every sample keeps it
    gemm_dtype = None if options.get("dropout") else gemm_attention.autocast_dtype(query.device)
    if gemm_dtype is None:  # else each sample is cast for the path it takes
        query, key, value = (x.to(dtype) for x in (query, key, value))
    if varlen_usable(query, options.get("dropout", 0.0)):
        return varlen_segments(query, key, value, runs, **options)
    with torch.autocast(query.device.type, enabled=False):
        parts = _segment_outputs(query, key, value, runs, options.get("scaling"), options.get("dropout", 0.0),
                                 options.get("sliding_window"), gemm_dtype)
        # under autocast off the CPU the result stays in autocast's dtype, as SDPA's does
        args = (len(runs), given if query.device.type == "cpu" else None)
        joined = _joined(*args, *parts)
    # the attention backward keeps the runs' outputs: the output projection's saved input is remade from them
    remember(joined, partial(_joined, *args), *parts)
    return joined.transpose(1, 2)


def compute_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype attention by segments computes in: float32 on CPU; elsewhere autocast's dtype when autocast is on
    (what SDPA gets there: a model training fully under bf16 autocast hands its attention float32 queries, because
    its float32 residual stream makes RoPE's output float32, and float32 attention on a GPU is both the slow kernel
    and, for the varlen path, no kernel at all), else the queries' own."""
    device = query.device.type
    if device == "cpu":
        return torch.float32
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return query.dtype


class SegmentAttention:
    """The attention function registered as :data:`SEGMENT_ATTENTION` (see the module docstring). The runs of
    the rows being trained are read once per forward and shared by the layers."""

    def __init__(self) -> None:
        self._cached: tuple[torch.Tensor, Runs] | None = None

    def runs(self, segments: torch.Tensor) -> Runs:
        """The runs of ``segments`` (the carrier, or SP's [B, T] ids), read once per forward: the layers get the
        same tensor object, which the cache holds, so a later batch can never be taken for it."""
        cached = self._cached
        if cached is None or cached[0] is not segments:
            ids = segments[:, 0, 0] if segments.dim() == 4 else segments
            cached = self._cached = (segments, segment_runs(ids))
        return cached[1]

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        sliding_window: int | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        offsets = kwargs.get(OFFSETS_KWARG)
        if offsets is not None and is_carrier(attention_mask):  # the batch brought its offsets: traceable
            dtype = compute_dtype(query)
            q, k, v = (x.to(dtype) for x in (query, key, value))
            if varlen_usable(q, dropout):
                out = varlen_attend(q, k, v, offsets, kwargs[LONGEST_KWARG], scaling, sliding_window)
                return out.transpose(1, 2).contiguous(), None
        return self._eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                           sliding_window=sliding_window, **kwargs)

    # a data-dependent Python loop, never traced: a compiled block breaks its graph here (train/compile.py)
    @eager_only
    def _eager(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        if not is_carrier(attention_mask):  # generation, evaluation of plain batches: transformers' own SDPA
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        out = attend_by_segments(query, key, value, self.runs(attention_mask), scaling=kwargs.get("scaling"),
                                 dropout=kwargs.get("dropout", 0.0), sliding_window=kwargs.get("sliding_window"))
        return out.transpose(1, 2).contiguous(), None


_ATTENTION = SegmentAttention()


def segment_attention(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The registered attention function (a module-level name for tests and for wrappers such as sequence
    parallel's)."""
    return _ATTENTION(*args, **kwargs)


def _unsupported(base: Any) -> str | None:
    """Why ``base`` (an HF model) cannot attend by segments, or None."""
    if not getattr(type(base), "_supports_attention_backend", False):
        return f"{type(base).__name__} does not use transformers' attention interface"
    implementation = getattr(base.config, "_attn_implementation", None)
    if implementation not in (None, "sdpa", SEGMENT_ATTENTION):
        return f"it runs {implementation} attention"
    if getattr(base.config, "attn_logit_softcapping", None):
        return "it soft-caps its attention scores"
    if getattr(base.config, "model_type", None) == "gpt_oss":
        return "its attention has sink logits"
    return None


def use_segment_attention(models: Sequence[torch.nn.Module]) -> bool:
    """Switch every model of ``models`` (PEFT wrappers too) to attention by segments when all of them can use it;
    True when they did. The mask function registered with it is SDPA's, so generation is unchanged."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    bases = [m.get_base_model() if hasattr(m, "get_base_model") else m for m in models]
    reasons = [why for why in map(_unsupported, bases) if why]
    if reasons:
        log.info("attention: transformers' SDPA with a block-diagonal mask for packed rows (%s)", reasons[0])
        return False
    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENT_ATTENTION, sdpa_mask)
    for base in bases:
        if hasattr(base, "set_attn_implementation"):
            base.set_attn_implementation(SEGMENT_ATTENTION)
        else:
            base.config._attn_implementation = SEGMENT_ATTENTION
    return True
