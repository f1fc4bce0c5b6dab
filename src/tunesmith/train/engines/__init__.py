"""Engines: how the loop's model, gradients and checkpoints map onto processes and devices.

``single`` (one process), ``ddp`` (replicated model, all-reduced gradients), ``fsdp2`` (sharded with
``fully_shard``) and ``deepspeed`` (DeepSpeed ZeRO), each one class behind the
:class:`~tunesmith.train.engines.base.Engine` interface. ``create_engine`` picks one from the config and the way
the job was launched. Adding an engine means a module here and a line in ``_ENGINES``; nothing else names one.
The deepspeed engine is imported only when chosen (DeepSpeed is an optional dependency).
"""

from __future__ import annotations

import importlib

import torch

from tunesmith.config import Config
from tunesmith.errors import ConfigError
from tunesmith.logging import get_logger
from tunesmith.runenv import launched_by_torchrun
from tunesmith.train import sequence_parallel, tensor_parallel
from tunesmith.train.distributed import Collectives, dist_info, join_process_group, rank_device
from tunesmith.train.engines.base import Engine, TorchEngine, clip_and_step
from tunesmith.train.optimizers import check_optimizer
from tunesmith.train.precision import resolve_precision

__all__ = ["Engine", "TorchEngine", "clip_and_step", "create_engine", "engine_class", "validate_engine_config"]

log = get_logger("train")

# name → "module:class", imported when chosen
_ENGINES = {
    "single": "tunesmith.train.engines.single:SingleDeviceEngine",
    "ddp": "tunesmith.train.engines.ddp:DDPEngine",
    "fsdp2": "tunesmith.train.engines.fsdp2:FSDP2Engine",
    "deepspeed": "tunesmith.train.engines.deepspeed:DeepSpeedEngine",
}


def engine_class(name: str) -> type[Engine]:
    module, cls = _ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def validate_engine_config(cfg: Config, world_size: int | None = None) -> type[Engine]:
    """The engine class for ``cfg`` in a job of ``world_size`` processes (default: this process's job), after
    it has refused what it cannot run; called before anything is loaded (and by the CLI before launching)."""
    world_size = dist_info().world_size if world_size is None else world_size
    name = cfg.resolved_engine(world_size)
    cls = engine_class(name)
    cls.validate(cfg, world_size)
    check_optimizer(cfg, name, world_size)
    sequence_parallel.validate(cfg, world_size)  # the world tiles into SP groups, the heads split over them
    _check_model_parallel(cfg, world_size)
    return cls


def _check_model_parallel(cfg: Config, world_size: int) -> None:
    """The whole mesh divides the world size (sequence parallel alone is checked above, with its heads)."""
    from tunesmith.config.parallel import mesh_sizes

    try:
        mesh_sizes(world_size, cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    tensor_parallel.validate(cfg, world_size)  # the heads split over the TP ranks
    from tunesmith.train import pipeline_parallel

    pipeline_parallel.validate(cfg, world_size)  # a stage per rank of each group, at least a layer per stage


def create_engine(cfg: Config, device: torch.device | str | None = None) -> Engine:
    """The engine for this process, on ``device`` (default: ``cfg.device``; an accelerator becomes this rank's
    own); joins the process group first when the engine runs in one (under torchrun, or a group of one)."""
    from tunesmith.model.load import pick_device

    cls = validate_engine_config(cfg)
    device = torch.device(device) if device is not None else pick_device(cfg.device)
    if cfg.use_v1_kernels and device.type == "cpu":
        raise ConfigError("use_v1_kernels: true asks for LLaMA-Factory v1's fused CUDA / Ascend kernels, which a "
                          "CPU run has none of; set use_v1_kernels: false")
    if cfg.use_v1_kernels:
        log.warning("use_v1_kernels: tunesmith runs transformers' attention and the engines' own fused ops; "
                    "LLaMA-Factory's v1 kernel plugins are not applied")
    comm = Collectives()
    if cls.needs_process_group:
        device = rank_device(device, dist_info().local_rank)
        if not launched_by_torchrun():
            log.info("engine: %s in a single process (a process group of one)", cls.name)
        comm = join_process_group(device, cfg.ddp_timeout)
    return cls(device, resolve_precision(cfg, device), comm)
