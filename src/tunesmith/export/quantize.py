"""GPTQ quantization of an export (``export_quantization_bit``), as LLaMA-Factory does it.

The merged full-precision folder is loaded again in float16 with transformers' ``GPTQConfig`` (optimum drives
gptqmodel, which quantizes block by block on the export device, CPU included), calibrated on token windows of
``export_quantization_dataset``, and saved over the full-precision weights: a folder transformers, vLLM and
gptqmodel load, whose config.json carries the ``quantization_config`` (bits, group size, gptq format).

Calibration data: the text of each row (a ``text`` column, an alpaca prompt, or a conversation's first
message; see :mod:`tunesmith.data.documents`) of a dataset_info.json name or a file. Each of the
``export_quantization_nsamples`` samples is a window of ``export_quantization_maxlen`` tokens at a random
offset of a different text at least that long (LLaMA-Factory's rule; texts are reused when too few are), seeded
by ``seed``. Unlike LLaMA-Factory, which gives up, a dataset without a text that long calibrates on whole texts.
Unlike LLaMA-Factory, which refuses, an adapter is merged first and the merged model is quantized.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.data.documents import detect_document_format, row_to_document
from tunesmith.data.sources import BadRows, iter_examples, read_dataset_info, resolve_source
from tunesmith.errors import ConfigError, DataError, ModelError
from tunesmith.logging import get_logger

if TYPE_CHECKING:
    from tunesmith.config.schema import Config

logger = get_logger("export")

GROUP_SIZES = (128, 64, 32)  # 128 (GPTQ's usual) when every linear layer's input size allows it


@dataclass(frozen=True)
class GptqSpec:
    bits: int
    dataset: str
    texts: list[str]
    nsamples: int
    maxlen: int
    seed: int = 42


def gptq_spec(cfg: Config) -> GptqSpec | None:
    """The config's GPTQ settings with the calibration texts read, or None without export_quantization_bit.

    Everything that can refuse is checked here, before export merges or writes anything."""
    bits = cfg.export_quantization_bit
    if bits is None:
        return None
    if not cfg.export_quantization_dataset:
        raise ConfigError(
            f"export_quantization_bit: {bits} needs export_quantization_dataset, the text GPTQ calibrates on; set "
            "it to a dataset name of dataset_info.json or a file (e.g. data/c4_demo.jsonl), or unset "
            "export_quantization_bit."
        )
    if cfg.stage == "rm":
        raise ConfigError(
            "export_quantization_bit quantizes causal language models and stage: rm exports a reward model "
            "(a scoring head); unset export_quantization_bit for it."
        )
    missing = [name for name in ("gptqmodel", "optimum") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelError(
            f"export_quantization_bit needs the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''}, "
            "which GPTQ quantization runs on and which are not installed; install them as the README's "
            "\"GPTQ export\" says (pip install 'tunesmith[gptq]', keeping your torch), or export without "
            "export_quantization_bit."
        )
    dataset_dir = Path(cfg.dataset_dir).expanduser()
    texts = read_calibration_texts(cfg.export_quantization_dataset, dataset_dir)
    return GptqSpec(
        bits=bits,
        dataset=cfg.export_quantization_dataset,
        texts=texts,
        nsamples=cfg.export_quantization_nsamples,
        maxlen=cfg.export_quantization_maxlen,
        seed=cfg.seed,
    )


def read_calibration_texts(name: str, dataset_dir: Path) -> list[str]:
    """The texts of a dataset_info.json name or a file (rows without text are skipped with a warning)."""
    source = resolve_source(name, dataset_dir, read_dataset_info(dataset_dir))
    bad = BadRows(skip=True)
    texts = [doc.text for doc in iter_examples(source, None, bad, row_to_document, detect_document_format)]
    if not texts:
        raise DataError(
            f"{source.where} has no text for GPTQ calibration; set export_quantization_dataset to a dataset "
            "whose rows have a text column (or prompts / messages)."
        )
    return texts


def calibration_samples(tokenizer: Any, spec: GptqSpec) -> list[dict[str, list[list[int]]]]:
    """``nsamples`` token windows of ``maxlen`` tokens (see the module docstring), as GPTQConfig takes them."""
    rng = random.Random(spec.seed)
    order = list(range(len(spec.texts)))
    rng.shuffle(order)
    long: list[list[int]] = []
    short: list[list[int]] = []
    for index in order:  # tokenizes only as many texts as it takes to find nsamples long ones
        ids = tokenizer(spec.texts[index])["input_ids"]
        if ids:
            (long if len(ids) >= spec.maxlen else short).append(ids)
        if len(long) >= spec.nsamples:
            break
    if not long:
        logger.warning(
            "no text of %s has export_quantization_maxlen (%d) tokens; GPTQ calibrates on whole texts (up to %d "
            "tokens)",
            spec.dataset,
            spec.maxlen,
            max(map(len, short)),
        )
    pool = long or short
    samples = []
    for k in range(spec.nsamples):
        ids = pool[k % len(pool)]
        start = rng.randint(0, len(ids) - min(len(ids), spec.maxlen))
        window = ids[start : start + spec.maxlen]
        samples.append({"input_ids": [window], "attention_mask": [[1] * len(window)]})
    return samples


def group_size(model_config: Any) -> int:
    """128 where every linear layer's input size is a multiple of it, else the largest of 64 / 32 that is."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (
        text.hidden_size // heads if heads and getattr(text, "hidden_size", None) else None
    )
    dims = [getattr(text, key, None) for key in ("hidden_size", "intermediate_size", "moe_intermediate_size")]
    dims.append(heads * head_dim if heads and head_dim else None)
    dims = [d for d in dims if isinstance(d, int) and d > 0]
    return next((g for g in GROUP_SIZES if all(d % g == 0 for d in dims)), GROUP_SIZES[0])


def quantize_folder(
    folder: Path,
    spec: GptqSpec,
    tokenizer: Any,
    *,
    device: str = "cpu",
    max_shard_size: int | str,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """GPTQ-quantize the full-precision model saved in ``folder`` and save it there in its place; returns what
    the export marker records."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GPTQConfig

    samples = calibration_samples(tokenizer, spec)
    group = group_size(AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code))
    logger.info(
        "GPTQ-quantizing to %d bits (group size %d) on %d samples of %s; this loads the model again in float16",
        spec.bits,
        group,
        len(samples),
        spec.dataset,
    )
    quantization = GPTQConfig(bits=spec.bits, group_size=group, tokenizer=tokenizer, dataset=samples)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=quantization,
        dtype=torch.float16,  # GPTQ kernels compute in float16 (LLaMA-Factory forces it too)
        device_map="auto" if device == "auto" else "cpu",
        trust_remote_code=trust_remote_code,
    )
    model.config.quantization_config.dataset = None  # else config.json would hold every calibration token
    for path in [*folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json")]:
        path.unlink()
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return {
        "dtype": "float16",
        "quantization": {
            "method": "gptq",
            "bits": spec.bits,
            "group_size": group,
            "dataset": spec.dataset,
            "nsamples": len(samples),
            "maxlen": spec.maxlen,
        },
    }
