"""Serving: the terminal chat and the OpenAI-compatible API server (streamed generation is tunesmith.model's)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "run_chat": "tunesmith.serve.chat",
    "generate_stream": "tunesmith.model.generate",
    "generate_reply": "tunesmith.model.generate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy, so importing the package (e.g. for the CLI's --help) does not import torch and transformers.
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
