"""The engine interface: where the model meets the hardware and the other ranks.

The loop knows engines only through :class:`Engine`. An engine declares what it needs before the model exists
(``validate`` refuses a config it cannot run, ``load_device`` / ``load_dtype`` say where and how the model is
loaded), then owns the model and its optimizer from ``setup`` on: precision (``autocast``), gradient
synchronisation (``accumulating``, ``backward``), the optimizer step with clipping (``step``) and the checkpoint
format (``save_checkpoint`` / ``load_checkpoint`` / ``save_model``). Reductions of logged numbers go through its
:class:`~tunesmith.train.distributed.Collectives` (``comm``).

:class:`TorchEngine` is what single, ddp and fsdp2 share: tunesmith's AdamW, stepped with torch, and torch
autocast with a loss scaler for fp16. DeepSpeed builds and steps its own optimizer, so it implements the
interface by itself.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from tunesmith.config import Config
from tunesmith.config.schema import MethodArgs, TrainArgs
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.distributed import Collectives
from tunesmith.train.optimizers import LayerwiseOptimizer, build_optimizer
from tunesmith.train.precision import Precision, autocast, frozen_base_dtype
from tunesmith.train.state import TrainState


class Engine(Protocol):
    """One training engine (``single``, ``ddp``, ``fsdp2``, ``deepspeed``); see the module docstring."""

    name: ClassVar[str]
    # whether it runs in a process group (joined before it is built; a group of one without a launcher)
    needs_process_group: ClassVar[bool]
    device: torch.device
    precision: Precision
    comm: Collectives
    model: torch.nn.Module  # after setup: what the loop calls (wrapped as the engine needs)
    optimizer: torch.optim.Optimizer  # after setup: the lr schedule drives its param groups

    @classmethod
    def validate(cls, cfg: Config, world_size: int) -> None:
        """Raise a ConfigError, before anything is loaded, when this engine cannot run ``cfg``."""

    @property
    def data_replicas(self) -> int:
        """How many ranks run each batch and compute the same loss (tensor parallel's group): the loop counts
        the window's units, losses and metrics once per group."""

    @property
    def whole_model_on_each_rank(self) -> bool:
        """Whether one rank can run the model alone (rank 0 generating sample answers); False where every
        forward is a collective over sharded parameters (fsdp2, ZeRO-3)."""

    def load_device(self, quantized: bool) -> torch.device:
        """Where the model is loaded before :meth:`setup` (a quantized base is quantized where it computes)."""

    def load_dtype(self, method: MethodArgs) -> torch.dtype:
        """The dtype the model is loaded in."""

    def setup(self, model: torch.nn.Module, train: TrainArgs, total_steps: int) -> None:
        """Place / wrap ``model`` and build its optimizer (``self.model``, ``self.optimizer``)."""

    def autocast(self) -> AbstractContextManager: ...

    def accumulating(self, last: bool) -> AbstractContextManager:
        """Around a micro-batch's forward + backward; ``last`` for the last one of an accumulation window, where
        gradients are synchronised."""

    def backward(self, loss: torch.Tensor) -> None:
        """``loss``: this rank's share of the window's loss (its token-loss sum / the targets of the window on
        all ranks), so the gradients summed over micro-batches and ranks are those of one big batch."""

    def step(self) -> float:
        """Clip to ``max_grad_norm`` (0: measure only), step, zero the gradients; returns the pre-clip norm."""

    def unwrapped(self) -> torch.nn.Module:
        """The HF / PEFT model inside any wrapper (for generation and saving)."""

    def save_checkpoint(self, output_dir: Path, tokenizer: Any, scheduler: Any, state: TrainState) -> Path:
        """``output_dir/checkpoint-<step>``, atomically (every rank must call it)."""

    def load_checkpoint(self, path: Path, scheduler: Any) -> TrainState:
        """Restore weights, optimizer, scheduler and RNG from ``path``; returns the saved progress."""

    def save_model(self, tokenizer: Any, directory: Path) -> None:
        """The HF / PEFT weights and the tokenizer into ``directory`` (every rank must call it)."""


def clip_and_step(
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    max_grad_norm: float,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """Unscale (fp16), clip to ``max_grad_norm`` (0: measure only), step, zero the grads; the pre-clip norm."""
    if isinstance(optimizer, LayerwiseOptimizer):  # stepped during backward; nothing left to clip
        return torch.tensor(optimizer.take_grad_norm())
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = [p.grad for p in params if p.grad is not None]
    if any(grad.is_sparse for grad in grads):  # BAdam's ratio mode: torch's clipping takes dense gradients only
        norm = _clip_sparse(grads, max_grad_norm)
    elif len(meshes := _grad_meshes(grads)) > 1:  # FSDP2 × tensor parallel: DTensors on two meshes
        norm = _clip_across_meshes(meshes, max_grad_norm)
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def _grad_meshes(grads: list[torch.Tensor]) -> dict[Any, list[torch.Tensor]]:
    """The gradients grouped by the DeviceMesh of their DTensor (None: plain tensors)."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for grad in grads:
        groups.setdefault(getattr(grad, "device_mesh", None), []).append(grad)
    return groups


def _clip_across_meshes(groups: dict[Any, list[torch.Tensor]], max_grad_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over DTensor gradients on different meshes (a 2-D dp × tp mesh for the split weights, its
    dp dimension for the rest), which torch's cannot stack: each group's norm made whole on its own mesh, then
    combined; the same norm and scaling."""
    squares = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        squares.append(norm.float().square())
    total = torch.stack(squares).sum().sqrt()
    if max_grad_norm > 0 and float(total) > max_grad_norm:
        scale = max_grad_norm / (float(total) + 1e-6)
        for grads in groups.values():
            torch._foreach_mul_(grads, scale)
    return total


def _clip_sparse(grads: list[torch.Tensor], max_grad_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over a mix of dense and sparse (COO) gradients: the same norm and scaling."""
    norm = torch.linalg.vector_norm(torch.stack([
        torch.linalg.vector_norm((grad.coalesce().values() if grad.is_sparse else grad).float()) for grad in grads
    ]))
    if max_grad_norm > 0 and float(norm) > max_grad_norm:
        scale = max_grad_norm / (float(norm) + 1e-6)
        for grad in grads:
            grad.mul_(scale)
    return norm


class TorchEngine:
    """Shared by the engines whose optimizer tunesmith builds and steps with torch (single, ddp, fsdp2)."""

    name: ClassVar[str]
    needs_process_group: ClassVar[bool] = True
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer

    def __init__(self, device: torch.device, precision: Precision = "fp32", comm: Collectives | None = None) -> None:
        self.device = device
        self.precision = precision
        self.comm = comm or Collectives()
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.params: list[torch.nn.Parameter] = []
        self.max_grad_norm = 1.0

    @classmethod
    def validate(cls, cfg: Config, world_size: int) -> None:
        return None

    @property
    def whole_model_on_each_rank(self) -> bool:
        return True

    @property
    def data_replicas(self) -> int:
        return 1

    def load_device(self, quantized: bool) -> torch.device:
        return self.device

    def load_dtype(self, method: MethodArgs) -> torch.dtype:
        return frozen_base_dtype(method, self.precision, self.device)

    def setup(self, model: torch.nn.Module, train: TrainArgs, total_steps: int) -> None:
        self.model = self.wrap(model)
        self.optimizer = build_optimizer(self.model, train, train)  # type: ignore[arg-type]  # a Config
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.max_grad_norm = train.max_grad_norm
        self.save_only_model = train.save_only_model

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Place (and wrap) the model; the base places it on the device."""
        return model.to(self.device)

    def autocast(self) -> AbstractContextManager:
        return autocast(self.precision, self.device)

    def accumulating(self, last: bool) -> AbstractContextManager:
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> float:
        return float(clip_and_step(self.optimizer, self.params, self.max_grad_norm, self.scaler))

    def unwrapped(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)

    # ------------------------------------------------------------------------------------------ checkpoints

    def extra_state(self) -> dict[str, Any]:
        """Objects with state_dict/load_state_dict that checkpoints carry besides model/optimizer/scheduler."""
        return {"scaler": self.scaler} if self.scaler is not None else {}

    def save_model(self, tokenizer: Any, directory: Path) -> None:
        if self.comm.is_main:
            ckpt.save_model(self.model, tokenizer, directory)

    def write_weights_and_optimizer(self, directory: Path, tokenizer: Any, step: int) -> None:
        """Replicated state (single, ddp): rank 0 writes the HF/PEFT weights and ``optimizer.pt``."""
        if self.comm.is_main:
            ckpt.save_model(self.model, tokenizer, directory)
            if not self.save_only_model:
                torch.save(self.optimizer.state_dict(), Path(directory) / ckpt.OPTIMIZER_FILE)

    def save_checkpoint(self, output_dir: Path, tokenizer: Any, scheduler: Any, state: TrainState) -> Path:
        return ckpt.write_checkpoint(
            output_dir,
            state,
            scheduler,
            self.comm,
            write=lambda tmp: self.write_weights_and_optimizer(tmp, tokenizer, state.global_step),
            extra=self.extra_state(),
            model=self.unwrapped(),
        )

    def load_checkpoint(self, path: Path, scheduler: Any) -> TrainState:
        return ckpt.load_checkpoint(
            path, self.model, self.optimizer, scheduler, extra=self.extra_state(), rank=self.comm.rank
        )
