"""Attention by segments in one kernel call per layer on CUDA: torch's variable-length flash attention.

Why. :func:`~tunesmith.model.segment_attention.segment_sdpa` calls SDPA once per sample of every row, in every
layer. On a CPU each call is long enough that the loop costs nothing; on a GPU the calls are short and the loop is
bound by launching them: measured on one H200 (a model of Qwen2.5-0.5B's shape, LoRA, bf16, 8 rows of 2,048
alpaca tokens, about 13 samples a row), steps took 0.8 to 1.7 s depending on the samples per row, a few percent
of the GPU. ``torch.nn.attention.varlen.varlen_attn`` (torch ≥ 2.10, CUDA, fp16 / bf16) takes every sample of the
batch at once, bounded by cumulative offsets, which is what flash-attention's varlen kernels do.

The batch's ``[B, H, T, D]`` tensors become ``[B·T, H, D]``; each sample of two or more tokens is one sequence and
each one-token segment (right padding, a one-token sample) a sequence of its own, so the result is exactly the
loop's. Anything else (CPU, NPU, float32, attention dropout, torch without the kernel) keeps the loop.

The offsets come from the batch (:func:`tunesmith.data.pack.sequence_offsets`, passed through the model's keyword
arguments) or, where a caller has only the runs (sequence parallel), from :func:`sequence_bounds`;
:func:`varlen_attend` itself is traceable, so compiled decoder blocks keep the call in their graphs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from tunesmith.data.pack import Runs, sequence_bounds

__all__ = ["Runs", "sequence_bounds", "varlen_attend", "varlen_kernel", "varlen_runs_here", "varlen_segments",
           "varlen_usable"]


Kernel = tuple[Callable[..., torch.Tensor], bool]
_FOUND: list[Kernel | None] = []  # varlen_kernel()'s answer, once: read by compiled code, which must not import


def varlen_kernel() -> Kernel | None:
    """(torch's varlen_attn, whether it takes ``enable_gqa``), or None where this torch has none."""
    if not _FOUND:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _FOUND.append(None)
        else:
            _FOUND.append((varlen_attn, "enable_gqa" in inspect.signature(varlen_attn).parameters))
    return _FOUND[0]


def varlen_runs_here(device: torch.device, precision: str) -> bool:
    """Whether attention by segments takes the variable-length kernel on ``device`` at ``precision`` ("fp32",
    "bf16", "fp16"): CUDA, half precision, a torch that has the kernel."""
    return device.type == "cuda" and precision != "fp32" and varlen_kernel() is not None


def varlen_usable(query: torch.Tensor, dropout: float) -> bool:
    """Whether ``query``'s attention can run in the variable-length kernel (see the module docstring)."""
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and not dropout
            and query.size(-1) <= 256 and varlen_kernel() is not None)


class _BoundsCache:
    """The offsets of the batch being trained, made once per forward and shared by its layers: keyed by the runs
    object itself (held, so its identity cannot be reused by a later batch's)."""

    def __init__(self) -> None:
        self._entry: tuple[Runs, int, torch.device, torch.Tensor, int] | None = None

    def get(self, runs: Runs, width: int, device: torch.device) -> tuple[torch.Tensor, int]:
        entry = self._entry
        if entry is None or entry[0] is not runs or entry[1] != width or entry[2] != device:
            bounds, longest = sequence_bounds(runs, width)
            offsets = torch.tensor(bounds, dtype=torch.int32).to(device, non_blocking=True)
            entry = self._entry = (runs, width, device, offsets, longest)
        return entry[3], entry[4]


_BOUNDS = _BoundsCache()


def varlen_segments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, runs: Runs,
                    scaling: float | None = None, sliding_window: int | None = None, **_: Any) -> torch.Tensor:
    """:func:`~tunesmith.model.segment_attention.segment_sdpa`'s result (``[B, H, T, D]``, a view of a
    ``[B, T, H, D]`` tensor) from one variable-length kernel call; only where :func:`varlen_usable`."""
    offsets, longest = _BOUNDS.get(runs, query.size(2), query.device)
    return varlen_attend(query, key, value, offsets, longest, scaling, sliding_window)


def varlen_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, offsets: torch.Tensor, longest: int,
                  scaling: float | None = None, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of the sequences bounded by ``offsets`` (int32 ``[N + 1]`` over the flattened ``[B·T]``
    batch; ``longest`` the longest one) in one kernel call: ``[B, H, T, D]`` in, ``[B, H, T, D]`` out (a view of
    a ``[B, T, H, D]`` tensor). Traceable by torch.compile (the kernel is a custom op); only where
    :func:`varlen_usable`."""
    kernel = varlen_kernel()
    assert kernel is not None
    attend, takes_gqa = kernel
    rows, heads, width, dim = query.shape
    q, k, v = (x.transpose(1, 2).reshape(rows * width, x.size(1), dim) for x in (query, key, value))
    options: dict[str, Any] = {"scale": scaling}
    if k.size(1) != heads:  # GQA: the kernel shares key/value heads itself where this torch lets it
        if takes_gqa:
            options["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(heads // x.size(1), dim=1) for x in (k, v))
    # causal: (-1, 0); a sliding window of W keys (the token itself and W - 1 before it): (W - 1, 0)
    options["window_size"] = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
    out = attend(q, k, v, offsets, offsets, longest, longest, **options)
    return out.view(rows, width, heads, dim).transpose(1, 2)
