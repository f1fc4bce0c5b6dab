"""Tensor parallel, Megatron style (``tensor_parallel_size: N``), with torch's DTensor on a ``dp × tp`` DeviceMesh.

Inside each group of N ranks every decoder block is split: the query / key / value and the MLP's gate / up
projections column-wise (each rank computes 1/N of the heads and of the intermediate features), the attention
output and MLP down projections row-wise (each rank adds its part; one all-reduce per projection brings the
block's output back to every rank). Between the blocks the hidden states are whole on every rank, so norms,
residuals, rotary embeddings and everything else run unchanged. The embeddings and the LM head are split over
the vocabulary (each rank holds V/N rows); the LM head's logits stay split and the loss is vocab-parallel
(:func:`tunesmith.train.objectives.head.vocab_parallel_cross_entropy`: max, sum of exponentials and the target's
logit all-reduced over the group), so no rank ever holds ``tokens × vocab`` logits.

Which layers split how is a table (:data:`PLAN`) of module-name suffixes, shared by the Llama / Qwen2 / Qwen3
families (and their look-alikes: Mistral, SmolLM2, ...) and InternLM2. A LoRA layer (PEFT) follows its base:
under a column-split base, ``lora_B`` is split the same way and ``lora_A`` is whole; under a row-split base,
``lora_A`` is split over its input and ``lora_B`` is whole. The layers compute with DTensors inside and hand plain
tensors to the rest of the model, so HF's attention code sees a model with H/N heads and changes nothing. The
column-split projections of one attention (MLP) module share one Replicate DTensor of its input, so backward sums
their partial input gradients and all-reduces once per module, not once per projection.

Gradients. Every rank of a TP group runs the same batch and the same loss (the loop counts it once: the
engine's ``data_replicas``); DTensor's redistributions make each rank's gradients those of its own slice, and the
whole weights' (norms) identical on the group's ranks. FSDP2 then shards and reduces over the ``dp`` dimension
only (:class:`~tunesmith.train.engines.fsdp2.FSDP2Engine`).
"""

from __future__ import annotations

from typing import Any

import torch

from tunesmith.config import Config
from tunesmith.errors import ConfigError
from tunesmith.logging import get_logger
from tunesmith.train.objectives.head import HeadSwitch
from tunesmith.train.sequence_parallel import (
    check_native,
    check_saved_native,
    head_counts,
    saved_model_config,
)

log = get_logger("train")

__all__ = ["PLAN", "check_model", "check_sizes", "parallelize", "validate", "working_sizes"]

# module-name suffix → how its weight splits; the names of llama / qwen2 / qwen3 / mistral (and internlm2's)
PLAN: dict[str, str] = {
    "q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise",
    "gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise",
    # InternLM2: wqkv packs the heads per key/value group, so splitting its rows keeps whole groups together
    "wqkv": "colwise", "wo": "rowwise", "w1": "colwise", "w3": "colwise", "w2": "rowwise",
}


# ------------------------------------------------------------------------------------------------ checks


def working_sizes(query_heads: int, kv_heads: int) -> list[int]:
    """The tensor_parallel_size values a model with these head counts can run (besides 1)."""
    return [n for n in range(2, kv_heads + 1) if query_heads % n == 0 and kv_heads % n == 0]


def check_sizes(query_heads: int, kv_heads: int, size: int) -> None:
    """Each rank computes query_heads / N query and kv_heads / N key/value heads, so N must divide both."""
    if size > 1 and (query_heads % size or kv_heads % size):
        sizes = working_sizes(query_heads, kv_heads)
        which = " or ".join(map(str, sizes)) if sizes else "none above 1"
        raise ConfigError(
            f"tensor_parallel_size: {size} does not divide this model's heads ({query_heads} query and {kv_heads} "
            f"key/value heads), so the ranks could not take equal shares of them; sizes that work: {which} "
            "(or 1: no tensor parallel)"
        )


def check_model(config: Any, size: int) -> None:
    """Heads, MLP width and vocabulary split evenly over ``size`` ranks (an HF config object or dict)."""
    counts = head_counts(config)
    if counts is None:
        raise ConfigError(f"tensor_parallel_size: {size} needs a model whose config names its attention heads "
                          "(num_attention_heads)")
    check_sizes(*counts, size)
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    for key in ("intermediate_size", "vocab_size"):
        value = get(key)
        if isinstance(value, int) and value % size:
            raise ConfigError(f"tensor_parallel_size: {size} does not divide the model's {key} ({value}); use a "
                              f"size that does, or 1")


def validate(cfg: Config, world_size: int) -> None:
    """Before anything is loaded (and before launching): the model's heads split over the TP ranks."""
    if cfg.tensor_parallel_size == 1:
        return
    check_saved_native(cfg, "tensor_parallel_size", cfg.tensor_parallel_size)
    config = saved_model_config(cfg)
    if config is not None:
        check_model(config, cfg.tensor_parallel_size)


# ------------------------------------------------------------------------------------------------ splitting


def _distribute(module: torch.nn.Module, name: str, mesh: Any, placement: Any) -> None:
    """Replace ``module.<name>`` (a parameter) by a DTensor parameter with ``placement`` on ``mesh``."""
    from torch.distributed.tensor import distribute_tensor

    param = getattr(module, name, None)
    if param is None:
        return
    tensor = distribute_tensor(param.data, mesh, [placement])
    module.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=param.requires_grad))


def _lora_parts(module: torch.nn.Module) -> tuple[torch.nn.Module, list[torch.nn.Module], list[torch.nn.Module]]:
    """(the base Linear, the lora_A layers, the lora_B layers) of a PEFT LoRA layer, or (module, [], [])."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return module, [], []
    if getattr(module, "lora_magnitude_vector", None):  # DoRA: its magnitude is a norm over the whole weight
        raise ConfigError("tensor_parallel_size > 1 does not split DoRA layers (their magnitude is a norm over the "
                          "whole weight); set use_dora: false or tensor_parallel_size: 1")
    lora_a = [layer for layer in getattr(module, "lora_A", {}).values()]
    lora_b = [layer for layer in getattr(module, "lora_B", {}).values()]
    return base, lora_a, lora_b


def _split_linear(module: torch.nn.Module, style: str, mesh: Any) -> None:
    """Split a Linear (or a LoRA layer around one) column- or row-wise; inputs and outputs stay plain tensors."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module

    base, lora_a, lora_b = _lora_parts(module)
    if not isinstance(base, torch.nn.Linear):
        raise ConfigError(f"tensor_parallel_size > 1 splits Linear layers; {type(base).__name__} is not one "
                          "(a quantized base?): set tensor_parallel_size: 1")
    if style == "colwise":  # out features split: y_local = x W_localᵀ (+ b_local)
        _distribute(base, "weight", mesh, Shard(0))
        _distribute(base, "bias", mesh, Shard(0))
        for layer in lora_a:
            _distribute(layer, "weight", mesh, Replicate())
        for layer in lora_b:
            _distribute(layer, "weight", mesh, Shard(0))
        inputs, to_local = Replicate(), lambda out: out.to_local()
    else:  # in features split: each rank's partial sum, all-reduced
        _distribute(base, "weight", mesh, Shard(1))
        _distribute(base, "bias", mesh, Replicate())
        for layer in lora_a:
            _distribute(layer, "weight", mesh, Shard(1))
        for layer in lora_b:
            _distribute(layer, "weight", mesh, Replicate())
        inputs, to_local = Shard(-1), lambda out: out.redistribute(placements=[Replicate()]).to_local()

    def input_fn(_module: torch.nn.Module, args: tuple, _mesh: Any) -> tuple:
        x, *rest = args
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [inputs], run_check=False)
        return (x, *rest)

    def output_fn(_module: torch.nn.Module, out: Any, _mesh: Any) -> Any:
        return to_local(out) if isinstance(out, DTensor) else out

    distribute_module(module, mesh, input_fn=input_fn, output_fn=output_fn)


# the attention / MLP modules whose column-split projections all read the module's one input (hidden_states)
_SHARED_INPUT = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"wqkv"}, {"w1", "w3"})


def _share_block_inputs(model: torch.nn.Module, targets: list[tuple[str, torch.nn.Module, str]], mesh: Any) -> None:
    """Make an attention or MLP module's input a Replicate DTensor once, before its column-split projections read
    it. Each projection converting it on its own gives each one its own DTensor, so backward all-reduces q's, k's
    and v's (gate's, up's) input gradients one by one, each into a new whole [tokens, hidden] buffer; one shared
    DTensor sums the partial gradients first and all-reduces once per module."""
    from torch.distributed.tensor import DTensor, Replicate

    colwise: dict[str, set[str]] = {}
    for name, _, style in targets:
        parent, _, leaf = name.rpartition(".")
        if style == "colwise":
            colwise.setdefault(parent, set()).add(leaf)
    modules = dict(model.named_modules())

    def to_replicate(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and not isinstance(x, DTensor):
            return DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        return x

    def pre_hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (to_replicate(args[0]), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": to_replicate(kwargs["hidden_states"])}
        return args, kwargs

    for parent, leaves in colwise.items():
        if leaves in _SHARED_INPUT and parent in modules:
            modules[parent].register_forward_pre_hook(pre_hook, with_kwargs=True)


def _split_vocab(model: torch.nn.Module, mesh: Any) -> None:
    """Embeddings split over vocabulary rows (torch's RowwiseParallel: masked lookup, all-reduced); the LM head's
    weight the same rows. The head runs through a :class:`HeadSwitch`, which gathers whole logits where they are
    asked for (generation) and runs the vocab-parallel loss otherwise."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    embed = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight is embed.weight
    embed_name = next(name for name, module in model.named_modules() if module is embed)
    parallelize_module(model, mesh, {embed_name: RowwiseParallel(input_layouts=Replicate())})
    if head is None:
        return
    if type(head) is not torch.nn.Linear or head.bias is not None:
        raise ConfigError(f"tensor_parallel_size > 1 splits a plain, bias-free LM head; this model's is a "
                          f"{type(head).__name__}: set tensor_parallel_size: 1")
    if tied:
        head.weight = embed.weight  # the embedding's DTensor parameter: still one weight
    else:
        _distribute(head, "weight", mesh, Shard(0))
    if not isinstance(head.__dict__.get("forward"), HeadSwitch):
        HeadSwitch(head)


def _base_model(model: torch.nn.Module) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def parallelize(model: torch.nn.Module, mesh: Any) -> int:
    """Split ``model`` (a PEFT wrapper's base too) over the 1-D ``mesh`` in place, as the module docstring says;
    returns how many layers were split. Called before FSDP2 wraps the model."""
    base = _base_model(model)
    check_native(type(base), "tensor_parallel_size", mesh.size())
    check_model(base.config, mesh.size())
    targets = [(name, module, PLAN[name.rsplit(".", 1)[-1]]) for name, module in base.named_modules()
               if name.rsplit(".", 1)[-1] in PLAN and not name.rsplit(".", 1)[-1].startswith("lora_")]
    targets = [(name, module, style) for name, module, style in targets
               if not any(name.startswith(other + ".") for other, _, _ in targets)]  # a LoRA layer, not its base
    if not targets:
        raise ConfigError(f"tensor_parallel_size > 1 found no attention / MLP projections it knows in "
                          f"{type(base).__name__} (names {sorted(PLAN)}); set tensor_parallel_size: 1")
    for _, module, style in targets:
        _split_linear(module, style, mesh)
    _share_block_inputs(base, targets, mesh)
    _split_vocab(base, mesh)
    log.info("tensor parallel over %d ranks: %d projections split (attention and MLP), embeddings and LM head "
             "split over the vocabulary, vocab-parallel loss", mesh.size(), len(targets))
    return len(targets)
