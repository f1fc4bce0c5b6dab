"""Choose what trains: all weights (full), the last/first N decoder layers (freeze), or LoRA adapters (PEFT)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tunesmith.errors import ConfigError, ModelError
from tunesmith.jsonfile import read_json_object
from tunesmith.logging import get_logger
from tunesmith.model.load import check_safetensors

if TYPE_CHECKING:
    from tunesmith.config.schema import Config, MethodArgs

logger = get_logger("model")

_PEFT_PREFIX = "base_model.model."


def apply_finetuning(model: Any, cfg: Config) -> Any:
    """Set requires_grad per `cfg.finetuning_type` (wrapping in PEFT for lora) and return the model to train."""
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
        _apply_freeze(model, cfg.freeze_trainable_layers, cfg.freeze_trainable_modules)
        if is_reward_model(model):
            model.score.requires_grad_(True)  # the new head always trains
    elif isinstance(model, PeftModel):
        # load_model_and_tokenizer already attached the adapter (frozen, for inference): continue training it.
        model.set_requires_grad(model.active_adapter, True)
        model.peft_config[model.active_adapter].inference_mode = False
    elif cfg.adapter_name_or_path:
        model = load_adapter(model, cfg.adapter_name_or_path, trainable=True, allow_pickle=cfg.allow_pickle)
    else:
        model = _wrap_lora(model, cfg)
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


def _apply_freeze(model: nn.Module, num_layers: int, modules: list[str] | str) -> None:
    layers_name, layers = find_decoder_layers(model)
    count = len(layers)
    if num_layers == 0 or abs(num_layers) > count:
        raise ModelError(
            f"freeze_trainable_layers is {num_layers} but the model has {count} decoder layers; "
            f"use 1..{count} (last N layers) or -1..-{count} (first N layers)."
        )
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


def _wrap_lora(model: nn.Module, method: MethodArgs) -> Any:
    from peft import LoraConfig, TaskType, get_peft_model

    available = find_linear_modules(model)
    targets = available if method.lora_target == "all" else list(method.lora_target)
    unknown = [name for name in targets if name not in available]
    if unknown:
        raise ModelError(
            f"lora_target {', '.join(unknown)} is not a linear layer of {type(model).__name__}; "
            f"use all or names from: {', '.join(available)}."
        )
    _check_dora_on_quantized(model, method)
    alpha = method.lora_alpha or 2 * method.lora_rank
    logger.info(
        "lora targets: %s (r %d, alpha %d, scaling %.4g%s%s)",
        ", ".join(targets),
        method.lora_rank,
        alpha,
        lora_scaling(alpha, method.lora_rank, method.use_rslora),
        ", rsLoRA" if method.use_rslora else "",
        ", DoRA" if method.use_dora else "",
    )
    reward_model = is_reward_model(model)
    config = LoraConfig(
        # SEQ_CLS: PEFT trains a reward model's new scalar head in full and saves it with the adapter
        task_type=TaskType.SEQ_CLS if reward_model else TaskType.CAUSAL_LM,
        r=method.lora_rank,
        lora_alpha=alpha,
        lora_dropout=method.lora_dropout,
        target_modules=targets,
        use_dora=method.use_dora,
        use_rslora=method.use_rslora,
    )
    with warnings.catch_warnings():
        # PEFT still asks for `is_gradient_checkpointing`, which transformers ≥ 5 renamed; nothing to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


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
    """Attach a saved LoRA adapter as a PeftModel, after checking it fits this model (type, modules, shapes)."""
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
    if peft_type != "LORA":
        raise ModelError(
            f"adapter {path} is a {peft_type} adapter; tunesmith loads and merges LoRA adapters only."
        )
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        check_safetensors(weights)  # truncated or foreign: one sentence naming it, not a SafetensorError
        _check_adapter_fits(model, weights, adapter_config.get("base_model_name_or_path"))
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
    logger.info("loaded LoRA adapter %s (%s)", path, "trainable" if trainable else "frozen")
    return peft_model


def _read_adapter_config(config_file: Path) -> dict[str, Any]:
    fix = "restore it from the training run, or point adapter_name_or_path at another checkpoint"
    return read_json_object(config_file, ModelError, fix)


def _check_adapter_fits(model: nn.Module, weights: Path, recorded_base: str | None) -> None:
    # PEFT only warns about adapter keys that match no module and fails deep in load_state_dict on shape
    # mismatches; checking first gives one clear message naming the module and the base the adapter expects.
    from safetensors import safe_open

    hint = (
        f"the adapter was trained on {recorded_base or 'another base model'}; use that as model_name_or_path"
    )
    with safe_open(str(weights), framework="pt") as fh:
        for key in fh.keys():
            module_path, part = _split_lora_key(key)
            if part is None:
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


def _split_lora_key(key: str) -> tuple[str, str | None]:
    """'base_model.model.model.layers.0.q_proj.lora_A.weight' -> ('model.layers.0.q_proj', 'lora_A')."""
    for part in ("lora_A", "lora_B"):
        marker = f".{part}."
        if marker in key:
            return key.split(marker)[0].removeprefix(_PEFT_PREFIX), part
    return key, None
