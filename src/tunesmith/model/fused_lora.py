"""LoRA layers whose base projection and adapter share one GEMM output (``fused_lora``).

PEFT's LoRA ``Linear`` computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: two full-size
``tokens × out_features`` tensors more than the projection itself (the scaled adapter output and the sum), read
and written once more each in the backward (the scaling's gradient, the sum of the two input gradients). On a
memory-bound device those passes cost as much as the adapter's small matmuls: on 2 CPU cores a SmolLM2 LoRA step
spends ~0.7 s of ~13 s in them. Here the adapter's product is accumulated into the base projection's output by
the GEMM itself (``addmm_`` with ``alpha = scaling``), and in the backward into the input's gradient the same way,
so no extra full-size tensor is made. The arithmetic is the same: loss and gradients equal PEFT's within float
rounding (tests/model/test_fused_lora.py).

The instance's class is swapped for a subclass (:func:`use_fused_lora`): the module tree, state dict, PEFT's
save/merge/unload and every ``isinstance`` stay. Each call checks it can fuse and otherwise runs PEFT's own
forward: disabled or merged adapters, several active adapters, DoRA and other variants, a base that is not a plain
``nn.Linear``, hooks on the base or adapter modules (DeepSpeed ZeRO-3 gathers parameters in them), DTensor weights
(tensor parallel, FSDP2 outside its unsharded forward), or dtypes that autocast does not reconcile.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _LoraLinear(torch.autograd.Function):
    """``x @ W.T + b + scaling * (x_lora @ A.T) @ B.T`` with the adapter accumulated into the GEMM output.
    ``x_lora`` is None when the adapter sees ``x`` itself (no dropout): then the input's two gradients are also
    accumulated by one GEMM. All tensors arrive in the compute dtype (the caller casts them, as autocast would)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, x_lora: torch.Tensor | None, weight: torch.Tensor,
                bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))
        rows_lora = rows if x_lora is None else x_lora.reshape(-1, x_lora.size(-1))
        down = rows_lora @ lora_a.t()  # [tokens, r]: kept for lora_B's gradient
        out = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
        out.addmm_(down, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(rows, None if x_lora is None else rows_lora, down, weight, lora_a, lora_b)
        ctx.scaling = scaling
        ctx.shapes = (x.shape, None if x_lora is None else x_lora.shape)
        ctx.has_bias = bias is not None
        return out.view(*x.shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, rows_lora, down, weight, lora_a, lora_b = ctx.saved_tensors
        scaling = ctx.scaling
        need_x, need_xl, need_w, need_b, need_a, need_lb, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.size(-1))
        if g.dtype != rows.dtype:
            g = g.to(rows.dtype)
        g_down = g @ lora_b  # [tokens, r]
        grad_x = grad_xl = None
        if need_x:
            grad_x = g @ weight
            if rows_lora is None:
                grad_x.addmm_(g_down, lora_a, alpha=scaling)
            grad_x = grad_x.view(ctx.shapes[0])
        if need_xl:
            grad_xl = (g_down @ lora_a).mul_(scaling).view(ctx.shapes[1])
        source = rows if rows_lora is None else rows_lora
        grad_a = (g_down.t() @ source).mul_(scaling) if need_a else None
        # B's gradient as (downᵀ · g)ᵀ, the same sums: a wide [r, out] GEMM, which a CPU runs ~2× faster than the
        # tall [out, r] of gᵀ · down (97 vs 171 µs for 1,960 tokens × 576 outputs on 2 EPYC cores)
        grad_lb = (down.t() @ g).mul_(scaling).t() if need_lb else None
        grad_w = g.t() @ rows if need_w else None
        grad_b = g.sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_xl, grad_w, grad_b, grad_a, grad_lb, None


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (tensor parallel, FSDP2 outside its unsharded forward)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


class FusedLoraMixin:
    """PEFT's LoRA ``Linear`` with the fused forward where it applies (see the module docstring)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        parts = None if args or kwargs else self._fusable(x)
        if parts is None:
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        dtype, weight, bias, lora_a, lora_b, dropout, scaling = parts
        x_lora = None if isinstance(dropout, nn.Identity) else dropout(x)
        with torch.autocast(x.device.type, enabled=False):
            cast = (lambda t: None if t is None else t.to(dtype))  # noqa: E731 (autocast's casts, made here)
            return _LoraLinear.apply(cast(x), cast(x_lora), cast(weight), cast(bias), cast(lora_a), cast(lora_b),
                                     float(scaling))

    def _fusable(self, x: torch.Tensor) -> tuple[Any, ...] | None:
        """(compute dtype, W, b, A, B, dropout, scaling) when this call can fuse, else None."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or name in getattr(self, "lora_variant", {}) or self.use_dora.get(name):
            return None
        base, lora_a, lora_b = self.base_layer, self.lora_A[name], self.lora_B[name]
        if type(base) is not nn.Linear or type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
            return None
        if getattr(self, "fan_in_fan_out", False) or lora_b.bias is not None:
            return None
        if any(_hooked(m) for m in (base, lora_a, lora_b)):
            return None
        tensors = [base.weight, lora_a.weight, lora_b.weight] + ([base.bias] if base.bias is not None else [])
        if any(is_dtensor(t) or t.device != x.device for t in tensors):
            return None
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        elif all(t.dtype == x.dtype for t in tensors):
            dtype = x.dtype
        else:
            return None
        if not dtype.is_floating_point:
            return None
        return dtype, base.weight, base.bias, lora_a.weight, lora_b.weight, self.lora_dropout[name], \
            self.scaling[name]


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (FusedLoraMixin, cls), {"__module__": __name__})
    return _FUSED_CLASSES[cls]


def use_fused_lora(model: nn.Module) -> int:
    """Swap every plain PEFT LoRA ``Linear`` in ``model`` for its fused subclass; how many were swapped."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    swapped = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = _fused_class(LoraLinear)
            swapped += 1
    return swapped


__all__ = ["FusedLoraMixin", "is_dtensor", "use_fused_lora"]

