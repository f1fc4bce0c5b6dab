"""Model loading (HF folders, GGUF, packaged aliases) and fine-tuning setup (full / freeze / LoRA).

Names are imported lazily so that `import tunesmith.model.resolve` (or the CLI's --help) does not pay for
importing torch and transformers.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

# tunesmith never downloads: every path is resolved locally first and loaded with local_files_only=True;
# this also stops libraries' own "is there a newer config on the hub" lookups (read when huggingface_hub is
# first imported, so it helps only when tunesmith is imported first).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# PEFT imports bitsandbytes whenever it is installed; on CPUs with AVX512-BF16 bitsandbytes then warns, on import,
# that an optional hub-downloaded kernel is missing, and falls back to its own. Nothing to act on: keep it quiet.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_EXPORTS = {
    "PACKAGED_MODELS": "resolve",
    "resolve_model_path": "resolve",
    "pick_device": "load",
    "load_tokenizer": "load",
    "load_model": "load",
    "load_model_and_tokenizer": "load",
    "apply_finetuning": "adapt",
    "trainable_summary": "adapt",
    "load_adapter": "adapt",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
