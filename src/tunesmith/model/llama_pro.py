"""LLaMA Pro block expansion (LLaMA-Factory's scripts/llama_pro.py, after Tencent's LLaMA-Pro).

``tunesmith llama-pro MODEL OUT --num-expand N`` splits the model's L decoder blocks into N groups of L / N and
puts a copy of each group's last block after it. In each copy the projections that write into the residual
stream (``o_proj``, ``down_proj``) are zeroed, so the copy adds nothing and the expanded model computes exactly
what the original did. Training with ``use_llama_pro: true`` (``freeze_trainable_layers: N``) then trains only the
copies: blocks stride - 1, 2 × stride - 1, … with stride = (L + N) / N, as LLaMA-Factory picks them.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.errors import ModelError
from tunesmith.logging import get_logger

logger = get_logger("model")

ZEROED = ("o_proj", "down_proj")  # what writes a block's attention and MLP results into the residual stream


def expanded_layer_ids(num_layers: int, num_expanded: int) -> list[int]:
    """The indices of the expanded blocks in a model of ``num_layers`` blocks, ``num_expanded`` of them copies."""
    if num_expanded <= 0 or num_layers % num_expanded:
        raise ModelError(
            f"use_llama_pro: the model has {num_layers} decoder layers, which freeze_trainable_layers "
            f"{num_expanded} does not divide; set freeze_trainable_layers to the --num-expand the model was "
            "expanded with"
        )
    stride = num_layers // num_expanded
    return list(range(stride - 1, num_layers, stride))


def expand_blocks(model: nn.Module, num_expand: int) -> list[int]:
    """Interleave ``num_expand`` zero-output copies of decoder blocks into ``model`` (in place, config updated);
    returns the indices of the new blocks."""
    from tunesmith.model.adapt import find_decoder_layers

    config = model.config
    name, layers = find_decoder_layers(model)
    count = len(layers)
    _check_num_expand(num_expand, count)
    group = count // num_expand
    layer_types = getattr(config, "layer_types", None)
    expanded: list[nn.Module] = []
    new_types: list[Any] = []
    added: list[int] = []
    for index, layer in enumerate(layers):
        expanded.append(layer)
        if layer_types is not None:
            new_types.append(layer_types[index])
        if (index + 1) % group == 0:
            added.append(len(expanded))
            expanded.append(_zero_output_copy(layer, type(model).__name__))
            if layer_types is not None:
                new_types.append(layer_types[index])
    for new_index, layer in enumerate(expanded):
        for module in layer.modules():  # attention modules know their index (the KV cache slot)
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, nn.ModuleList(expanded))
    config.num_hidden_layers = len(expanded)
    if layer_types is not None:
        config.layer_types = new_types
    return added


def _zero_output_copy(layer: nn.Module, model_name: str) -> nn.Module:
    clone = copy.deepcopy(layer)
    zeroed = [module for name, module in clone.named_modules() if name.split(".")[-1] in ZEROED]
    if len(zeroed) < 2:
        raise ModelError(
            f"llama-pro needs decoder blocks with o_proj and down_proj (LLaMA, Mistral, Qwen2, Yi, …) to make "
            f"the new blocks start as the identity; {model_name}'s blocks lack them"
        )
    with torch.no_grad():
        for module in zeroed:
            for param in module.parameters():
                param.zero_()
    return clone


def _check_num_expand(num_expand: int, count: int) -> None:
    if num_expand <= 0 or count % num_expand:
        divisors = [n for n in range(1, count + 1) if count % n == 0]
        raise ModelError(
            f"--num-expand {num_expand} must divide the model's {count} decoder layers (one copy after each "
            f"group of layers / num-expand); use one of {', '.join(map(str, divisors))}"
        )


def expand_model_folder(
    model_name_or_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    num_expand: int,
    *,
    cache_dir: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Write ``model_name_or_path`` expanded by ``num_expand`` blocks (weights in their saved dtype, safetensors)
    and its tokenizer to ``out_dir``, a new or empty folder; returns it."""
    from tunesmith.config.load import check_output_folder
    from tunesmith.model.load import check_model_config, load_model, load_tokenizer
    from tunesmith.model.resolve import resolve_model_path

    out = Path(out_dir).expanduser()
    check_output_folder("the llama-pro output folder", out, ModelError)
    if out.is_dir() and any(out.iterdir()):
        raise ModelError(f"the llama-pro output folder {out} is not empty; choose a new or empty folder")
    config = check_model_config(resolve_model_path(model_name_or_path, cache_dir), trust_remote_code)
    if isinstance(config.get("num_hidden_layers"), int):  # before the slow part
        _check_num_expand(num_expand, config["num_hidden_layers"])
    tokenizer = load_tokenizer(model_name_or_path, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    model = load_model(model_name_or_path, dtype="auto", cache_dir=cache_dir, trust_remote_code=trust_remote_code,
                       allow_pickle=allow_pickle)
    before = model.config.num_hidden_layers
    added = expand_blocks(model, num_expand)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()  # checked empty above
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("expanded %s from %d to %d decoder layers (new: %s) into %s", model_name_or_path, before,
                model.config.num_hidden_layers, ", ".join(map(str, added)), out)
    return out
