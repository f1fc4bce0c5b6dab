"""A deterministic validation split: the same seed and sizes always hold out the same samples."""

from __future__ import annotations

import random
from typing import TypeVar

from tunesmith.errors import DataError

T = TypeVar("T")


def val_count(total: int, val_size: float) -> int:
    """val_size < 1 is a fraction (at least one sample when > 0), val_size ≥ 1 a count."""
    if val_size <= 0:
        return 0
    count = max(1, round(total * val_size)) if val_size < 1 else int(val_size)
    if count >= total:
        raise DataError(
            f"val_size={val_size:g} holds out {count} of {total} samples and leaves none to train on; "
            "lower val_size or add data"
        )
    return count


def split_train_val(samples: list[T], val_size: float, seed: int) -> tuple[list[T], list[T]]:
    """Hold out a seeded random subset; both parts keep the original order (the loader shuffles training)."""
    count = val_count(len(samples), val_size)
    if count == 0:
        return list(samples), []
    # A private Random: the split must not depend on (or disturb) the global RNG state.
    held = set(random.Random(seed).sample(range(len(samples)), count))
    train = [s for i, s in enumerate(samples) if i not in held]
    val = [s for i, s in enumerate(samples) if i in held]
    return train, val
