"""The ``speed:`` line among a run's first lines: which speed features this run uses and which it does not (the
issue behind it: users should not have to guess whether packing, the target-only head or compiling is on)."""

from __future__ import annotations

import os

import torch

from tunesmith.config import Config
from tunesmith.logging import get_logger
from tunesmith.model import gemm_attention
from tunesmith.model.fused_lora import FusedLoraMixin
from tunesmith.model.lean_activations import lean_activation_count
from tunesmith.runenv import loaded_allocator
from tunesmith.train.compile import Compiled
from tunesmith.train.engines import Engine
from tunesmith.train.objectives import Objective

log = get_logger("train")


def log_speed_features(cfg: Config, engine: Engine, objective: Objective, compiled: Compiled) -> None:
    """One line: which of the speed features this run uses (issue: users should not have to guess)."""
    precision = {"fp32": "float32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[engine.precision]
    frozen = {p.dtype for p in engine.model.parameters() if not p.requires_grad}
    if engine.precision != "fp32" and frozen and all(d in (torch.bfloat16, torch.float16) for d in frozen):
        precision += " (frozen weights stored in " + ("bf16" if torch.bfloat16 in frozen else "fp16") + ")"
    packing = "packing without cross-attention" if cfg.packing or cfg.neat_packing else "no packing"
    if cfg.sequence_parallel_size > 1:
        packing += f"; sequence parallel over {cfg.sequence_parallel_size} ranks (all-to-all attention)"
    attention = {"segments": "attention sample by sample (no T×T mask)",
                 "segment_offsets": "attention by samples, one variable-length flash-attention call per layer "
                                    "(no T×T mask)",
                 "varlen": "flash-attention variable-length kernels"}.get(objective.attention, "attention with masks")
    if objective.attention == "segments" and _short_samples_as_gemms(engine):
        attention += f", samples of up to {gemm_attention.MAX_LENGTH} tokens as GEMMs"
    if any(isinstance(m, FusedLoraMixin) for m in engine.model.modules()):
        attention += "; LoRA fused into the base projection's GEMM"
    lean = lean_activation_count(engine.model)
    kept = [f"{lean['norms']} RMSNorms and {lean['mlps']} SwiGLU MLPs keep only their inputs for backward"
            + ("" if cfg.gradient_checkpointing or cfg.pipeline_parallel_size > 1
               else ", and the layers that read their outputs recompute them")]
    features = [precision, packing, attention, *(kept if lean["norms"] or lean["mlps"] else []),
                *objective.speed_features(),
                "activation checkpointing " + ("on" if cfg.gradient_checkpointing else "off"), compiled.feature()]
    if engine.device.type == "cpu":
        features.append(f"host memory: {loaded_allocator() or 'glibc malloc'}")
        if os.environ.get("OMP_WAIT_POLICY", "").lower() == "active":
            features.append("OpenMP threads spin between operations")
    log.info("speed: %s", "; ".join(features))


def _short_samples_as_gemms(engine: Engine) -> bool:
    """Whether attention by segments takes :mod:`tunesmith.model.gemm_attention` for short samples: under the
    engine's own bf16 autocast (DeepSpeed casts the module instead) on a CPU with bf16 in hardware."""
    with engine.autocast():
        return gemm_attention.autocast_dtype(engine.device) is not None
