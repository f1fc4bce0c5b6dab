"""Engines: how the loop's model, gradients and checkpoints map onto processes and devices.

``single`` (one process), ``ddp`` (replicated model, all-reduced gradients), ``fsdp2`` (sharded with
``fully_shard``) and ``deepspeed`` (DeepSpeed ZeRO); ``create_engine`` picks one from the config and the way the
job was launched. The deepspeed engine is imported only when chosen (DeepSpeed is an optional dependency).
"""

from __future__ import annotations

import torch

from tunesmith.config import Config
from tunesmith.errors import ConfigError
from tunesmith.launch.distributed import dist_info, init_distributed, launched_by_torchrun
from tunesmith.logging import get_logger
from tunesmith.train.engines.base import Engine, Precision
from tunesmith.train.engines.ddp import DDPEngine
from tunesmith.train.engines.fsdp2 import FSDP2Engine
from tunesmith.train.engines.single import SingleDeviceEngine

__all__ = [
    "DDPEngine",
    "Engine",
    "FSDP2Engine",
    "Precision",
    "SingleDeviceEngine",
    "check_quantization_supported",
    "create_engine",
    "engine_name",
    "resolve_precision",
]

log = get_logger("train")


def resolve_precision(cfg: Config, device: torch.device) -> Precision:
    """bf16/fp16 autocast where the device supports it; fp16 on CPU falls back to float32 with a warning."""
    if cfg.bf16:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(
                "bf16: true but this GPU has no bfloat16 support; set fp16: true or bf16: false"
            )
        return "bf16"
    if cfg.fp16:
        if device.type == "cpu":
            log.warning(
                "fp16: true needs a GPU (float16 autocast with loss scaling); training in float32 on CPU "
                "instead (bf16: true works on CPU)"
            )
            return "fp32"
        return "fp16"
    return "fp32"


def engine_name(cfg: Config) -> str:
    """``cfg.engine`` with ``auto`` resolved: ddp when the job has more than one process, else single."""
    world_size = dist_info().world_size
    if cfg.engine == "auto":  # (a config with `deepspeed` set already says engine: deepspeed)
        return "ddp" if world_size > 1 else "single"
    if cfg.engine == "single" and world_size > 1:
        raise ConfigError(
            f"engine: single trains in one process but this job runs {world_size} (WORLD_SIZE); "
            "use engine: auto, ddp, fsdp2 or deepspeed"
        )
    return cfg.engine


def check_quantization_supported(cfg: Config) -> None:
    """Refuse, before any model is loaded, an engine that cannot train on a quantized (QLoRA) base.

    Verified with 2 ranks on CPU (gloo): single, ddp and deepspeed ZeRO 0-3 train 4-bit and 8-bit bases; fsdp2
    trains 4-bit ones (``Linear4bit`` keeps its quantization state on the module and restores it after each
    all-gather) but not 8-bit ones, whose scales (``SCB``) hang on the weight tensor that FSDP2 replaces by its
    shard, and whose extra state-dict entries torch's distributed state dict cannot map back. DoRA on a quantized
    base fails under ZeRO-3 (its weight-norm pass meets a quantized weight ZeRO-3 did not register); ZeRO 0-2,
    fsdp2 and ddp train it."""
    if cfg.quantization_bit is None:
        return
    if cfg.use_dora and cfg.engine == "deepspeed" and _zero_stage(cfg) == 3:
        raise ConfigError(
            f"use_dora: true with quantization_bit: {cfg.quantization_bit} does not work with DeepSpeed ZeRO-3 "
            f"(deepspeed: {cfg.deepspeed}): DoRA re-reads the quantized weights outside ZeRO-3's parameter "
            "gathering; use ZeRO stage 0-2, engine: fsdp2 or ddp, or use_dora: false"
        )
    # cfg.engine, not engine_name(cfg): auto never means fsdp2, and the CLI can call this before launching
    if cfg.quantization_bit == 8 and cfg.engine == "fsdp2":
        raise ConfigError(
            "quantization_bit: 8 does not work with engine: fsdp2 (FSDP2 shards away the 8-bit scales "
            "bitsandbytes keeps on each weight); use quantization_bit: 4, or engine: ddp or deepspeed"
        )


def _zero_stage(cfg: Config) -> int | None:
    from tunesmith.train.ds_config import read_ds_config

    raw, _ = read_ds_config(cfg.deepspeed)
    stage = raw.get("zero_optimization", {}).get("stage", 0) if isinstance(raw, dict) else None
    return stage if isinstance(stage, int) else None


def create_engine(cfg: Config, device: torch.device, precision: Precision | None = None) -> Engine:
    """The engine for this process; joins the process group first when the engine needs one (under torchrun,
    or a group of one for ``engine: ddp``/``fsdp2`` in a single process)."""
    engine = _create_engine(cfg, device, precision)
    engine.varlen = getattr(cfg, "flash_attn", "auto") == "fa2"
    return engine


def _create_engine(cfg: Config, device: torch.device, precision: Precision | None) -> Engine:
    name = engine_name(cfg)
    check_quantization_supported(cfg)
    precision = precision or resolve_precision(cfg, device)
    if name == "single":
        return SingleDeviceEngine(device, precision)
    if not launched_by_torchrun():
        log.info("engine: %s in a single process (a process group of one)", name)
    info = init_distributed(device, cfg.ddp_timeout)
    if name == "deepspeed":
        from tunesmith.train.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(
            device, precision, rank=info.rank, world_size=info.world_size, ds_config=cfg.deepspeed
        )
    cls = DDPEngine if name == "ddp" else FSDP2Engine
    return cls(device, precision, rank=info.rank, world_size=info.world_size)
