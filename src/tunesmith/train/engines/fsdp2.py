"""``engine: fsdp2``: parameters, gradients and optimizer state sharded over the ranks with FSDP2
(``torch.distributed.fsdp.fully_shard``), driven by tunesmith's own loop.

Each decoder layer is one FSDP unit (all-gathered for its forward/backward, resharded after), the rest of the model
(embeddings, final norm, head) is the root unit; ``fully_shard`` moves each unit's shard from the CPU copy the
model was loaded into onto this rank's device. Master weights stay float32; with ``bf16`` the layers compute in
bfloat16 (``MixedPrecisionPolicy``) and gradients are reduced in float32.

With ``tensor_parallel_size: N`` the ranks form a 2-D mesh ``dp × tp``: the blocks are first split over ``tp``
(:mod:`tunesmith.train.tensor_parallel`), then sharded over ``dp``; gradients are reduced over ``dp`` only, and the
N ranks of a TP group, which compute the same loss, count it once (``data_replicas``).

Checkpoints hold ``dcp/`` (the shards, torch.distributed.checkpoint: resumable on any number of ranks) plus the
consolidated HF/PEFT weights gathered on rank 0, so export and ``adapter_name_or_path`` keep working.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch

from tunesmith.config import Config
from tunesmith.config.schema import MethodArgs
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.engines.base import TorchEngine, clip_and_step
from tunesmith.train.sharded import full_model_state_dict, save_sharded
from tunesmith.train.state import TrainState


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: classes the HF model lists in ``_no_split_modules`` (its
    decoder layers), found through a PEFT wrapper too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in names]


class FSDP2Engine(TorchEngine):
    name: ClassVar[str] = "fsdp2"

    @classmethod
    def validate(cls, cfg: Config, world_size: int) -> None:
        if cfg.save_only_model:
            raise ConfigError(
                "save_only_model: true works with the single and ddp engines; fsdp2 writes weights and optimizer "
                "shards as one distributed checkpoint: set save_only_model: false (or engine: ddp)"
            )
        if cfg.fp16:
            raise ConfigError(
                "fp16 with engine: fsdp2 is not supported yet (the loss scaler does not handle sharded "
                "gradients); use bf16: true, or engine: ddp"
            )
        if cfg.quantization_bit == 8:
            # Linear4bit keeps its quantization state on the module and restores it after each all-gather; 8-bit
            # weights keep their scales (SCB) on the weight tensor FSDP2 replaces by its shard, and their extra
            # state-dict entries cannot be mapped back by torch's distributed state dict.
            raise ConfigError(
                "quantization_bit: 8 does not work with engine: fsdp2 (FSDP2 shards away the 8-bit scales "
                "bitsandbytes keeps on each weight); use quantization_bit: 4, or engine: ddp or deepspeed"
            )

    tensor_parallel: int = 1

    @property
    def whole_model_on_each_rank(self) -> bool:
        return False

    @property
    def data_replicas(self) -> int:
        return self.tensor_parallel

    def setup(self, model: torch.nn.Module, train: Any, total_steps: int) -> None:
        self.tensor_parallel = getattr(train, "tensor_parallel_size", 1)
        super().setup(model, train, total_steps)

    def load_device(self, quantized: bool) -> torch.device:
        # fully_shard moves each rank's shard from the CPU copy onto the device: no rank holds the whole model
        # there; a quantized base is quantized on (and stays on) the device it computes on
        return self.device if quantized else torch.device("cpu")

    def load_dtype(self, method: MethodArgs) -> torch.dtype:
        return torch.float32  # one parameter dtype per unit: bf16 compute comes from the MixedPrecisionPolicy

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        layers = decoder_layers(model)
        if not layers:
            raise ConfigError(
                f"engine: fsdp2 found no decoder layers to shard in {type(model).__name__} "
                "(its _no_split_modules is empty); use engine: ddp"
            )
        self._broadcast_from_rank0(model)
        if self.tensor_parallel > 1:
            from tunesmith.train.tensor_parallel import parallelize

            tp = self.tensor_parallel
            grid = init_device_mesh(self.device.type, (self.comm.world_size // tp, tp), mesh_dim_names=("dp", "tp"))
            parallelize(model, grid["tp"])
            mesh = grid["dp"]
        else:
            mesh = init_device_mesh(self.device.type, (self.comm.world_size,))
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
        if self.comm.world_size == 1:
            return
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                # one tensor at a time through the device the backend can send from (nccl: the GPU)
                staged = tensor.data.to(self.device)
                torch.distributed.broadcast(staged, src=0)
                if staged is not tensor.data:
                    tensor.data.copy_(staged)

    def accumulating(self, last: bool) -> AbstractContextManager:
        return _gradient_sync(self.model, last)

    def backward(self, loss: torch.Tensor) -> None:
        # FSDP averages gradients over the data-parallel ranks (the world, or its dp dimension beside tp)
        super().backward(loss * (self.comm.world_size // self.tensor_parallel))

    def step(self) -> float:
        norm = clip_and_step(self.optimizer, self.params, self.max_grad_norm)
        return float(norm.full_tensor()) if hasattr(norm, "full_tensor") else float(norm)

    # ---------------------------------------------------------------------------------------- checkpoints

    def save_model(self, tokenizer: Any, directory: Path) -> None:
        full = full_model_state_dict(self.model, trainable_only=ckpt.is_peft_model(self.model))
        if self.comm.is_main:
            ckpt.save_model(self.model, tokenizer, directory, state_dict=full)

    def write_weights_and_optimizer(self, directory: Path, tokenizer: Any, step: int) -> None:
        save_sharded(Path(directory) / ckpt.SHARDED_DIR, self.model, self.optimizer)
        self.save_model(tokenizer, directory)

    def load_checkpoint(self, path: Path, scheduler: Any) -> TrainState:
        if not (Path(path) / ckpt.SHARDED_DIR).is_dir():
            raise TunesmithError(
                f"{path} was written by engine single or ddp (no {ckpt.SHARDED_DIR}/ folder); engine: fsdp2 cannot "
                "resume it yet: resume with engine: ddp (or one process), or start fresh with another output_dir"
            )
        return super().load_checkpoint(path, scheduler)


@contextmanager
def _gradient_sync(model: torch.nn.Module, sync: bool):
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
