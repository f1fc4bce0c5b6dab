"""Choose what trains: all weights (full), the last/first N decoder layers (freeze), or adapters through PEFT:
LoRA (with DoRA, rsLoRA, PiSSA initialisation) or OFT; LLaMA Pro restricts either to the expanded blocks, and
NEFTune adds noise to the input embeddings (:mod:`.neftune`)."""

from __future__ import annotations

import os
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tunesmith.errors import ConfigError, ModelError
from tunesmith.jsonfile import read_json_object
from tunesmith.logging import get_logger
from tunesmith.model.llama_pro import expanded_layer_ids
from tunesmith.model.load import check_safetensors

if TYPE_CHECKING:
    from collections.abc import Sequence

    from tunesmith.config.schema import Config, MethodArgs

logger = get_logger("model")

_PEFT_PREFIX = "base_model.model."
ADAPTER_TYPES = {"LORA": "LoRA", "OFT": "OFT"}  # PEFT's peft_type of the adapters tunesmith trains and loads


def apply_finetuning(model: Any, cfg: Config) -> Any:
    """Set requires_grad per `cfg.finetuning_type` (wrapping in PEFT for lora / oft; use_llama_pro: only the
    expanded blocks; neftune_noise_alpha: the embedding noise) and return the model to train."""
    from peft import PeftModel

    if (cfg.adapter_name_or_path or isinstance(model, PeftModel)) and cfg.finetuning_type != "lora":
        raise ModelError(
            f"adapter_name_or_path works with finetuning_type: lora only, not {cfg.finetuning_type}; "
            "export the merged model first (tunesmith export) and fine-tune that."
        )
    if cfg.gradient_checkpointing:
        _enable_gradient_checkpointing(model, frozen_embeddings=cfg.finetuning_type != "full")

    if cfg.finetuning_type == "full":
        model.requires_grad_(True)
    elif cfg.finetuning_type == "freeze":
        _apply_freeze(model, cfg.freeze_trainable_layers, cfg.freeze_trainable_modules, cfg.use_llama_pro)
        if is_reward_model(model):
            model.score.requires_grad_(True)  # the new head always trains
    elif isinstance(model, PeftModel):
        # load_model_and_tokenizer already attached the adapter (frozen, for inference): continue training it.
        model.set_requires_grad(model.active_adapter, True)
        model.peft_config[model.active_adapter].inference_mode = False
    elif cfg.adapter_name_or_path:
        model = load_adapter(model, cfg.adapter_name_or_path, trainable=True, allow_pickle=cfg.allow_pickle)
    elif cfg.finetuning_type == "oft":
        model = _wrap_oft(model, cfg)
    else:
        model = _wrap_lora(model, cfg)
    if cfg.neftune_noise_alpha:
        from tunesmith.model.neftune import attach_neftune

        attach_neftune(model, cfg.neftune_noise_alpha)
    model.train()
    logger.info("%s fine-tuning, %s", cfg.finetuning_type, trainable_summary(model))
    return model


def is_reward_model(model: nn.Module) -> bool:
    """An HF …ForSequenceClassification with its scalar ``score`` head (stage: rm)."""
    return type(model).__name__.endswith("ForSequenceClassification") and hasattr(model, "score")


def trainable_summary(model: nn.Module) -> str:
    """'trainable params: X of Y (Z%)', counting tied weights once."""
    total = trainable = 0
    for param in model.parameters():  # parameters() yields each shared tensor once
        # a bitsandbytes 4-bit weight packs two values per byte: count the weights, not the bytes
        quant_state = getattr(param, "quant_state", None)
        shape = getattr(quant_state, "shape", None)
        total += shape.numel() if isinstance(shape, torch.Size) else param.numel()
        if param.requires_grad:
            trainable += param.numel()
    percent = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} of {total:,} ({percent:.4f}%)"


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of decoder blocks: the ModuleList with config.num_hidden_layers entries (largest otherwise)."""
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [
        (name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod)
    ]
    matching = [item for item in lists if len(item[1]) == expected] or sorted(
        lists, key=lambda it: -len(it[1])
    )
    if not matching:
        raise ModelError(
            f"cannot find the decoder layers of {type(model).__name__}; use finetuning_type: full or lora."
        )
    return matching[0]


def find_linear_modules(model: nn.Module) -> list[str]:
    """Short names of all linear layers except the output head (what lora_target: all adapts)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not output and name.split(".")[-1] != "lm_head":
            names.add(name.split(".")[-1])
    return sorted(names)


def _apply_freeze(model: nn.Module, num_layers: int, modules: list[str] | str, llama_pro: bool = False) -> None:
    layers_name, layers = find_decoder_layers(model)
    count = len(layers)
    if num_layers == 0 or abs(num_layers) > count:
        raise ModelError(
            f"freeze_trainable_layers is {num_layers} but the model has {count} decoder layers; "
            f"use 1..{count} (last N layers) or -1..-{count} (first N layers)."
        )
    chosen: Sequence[int]
    if llama_pro:  # the blocks `tunesmith llama-pro` added: the last of every group of count / num_layers
        chosen = expanded_layer_ids(count, num_layers)
    else:
        chosen = range(count - num_layers, count) if num_layers > 0 else range(-num_layers)
    model.requires_grad_(False)
    matched = False
    for index in chosen:
        for name, param in layers[index].named_parameters():
            if modules == "all" or any(part in modules for part in name.split(".")):
                param.requires_grad_(True)
                matched = True
    if not matched:
        available = sorted(
            {part for name, _ in layers[0].named_parameters() for part in name.split(".")[:-1]}
        )
        raise ModelError(
            f"freeze_trainable_modules {modules} matches nothing in {layers_name}.N; "
            f"use all or names from: {', '.join(available)}."
        )
    logger.info("freeze: training %s %s of %s", layers_name, list(chosen), count)


def _adapter_targets(model: nn.Module, wanted: list[str] | str, key: str, cfg: Config) -> list[str]:
    """The module names ``key`` (lora_target / oft_target) adapts: short names, or with use_llama_pro the full
    names of those modules inside the expanded blocks only."""
    available = find_linear_modules(model)
    targets = available if wanted == "all" else list(wanted)
    unknown = [name for name in targets if name not in available]
    if unknown:
        raise ModelError(
            f"{key} {', '.join(unknown)} is not a linear layer of {type(model).__name__}; "
            f"use all or names from: {', '.join(available)}."
        )
    if not cfg.use_llama_pro:
        return targets
    layers_name, layers = find_decoder_layers(model)
    chosen = expanded_layer_ids(len(layers), cfg.freeze_trainable_layers)
    prefixes = tuple(f"{layers_name}.{index}." for index in chosen)
    logger.info("use_llama_pro: adapters in the expanded blocks %s of %s", chosen, layers_name)
    return [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(prefixes) and name.split(".")[-1] in targets
    ]


def _task_type(model: nn.Module) -> Any:
    from peft import TaskType

    # SEQ_CLS: PEFT trains a reward model's new scalar head in full and saves it with the adapter
    return TaskType.SEQ_CLS if is_reward_model(model) else TaskType.CAUSAL_LM


def _get_peft_model(model: nn.Module, config: Any) -> Any:
    from peft import get_peft_model

    with warnings.catch_warnings():
        # PEFT still asks for `is_gradient_checkpointing`, which transformers ≥ 5 renamed; nothing to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def _wrap_lora(model: nn.Module, cfg: Config) -> Any:
    from peft import LoraConfig

    from tunesmith.model import pissa

    targets = _adapter_targets(model, cfg.lora_target, "lora_target", cfg)
    _check_dora_on_quantized(model, cfg)
    alpha = cfg.lora_alpha or 2 * cfg.lora_rank
    logger.info(
        "lora targets: %s (r %d, alpha %d, scaling %.4g%s%s%s)",
        ", ".join(targets),
        cfg.lora_rank,
        alpha,
        lora_scaling(alpha, cfg.lora_rank, cfg.use_rslora),
        ", rsLoRA" if cfg.use_rslora else "",
        ", DoRA" if cfg.use_dora else "",
        f", PiSSA init ({pissa.init_lora_weights(cfg.pissa_iter)})" if cfg.pissa_init else "",
    )
    config = LoraConfig(
        task_type=_task_type(model),
        r=cfg.lora_rank,
        lora_alpha=alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        init_lora_weights=pissa.init_lora_weights(cfg.pissa_iter) if cfg.pissa_init else True,
    )
    with pissa.seeded(cfg.seed) if cfg.pissa_init else nullcontext():
        peft_model = _get_peft_model(model, config)
    if cfg.pissa_init and cfg.pissa_convert:
        pissa.remember_initial_adapter(peft_model)
    return peft_model


def _wrap_oft(model: nn.Module, cfg: Config) -> Any:
    from peft import OFTConfig

    targets = _adapter_targets(model, cfg.oft_target, "oft_target", cfg)
    size = f"block size {cfg.oft_block_size}" if cfg.oft_block_size else f"r {cfg.oft_rank}"
    logger.info("oft targets: %s (%s, module dropout %g)", ", ".join(targets), size, cfg.module_dropout)
    config = OFTConfig(
        task_type=_task_type(model),
        r=cfg.oft_rank,
        oft_block_size=cfg.oft_block_size,
        target_modules=targets,
        module_dropout=cfg.module_dropout,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = _get_peft_model(model, config)
    # PEFT adjusts a block size (or r) that does not divide a layer's inputs to the nearest one that does, with a
    # warning per layer: say it once
    adjusted = sorted({str(w.message) for w in caught if str(w.message).startswith("Invalid `")})
    for message in adjusted:
        logger.warning("oft: PEFT: %s (for the layers whose input size it does not divide)", message)
    return peft_model


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    """The factor on the adapter's output: alpha / r, or alpha / sqrt(r) with rsLoRA (whose updates then keep
    their size as r grows, so higher ranks actually learn more)."""
    return alpha / rank**0.5 if rslora else alpha / rank


def _check_dora_on_quantized(model: Any, method: MethodArgs) -> None:
    # bitsandbytes' CPU backend cannot dequantize an 8-bit weight once it has been used in a training step
    # (int8_mm_dequant gets no column statistics), which DoRA does on every forward: it crashes on the 2nd step.
    if not (method.use_dora and getattr(model, "is_loaded_in_8bit", False)):
        return
    if next(model.parameters()).device.type == "cpu":
        raise ConfigError(
            "use_dora: true with quantization_bit: 8 does not work on CPU (bitsandbytes cannot dequantize 8-bit "
            "weights there during training); use quantization_bit: 4, or use_dora: false"
        )


def _enable_gradient_checkpointing(model: Any, frozen_embeddings: bool) -> None:
    kwargs = {"use_reentrant": False}  # the non-reentrant variant works with frozen inputs and kwargs
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    if frozen_embeddings:
        # Frozen embeddings give inputs without grad; checkpointed blocks then would not backpropagate into
        # the trainable weights inside them.
        model.enable_input_require_grads()


def load_adapter(
    model: nn.Module, adapter_path: str | os.PathLike, *, trainable: bool = False, allow_pickle: bool = False
) -> Any:
    """Attach a saved LoRA or OFT adapter as a PeftModel, after checking it fits this model (type, modules,
    shapes)."""
    from peft import PeftModel

    path = Path(adapter_path).expanduser()
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ModelError(
            f"adapter_name_or_path {path} has no adapter_config.json; point it at a PEFT adapter folder "
            "(a training run's output_dir or one of its checkpoints)."
        )
    adapter_config = _read_adapter_config(config_file)
    peft_type = adapter_config.get("peft_type")
    if peft_type not in ADAPTER_TYPES:
        raise ModelError(
            f"adapter {path} is a {peft_type} adapter; tunesmith loads and merges LoRA and OFT adapters only."
        )
    _warn_unconverted_pissa(path, adapter_config)
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        check_safetensors(weights)  # truncated or foreign: one sentence naming it, not a SafetensorError
        _check_adapter_fits(model, weights, adapter_config)
    elif not (path / "adapter_model.bin").is_file():
        raise ModelError(
            f"adapter {path} has no adapter_model.safetensors; point at a complete adapter folder."
        )
    elif not allow_pickle:
        raise ModelError(
            f"adapter {path} has only pickled weights (adapter_model.bin), which can run arbitrary code when "
            "loaded; re-save it as safetensors, or set allow_pickle: true if you trust it."
        )
    try:
        with warnings.catch_warnings():  # see _wrap_lora
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = PeftModel.from_pretrained(model, path, is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as err:
        recorded = adapter_config.get("base_model_name_or_path") or "another base model"
        raise ModelError(
            f"adapter {path} does not fit this model (trained on {recorded}): {str(err).splitlines()[0]}; "
            "use the adapter's own base model as model_name_or_path."
        ) from err
    logger.info("loaded %s adapter %s (%s)", ADAPTER_TYPES[peft_type], path, "trainable" if trainable else "frozen")
    return peft_model


def _warn_unconverted_pissa(path: Path, adapter_config: dict[str, Any]) -> None:
    init = str(adapter_config.get("init_lora_weights", ""))
    if init.startswith("pissa_niter_"):
        # PEFT re-runs PiSSA's decomposition on the base when it loads such an adapter: the randomised SVD of
        # another generator state gives other residual weights than training had
        logger.warning(
            "adapter %s is an unconverted PiSSA adapter (%s): loading re-runs PEFT's randomised SVD on the base, so "
            "the model only approximates the trained one; train with pissa_convert: true (or pissa_iter: -1) for "
            "an adapter that loads exactly",
            path,
            init,
        )


def _read_adapter_config(config_file: Path) -> dict[str, Any]:
    fix = "restore it from the training run, or point adapter_name_or_path at another checkpoint"
    return read_json_object(config_file, ModelError, fix)


def _check_adapter_fits(model: nn.Module, weights: Path, adapter_config: dict[str, Any]) -> None:
    # PEFT only warns about adapter keys that match no module and fails deep in load_state_dict on shape
    # mismatches; checking first gives one clear message naming the module and the base the adapter expects.
    from safetensors import safe_open

    recorded_base = adapter_config.get("base_model_name_or_path")
    hint = (
        f"the adapter was trained on {recorded_base or 'another base model'}; use that as model_name_or_path"
    )
    with safe_open(str(weights), framework="pt") as fh:
        for key in fh.keys():
            module_path, part = _split_lora_key(key)
            if part is None:
                continue
            if part == "oft_R":
                _check_oft_fits(model, module_path, fh.get_slice(key).get_shape(), adapter_config, weights, hint)
                continue
            try:
                module = model.get_submodule(module_path)
            except AttributeError:
                raise ModelError(
                    f"adapter {weights.parent} adapts {module_path}, which {type(model).__name__} does not have; "
                    f"{hint}."
                ) from None
            if not isinstance(module, nn.Linear):
                continue
            shape = fh.get_slice(key).get_shape()
            want, got = (
                (module.in_features, shape[1]) if part == "lora_A" else (module.out_features, shape[0])
            )
            if want != got:
                raise ModelError(
                    f"adapter {weights.parent} expects {module_path} with {got} "
                    f"{'inputs' if part == 'lora_A' else 'outputs'} but this model's has {want}; {hint}."
                )


def _check_oft_fits(
    model: nn.Module, module_path: str, shape: list[int], adapter_config: dict[str, Any], weights: Path, hint: str
) -> None:
    """An OFT rotation [r, b (b - 1) / 2] (the strict upper triangles of r blocks of b × b) covers r × b inputs."""
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        raise ModelError(
            f"adapter {weights.parent} adapts {module_path}, which {type(model).__name__} does not have; {hint}."
        ) from None
    if not isinstance(module, nn.Linear) or adapter_config.get("block_share") or len(shape) != 2:
        return
    blocks, triangle = shape
    block = round((1 + (1 + 8 * triangle) ** 0.5) / 2)
    if block * (block - 1) // 2 == triangle and blocks * block != module.in_features:
        raise ModelError(
            f"adapter {weights.parent} rotates {blocks * block} inputs of {module_path} but this model's has "
            f"{module.in_features}; {hint}."
        )


def _split_lora_key(key: str) -> tuple[str, str | None]:
    """'base_model.model.model.layers.0.q_proj.lora_A.weight' -> ('model.layers.0.q_proj', 'lora_A') (an OFT
    adapter's rotations: 'oft_R')."""
    for part in ("lora_A", "lora_B", "oft_R"):
        marker = f".{part}."
        if marker in key:
            return key.split(marker)[0].removeprefix(_PEFT_PREFIX), part
    return key, None
