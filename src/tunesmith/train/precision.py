"""Which floating-point precision a run computes in (``bf16`` / ``fp16`` keys), and the autocast for it."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch

from tunesmith.config.schema import MethodArgs, TrainArgs
from tunesmith.errors import ConfigError
from tunesmith.logging import get_logger
from tunesmith.runenv import cpu_has_fast_bf16

log = get_logger("train")

Precision = Literal["fp32", "bf16", "fp16"]


def resolve_precision(train: TrainArgs, device: torch.device) -> Precision:
    """bf16/fp16 autocast where the device supports it; fp16 on CPU falls back to float32 with a warning.
    pure_bf16 is bf16 too (its weights are bfloat16 already: :func:`frozen_base_dtype`)."""
    if train.bf16 or getattr(train, "pure_bf16", False):
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("bf16: true but this GPU has no bfloat16 support; set fp16: true or bf16: false")
        if device.type == "cpu" and not cpu_has_fast_bf16():
            log.warning("bf16: true on a CPU without bfloat16 hardware (no avx512_bf16 or AMX in /proc/cpuinfo): its "
                        "bfloat16 matmuls are emulated, several times slower than float32 (7× on a 2-core AVX2 "
                        "EPYC); bf16: false trains faster here")
        return "bf16"
    if train.fp16:
        if device.type == "cpu":
            log.warning(
                "fp16: true needs a GPU (float16 autocast with loss scaling); training in float32 on CPU "
                "instead (bf16: true works on CPU)"
            )
            return "fp32"
        return "fp16"
    return "fp32"


def half_dtype(precision: Precision) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(precision: Precision, device: torch.device) -> AbstractContextManager:
    """torch autocast to the run's half dtype (nothing in fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=half_dtype(precision))


def frozen_base_dtype(method: MethodArgs, precision: Precision, device: torch.device) -> torch.dtype:
    """The dtype a model is loaded in: float32 master weights for full / freeze; LoRA where the device computes
    in the autocast dtype (an accelerator, or a CPU with bf16 in hardware) keeps its frozen base in that dtype:
    half the memory, and no cast of every weight at every forward; only the float32 adapters train."""
    if getattr(method, "pure_bf16", False):  # pure_bf16: no float32 master weights at all
        return torch.bfloat16
    if method.finetuning_type in ("lora", "oft") and precision != "fp32" and (
        device.type != "cpu" or cpu_has_fast_bf16()
    ):
        return half_dtype(precision)
    return torch.float32
