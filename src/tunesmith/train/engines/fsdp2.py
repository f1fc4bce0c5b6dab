"""``engine: fsdp2``: parameters, gradients and optimizer state sharded over the ranks with FSDP2
(``torch.distributed.fsdp.fully_shard``), driven by tunesmith's own loop.

Each decoder layer is one FSDP unit (all-gathered for its forward/backward, resharded after), the rest of the model
(embeddings, final norm, head) is the root unit; ``fully_shard`` moves each unit's shard from the CPU copy the
model was loaded into onto this rank's device. Master weights stay float32; with ``bf16`` the layers compute in
bfloat16 (``MixedPrecisionPolicy``) and gradients are reduced in float32.

Checkpoints hold ``dcp/`` (the shards, torch.distributed.checkpoint: resumable on any number of ranks) plus the
consolidated HF/PEFT weights gathered on rank 0, so export and ``adapter_name_or_path`` keep working.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.engines.base import Engine
from tunesmith.train.sharded import full_model_state_dict, save_sharded
from tunesmith.train.state import TrainState


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: classes the HF model lists in ``_no_split_modules`` (its
    decoder layers), found through a PEFT wrapper too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in names]


class FSDP2Engine(Engine):
    name = "fsdp2"
    whole_model_on_each_rank = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.precision == "fp16":
            raise ConfigError(
                "fp16 with engine: fsdp2 is not supported yet (the loss scaler does not handle sharded "
                "gradients); use bf16: true, or engine: ddp"
            )

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        layers = decoder_layers(model)
        if not layers:
            raise ConfigError(
                f"engine: fsdp2 found no decoder layers to shard in {type(self.unwrap(model)).__name__} "
                "(its _no_split_modules is empty); use engine: ddp"
            )
        self._broadcast_from_rank0(model)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if self.precision == "bf16" else None, reduce_dtype=torch.float32
        )
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model

    def _broadcast_from_rank0(self, model: torch.nn.Module) -> None:
        """fully_shard keeps each rank's own slice of its local tensors, so the ranks must start identical (DDP
        does the same broadcast): seeds make them so, this makes it certain."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                # one tensor at a time through the device the backend can send from (nccl: the GPU)
                staged = tensor.data.to(self.device)
                torch.distributed.broadcast(staged, src=0)
                if staged is not tensor.data:
                    tensor.data.copy_(staged)

    def no_sync(self, model: torch.nn.Module, skip: bool) -> AbstractContextManager:
        return _gradient_sync(model, not skip)

    # ---------------------------------------------------------------------------------------- checkpoints

    def save_model(self, model: torch.nn.Module, tokenizer: Any, directory: Path) -> None:
        full = full_model_state_dict(model, trainable_only=ckpt.is_peft_model(model))
        if self.is_main:
            ckpt.save_model(model, tokenizer, directory, state_dict=full)

    def save_weights_and_optimizer(
        self,
        directory: Path,
        model: torch.nn.Module,
        tokenizer: Any,
        optimizer: torch.optim.Optimizer,
        step: int,
    ) -> None:
        save_sharded(Path(directory) / ckpt.SHARDED_DIR, model, optimizer)
        self.save_model(model, tokenizer, directory)

    def load_checkpoint(
        self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> TrainState:
        if not (Path(path) / ckpt.SHARDED_DIR).is_dir():
            raise TunesmithError(
                f"{path} was written by engine single or ddp (no {ckpt.SHARDED_DIR}/ folder); engine: fsdp2 cannot "
                "resume it yet: resume with engine: ddp (or one process), or start fresh with another output_dir"
            )
        return super().load_checkpoint(path, model, optimizer, scheduler)


@contextmanager
def _gradient_sync(model: torch.nn.Module, sync: bool):
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
