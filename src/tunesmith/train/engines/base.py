"""The engine interface: where the model meets the hardware and the other ranks.

The loop only calls these methods; an engine decides placement and wrapping (``prepare``), model and optimizer
(``setup``), precision (``autocast``), gradient synchronisation (``no_sync`` during accumulation, ``backward``),
the optimizer step with clipping (``step``), reductions of logged numbers (``all_reduce_sum``), and the checkpoint
format (``save_checkpoint`` / ``load_checkpoint`` / ``save_model``). :class:`Engine` implements everything for one
process; the distributed engines override what differs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch

from tunesmith.config import Config
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.optim import build_optimizer
from tunesmith.train.state import TrainState

Precision = Literal["fp32", "bf16", "fp16"]


class Engine:
    """One process, one device. Subclasses: :class:`~tunesmith.train.engines.ddp.DDPEngine`,
    :class:`~tunesmith.train.engines.fsdp2.FSDP2Engine`."""

    name = "single"
    # flash_attn: fa2: packed rows go to the model as position_ids without the 4-D mask (Batch.model_inputs)
    varlen: bool = False

    def __init__(
        self, device: torch.device, precision: Precision = "fp32", rank: int = 0, world_size: int = 1
    ) -> None:
        self.device = device
        self.precision = precision
        self.rank = rank
        self.world_size = world_size
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def whole_model_on_each_rank(self) -> bool:
        """Whether one rank can run the model by itself (e.g. rank 0 generating sample answers); False where
        parameters are sharded and every forward is a collective (fsdp2, ZeRO-3)."""
        return True

    # ------------------------------------------------------------------------------------------- compute

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def setup(
        self, model: torch.nn.Module, cfg: Config, total_steps: int
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """The model to train (placed/wrapped by :meth:`prepare`) and its AdamW. DeepSpeed overrides this: it
        builds both together. The lr schedule is attached to the returned optimizer by the loop."""
        model = self.prepare(model)
        return model, build_optimizer(model, cfg)

    def autocast(self) -> AbstractContextManager:
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def no_sync(self, model: torch.nn.Module, skip: bool) -> AbstractContextManager:
        """Around a micro-batch's forward + backward: ``skip`` = True for all but the last micro-batch of an
        accumulation window, so gradients are synchronised once per optimizer step."""
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """``loss`` is this rank's share of the window's loss (its token-loss sum / the window's targets on all
        ranks). Data-parallel wrappers average gradients over ranks, so they scale by the world size first."""
        if self.world_size > 1:
            loss = loss * self.world_size
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(
        self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_grad_norm: float
    ) -> float:
        """Unscale (fp16), clip to ``max_grad_norm`` (0: measure only), step, zero the grads; the pre-clip norm."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(norm, "full_tensor"):  # a DTensor (FSDP2): the norm over every rank's shards
            norm = norm.full_tensor()
        return float(norm)

    # ----------------------------------------------------------------------------------- communication

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Sums over ranks (in float64, so target counts stay exact); the values themselves in one process."""
        if self.world_size == 1:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def all_gather_object(self, value: Any) -> list[Any]:
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def _comm_device(self) -> torch.device:
        return torch.device("cpu") if self.device.type == "cpu" else self.device

    # ------------------------------------------------------------------------------------------ checkpoints

    def extra_state(self) -> dict[str, Any]:
        """Objects with state_dict/load_state_dict that checkpoints must carry besides model/optimizer/scheduler."""
        return {"scaler": self.scaler} if self.scaler is not None else {}

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return getattr(model, "module", model)

    def save_model(self, model: torch.nn.Module, tokenizer: Any, directory: Path) -> None:
        """HF/PEFT weights + tokenizer into ``directory`` (rank 0 writes; every rank must call it)."""
        if self.is_main:
            ckpt.save_model(model, tokenizer, directory)

    def save_weights_and_optimizer(
        self,
        directory: Path,
        model: torch.nn.Module,
        tokenizer: Any,
        optimizer: torch.optim.Optimizer,
        step: int,
    ) -> None:
        """Replicated state (single, DDP): rank 0 writes the HF/PEFT weights and ``optimizer.pt``."""
        if self.is_main:
            ckpt.save_model(model, tokenizer, directory)
            torch.save(optimizer.state_dict(), Path(directory) / ckpt.OPTIMIZER_FILE)

    def save_checkpoint(
        self,
        output_dir: Path,
        model: torch.nn.Module,
        tokenizer: Any,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        state: TrainState,
    ) -> Path:
        """``output_dir/checkpoint-<step>``, atomically: rank 0 creates the temp folder, every rank writes its part
        (weights/optimizer as the engine dictates, its own RNG state), rank 0 adds the rest and renames."""
        tmp = ckpt.tmp_checkpoint_dir(output_dir, state.global_step)
        if self.is_main:
            ckpt.begin_checkpoint(output_dir, state.global_step)
        self.barrier()
        self.save_weights_and_optimizer(tmp, model, tokenizer, optimizer, state.global_step)
        ckpt.save_rng_state(tmp, self.rank)
        self.barrier()
        final = Path(output_dir) / f"{ckpt.CHECKPOINT_PREFIX}{state.global_step}"
        if self.is_main:
            extra = {k: v.state_dict() for k, v in self.extra_state().items()}
            final = ckpt.finish_checkpoint(tmp, scheduler, state, extra)
        self.barrier()  # nobody goes on (and maybe crashes) before the checkpoint is complete
        return final

    def load_checkpoint(
        self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> TrainState:
        return ckpt.load_checkpoint(path, model, optimizer, scheduler, extra=self.extra_state(), rank=self.rank)
