"""Load a causal LM and its tokenizer from anything `resolve_model_path` accepts, offline and safetensors-first."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from huggingface_hub.errors import StrictDataclassError

from tunesmith.errors import ConfigError, ModelError
from tunesmith.jsonfile import read_json_object
from tunesmith.logging import get_logger
from tunesmith.model.resolve import resolve_model_path

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunesmith.config.schema import Config, MethodArgs

logger = get_logger("model")

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def _npu_available() -> bool:
    # torch_npu registers the "npu" device only once imported; a broken install must not break CPU/CUDA users.
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch_npu  # noqa: F401

        return bool(torch.npu.is_available())  # type: ignore[attr-defined]
    except Exception as err:  # noqa: BLE001 - any failure there just means "no NPU"
        logger.debug("torch_npu is installed but unusable: %s", err)
        return False


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA, then Ascend NPU, then CPU; otherwise the named torch device, checked to exist."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _npu_available():
            return torch.device("npu")
        return torch.device("cpu")
    if name.startswith("npu") and not _npu_available():
        raise ModelError(
            f"device {name} was asked for but no Ascend NPU is usable (torch_npu); use auto or cpu."
        )
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ModelError(
            f"device {name} is not a torch device ({err}); use auto, cpu, cuda, cuda:N or npu."
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {name} was asked for but CUDA is not available here; use auto or cpu.")
    return device


def resolve_dtype(dtype: torch.dtype | str | None, model_dir: Path | None = None) -> torch.dtype:
    """A torch dtype from a dtype or its name; `auto`/None means the dtype the model folder was saved in."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = (dtype or "auto").lower().removeprefix("torch.")
    if name == "auto":
        saved = _saved_dtype(model_dir) if model_dir is not None else None
        return _DTYPES.get(saved or "", torch.float32)
    if name not in _DTYPES:
        raise ModelError(f"dtype {dtype} is not supported; use auto, float32, bfloat16 or float16.")
    return _DTYPES[name]


def _saved_dtype(model_dir: Path) -> str | None:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    # transformers 5 writes "dtype"; older folders say "torch_dtype".
    value = config.get("dtype") or config.get("torch_dtype")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class Quantization:
    """How to quantize the frozen base while loading (QLoRA): bitsandbytes 4-bit (nf4/fp4) or 8-bit (LLM.int8)."""

    bits: Literal[4, 8]
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.float32

    def describe(self) -> str:
        if self.bits == 8:
            return "8-bit (LLM.int8)"
        double = ", double quantization" if self.double_quant else ""
        return f"4-bit {self.quant_type}{double}, compute in {str(self.compute_dtype).removeprefix('torch.')}"

    def bnb_config(self) -> Any:
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=self.compute_dtype,
        )


def quantization_from_config(method: MethodArgs, precision: str = "fp32") -> Quantization | None:
    """The config's QLoRA settings (None without quantization_bit). ``precision`` is the run's resolved autocast
    precision (fp32/bf16/fp16): quantization_compute_dtype auto follows it."""
    if method.quantization_bit is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"quantization_bit: {method.quantization_bit} needs bitsandbytes, which is not installed; "
            "pip install bitsandbytes, or remove quantization_bit"
        )
    name = method.quantization_compute_dtype
    if name == "auto":
        name = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")
    return Quantization(
        bits=method.quantization_bit,
        quant_type=method.quantization_type,
        double_quant=method.double_quantization,
        compute_dtype=_DTYPES[name],
    )


def is_quantized(model: Any) -> bool:
    """Whether a (PEFT-wrapped) model's base was loaded quantized (bitsandbytes 4/8-bit)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else getattr(model, "module", model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return bool(
        getattr(base, "is_loaded_in_4bit", False)
        or getattr(base, "is_loaded_in_8bit", False)
        or getattr(base, "is_quantized", False)
    )


def saved_quantization(model_dir: Path) -> dict | None:
    """The quantization_config of a model folder's config.json (a folder saved from a quantized model)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    value = config.get("quantization_config")
    return value if isinstance(value, dict) else None


def _prepare_quantized(model: Any, compute_dtype: torch.dtype) -> None:
    """What matters of PEFT's prepare_model_for_kbit_training, without its memory cost: freeze everything (the
    adapters are added later and are the only trainable weights) and keep the small 1-D weights (norms, biases)
    in float32 for stable statistics. PEFT's version would also upcast the embeddings and the output head, a
    full-precision copy of the largest matrices that QLoRA is meant to avoid."""
    model.requires_grad_(False)
    for param in model.parameters():
        if param.ndim == 1 and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    model.config.use_cache = False
    logger.debug("prepared the quantized base for adapter training (compute dtype %s)", compute_dtype)


def _read_config_json(model_dir: Path) -> dict[str, Any]:
    """The folder's config.json as a dict; unreadable, not UTF-8, not JSON or not an object is a ModelError."""
    return read_json_object(model_dir / "config.json", ModelError, "restore the model's original config.json")


def check_model_config(model_dir: Path, trust_remote_code: bool = False) -> dict[str, Any]:
    """config.json read and its architecture known to transformers (or brought by the folder's own code)."""
    import transformers
    from transformers import CONFIG_MAPPING

    config = _read_config_json(model_dir)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelError(
            f"{model_dir / 'config.json'} has no model_type, so its architecture is unknown; restore the model's "
            "original config.json"
        )
    if model_type not in CONFIG_MAPPING and not (trust_remote_code and "auto_map" in config):
        hint = (
            "set trust_remote_code: true if you trust the folder's own Python code"
            if "auto_map" in config
            else "check the name, or install a transformers release that supports it"
        )
        raise ModelError(
            f"{model_dir / 'config.json'} has model_type {model_type!r}, an architecture transformers "
            f"{transformers.__version__} does not know; {hint}"
        )
    if model_type in CONFIG_MAPPING and not trust_remote_code:  # built-in code: check the values now
        _load_config_object(model_dir)
    return config


def _load_config_object(model_dir: Path) -> Any:
    """transformers' config of a built-in architecture; a value of the wrong type is a ModelError naming it."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (StrictDataclassError, ValueError) as err:
        raise ModelError(
            f"{model_dir / 'config.json'} has a value transformers refuses ({_one_line(err)}); restore the model's "
            "original config.json"
        ) from None


def check_safetensors(path: Path) -> dict[str, list[int]]:
    """The tensor shapes a safetensors file's header lists, once the file is known to hold every byte that header
    promises: a truncated or foreign file is one ModelError naming it (safetensors itself raises a bare
    SafetensorError deep inside transformers)."""
    again = "copy or download the file again"
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            raw = fh.read(length) if 0 < length <= size - 8 else b""
    except OSError as err:
        raise ModelError(f"cannot read {path} ({err.strerror or err}); check that it is a readable file") from None
    if length < 0 or not raw:
        raise ModelError(f"{path} is truncated or not a safetensors file ({size:,} bytes, no valid header); {again}")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        header = None
    entries = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else None
    if entries is None or not all(_valid_entry(v) for v in entries.values()):
        raise ModelError(f"{path} is not a safetensors file (its header is not a table of tensors); {again}")
    needed = 8 + length + max((v["data_offsets"][1] for v in entries.values()), default=0)
    if needed > size:
        raise ModelError(f"{path} is truncated: it has {size:,} bytes but its tensors need {needed:,}; {again}")
    return {name: list(entry["shape"]) for name, entry in entries.items()}


def _valid_entry(entry: Any) -> bool:
    if not isinstance(entry, dict):
        return False
    offsets, shape = entry.get("data_offsets"), entry.get("shape")
    return (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(x, int) and x >= 0 for x in offsets)
        and isinstance(shape, list)
        and all(isinstance(x, int) for x in shape)
    )


def _weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files transformers will read: the shards of the index, else model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    for path in (index, single):
        if os.path.lexists(path) and not path.is_file():
            what = "a folder" if path.is_dir() else "a symbolic link that leads nowhere (or loops)"
            raise ModelError(f"{path} is {what}, not a file; copy the model's {path.name} there again")
    if not index.is_file():
        return [single] if single.is_file() else []
    try:
        content = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8, not JSON
        content = None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelError(f"{index} is not a safetensors index (no weight_map of file names); restore the original")
    shards = [model_dir / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise ModelError(f"{index} lists {shard.name}, which is missing from {model_dir}; copy every shard")
    return shards


def _check_weight_shapes(model_dir: Path, config: dict[str, Any], trust_remote_code: bool) -> None:
    """Every saved tensor that the architecture of config.json also has must have the shape config.json implies:
    a config.json of another model size otherwise fails inside transformers after a page-long report."""
    shapes: dict[str, tuple[Path, list[int]]] = {}
    for file in _weight_files(model_dir):
        shapes.update({name: (file, shape) for name, shape in check_safetensors(file).items()})
    if not shapes or trust_remote_code or "quantization_config" in config:
        return
    from transformers import AutoModelForCausalLM

    model_config = _load_config_object(model_dir)
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = AutoModelForCausalLM.from_config(model_config)
    except (RuntimeError, ValueError, TypeError) as err:  # e.g. hidden_size: 0, num_attention_heads: -1
        raise ModelError(
            f"{model_dir / 'config.json'} describes a model that cannot be built ({_first_line(err)}); restore the "
            "model's original config.json"
        ) from None
    for name, tensor in model.state_dict().items():
        file, shape = shapes.get(name, (None, None))
        if file is not None and shape != list(tensor.shape):
            raise ModelError(
                f"{file} holds {name} with shape {shape} but {model_dir / 'config.json'} describes "
                f"{list(tensor.shape)}; the weights and config.json come from different models, so put the "
                "config.json that belongs to these weights next to them"
            )


def check_weights(model_dir: Path, allow_pickle: bool) -> bool:
    """True when the folder has safetensors weights; pickled-only folders need `allow_pickle: true`."""
    if any(model_dir.glob("*.safetensors")):
        return True
    pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if not pickled:
        raise ModelError(
            f"model folder {model_dir} has no weights (*.safetensors); point model_name_or_path at a complete "
            "model folder."
        )
    if not allow_pickle:
        raise ModelError(
            f"model folder {model_dir} has only pickled weights ({', '.join(pickled[:3])}), which can run arbitrary "
            "code when loaded; convert them to safetensors, or set allow_pickle: true if you trust the folder."
        )
    logger.warning("loading pickled weights from %s (allow_pickle: true)", model_dir)
    return False


def load_tokenizer(
    name_or_path: str | os.PathLike, cache_dir: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (the eos token when the model defines none, as most chat LMs)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path, cache_dir)
    check_model_config(path, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError, StrictDataclassError) as err:
        raise ModelError(
            f"cannot load the tokenizer of {path} ({_one_line(err)}); {_remote_code_hint(err)}"
        ) from err
    if len(tokenizer.get_vocab()) <= len(tokenizer.added_tokens_decoder):
        # transformers builds an empty tokenizer when the files are missing: it would encode every text as []
        raise ModelError(
            f"the tokenizer of {path} has no vocabulary besides its special tokens, so its files (tokenizer.json, "
            "or vocab.json with merges.txt, or tokenizer.model) are missing; copy them from the model's original "
            "folder"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                f"the tokenizer of {path} has neither a pad nor an eos token; set pad_token in its "
                "tokenizer_config.json."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# flash_attn (LLaMA-Factory's values) → transformers' attn_implementation; None keeps transformers' default (SDPA)
ATTENTION = {"auto": None, "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2"}


def attention_implementation(flash_attn: str, device: torch.device) -> str | None:
    """transformers' attn_implementation for ``flash_attn``; fa2 is refused where it cannot run."""
    if flash_attn == "fa2":
        missing = [
            what
            for what, ok in (
                ("a CUDA device", device.type == "cuda"),
                ("the flash-attn package", importlib.util.find_spec("flash_attn") is not None),
            )
            if not ok
        ]
        if missing:
            raise ConfigError(
                f"flash_attn: fa2 needs {' and '.join(missing)}, which this run does not have (device {device}); "
                "set flash_attn: sdpa (packed samples stay isolated by their block-diagonal mask) or auto (on CUDA "
                "in bf16 / fp16 that is torch's own variable-length flash attention, no package needed), or install "
                "flash-attn on a CUDA machine"
            )
    return ATTENTION[flash_attn]


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    cache_dir: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device: str | torch.device = "cpu",
    quantization: Quantization | None = None,
    attn_implementation: str | None = None,
    reward_head: RewardHead | None = None,
) -> PreTrainedModel:
    """A causal LM from a local folder / .gguf / alias, on `device` (`auto` picks CUDA, NPU, then CPU); with
    ``reward_head`` the same backbone as an HF ``…ForSequenceClassification`` with one output (a reward model).

    With `quantization` (QLoRA) the linear layers are quantized by bitsandbytes while loading, straight onto
    `device`, where the model stays (quantized weights cannot be moved back to full precision); everything is
    frozen, ready for `apply_finetuning` to add the trainable adapters."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model_path(name_or_path, cache_dir)
    config = check_model_config(path, trust_remote_code)
    use_safetensors = check_weights(path, allow_pickle)
    if use_safetensors:
        _check_weight_shapes(path, config, trust_remote_code)
    torch_dtype = resolve_dtype(dtype, path)
    target = device if isinstance(device, torch.device) else pick_device(device)
    extra: dict[str, Any] = {}
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation
    if quantization is not None:
        if saved_quantization(path) is not None:
            raise ModelError(
                f"model {path} is already quantized (its config.json has a quantization_config); remove "
                "quantization_bit, or point model_name_or_path at the full-precision model."
            )
        extra.update(quantization_config=quantization.bnb_config(), device_map={"": str(target)})
    if reward_head is not None:
        extra.update(num_labels=1, pad_token_id=reward_head.pad_token_id)
    auto_class = AutoModelForSequenceClassification if reward_head is not None else AutoModelForCausalLM
    try:
        with transformers_logging_quiet(reward_head is not None):  # "score.weight newly initialized": on purpose
            model = auto_class.from_pretrained(
                path,
                dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
                use_safetensors=use_safetensors,
                local_files_only=True,
                **extra,
            )
    except (OSError, ValueError, StrictDataclassError) as err:
        raise ModelError(
            f"cannot load the model in {path} ({_one_line(err)}); {_remote_code_hint(err)}"
        ) from err
    if reward_head is not None and not _has_reward_head(config):  # a trained reward model keeps its own head
        reward_head.initialise(model)
    if quantization is not None:
        _prepare_quantized(model, quantization.compute_dtype)
        logger.info("loaded %s quantized %s on %s from %s", type(model).__name__, quantization.describe(),
                    target, path)
        return model
    if target.type != "cpu":
        model.to(target)
    logger.info("loaded %s (%s, %s) from %s", type(model).__name__, torch_dtype, target, path)
    return model


def _has_reward_head(config: dict[str, Any]) -> bool:
    """Whether the checkpoint is already a sequence classifier (a trained reward model), head included."""
    return any(str(name).endswith("ForSequenceClassification") for name in config.get("architectures") or [])


@dataclass(frozen=True)
class RewardHead:
    """A reward model's scalar head: ``pad_token_id`` finds each row's last real token (HF's rule: the rightmost
    token that is not padding), and the head starts from a seeded draw, the same on every rank and every run
    whatever the global RNG did before, so a resumed or re-sharded run starts from the same weights."""

    pad_token_id: int
    seed: int = 42

    def initialise(self, model: Any) -> None:
        head = getattr(model, "score", None)
        if not isinstance(head, torch.nn.Linear):
            raise ModelError(
                f"{type(model).__name__} has no `score` layer, the scalar head tunesmith trains for stage: rm; "
                "use a model family with a …ForSequenceClassification class that has one (Qwen2/3, Llama, …)"
            )
        generator = torch.Generator().manual_seed(self.seed)
        std = getattr(model.config, "initializer_range", 0.02)
        with torch.no_grad():
            weight = torch.randn(head.weight.shape, generator=generator, dtype=torch.float32) * std
            head.weight.copy_(weight.to(head.weight.dtype))
            if getattr(head, "bias", None) is not None:
                head.bias.zero_()


@contextmanager
def transformers_logging_quiet(quiet: bool) -> Iterator[None]:
    """Silence transformers' load report while ``quiet`` (an expected "newly initialized" head)."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_model_and_tokenizer(cfg: Config) -> tuple[Any, PreTrainedTokenizerBase]:
    """Model (+ cfg.adapter_name_or_path as a frozen PeftModel, for inference) and tokenizer from a config.

    For training, `apply_finetuning(model, cfg)` turns the loaded adapter trainable (lora) or refuses it.
    """
    from tunesmith.model.adapt import load_adapter

    cfg.require("model_name_or_path")
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.cache_dir, cfg.trust_remote_code)
    model = load_model(
        cfg.model_name_or_path,
        cache_dir=cfg.cache_dir,
        trust_remote_code=cfg.trust_remote_code,
        allow_pickle=cfg.allow_pickle,
        device=cfg.device,
        attn_implementation=attention_implementation(cfg.flash_attn, pick_device(cfg.device)),
    )
    if cfg.adapter_name_or_path:
        model = load_adapter(model, cfg.adapter_name_or_path, trainable=False, allow_pickle=cfg.allow_pickle)
    return model, tokenizer


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _one_line(err: BaseException) -> str:
    """The error's text on one line (huggingface_hub's validation errors put the field and its problem on two)."""
    if isinstance(err, StrictDataclassError):
        return " ".join(line.strip() for line in str(err).splitlines() if line.strip()).rstrip(".")
    return _first_line(err)


def _remote_code_hint(err: BaseException) -> str:
    if "trust_remote_code" in str(err):
        return "set trust_remote_code: true if you trust the folder's own Python code."
    return "check that the folder is a complete Hugging Face causal-LM folder."
