"""Warm-up learning-rate schedules and the step count (the optimizers: :mod:`tunesmith.train.optimizers`).

The schedules follow HF ``transformers`` exactly (same formulas, same step-0 lr of 0 during warm-up), so loss
curves compare one to one with runs of LLaMA-Factory / the HF Trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from tunesmith.config.schema import TrainArgs
from tunesmith.errors import ConfigError


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


# HF's schedules that take options (lr_scheduler_kwargs), with the options each takes and their defaults
SCHEDULE_OPTIONS: dict[str, dict[str, float | None]] = {
    "cosine_with_min_lr": {"num_cycles": 0.5, "min_lr": None, "min_lr_rate": None},
    "cosine_with_restarts": {"num_cycles": 1.0},
    "polynomial": {"lr_end": 1e-7, "power": 1.0},
}


def schedule_options(kind: str, given: dict[str, Any], learning_rate: float) -> dict[str, float]:
    """``lr_scheduler_kwargs`` checked against the schedule's own options, with HF's defaults filled in."""
    known = SCHEDULE_OPTIONS.get(kind, {})
    unknown = sorted(set(given) - set(known))
    if unknown:
        takes = ", ".join(known) if known else "no options"
        raise ConfigError(f"lr_scheduler_kwargs: {', '.join(unknown)} is not an option of lr_scheduler_type {kind} "
                          f"(it takes {takes}); remove it")
    options = {**known, **given}
    if kind == "cosine_with_min_lr":
        if (options["min_lr"] is None) == (options["min_lr_rate"] is None):
            raise ConfigError("lr_scheduler_type cosine_with_min_lr needs exactly one of min_lr and min_lr_rate in "
                              "lr_scheduler_kwargs, such as {min_lr_rate: 0.1}")
        if options["min_lr"] is not None:
            options["min_lr_rate"] = float(options["min_lr"]) / learning_rate
    return {key: float(value) for key, value in options.items() if value is not None}


def option_lambda(kind: str, warmup: int, total: int, options: dict[str, float],
                  learning_rate: float) -> Callable[[int], float]:
    """The multiplier of the schedules with options (HF's formulas)."""

    def progress(step: int) -> float:
        return (step - warmup) / max(1, total - warmup)

    def cosine_with_min_lr(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        factor = 0.5 * (1.0 + math.cos(math.pi * options["num_cycles"] * 2.0 * progress(step)))
        return max(0.0, factor * (1 - options["min_lr_rate"]) + options["min_lr_rate"])

    def cosine_with_restarts(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if progress(step) >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((options["num_cycles"] * progress(step)) % 1.0))))

    def polynomial(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        lr_end, power = options["lr_end"], options["power"]
        if step > total or learning_rate <= lr_end:
            return lr_end / learning_rate
        decay = (learning_rate - lr_end) * (1 - progress(step)) ** power + lr_end
        return decay / learning_rate

    return {"cosine_with_min_lr": cosine_with_min_lr, "cosine_with_restarts": cosine_with_restarts,
            "polynomial": polynomial}[kind]


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainArgs, total: int) -> LambdaLR:
    # A plain function (not a callable object) as lambda: LambdaLR.state_dict() then stores only the step count,
    # and a resumed run with a changed budget (max_steps) follows the new schedule.
    kind, warmup = train.lr_scheduler_type, warmup_steps(train, total)
    given = getattr(train, "lr_scheduler_kwargs", {}) or {}
    options = schedule_options(kind, given, train.learning_rate)
    if kind in SCHEDULE_OPTIONS:
        return LambdaLR(optimizer, option_lambda(kind, warmup, total, options, train.learning_rate))
    return LambdaLR(optimizer, lr_lambda(kind, warmup, total))
