"""Export: merge a LoRA adapter into its base model and write a sharded safetensors HF folder."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"export_model": "merge", "export_from_config": "merge"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy, so importing the package (e.g. for the CLI's --help) does not import torch and transformers.
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
