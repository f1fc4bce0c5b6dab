"""The LM head of causal-LM objectives, run only where there are targets (``target_only_head``) and, with
``loss_chunk_size``, fused with the cross entropy over chunks of tokens.

A causal LM spends ``2 × hidden × vocab`` FLOPs per position on its head, and the loss a float32 softmax over the
vocabulary, at every position, while only the positions that predict a target count (half of them on alpaca,
where prompts are masked; fewer in DPO). Here the hidden states of those positions are gathered *before* the
head, inside the model's own forward: the head's ``forward`` is replaced on the instance (:class:`HeadSwitch`), so
the module tree, its state dict and every engine's hooks around it (DDP, FSDP2's unshard, ZeRO-3's gather) stay
as they are, and any head module works (PEFT wrappers, quantized layers).

With ``loss_chunk_size`` the head and the cross entropy run fused over chunks of that many targets
(:class:`LinearCrossEntropy`), as Liger's fused linear cross-entropy and Apple's cut cross-entropy do, in plain
torch: the gradients of each chunk are computed in the forward, while its logits exist, so the full
``targets × vocab`` logits (and their float32 copy, softmax and gradient) never exist at once, and the backward
only scales them. This needs a plain ``nn.Linear`` head and a model that does nothing to its logits after the
head (no soft-capping or scaling); otherwise the gathered head is used, with one log line saying why.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tunesmith.config.speed import SpeedArgs
from tunesmith.data.loader import IGNORE_INDEX
from tunesmith.logging import get_logger
from tunesmith.train.objectives.base import ModelCall

log = get_logger("train")

# config attributes with which a model transforms its logits after the head (the fused loss would skip them)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross entropy summed over the target tokens (position t predicts labels[t + 1]), in float32,
    from every position's logits.

    The labels are shifted, not the logits: slicing the (batch × seq × vocab) logits would copy the largest
    tensor of the step (and keep a second one alive for backward).
    """
    shift_labels = shifted_labels(labels, logits.size(1)).to(logits.device)
    if logits.dtype != torch.float32:  # autocast: compute the softmax in float32
        logits = logits.float()
    return F.cross_entropy(
        logits.view(-1, logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def shifted_labels(labels: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """[B, width]: each position's target, labels[t + 1] for position t (-100 past the end). ``width``: the
    positions (default: the labels' own width). A sequence-parallel slice carries one label more than tokens
    (:mod:`tunesmith.train.sequence_parallel`): shifted on the full row before the split, so its last position
    keeps its target, the first token of the next slice."""
    width = labels.size(1) if width is None else width
    return F.pad(labels[:, 1:], (0, width + 1 - labels.size(1)), value=IGNORE_INDEX)


def target_mask(labels: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """[B, width] bool: the positions that predict a target (position t predicts labels[t + 1])."""
    return shifted_labels(labels, width) != IGNORE_INDEX


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """The targets of :func:`target_mask`'s positions, in row-major order: [n]."""
    return labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T + bias, targets), chunk by chunk, float32 softmax; the
    gradients are made in the forward (see the module docstring). Inputs: hidden [n, H], weight [V, H], bias [V]
    or None, targets [n]; ``grads``: whether to make gradients (the caller's grad mode: the forward of an
    autograd Function always runs without it); ``dtype``: the matmul dtype (the autocast dtype, if any)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk_size: int, grads: bool, dtype: torch.dtype,
                vocab: VocabShard | None = None) -> torch.Tensor:
        want_h = grads and hidden.requires_grad
        want_w = grads and weight.requires_grad
        want_b = grads and bias is not None and bias.requires_grad
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.size(0), dtype=torch.float32, device=weight.device) if want_b else None
        for start in range(0, hidden.size(0), chunk_size):
            h = hidden[start : start + chunk_size].to(dtype)
            t = targets[start : start + chunk_size]
            logits = F.linear(h, w, b).float()
            if vocab is None:  # the softmax in place of the logits: one [chunk, V] float32 buffer, three passes
                target_logit = logits.gather(1, t[:, None]).squeeze(1)
                peak = logits.amax(dim=-1, keepdim=True)
                sums = logits.sub_(peak).exp_().sum(dim=-1, keepdim=True)
                total += (peak + sums.log()).squeeze(1).sub_(target_logit).sum()
                here, t_local = None, t
                if not (want_h or want_w or want_b):
                    continue
                g = logits.div_(sums)
            else:
                lse, target_logit, here, t_local = vocab.lse_and_target(logits, t)
                total += (lse - target_logit).sum()
                if not (want_h or want_w or want_b):
                    continue
                g = logits.sub_(lse[:, None]).exp_()
            rows = torch.arange(t.numel(), device=t.device)
            if here is None:
                g[rows, t_local] -= 1.0
            else:  # only the rank holding a target's row of the vocabulary subtracts its one-hot
                g[rows[here], t_local[here]] -= 1.0
            if grad_b is not None:
                grad_b += g.sum(dim=0)
            g = g.to(dtype)
            if grad_h is not None:
                grad_h[start : start + chunk_size] = (g @ w).to(hidden.dtype)
            if grad_w is not None:
                if dtype == torch.float32:
                    grad_w.addmm_(g.t(), h)
                else:
                    grad_w += (g.t() @ h).float()
        if vocab is not None and grad_h is not None:
            vocab.all_reduce(grad_h)  # each rank's part of the hidden states' gradient: its slice of the vocabulary
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out.float()
        return (
            None if grad_h is None else grad_h * scale.to(grad_h.dtype),
            None if grad_w is None else (grad_w * scale).to(ctx.weight_dtype),
            None if grad_b is None else (grad_b * scale).to(ctx.bias_dtype),
            None, None, None, None, None,
        )


@dataclass
class VocabShard:
    """This rank's rows ``[start, start + size)`` of a head split over the vocabulary (tensor parallel) and the
    process group that holds the others: the cross entropy's softmax is taken over the whole vocabulary with three
    all-reduces per chunk (max, sum of exponentials, the target's logit), as Megatron's vocab-parallel loss does."""

    start: int
    size: int
    group: Any

    def all_reduce(self, tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=self.group)
        return tensor

    def lse_and_target(self, logits: torch.Tensor, targets: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logsumexp over the whole vocabulary, each target's logit, which targets this rank holds, their local
        column) for this rank's logits [n, size]."""
        import torch.distributed as dist

        peak = self.all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX)
        sums = self.all_reduce((logits - peak[:, None]).exp().sum(dim=-1))
        here = (targets >= self.start) & (targets < self.start + self.size)
        local = (targets - self.start).clamp(0, self.size - 1)
        picked = logits.gather(1, local[:, None]).squeeze(1) * here
        return peak + sums.log(), self.all_reduce(picked), here, local


def vocab_shard(weight: torch.Tensor) -> tuple[torch.Tensor, VocabShard | None]:
    """(the local weight, its :class:`VocabShard`) for a head weight that is a DTensor split over its rows, else
    (weight, None). ``to_local`` is differentiable: the local gradient becomes the DTensor's."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(weight, DTensor) or weight.placements != (Shard(0),):
        return weight, None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    return weight.to_local(), VocabShard(int(offset[0]), int(shape[0]), weight.device_mesh.get_group())


def _split_over_tp(weight: torch.Tensor) -> bool:
    """A DTensor on a mesh whose last dimension is named ``tp`` and splits its rows (FSDP2's sharded head weight
    under tensor parallel; the forward sees the ``tp`` part only, which :func:`vocab_shard` recognises)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(weight, DTensor):
        return False
    names = weight.device_mesh.mesh_dim_names or ()
    return bool(names) and names[-1] == "tp" and weight.placements[-1] == Shard(0)


def _compute_dtype(device: torch.device, fallback: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return fallback


@dataclass
class _Request:
    """What the next call of the head does: gather the rows of ``mask``; with ``targets``, return the summed
    cross entropy instead of logits."""

    mask: torch.Tensor
    targets: torch.Tensor | None = None
    chunk_size: int = 0


class HeadSwitch:
    """Replaces ``head.forward`` on the instance; a pending :class:`_Request` changes the next call only.
    ``liger``: liger-kernel's fused linear cross-entropy, used instead of ours for CUDA tensors."""

    def __init__(self, head: torch.nn.Module) -> None:
        self.head = head
        self.request: _Request | None = None
        self.liger: torch.nn.Module | None = None
        head.forward = self  # an instance attribute: the class (and every hook on the module) stays

    @property
    def vocab_parallel(self) -> bool:
        """Whether the head's weight is split over the vocabulary (tensor parallel): a DTensor split on the mesh
        dimension named ``tp`` (outside the forward, FSDP2 on a ``dp × tp`` mesh holds it as a 2-D DTensor whose
        last placement is that split; plain FSDP2's row shards over ``dp`` are not a vocabulary split)."""
        return _split_over_tp(self.head.weight)

    def __call__(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        request, self.request = self.request, None
        if request is None:
            return self._logits(hidden, *args, **kwargs)
        selected = hidden[request.mask.to(hidden.device)]
        if request.targets is None:
            return self._logits(selected, *args, **kwargs)
        weight, vocab = vocab_shard(self.head.weight)
        bias = self.head.bias
        targets = request.targets.to(hidden.device)
        if self.liger is not None and hidden.is_cuda and vocab is None:
            return self.liger(weight, selected, targets, bias)
        chunk = request.chunk_size or max(targets.numel(), 1)
        return LinearCrossEntropy.apply(selected, weight, bias, targets, chunk, torch.is_grad_enabled(),
                                        _compute_dtype(hidden.device, weight.dtype), vocab)

    def _logits(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The head's own forward; with a vocab-split weight, each rank's slice of the logits gathered whole."""
        if not self.vocab_parallel:
            return type(self.head).forward(self.head, hidden, *args, **kwargs)
        from torch.distributed.tensor import DTensor, Replicate

        weight = self.head.weight
        whole = DTensor.from_local(hidden, weight.device_mesh, [Replicate()], run_check=False)
        return F.linear(whole, weight).redistribute(placements=[Replicate()]).to_local()

    def __deepcopy__(self, memo: dict[int, Any]) -> HeadSwitch:  # a frozen reference copy: a switch of its own
        clone = HeadSwitch.__new__(HeadSwitch)
        clone.head = copy.deepcopy(self.head, memo)  # the copy under construction, from the memo
        clone.request = None
        clone.liger = None
        return clone

    @contextmanager
    def pending(self, request: _Request) -> Iterator[None]:
        """``request`` for the head call inside the block (never left for a later call if the forward fails)."""
        self.request = request
        try:
            yield
        finally:
            self.request = None


class LMHead:
    """How a causal-LM objective gets the logits / losses of its target positions; :meth:`install` on the
    model before the engine wraps it. ``target_only``: gather before the head; ``chunk_size`` > 0: the fused
    chunked loss (both fall back to the full head when the model does not allow them, see :meth:`install`)."""

    def __init__(self, target_only: bool = True, chunk_size: int = 0, liger: bool = False) -> None:
        self.target_only = target_only or chunk_size > 0
        self.chunk_size = chunk_size
        self.liger = liger  # enable_liger_kernel: Liger's fused loss on CUDA when installed
        self.switch: HeadSwitch | None = None

    @property
    def mode(self) -> str:
        """What runs: ``full`` head, ``targets`` (gathered), or ``chunked`` (gathered and fused)."""
        if self.switch is None:
            return "full"
        return "chunked" if self.chunk_size > 0 else "targets"

    def describe(self) -> str:
        return {"full": "LM head on every position", "targets": "LM head on target positions only",
                "chunked": f"LM head on target positions only, fused with the loss in chunks of {self.chunk_size}"
                }[self.mode]

    def install(self, model: torch.nn.Module, announce: bool = True) -> torch.nn.Module:
        """Switch ``model``'s head; ``announce``: log why a feature falls back (not for a second, frozen model)."""
        say = log.info if announce else log.debug
        if not self.target_only:
            return model
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            say("target_only_head: %s has no output embeddings to gather for; the full head runs",
                     type(model).__name__)
            self.chunk_size = 0
            return model
        if self.chunk_size > 0 and (reason := _fused_refusal(model, head)):
            say("loss_chunk_size: %s; the head runs on the target positions only, unfused", reason)
            self.chunk_size = 0
        existing = head.__dict__.get("forward")
        self.switch = existing if isinstance(existing, HeadSwitch) else HeadSwitch(head)
        if self.liger and self.chunk_size > 0:
            self.switch.liger = _liger_loss()
        return model

    def loss_sum(self, model: ModelCall, inputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
        """The cross entropy summed over the target tokens, float32."""
        if self.switch is None:
            return token_loss_sum(model(**inputs).logits, labels)
        targets = shifted_targets(labels)
        if self.chunk_size > 0 or self.switch.vocab_parallel:  # fused: a vocab-split head never gathers logits
            mask = target_mask(labels, _positions(inputs))
            with self.switch.pending(_Request(mask, targets, self.chunk_size)):
                return model(**inputs).logits
        logits = self.target_logits(model, inputs, labels)
        return F.cross_entropy(logits, targets.to(logits.device), reduction="sum")

    def target_logits(self, model: ModelCall, inputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
        """The float32 logits of the target positions, [n, vocab] (row-major order, as :func:`shifted_targets`)."""
        mask = target_mask(labels, _positions(inputs))
        if self.switch is None:
            return model(**inputs).logits[mask.to(model.device)].float()
        with self.switch.pending(_Request(mask)):
            return model(**inputs).logits.float()


def _positions(inputs: dict[str, Any]) -> int | None:
    """How many positions the model's output has (the labels' own width when they do not say otherwise)."""
    ids = inputs.get("input_ids")
    return None if ids is None else ids.size(1)


def lm_head(speed: SpeedArgs) -> LMHead:
    """The head a causal-LM objective runs with these speed keys."""
    return LMHead(speed.target_only_head, speed.resolved_chunk_size(), speed.enable_liger_kernel)


def _liger_loss() -> torch.nn.Module | None:
    """liger-kernel's fused linear cross-entropy (summed) where it can run: CUDA, with the package installed."""
    import importlib.util

    if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
        why = "no CUDA device" if not torch.cuda.is_available() else "liger-kernel is not installed"
        log.info("enable_liger_kernel: %s; tunesmith's chunked loss does the same in plain torch", why)
        return None
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    log.info("enable_liger_kernel: liger-kernel's fused linear cross-entropy runs the LM head and the loss")
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")


def _fused_refusal(model: torch.nn.Module, head: torch.nn.Module) -> str | None:
    """Why the fused loss cannot replace this model's head, or None."""
    if type(head) is not torch.nn.Linear:
        return f"the head is a {type(head).__name__}, not a plain Linear layer"
    config = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return f"the model transforms its logits after the head ({name}={value})"
    return None


__all__ = ["HeadSwitch", "LMHead", "lm_head", "LinearCrossEntropy", "VocabShard", "vocab_shard", "shifted_labels", "shifted_targets", "target_mask",
           "token_loss_sum"]
