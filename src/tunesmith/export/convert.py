"""``tunesmith convert CHECKPOINT --out DIR``: any training checkpoint → an HF model folder or a PEFT adapter
folder.

The weights are read from the engine's own state, whatever wrote it:

* ``ds/`` (DeepSpeed ZeRO 1-3; or CHECKPOINT itself when it holds DeepSpeed's ``latest`` file, as HF Trainer
  checkpoints do): the fp32 master weights, reconstructed by DeepSpeed's ``zero_to_fp32``;
* ``dcp/`` (fsdp2, and deepspeed's world-size-free copy): read with ``torch.distributed.checkpoint``, no
  process group needed;
* otherwise the HF/PEFT weights at the checkpoint's root (single / ddp).

Sharded states hold the trainable weights only; frozen ones (``finetuning_type: freeze``) come from the
root's consolidated weights. A LoRA run becomes a PEFT folder (``adapter_model.safetensors`` +
``adapter_config.json``, loadable with ``PeftModel.from_pretrained`` on its base); full and freeze runs an HF
folder in float32 (the master weights). The tokenizer (with its chat template) is written beside either.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunesmith.errors import TunesmithError
from tunesmith.logging import get_logger
from tunesmith.model.load import check_safetensors
from tunesmith.train import checkpoint as ckpt

log = get_logger("export")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT names a module's adapter weights "<module>.lora_A.<adapter>.weight" but saves them without the adapter
# name
_ADAPTER_NAME = re.compile(r"\.default(?=\.|$)")


def _deepspeed_dir(path: Path) -> Path | None:
    """The folder holding DeepSpeed's ``latest`` + ``global_stepN/`` with ZeRO partitions (stage ≥ 1), if
    any."""
    for candidate in (path / ckpt.DEEPSPEED_DIR, path):
        if (candidate / "latest").is_file() and list(candidate.glob("*/*optim_states.pt")):
            return candidate
    return None


def read_deepspeed(directory: Path) -> dict[str, torch.Tensor]:
    """fp32 weights by parameter name from a ZeRO checkpoint, through DeepSpeed's own ``zero_to_fp32``."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # reading files only: no accelerator guess (and warning)
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise TunesmithError(
            f"{directory} is a DeepSpeed ZeRO checkpoint; reading it needs DeepSpeed: pip install "
            "'tunesmith[deepspeed]'"
        ) from None
    with contextlib.redirect_stdout(io.StringIO()):  # its progress prints
        state = get_fp32_state_dict_from_zero_checkpoint(str(directory), exclude_frozen_parameters=True)
    return {name: tensor.detach().float().contiguous() for name, tensor in state.items()}


def read_dcp(directory: Path) -> dict[str, torch.Tensor]:
    """The ``model.*`` tensors of a DCP folder (written on any number of ranks), whole, in this process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    wanted = {
        key.removeprefix("model."): torch.empty(item.size, dtype=item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata)
    }
    if not wanted:
        raise TunesmithError(
            f"{directory} holds no model weights (model.* keys); is it a tunesmith dcp/ folder?"
        )
    state = {"model": wanted}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*distributed.*", category=UserWarning)
        dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    return state["model"]


def read_root_weights(path: Path) -> dict[str, torch.Tensor]:
    """The HF/PEFT safetensors at the root (empty when there are none)."""
    files = sorted(path.glob("model*.safetensors")) or sorted(path.glob(ADAPTER_WEIGHTS))
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        check_safetensors(file)  # a truncated file: one sentence naming it
        weights.update(load_file(file, device="cpu"))
    return weights


def trained_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(weights by the training model's parameter names, where they came from)."""
    ds_dir = _deepspeed_dir(path)
    if ds_dir is not None:
        return read_deepspeed(ds_dir), f"DeepSpeed ZeRO checkpoint {ds_dir}"
    if (path / ckpt.SHARDED_DIR).is_dir():
        return read_dcp(path / ckpt.SHARDED_DIR), f"sharded checkpoint {path / ckpt.SHARDED_DIR}"
    weights = read_root_weights(path)
    if not weights:
        raise TunesmithError(
            f"{path} holds no weights: no ds/ or dcp/ folder and no model*.safetensors / {ADAPTER_WEIGHTS}; "
            "point at an output_dir/checkpoint-N (or a run's output_dir)"
        )
    return weights, f"HF/PEFT weights in {path}"


def convert_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Write ``out`` (an HF or PEFT folder) from checkpoint ``path``; returns ``out``."""
    path, out = Path(path).expanduser(), Path(out).expanduser()
    if not path.is_dir():
        raise TunesmithError(f"{path} is not a folder; point at an output_dir/checkpoint-N")
    if out.resolve() == path.resolve():
        raise TunesmithError("--out must be a new folder, not the checkpoint itself")
    is_adapter = (path / ADAPTER_CONFIG).is_file()
    if not is_adapter and not (path / "config.json").is_file():
        raise TunesmithError(
            f"{path} has neither config.json (full / freeze) nor {ADAPTER_CONFIG} (LoRA); tunesmith "
            "checkpoints hold one of them at their root"
        )
    weights, source = trained_weights(path)
    out.mkdir(parents=True, exist_ok=True)
    if is_adapter:
        _write_adapter(path, out, weights)
    else:
        _write_model(path, out, weights)
    _write_tokenizer(path, out)
    log.info("converted %s (%s) into %s", path, source, out)
    return out


def _write_adapter(path: Path, out: Path, weights: dict[str, torch.Tensor]) -> None:
    adapter = {_ADAPTER_NAME.sub("", name): tensor for name, tensor in weights.items()
               if "lora_" in name or "oft_" in name}
    if not adapter:
        raise TunesmithError(f"{path}: the checkpoint holds no LoRA or OFT weights although it has {ADAPTER_CONFIG}")
    save_file(
        {k: v.contiguous() for k, v in adapter.items()}, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"}
    )
    shutil.copyfile(path / ADAPTER_CONFIG, out / ADAPTER_CONFIG)


def _write_model(path: Path, out: Path, weights: dict[str, torch.Tensor]) -> None:
    """An HF folder through the architecture's own ``save_pretrained`` (sharding, tied weights, config), from
    a skeleton on the meta device: no second copy of the model in memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    config.dtype = torch.float32
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    expected = [k for k in skeleton.state_dict() if not ckpt._is_tied(skeleton, k)]
    missing = [k for k in expected if k not in weights]
    if (
        missing
    ):  # frozen weights (freeze runs) are not in the sharded state: the root's consolidated copy has them
        root = read_root_weights(path)
        for key in missing:
            if key in root:
                weights[key] = root[key].float()
        missing = [k for k in expected if k not in weights]
    if missing:
        raise TunesmithError(
            f"{path}: no weights for {len(missing)} parameter(s) (e.g. {missing[0]}); the checkpoint is "
            "incomplete"
        )
    unknown = [k for k in weights if k not in skeleton.state_dict()]
    if unknown:
        raise TunesmithError(f"{path}: weights the model in config.json lacks (e.g. {unknown[0]})")
    with ckpt._quiet_hf_progress():
        skeleton.save_pretrained(out, state_dict=dict(weights))  # save_pretrained empties the dict it gets
    generation = path / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, out / "generation_config.json")


def _write_tokenizer(path: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        log.warning("no tokenizer written: %s holds none that loads (%s)", path, str(err).splitlines()[0])
        return
    tokenizer.save_pretrained(out)


def describe(out: Path) -> str:
    """One line for the CLI: what was written and how to load it."""
    if (out / ADAPTER_CONFIG).is_file():
        base = json.loads((out / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
        return (
            f"PEFT adapter in {out} (base model: {base}); load with PeftModel.from_pretrained(base, '{out}')"
        )
    return f"HF model in {out}; load with AutoModelForCausalLM.from_pretrained('{out}')"
