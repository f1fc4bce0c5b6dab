"""PiSSA (``pissa_init``, ``pissa_iter``, ``pissa_convert``) through PEFT.

PEFT initialises each adapter from the weight's top ``lora_rank`` singular vectors (``init_lora_weights="pissa"``:
full SVD; ``"pissa_niter_N"``: a randomised SVD with N power iterations) and subtracts that part from the frozen
weight, which becomes the *residual* W_res = W - B0 A0. The randomised SVD draws from torch's generator; it is
run under a generator seeded by ``seed`` and forked from the global one, so a resumed run rebuilds the same
W_res (the checkpoints hold only the adapter) and the global random stream is the one without PiSSA.

A trained PiSSA adapter applies to W_res, not to the base model. ``pissa_convert`` rewrites the final adapter
as a plain LoRA adapter for the unmodified base with PEFT's conversion (``save_pretrained``'s
``path_initial_model_for_weight_conversion``, ``LoraModel.subtract_mutated_init``):
ΔW = B A - B0 A0 = [B | -B0] [A ; A0], rank 2r, alpha doubled (× sqrt 2 with rsLoRA) so the scaling stays.
It is computed here from the saved adapter and the initial one kept in memory, the same arithmetic, so it works
on the state dict any engine gathers (fsdp2 and ZeRO-3 shard the live model, where PEFT would load the initial
adapter).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tunesmith.logging import get_logger

logger = get_logger("model")

INITIAL_ATTRIBUTE = "tunesmith_pissa_initial"  # on the PeftModel: the initial adapter (CPU), when converting
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def init_lora_weights(pissa_iter: int) -> str:
    """PEFT's ``init_lora_weights`` for LLaMA-Factory's ``pissa_iter`` (-1: the full SVD)."""
    return "pissa" if pissa_iter == -1 else f"pissa_niter_{pissa_iter}"


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's generators (CPU and every CUDA device) seeded by ``seed``, then restore them."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def remember_initial_adapter(model: Any) -> None:
    """Keep the freshly initialised adapter (a CPU copy) on ``model`` for :func:`convert_saved_adapter`."""
    from peft import get_peft_model_state_dict

    initial = {key: value.detach().to("cpu", copy=True) for key, value in get_peft_model_state_dict(model).items()}
    setattr(model, INITIAL_ATTRIBUTE, initial)


def initial_adapter(model: Any) -> dict[str, torch.Tensor] | None:
    """The adapter :func:`remember_initial_adapter` kept (None: the model does not convert PiSSA)."""
    return getattr(model, INITIAL_ATTRIBUTE, None)


def convert_saved_adapter(directory: Path, initial: dict[str, torch.Tensor]) -> None:
    """Rewrite the PiSSA adapter saved in ``directory`` as the equivalent LoRA adapter for the unmodified base."""
    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    trained = load_file(directory / ADAPTER_FILE, device="cpu")
    converted: dict[str, torch.Tensor] = {}
    for key, value in trained.items():
        if ".lora_A." in key:  # [r, in]: the rows of A, then A0
            converted[key] = torch.cat([value, initial[key].to(value.dtype)], dim=0).contiguous()
        elif ".lora_B." in key:  # [out, r]: the columns of B, then -B0
            converted[key] = torch.cat([value, -initial[key].to(value.dtype)], dim=1).contiguous()
        else:  # what trains in full besides the adapters (a reward model's head) is the same either way
            converted[key] = value
    save_file(converted, str(directory / ADAPTER_FILE), metadata={"format": "pt"})
    config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    config["init_lora_weights"] = True
    config["r"] = 2 * config["r"]
    config["lora_alpha"] = config["lora_alpha"] * (2**0.5 if config.get("use_rslora") else 2)
    for pattern in ("rank_pattern", "alpha_pattern"):
        if config.get(pattern):
            config[pattern] = {key: 2 * value for key, value in config[pattern].items()}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    logger.info("pissa_convert: %s holds the adapter as plain LoRA (rank %d) for the unmodified base",
                directory, config["r"])
