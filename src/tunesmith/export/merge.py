"""`tunesmith export`: merge a LoRA adapter into its base and write a self-contained HF folder.

The folder holds sharded safetensors, the tokenizer with the chat template baked in, and a generation config
whose eos ids are the template's stop tokens, so vLLM / llama.cpp converters / transformers stop where
training taught the model to stop.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.config.load import check_output_folder
from tunesmith.errors import ModelError
from tunesmith.logging import get_logger

if TYPE_CHECKING:
    from tunesmith.config.schema import Config
    from tunesmith.export.quantize import GptqSpec

logger = get_logger("export")

# Written into every export; an existing out_dir holding it may be replaced, any other non-empty one may not.
EXPORT_MARKER = "tunesmith_export.json"


def _check_gguf_request(base_dir: Path, gptq: Any, reward_model: bool) -> None:
    """What a GGUF export cannot write, refused before the merge (:func:`tunesmith.export.gguf.check_gguf_support`)."""
    from tunesmith.export.gguf import check_gguf_support

    if gptq is not None or reward_model:
        raise ModelError("export_format: gguf writes causal language models without GPTQ; unset "
                         "export_quantization_bit (and use stage sft/pt/dpo models), or set export_format: hf.")
    check_gguf_support(base_dir)


def _write_gguf_folder(tmp: Path, out: Path, model: Any, tokenizer: Any, quantization: str, base_dir: Path,
                       chat: tuple[str | None, list[int], str | None]) -> dict[str, Any]:
    """One .gguf and an Ollama Modelfile into ``tmp`` (``chat``: template, stop ids, default system); the
    settings for the export marker."""
    from tunesmith.export.gguf import gguf_file_name, write_gguf
    from tunesmith.export.modelfile import write_modelfile

    chat_template, stop_ids, default_system = chat
    name = gguf_file_name(out, quantization)
    settings = write_gguf(model, tokenizer, tmp / name, quantization, base_dir, stop_ids)
    write_modelfile(tmp / "Modelfile", name, chat_template, tokenizer, default_system)
    return settings


def export_model(
    model_name_or_path: str,
    out_dir: str | os.PathLike,
    adapter: str | None = None,
    *,
    export_size_gb: float | str = 5,
    dtype: str = "auto",
    device: str = "cpu",
    template: str | None = None,
    default_system: str | None = None,
    cache_dir: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    reward_model: bool = False,
    gptq: GptqSpec | None = None,
    gguf_quantization: str | None = None,
) -> Path:
    """Write base (+ merged LoRA adapter) to `out_dir`; returns it.

    `reward_model` (stage: rm): the model is a …ForSequenceClassification with one output, and the adapter
    carries the trained head; the export loads with AutoModelForSequenceClassification.

    `export_size_gb` is the largest shard in GB; a string with a unit ("500MB") is passed to transformers as is.
    `default_system` (the training config's) becomes the exported chat template's default system prompt, so chat
    on the merged model sees the same prompt the model was trained with.
    `gptq`: the merged model is then GPTQ-quantized in the folder (:mod:`tunesmith.export.quantize`).
    `gguf_quantization` (f32, f16, bf16, q8_0): the folder holds one .gguf and an Ollama Modelfile instead of
    safetensors (:mod:`tunesmith.export.gguf`).
    """
    from tunesmith.data.loader import pad_token_id
    from tunesmith.model.load import load_tokenizer, resolve_dtype
    from tunesmith.model.resolve import resolve_model_path

    out = Path(out_dir).expanduser()
    _check_out_dir(out)
    base_dir = resolve_model_path(model_name_or_path, cache_dir)
    if gguf_quantization is not None:
        _check_gguf_request(base_dir, gptq, reward_model)  # before the (long) merge
    if adapter:
        _refuse_quantized_base(base_dir)
    torch_dtype = resolve_dtype(dtype, base_dir)
    tokenizer = load_tokenizer(base_dir, trust_remote_code=trust_remote_code)
    model = _load_merged(base_dir, adapter, torch_dtype, pad_token_id=pad_token_id(tokenizer) if reward_model else None,
                         trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, device=device)

    chat_template, stop_ids = None, []
    if not reward_model:  # a scorer has no chat template or generation settings
        chat_template, stop_ids = _set_chat_template(model, tokenizer, template, default_system, base_dir)

    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside out_dir and renamed in at the end: a crash never leaves a half export that looks whole.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)
    try:
        marker: dict[str, Any] = {}
        if gguf_quantization is not None:
            marker |= _write_gguf_folder(tmp, out, model, tokenizer, gguf_quantization, base_dir,
                                         (chat_template, stop_ids, default_system))
        else:
            model.save_pretrained(tmp, max_shard_size=_shard_size(export_size_gb))
            tokenizer.save_pretrained(tmp)
        del model  # saved: GPTQ (when asked) loads it again from the folder, without a second copy in memory
        marker |= {
            "base": str(base_dir),
            "adapter": str(Path(adapter).expanduser().resolve()) if adapter else None,
            "dtype": str(torch_dtype).removeprefix("torch."),
            "template": template or "auto",
        }
        if gptq is not None:
            from tunesmith.export.quantize import quantize_folder

            marker |= quantize_folder(tmp, gptq, tokenizer, device=device,
                                      max_shard_size=_shard_size(export_size_gb), trust_remote_code=trust_remote_code)
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported %s to %s", "merged model" if adapter else "model", out)
    return out


def _load_merged(base_dir: Path, adapter: str | None, torch_dtype: Any, *, pad_token_id: int | None,
                 trust_remote_code: bool, allow_pickle: bool, device: str) -> Any:
    """The base model with ``adapter`` merged in; with ``pad_token_id``, the reward model (its trained head comes
    with the adapter). Loaded straight in the export dtype: PEFT computes the LoRA delta in float32 and rounds once
    when merging."""
    from tunesmith.model.adapt import load_adapter
    from tunesmith.model.load import RewardHead, load_model

    model: Any = load_model(
        base_dir,
        dtype=torch_dtype,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        device=device,
        reward_head=RewardHead(pad_token_id) if pad_token_id is not None else None,
    )
    if adapter:
        model = load_adapter(model, adapter, trainable=False, allow_pickle=allow_pickle).merge_and_unload()
        logger.info("merged adapter %s into %s", adapter, base_dir)
    return model


def _set_chat_template(model: Any, tokenizer: Any, template: str | None, default_system: str | None,
                       base_dir: Path) -> tuple[Any, list[int]]:
    """The training template (with its default system prompt) as the tokenizer's chat_template, and its stop
    tokens as the generation config's eos; returns the template (None without one) and the stop ids."""
    from tunesmith.data.templates import Template
    from tunesmith.model.generate import get_chat_template

    if (template and template != "auto") or tokenizer.chat_template:
        chat_template = get_chat_template(template, tokenizer)
        if default_system is not None:
            if type(chat_template) is Template:  # a registry template; AutoTemplate wraps the tokenizer's jinja
                chat_template = dataclasses.replace(chat_template, default_system=default_system)
            else:
                logger.warning("default_system is not written into the tokenizer's own (auto) template; "
                               "pass --system when chatting with the export")
        tokenizer.chat_template = chat_template.jinja()  # for auto: the tokenizer's own, unchanged
        stop_ids = chat_template.stop_token_ids(tokenizer)
    else:
        chat_template = None
        logger.warning("the tokenizer of %s has no chat template; the export will have none either", base_dir)
        stop_ids = [tokenizer.eos_token_id]
    model.generation_config.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else stop_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return chat_template, stop_ids


def export_from_config(cfg: Config) -> Path:
    """export_model with the config's model, adapter and export_* keys."""
    from tunesmith.export.quantize import gptq_spec

    cfg.require("model_name_or_path", "export_dir")
    gptq = gptq_spec(cfg)  # its refusals come before anything is merged or written
    gguf_quantization = cfg.export_quantization if cfg.export_format == "gguf" else None
    dtype = cfg.export_dtype
    if gguf_quantization in ("f32", "q8_0") and dtype == "auto":
        dtype = "float32"  # merge and quantize from full precision, rounding once
    if cfg.quantization_bit is not None and cfg.adapter_name_or_path:
        # QLoRA: the adapter learned against dequantized weights, which approximate these full-precision ones;
        # merging into the quantized base would round the merged weights to 4/8 bits again.
        logger.info(
            "quantization_bit: %s was for training; merging the adapter into the full-precision base %s",
            cfg.quantization_bit,
            cfg.model_name_or_path,
        )
    return export_model(
        cfg.model_name_or_path,
        cfg.export_dir,
        cfg.adapter_name_or_path,
        export_size_gb=cfg.export_size,
        dtype=dtype,
        device=cfg.export_device,
        template=cfg.template,
        default_system=cfg.default_system,
        cache_dir=cfg.cache_dir,
        trust_remote_code=cfg.trust_remote_code,
        allow_pickle=cfg.allow_pickle,
        reward_model=cfg.stage == "rm",
        gptq=gptq,
        gguf_quantization=gguf_quantization,
    )


def _refuse_quantized_base(base_dir: Path) -> None:
    from tunesmith.model.load import saved_quantization

    quantization = saved_quantization(base_dir)
    if quantization is None:
        return
    method = quantization.get("quant_method", "quantized")
    bits = next((b for b in (4, 8) if quantization.get(f"load_in_{b}bit") or quantization.get("bits") == b), None)
    kind = f"{method} {bits}-bit" if bits else str(method)
    raise ModelError(
        f"model {base_dir} is quantized ({kind}: its config.json has a quantization_config) and export merges "
        "adapters into full-precision weights only; set model_name_or_path (--model) to the full-precision "
        "model the quantized one was made from."
    )


def _shard_size(size: float | str) -> int | str:
    if isinstance(size, str):
        return size
    if size <= 0:
        raise ModelError(f"export_size is {size}; set it to the largest shard size in GB (e.g. 5).")
    return int(size * 10**9)  # transformers counts "5GB" as 5 * 10**9 bytes too


def _check_out_dir(out: Path) -> None:
    check_output_folder("export_dir", out, ModelError)  # a file, a path below a file, a dangling link, no permission
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        raise ModelError(
            f"export_dir {out} is not empty and holds no earlier tunesmith export; choose a new or empty folder "
            "so nothing of yours is overwritten."
        )


def _replace_dir(new: Path, out: Path) -> None:
    if out.exists():
        # Checked above: out is empty or a previous export. Move it aside so the swap is two renames.
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        new.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(out)
