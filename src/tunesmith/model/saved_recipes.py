"""Saved tensors kept as recipes: an activation that is one cheap op away from tensors autograd keeps anyway is
not kept itself, but recomputed when the backward needs it.

Why. A linear layer saves its input for its weight's gradient (full fine-tuning) or LoRA's ``A`` (LoRA). In a
Llama-style layer those inputs are an RMSNorm's output (q/k/v, gate/up) and ``silu(gate) * up`` (down): one
hidden-size tensor per norm and one intermediate-size tensor per MLP. The lean norm and SwiGLU
(:mod:`tunesmith.model.lean_activations`) keep their own inputs for their backward anyway (``x`` and its ``rstd``;
``gate`` and ``up``), so from those the outputs are one elementwise op away. For SmolLM2-135M that is 2,688 floats
a token and layer, about a quarter of what a lean layer keeps.

How. Inside :func:`saved_as_recipes` (the train step's forward), a module registers its output with the function
and the inputs that made it (:func:`remember`). Autograd's saved-tensor hooks then see every tensor any op saves
— a plain ``Linear``, PEFT's LoRA, the fused LoRA, under any engine — and one that is that output, or a view of
it, is kept as its recipe; the backward reruns the same function on the same inputs, so it gets the same bits.

Safety. A registered output changed in place before it is saved is saved as it is; a recipe's input changed in
place before the backward raises (as autograd does for saved tensors). Inner saved-tensor hooks (activation
checkpointing, offloading) take precedence, so inside them nothing changes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

_active: list[_Registry] = []


class _Output:
    """A registered output: how to make it again, and (while its recipes are being unpacked) the remade tensor,
    so that the layers reading the same output (q, k and v; gate and up) recompute it once."""

    def __init__(self, output: torch.Tensor, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]):
        # alive while anything uses its storage: a view's base (views of a view hold the first one's base only)
        self.ref = weakref.ref(output if output._base is None else output._base)
        self.offset = output.storage_offset()
        self.version = output._version
        self.fn, self.inputs = fn, inputs
        self.versions = tuple(t._version for t in inputs)
        self.pending = 0  # recipes packed and not yet unpacked
        self.remade: torch.Tensor | None = None

    def remake(self) -> torch.Tensor:
        if any(t._version != v for t, v in zip(self.inputs, self.versions, strict=True)):
            raise RuntimeError("a tensor a saved activation is recomputed from was modified in place after the "
                               "forward (saved_as_recipes); turn off lean_activations to keep the activation")
        remade = self.remade if self.remade is not None else self.fn(*self.inputs)
        self.pending -= 1
        self.remade = remade if self.pending > 0 else None
        return remade


@dataclass(frozen=True)
class _Recipe:
    output: _Output
    size: torch.Size
    stride: tuple[int, ...]
    offset: int

    def tensor(self) -> torch.Tensor:
        return self.output.remake().as_strided(self.size, self.stride, self.offset)


class _Registry:
    def __init__(self) -> None:
        self.outputs: dict[int, _Output] = {}  # by the address of the output's storage

    def pack(self, saved: torch.Tensor) -> Any:
        if not self.outputs or type(saved) is not torch.Tensor:  # parameters and tensor subclasses pass through
            return saved
        address = saved.untyped_storage().data_ptr()
        entry = self.outputs.get(address)
        output = entry.ref() if entry is not None else None
        if (output is None or output.untyped_storage().data_ptr() != address
                or saved._version != entry.version or saved.dtype != output.dtype):
            return saved
        entry.pending += 1
        return _Recipe(entry, saved.size(), saved.stride(), saved.storage_offset() - entry.offset)

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        return packed.tensor() if isinstance(packed, _Recipe) else packed


def recording() -> bool:
    """Whether :func:`remember` keeps anything now (inside :func:`saved_as_recipes`, with gradients on)."""
    return bool(_active) and torch.is_grad_enabled()


def remember(output: torch.Tensor, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> None:
    """Within :func:`saved_as_recipes`: ``output`` equals ``fn(*inputs)`` bit for bit, so autograd may keep that
    recipe instead of ``output``. ``inputs`` must be kept alive anyway (saved for a backward), or be small."""
    if not recording() or not output.is_contiguous() or output.untyped_storage().data_ptr() == 0:
        return  # (no data: empty or on the meta device, where addresses tell nothing apart)
    detached = tuple(t.detach() for t in inputs)  # the same storage and version counter, without the graph
    _active[-1].outputs[output.untyped_storage().data_ptr()] = _Output(output, fn, detached)


@contextmanager
def saved_as_recipes() -> Iterator[_Registry]:
    """Autograd keeps :func:`remember`-ed outputs as recipes for what runs inside (see the module docstring).
    Yields the hooks (``pack``, ``unpack``), for a caller that wraps them in its own."""
    registry = _Registry()
    _active.append(registry)
    try:
        with torch.autograd.graph.saved_tensors_hooks(registry.pack, registry.unpack):
            yield registry
    finally:
        _active.pop()
        registry.outputs.clear()


__all__ = ["recording", "remember", "saved_as_recipes"]
