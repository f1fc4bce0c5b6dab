"""``engine: ddp``: every rank holds the whole model; DistributedDataParallel all-reduces (averages) gradients.

Checkpoints are the single-process format (HF/PEFT weights at the root, ``optimizer.pt``), written by rank 0:
the state is replicated, so the files do not depend on the world size and resume on any number of ranks.
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, nullcontext
from typing import ClassVar

import torch
from torch.nn.parallel import DistributedDataParallel

from tunesmith.config.schema import TrainArgs
from tunesmith.train.engines.base import TorchEngine

# torch ≥ 2.13 names it forward_sync_buffers (and warns about broadcast_buffers, which older ones take)
_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


class DDPEngine(TorchEngine):
    name: ClassVar[str] = "ddp"
    find_unused_parameters = False

    def setup(self, model: torch.nn.Module, train: TrainArgs, total_steps: int) -> None:
        self.find_unused_parameters = bool(getattr(train, "ddp_find_unused_parameters", None))
        super().setup(model, train, total_steps)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # DDP broadcasts rank 0's parameters and buffers here, so every replica starts identical. The buffers of a
        # causal LM (rotary tables) never change, so re-syncing them before every forward would be wasted.
        # gradient_as_bucket_view: each .grad is a view into the reducer's all-reduce bucket instead of a second
        # copy beside it, saving one full set of gradients (the reduced values are the same).
        return DistributedDataParallel(
            model, device_ids=device_ids, gradient_as_bucket_view=True,
            find_unused_parameters=self.find_unused_parameters, **_NO_FORWARD_BUFFER_SYNC
        )

    def accumulating(self, last: bool) -> AbstractContextManager:
        return nullcontext() if last else self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        super().backward(loss * self.comm.world_size)  # DDP averages over ranks; the loop's loss is a share of a sum
