"""Evaluation: BLEU / ROUGE metrics, dataset prediction (`tunesmith eval`), sample answers during training."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "compute_metrics": "metrics",
    "run_predict": "predict",
    "predict_after_training": "predict",
    "log_sample_generations": "samples",
    "sample_generation_due": "samples",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy, like tunesmith.serve: the CLI imports this package without paying for torch.
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
