"""Decoder layers that keep less for backward (``lean_activations``): the RMSNorms and the SwiGLU MLPs of
transformers' models as autograd functions that save their inputs only.

Why. Autograd keeps every tensor an op needs for its gradient. In transformers' ``LlamaRMSNorm``
(``weight * (x * rsqrt(mean(x²) + eps))``) that is ``x``, the per-token ``rsqrt`` and, when the weight trains,
the normalized ``x`` as well: one more hidden-size tensor per norm. In the SwiGLU MLP
(``down(silu(gate(x)) * up(x))``) it is ``gate``, ``up`` and ``silu(gate)``: one more intermediate-size tensor per
layer. Both are one elementwise op away from what is kept anyway, so here they are recomputed in the backward
instead (the technique of Liger's RMSNorm and SwiGLU kernels, in plain torch: CPU, CUDA, NPU). For SmolLM2-135M's
full fine-tuning (hidden 576, intermediate 1,536) that is 2,688 of about 12,300 floats a token keeps per layer.

Which modules. A module is changed only when its class's ``forward`` is transformers' Llama code itself (the same
bytecode, names and constants: the families that copy it, Qwen2/3, Mistral, Phi-3, Granite, … and not Gemma's
``1 + weight`` norm), and, for the MLP, when its activation is SiLU. The instance's class is swapped for a
subclass (:func:`use_lean_activations`), so the module tree, state dict, PEFT and every engine's hooks stay; a
call on DTensors (tensor parallel) runs the original forward.

The SwiGLU's gradients are the same ops autograd would run (bitwise equal); the norm's are the analytic formula,
equal within float rounding (tests/model/test_lean_activations.py). Their outputs, which the next linear layers
would keep, are registered as recipes (:mod:`tunesmith.model.saved_recipes`) and remade in the backward.

Under autocast. A decoder layer's two norms feed only linear layers (q/k/v; gate/up), and autocast casts the
float32 norm output to bf16 / fp16 once *per projection*, each projection keeping its own copy for backward: five
casts and five copies a layer. Where the layer runs transformers' Llama decoder code (so those norms feed the
attention and a SwiGLU MLP), the lean norm hands out the autocast dtype itself: the same bits autocast would have
made, one cast, one tensor the projections share (and a recipe, so none is kept). The three projections'
gradients then add up in that dtype before the norm's backward (in float32 without it): bf16 rounding of a sum
of bf16 products, the precision the projections computed them in.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.model.fused_lora import is_dtensor
from tunesmith.model.saved_recipes import recording, remember


def _rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x.detach().float().pow(2).mean(-1, keepdim=True) + eps)


def _normed(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dtype: torch.dtype | None = None
            ) -> torch.Tensor:
    """The norm's output; with ``dtype``, cast to it as autocast casts a linear layer's input."""
    out = weight * (x.float() * rstd).to(x.dtype)
    return out if dtype is None else out.to(dtype)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class _RMSNorm(torch.autograd.Function):
    """``weight * (x32 * rstd).to(x.dtype)`` with ``rstd = rsqrt(mean(x32²) + eps)`` (given), as transformers
    computes it, cast to ``dtype`` if given; saves ``x`` and ``rstd`` only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                dtype: torch.dtype | None = None) -> torch.Tensor:
        ctx.save_for_backward(x, weight, rstd)
        return _normed(x, weight, rstd, dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            rows = (grad * normed.to(x.dtype)).reshape(-1, weight.numel())
            grad_weight = rows.sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_normed = (grad * weight).float()
            dot = (grad_normed * normed).mean(-1, keepdim=True)
            grad_x = ((grad_normed - normed * dot) * rstd).to(x.dtype)
        return grad_x, grad_weight, None, None


class _SiluMul(torch.autograd.Function):
    """``silu(gate) * up``; saves ``gate`` and ``up`` and recomputes ``silu(gate)`` in the backward."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return _silu_mul(gate, up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


class LeanRMSNorm:
    """Mixed in before a Llama-style RMSNorm class (see the module docstring). ``feeds_linears``: set on a
    decoder layer's two norms, whose outputs only linear layers read (then autocast's dtype is handed out)."""

    feeds_linears = False

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if is_dtensor(hidden_states) or is_dtensor(self.weight):
            return super().forward(hidden_states)  # type: ignore[misc]
        rstd = _rstd(hidden_states, self.variance_epsilon)
        dtype = self._linear_input_dtype(hidden_states)
        out = _RMSNorm.apply(hidden_states, self.weight, rstd, dtype)
        if recording():  # the weight as a copy (a few floats): engines may free a parameter's storage till backward
            remember(out, functools.partial(_normed, dtype=dtype), hidden_states, self.weight.detach().clone(), rstd)
        return out

    def _linear_input_dtype(self, hidden_states: torch.Tensor) -> torch.dtype | None:
        """The autocast dtype when the linear layers reading this norm would cast its output to it, else None."""
        device = hidden_states.device.type
        if not self.feeds_linears or not torch.is_autocast_enabled(device):
            return None
        dtype = torch.get_autocast_dtype(device)
        wider = torch.promote_types(hidden_states.dtype, self.weight.dtype)
        return dtype if dtype.itemsize < wider.itemsize else None


class LeanSwiGLU:
    """Mixed in before a Llama-style MLP class whose activation is SiLU (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if gate.dtype != up.dtype or is_dtensor(gate) or is_dtensor(up):
            return self.down_proj(self.act_fn(gate) * up)
        product = _SiluMul.apply(gate, up)
        remember(product, _silu_mul, gate, up)
        return self.down_proj(product)


_CLASSES: dict[tuple[type, type], type] = {}


def _lean_class(mixin: type, cls: type) -> type:
    key = (mixin, cls)
    if key not in _CLASSES:
        _CLASSES[key] = type(cls.__name__, (mixin, cls), {"__module__": cls.__module__, "__doc__": cls.__doc__})
    return _CLASSES[key]


def _same_code(cls: type, reference: Any) -> bool:
    forward = getattr(cls, "forward", None)
    return forward is not None and _same_code_object(forward, reference)


def _silu_classes() -> tuple[type, ...]:
    from transformers.activations import SiLUActivation

    return (nn.SiLU, SiLUActivation)


def _mixin_for(module: nn.Module) -> type | None:
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    cls = type(module)
    if issubclass(cls, (LeanRMSNorm, LeanSwiGLU)):
        return None
    if _same_code(cls, LlamaRMSNorm.forward) and hasattr(module, "variance_epsilon"):
        return LeanRMSNorm
    if _same_code(cls, LlamaMLP.forward) and type(getattr(module, "act_fn", None)) in _silu_classes():
        return LeanSwiGLU
    return None


def _llama_decoder_layer(module: nn.Module) -> bool:
    """Whether ``module`` runs transformers' Llama decoder-layer code (decorators unwrapped): pre-norms whose
    outputs go into ``self_attn`` and ``mlp`` only."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    forward = getattr(type(module), "forward", None)
    return forward is not None and _same_code_object(inspect.unwrap(forward), inspect.unwrap(LlamaDecoderLayer.forward))


def _same_code_object(fn: Any, reference: Any) -> bool:
    code, ref = getattr(fn, "__code__", None), reference.__code__
    return code is not None and (code.co_code, code.co_names, code.co_consts) == (
        ref.co_code, ref.co_names, ref.co_consts)


def _mark_norms_feeding_linears(model: nn.Module) -> None:
    """``feeds_linears`` on the lean norms of Llama-code decoder layers: the input norm (read by the attention's
    projections) and, where the MLP is a lean SwiGLU (read by gate and up), the post-attention norm."""
    for layer in model.modules():
        if not _llama_decoder_layer(layer):
            continue
        norm = getattr(layer, "input_layernorm", None)
        if isinstance(norm, LeanRMSNorm):
            norm.feeds_linears = True
        norm = getattr(layer, "post_attention_layernorm", None)
        if isinstance(norm, LeanRMSNorm) and isinstance(getattr(layer, "mlp", None), LeanSwiGLU):
            norm.feeds_linears = True


def use_lean_activations(model: nn.Module) -> dict[str, int]:
    """Swap the Llama-style RMSNorms and SiLU MLPs of ``model`` for their lean subclasses; how many of each."""
    counts = {"norms": 0, "mlps": 0}
    for module in model.modules():
        mixin = _mixin_for(module)
        if mixin is not None:
            module.__class__ = _lean_class(mixin, type(module))
            counts["norms" if mixin is LeanRMSNorm else "mlps"] += 1
    _mark_norms_feeding_linears(model)
    return counts


def lean_activation_count(model: nn.Module) -> dict[str, int]:
    """How many of ``model``'s norms and MLPs run lean (for the speed line)."""
    modules = list(model.modules())
    return {"norms": sum(isinstance(m, LeanRMSNorm) for m in modules),
            "mlps": sum(isinstance(m, LeanSwiGLU) for m in modules)}


__all__ = ["LeanRMSNorm", "LeanSwiGLU", "lean_activation_count", "use_lean_activations"]
