"""AdamW with decoupled weight decay (none on biases and norms) and warm-up learning-rate schedules.

The schedules follow HF ``transformers`` exactly (same formulas, same step-0 lr of 0 during warm-up), so loss
curves compare one to one with runs of LLaMA-Factory / the HF Trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from tunesmith.config.schema import TrainArgs
from tunesmith.errors import ConfigError


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights (any 1-D parameter) and anything named *norm*/*bias* get no weight decay."""
    lowered = name.lower()
    return param.ndim < 2 or "bias" in lowered or "norm" in lowered


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed and a not-decayed group (empty groups left out)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if is_no_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, train: TrainArgs) -> torch.optim.AdamW:
    groups = param_groups(model, train.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(
        groups, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon
    )


def steps_per_epoch(batches_per_epoch: int, accumulation: int) -> int:
    """Optimizer steps in one epoch: the last accumulation window of an epoch may be short but still steps."""
    return max(1, -(-batches_per_epoch // accumulation))


def total_steps(train: TrainArgs, batches_per_epoch: int | None) -> int:
    """``max_steps`` when > 0, else ``ceil(num_train_epochs × steps per epoch)``; ``batches_per_epoch`` None
    (a stream, which has no length) needs max_steps."""
    if train.max_steps > 0:
        return train.max_steps
    if batches_per_epoch is None:
        raise ConfigError("streaming: true needs max_steps (a stream has no known length); set max_steps: N")
    steps = steps_per_epoch(batches_per_epoch, train.gradient_accumulation_steps)
    return max(1, math.ceil(train.num_train_epochs * steps))


def warmup_steps(train: TrainArgs, total: int) -> int:
    """``warmup_steps`` when > 0, else ``ceil(warmup_ratio × total)``."""
    return train.warmup_steps if train.warmup_steps > 0 else math.ceil(train.warmup_ratio * total)


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """The multiplier of the peak lr at optimizer step ``step`` (0-based: the lr used by the step-th update)."""

    def warm(step: int) -> float:
        return step / max(1, warmup)

    def constant(step: int) -> float:
        return 1.0

    def constant_with_warmup(step: int) -> float:
        return warm(step) if step < warmup else 1.0

    def linear(step: int) -> float:
        if step < warmup:
            return warm(step)
        return max(0.0, (total - step) / max(1, total - warmup))

    def cosine(step: int) -> float:
        if step < warmup:
            return warm(step)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    schedules = {
        "constant": constant,
        "constant_with_warmup": constant_with_warmup,
        "linear": linear,
        "cosine": cosine,
    }
    if kind not in schedules:
        raise ValueError(f"unknown lr_scheduler_type {kind!r}; use one of {', '.join(schedules)}")
    return schedules[kind]


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainArgs, total: int) -> LambdaLR:
    # A plain function (not a callable object) as lambda: LambdaLR.state_dict() then stores only the step count,
    # and a resumed run with a changed budget (max_steps) follows the new schedule.
    return LambdaLR(optimizer, lr_lambda(train.lr_scheduler_type, warmup_steps(train, total), total))
