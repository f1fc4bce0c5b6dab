"""GGUF export (``export_format: gguf``): the merged model as one .gguf for llama.cpp / Ollama, plus a Modelfile.

Written with the ``gguf`` package's writer, following the layout llama.cpp's convert_hf_to_gguf.py writes for the
same families: the ``llama`` architecture (Llama, SmolLM2, Mistral-style models) with q/k rows permuted from HF's
rotate-half order into llama.cpp's interleaved RoPE order, ``qwen2`` (q/k/v biases) and ``qwen3`` (q/k norms).
Norms, biases and other 1-D tensors stay float32 whatever the quantization, as llama.cpp expects.

:func:`check_gguf_support` reads only config.json and tokenizer.json, so ``tunesmith train`` can refuse an
unsupported model before training instead of after it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.errors import ModelError
from tunesmith.export.gguf_vocab import add_vocab, build_vocab, pre_tokenizer_name, read_tokenizer_json
from tunesmith.logging import get_logger

if TYPE_CHECKING:
    import numpy as np

    from tunesmith.config.schema import Config

logger = get_logger("export")

QUANTIZATIONS = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class _Arch:
    gguf_arch: str  # llama.cpp's architecture name (general.architecture)
    permute_qk: bool  # HF's Llama q/k rows are in rotate-half order; llama.cpp's llama graph wants interleaved


_ARCHES = {
    "LlamaForCausalLM": _Arch("llama", True),
    "MistralForCausalLM": _Arch("llama", True),
    "Qwen2ForCausalLM": _Arch("qwen2", False),
    "Qwen3ForCausalLM": _Arch("qwen3", False),
}
_ROPE_TYPES = (None, "default", "linear", "llama3")


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from either spelling: transformers 5's rope_parameters or the older rope_theta/rope_scaling."""
    params = dict(config.get("rope_parameters") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or {}
    for key, value in scaling.items():
        params.setdefault("rope_type" if key == "type" else key, value)
    return params


def check_gguf_support(model_dir: str | Path, where: str = "export_format: gguf") -> None:
    """Refuse, with one sentence, a model whose architecture, RoPE or tokenizer GGUF export cannot write."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    arch = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    if arch not in _ARCHES:
        if arch == "InternLM2ForCausalLM":
            detail = " (InternLM2's fused wqkv weights and SentencePiece tokenizer are not written yet)"
        else:
            detail = ""
        raise ModelError(
            f"{where}: {config_path} names architecture {arch}{detail}, and GGUF export supports "
            f"{', '.join(sorted(_ARCHES))}; use export_format: hf and convert the folder with llama.cpp's "
            "convert_hf_to_gguf.py."
        )
    rope_type = _rope(config).get("rope_type")
    if rope_type not in _ROPE_TYPES:
        raise ModelError(
            f"{where}: {config_path} uses RoPE scaling {rope_type!r}, and GGUF export writes default, linear and "
            "llama3 RoPE only; use export_format: hf and llama.cpp's convert_hf_to_gguf.py for this model."
        )
    pre_tokenizer_name(read_tokenizer_json(model_dir), f"{where}: {model_dir / 'tokenizer.json'}")


def check_training_config(cfg: Config) -> None:
    """Before training: a config that will be exported to GGUF must name a model GGUF export can write."""
    if getattr(cfg, "export_format", "hf") != "gguf":
        return
    from tunesmith.model.resolve import resolve_model_path

    if cfg.stage == "rm":
        raise ModelError("export_format: gguf exports causal language models, and stage: rm trains a reward model "
                         "(a scoring head) that has no GGUF form; set export_format: hf.")
    check_gguf_support(resolve_model_path(cfg.model_name_or_path, cfg.cache_dir))


def gguf_file_name(out_dir: Path, quantization: str) -> str:
    return f"{out_dir.name}-{quantization}.gguf"


def write_gguf(model: Any, tokenizer: Any, path: Path, quantization: str, base_dir: Path,
               stop_ids: list[int]) -> dict[str, Any]:
    """Write `model` (merged, HF layout) and `tokenizer` (chat template set) as one .gguf; returns a summary."""
    import gguf

    if quantization not in QUANTIZATIONS:
        raise ModelError(f"export_quantization is {quantization!r}; set it to one of {', '.join(QUANTIZATIONS)}.")
    check_gguf_support(base_dir)
    start = time.perf_counter()
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    spec = _ARCHES[config["architectures"][0]]
    hf = model.config
    writer = gguf.GGUFWriter(path, spec.gguf_arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(str(config.get("_name_or_path") or base_dir.name))
    _add_hparams(writer, hf, _rope(config), spec)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quantization]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab = build_vocab(json.loads(tokenizer.backend_tokenizer.to_str()), hf.vocab_size, str(base_dir))
    add_vocab(writer, vocab, tokenizer, stop_ids)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    for name, data in _gguf_tensors(model, spec, _rope(config)):
        qtype = _tensor_type(name, data, quantization)
        try:
            packed = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # a row length q8_0's 32-value blocks do not divide: half precision instead
            qtype = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(data, qtype)
        writer.add_tensor(name, packed, raw_dtype=qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    seconds = time.perf_counter() - start
    logger.info("wrote %s (%s, %.1f MB) in %.1f s", path.name, quantization, path.stat().st_size / 1e6, seconds)
    return {"gguf": path.name, "quantization": quantization, "architecture": spec.gguf_arch,
            "pre_tokenizer": vocab.pre}


def _add_hparams(writer: Any, hf: Any, rope: dict[str, Any], spec: _Arch) -> None:
    """The <arch>.* keys llama.cpp reads for these families."""
    import gguf

    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    writer.add_block_count(hf.num_hidden_layers)
    writer.add_context_length(hf.max_position_embeddings)
    writer.add_embedding_length(hf.hidden_size)
    writer.add_feed_forward_length(hf.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(hf, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(hf.rms_norm_eps)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(hf.vocab_size)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def _tensor_type(name: str, data: np.ndarray, quantization: str) -> Any:
    """llama.cpp's rule: 1-D tensors, norms and biases stay float32; weight matrices take the file's type."""
    from gguf import GGMLQuantizationType as Q

    if data.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[quantization]


def _permute(weight: Any, heads: int) -> Any:
    """HF's rotate-half q/k row order → llama.cpp's interleaved pairs, per head (convert_hf_to_gguf's permute)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _gguf_tensors(model: Any, spec: _Arch, rope: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every tensor of the merged model, in llama.cpp's layout."""
    import gguf
    import torch

    hf = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[spec.gguf_arch.upper()], hf.num_hidden_layers)
    heads, kv_heads = hf.num_attention_heads, getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    if rope.get("rope_type") == "llama3":
        yield "rope_freqs.weight", _llama3_rope_factors(hf, rope)
    tied = bool(getattr(hf, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if (tied and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq"):
            continue  # llama.cpp reuses token_embd when output.weight is absent
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ModelError(f"the merged model has tensor {name}, which has no GGUF name for {spec.gguf_arch}; "
                             "use export_format: hf and llama.cpp's convert_hf_to_gguf.py for this model.")
        data = tensor.detach().to(device="cpu", dtype=torch.float32)
        if spec.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, heads)
        elif spec.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, kv_heads)
        yield new_name, data.contiguous().numpy()


def _llama3_rope_factors(hf: Any, rope: dict[str, Any]) -> np.ndarray:
    """Llama 3.1's frequency-dependent RoPE scaling as the per-dimension factors llama.cpp reads."""
    import math

    import numpy as np

    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    freqs = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)
