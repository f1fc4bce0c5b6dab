"""Training: ``train(cfg)`` runs the whole pipeline; ``fit`` is setup → loop → finish on a prepared model.

The names below are imported on first use (PEP 562): the launcher imports ``tunesmith.train.engines`` to check a
config before it starts torchrun, and must not pay for the loop's imports (torch._dynamo, transformers, PEFT) in a
process that never trains."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunesmith.train.loop import TrainResult, fit
    from tunesmith.train.pipeline import train
    from tunesmith.train.state import TrainState

__all__ = ["TrainResult", "TrainState", "fit", "train"]

_HOMES = {"TrainResult": "loop", "fit": "loop", "train": "pipeline", "TrainState": "state"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value
