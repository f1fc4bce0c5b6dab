"""Quantization libraries a training process does not use stay unimported.

PEFT imports bitsandbytes whenever it is installed, and bitsandbytes compiles kernels with ``torch.compile`` on
import, which loads inductor: 2-4 s of CPU per process. PEFT's LoRA dispatch imports gptqmodel the same way for
every wrapped layer (another second, and gptqmodel sets ``PYTORCH_ALLOC_CONF`` on import). Each rank of a job pays
that at every start. A run that neither quantizes (``quantization_bit``), nor uses a bitsandbytes or GaLore-family
optimizer, nor loads a pre-quantized model needs neither, so the ``tunesmith`` command marks them as absent
(``sys.modules[name] = None``: ``import`` raises, ``importlib.util.find_spec`` says None, which is how PEFT,
transformers and accelerate ask) before anything imports PEFT. Only the command's own process does this
(``cli.main`` with no argv): code that calls ``train()`` in a longer-lived process keeps every library.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tunesmith.config import Config

# the optimizers torch itself provides (train/optimizers.py); any other name may need bitsandbytes
_TORCH_OPTIMIZERS = ("adamw_torch", "adamw_hf", "adamw_torch_fused", "sgd", "adafactor")
# optimizer libraries that import bitsandbytes themselves (their 8-bit variants)
_OPTIMIZER_KEYS = ("use_galore", "use_apollo", "use_badam", "use_adam_mini")


def unused_quantization_libraries(cfg: Config) -> list[str]:
    """The quantization libraries that training ``cfg`` cannot touch; none when in doubt."""
    if _may_be_quantized(cfg.model_name_or_path):
        return []
    unused = ["gptqmodel"]  # only a GPTQ / AWQ model loads through it, ruled out above
    optimizer_needs_bnb = cfg.optim not in _TORCH_OPTIMIZERS or any(getattr(cfg, key) for key in _OPTIMIZER_KEYS)
    if cfg.quantization_bit is None and not optimizer_needs_bnb:
        unused.append("bitsandbytes")
    return unused


def leave_unused_quantization_libraries_unimported(cfg: Config) -> list[str]:
    """Mark :func:`unused_quantization_libraries` absent in this process (those not imported yet); returns them."""
    names = [name for name in unused_quantization_libraries(cfg) if name not in sys.modules]
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]
    return names


def _may_be_quantized(model_name_or_path: str | None) -> bool:
    """True unless the model is a local folder whose config.json has no ``quantization_config``."""
    config_file = Path(model_name_or_path or "") / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # an alias, a hub id, a GGUF file, an unreadable folder: keep everything
        return True
    return not isinstance(config, dict) or "quantization_config" in config
