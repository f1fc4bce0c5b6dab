"""``tunesmith convert HF --to mindspore`` and ``tunesmith convert CKPT --from mindspore``: HF model folders ↔
MindSpore checkpoints with the parameter names MindFormers' models load (guide 002's ``convert_weight.py``;
the table is in :mod:`tunesmith.export.mindspore_names`).

Weights are read from the safetensors files as raw bytes and written back the same way, never through a torch
model: nothing is rounded on the way (HF → MindSpore → HF is bit-identical in the saved dtype), bf16 survives
(numpy has no bf16: its bit pattern is widened to float32 exactly), and no model has to be instantiated.
``mindspore`` is imported only here, lazily; it is an optional extra (``pip install 'tunesmith[mindspore]'``).
Importing it beside torch in one process was checked (MindSpore 2.10, torch 2.13, protobuf 7): no conflict, so
no subprocess is needed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.data import mindrecord
from tunesmith.errors import TunesmithError
from tunesmith.export import mindspore_names as names
from tunesmith.logging import get_logger

log = get_logger("export")

INSTALL = "pip install 'tunesmith[mindspore]'"
DTYPES = ("float16", "bfloat16", "float32")
_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
_SHARD_BYTES = 5 << 30  # transformers' default largest shard
# what a reference folder gives the converted folder: everything but its weights
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_SKIP_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "tunesmith_source.json"}


def import_mindspore() -> Any:
    """MindSpore, imported without its process-wide side effects (see :func:`tunesmith.data.mindrecord.import_mindspore`)."""
    return mindrecord.import_mindspore("converting MindSpore checkpoints")


@dataclass
class Converted:
    """What a conversion wrote: the path, its tensor count and dtype, and the notes worth telling."""

    path: Path
    tensors: int
    dtype: str
    skipped: int = 0

    def describe(self, what: str) -> str:
        skipped = f"; {self.skipped} training-state entries (optimizer, step counters) skipped" if self.skipped else ""
        return f"wrote {what} {self.path}: {self.tensors} tensors, {self.dtype}{skipped}"


# --- reading an HF folder -----------------------------------------------------------------------------------


def _model_config(model_dir: Path) -> tuple[dict[str, Any], str]:
    """config.json and the mapping family of its architecture; anything else is refused in one sentence."""
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TunesmithError(f"cannot read {path} ({err}); point at an HF model folder with its config.json") from None
    archs = config.get("architectures") if isinstance(config, dict) else None
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in names.ARCHITECTURES:
        known = ", ".join(names.ARCHITECTURES)
        raise TunesmithError(
            f"{path} names architecture {arch!r}, which has no MindFormers mapping here; "
            f"convert a model of one of: {known}"
        )
    return config, names.ARCHITECTURES[arch]


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise TunesmithError(f"{index} is not a safetensors index; restore the original file") from None
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise TunesmithError(f"{model_dir} has no safetensors weights (model.safetensors or its index); "
                         "save the model with safe_serialization=True")


def _widen(raw: np.ndarray, st_dtype: str) -> np.ndarray:
    """A tensor's bytes as a numpy array: F32/F16 as they are, BF16 widened to float32 (exact)."""
    if st_dtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return raw.view(np.float32 if st_dtype == "F32" else np.float16)


def read_safetensors(path: Path) -> dict[str, tuple[np.ndarray, str]]:
    """name → (array, saved dtype name) for every tensor of a safetensors file (memory-mapped)."""
    from tunesmith.model.load import check_safetensors

    check_safetensors(path)  # a truncated or foreign file: one sentence naming it
    with path.open("rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(length))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + length)
    tensors: dict[str, tuple[np.ndarray, str]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _ST_DTYPES:
            raise TunesmithError(
                f"{path}: tensor {name} is {entry['dtype']}, not a float type; convert an unquantized model"
            )
        start, end = entry["data_offsets"]
        array = _widen(data[start:end], entry["dtype"]).reshape(entry["shape"])
        tensors[name] = (array, _ST_DTYPES[entry["dtype"]])
    return tensors


# --- HF → MindSpore -------------------------------------------------------------------------------------------


def _mindformers_tensors(family: str, hf: dict[str, tuple[np.ndarray, str]], where: Path) -> list[tuple[str, np.ndarray, str]]:
    """HF tensors → (MindFormers name, array, dtype) in the HF order; Qwen v1's fused q/k/v split in three."""
    out: list[tuple[str, np.ndarray, str]] = []
    for name, (array, dtype) in hf.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer old checkpoints saved: recomputed by every runtime
            continue
        fused = names.QWEN_FUSED.fullmatch(name) if family == "qwen" else None
        if fused:
            for part, block in zip(names.QWEN_SPLIT, np.array_split(array, 3), strict=True):
                out.append((f"transformer.layers.{fused['n']}.attention.{part}.{fused['kind']}", block, dtype))
            continue
        target = names.to_mindformers(family, name)
        if target is None:
            raise TunesmithError(
                f"{where}: parameter {name} has no MindFormers name in the {family} mapping; "
                "this model is not one MindFormers' convert_weight.py covers"
            )
        out.append((target, array, dtype))
    return out


def _with_lm_head(family: str, config: dict[str, Any], hf: dict[str, tuple[np.ndarray, str]]) -> None:
    """MindFormers' models always have lm_head.weight; a tied HF model saves only the embedding (its convert
    script reads ``state_dict()``, where the head is the embedding again): give it the same tensor."""
    embed = "model.embed_tokens.weight" if family == "llama" else "transformer.wte.weight"
    if "lm_head.weight" not in hf and embed in hf:
        hf["lm_head.weight"] = hf[embed]


def _cast(array: np.ndarray, source: str, target: str) -> np.ndarray:
    """``array`` (bf16 widened to float32) as the numpy dtype that carries ``target`` (bf16: float32 again)."""
    if target == "bfloat16":
        return array if source == "bfloat16" else array.astype(np.float32)  # MindSpore rounds to bf16
    return array.astype(np.float16 if target == "float16" else np.float32)


def hf_to_mindspore(model: str, out: Path, dtype: str | None = None) -> Converted:
    """Write HF model ``model`` (folder, .gguf or alias) as a MindFormers-named MindSpore checkpoint ``out``."""
    from tunesmith.model.resolve import resolve_model_path

    _check_ckpt_out(out)
    model_dir = resolve_model_path(model)
    config, family = _model_config(model_dir)
    hf: dict[str, tuple[np.ndarray, str]] = {}
    for path in _safetensors_files(model_dir):
        hf.update(read_safetensors(path))
    _with_lm_head(family, config, hf)
    tensors = _mindformers_tensors(family, hf, model_dir)
    ms = import_mindspore()
    kinds = {"float16": ms.float16, "bfloat16": ms.bfloat16, "float32": ms.float32}
    items = [
        {"name": name, "data": ms.Tensor(_cast(array, source, dtype or source), dtype=kinds[dtype or source])}
        for name, array, source in tensors
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}.ckpt")  # save_checkpoint adds .ckpt to any other name
    ms.save_checkpoint(items, str(tmp))
    os.replace(tmp, out)  # a reader never sees half a file
    used = sorted({dtype or source for _, _, source in tensors})
    return Converted(out, len(items), "/".join(used))


def _check_ckpt_out(out: Path) -> None:
    if out.suffix != ".ckpt":
        raise TunesmithError(f"--out {out} must end in .ckpt (MindFormers loads model_dir/rank_0/NAME.ckpt)")
    if out.is_dir():
        raise TunesmithError(f"--out {out} is a folder; give the file to write, such as {out / 'model.ckpt'}")
    from tunesmith.config.load import check_output_folder

    check_output_folder("--out", out.parent, TunesmithError)


# --- MindSpore → HF -------------------------------------------------------------------------------------------


def expected_shapes(family: str, config: dict[str, Any]) -> dict[str, list[int]]:
    """HF parameter name → shape that ``config`` implies, for every weight MindFormers' model holds."""
    h, vocab, layers = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    inter = config["intermediate_size"]
    if family == "qwen":
        ff = inter // 2  # Qwen v1's MLP halves intermediate_size (its modeling code: ff_dim_in)
        shapes = {"transformer.wte.weight": [vocab, h], "transformer.ln_f.weight": [h], "lm_head.weight": [vocab, h]}
        for n in range(layers):
            p = f"transformer.h.{n}."
            shapes |= {p + "ln_1.weight": [h], p + "ln_2.weight": [h], p + "attn.c_attn.weight": [3 * h, h],
                       p + "attn.c_attn.bias": [3 * h], p + "attn.c_proj.weight": [h, h],
                       p + "mlp.w1.weight": [ff, h], p + "mlp.w2.weight": [ff, h], p + "mlp.c_proj.weight": [h, ff]}
        return shapes
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    qwen2 = config["architectures"][0] == "Qwen2ForCausalLM"
    qkv_bias, o_bias = qwen2 or config.get("attention_bias", False), config.get("attention_bias", False)
    mlp_bias = config.get("mlp_bias", False)
    shapes = {"model.embed_tokens.weight": [vocab, h], "model.norm.weight": [h], "lm_head.weight": [vocab, h]}
    for n in range(layers):
        a, m = f"model.layers.{n}.self_attn.", f"model.layers.{n}.mlp."
        shapes |= {f"model.layers.{n}.input_layernorm.weight": [h],
                   f"model.layers.{n}.post_attention_layernorm.weight": [h],
                   a + "q_proj.weight": [heads * hd, h], a + "k_proj.weight": [kv * hd, h],
                   a + "v_proj.weight": [kv * hd, h], a + "o_proj.weight": [h, heads * hd],
                   m + "gate_proj.weight": [inter, h], m + "up_proj.weight": [inter, h], m + "down_proj.weight": [h, inter]}
        if qkv_bias:
            shapes |= {a + "q_proj.bias": [heads * hd], a + "k_proj.bias": [kv * hd], a + "v_proj.bias": [kv * hd]}
        if o_bias:
            shapes[a + "o_proj.bias"] = [h]
        if mlp_bias:
            shapes |= {m + "gate_proj.bias": [inter], m + "up_proj.bias": [inter], m + "down_proj.bias": [h]}
    return shapes


def load_mindspore(ckpt: Path) -> dict[str, tuple[np.ndarray, str]]:
    """name → (array, dtype name) of a MindSpore checkpoint (bf16 widened to float32, exactly)."""
    if not ckpt.is_file():
        what = "a folder" if ckpt.is_dir() else "missing"
        raise TunesmithError(f"checkpoint {ckpt} is {what}; give the path of a MindSpore .ckpt file")
    ms = import_mindspore()
    try:
        params = ms.load_checkpoint(str(ckpt))
    except (ValueError, RuntimeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TunesmithError(f"{ckpt} is not a readable MindSpore checkpoint ({first.rstrip('.')})") from None
    kinds = {ms.float16: "float16", ms.bfloat16: "bfloat16", ms.float32: "float32"}
    out: dict[str, tuple[np.ndarray, str]] = {}
    for name, param in params.items():
        kind = kinds.get(param.dtype)
        array = (param.astype(ms.float32) if kind == "bfloat16" else param).asnumpy()
        out[name] = (array, kind or str(param.dtype))
    return out


def _hf_tensors(family: str, ms_tensors: dict[str, tuple[np.ndarray, str]], ckpt: Path) -> tuple[dict, int]:
    """MindFormers tensors → HF tensors (Qwen v1's q/k/v fused again); training state skipped and counted."""
    hf: dict[str, tuple[np.ndarray, str]] = {}
    parts: dict[tuple[str, str], dict[str, tuple[np.ndarray, str]]] = {}
    skipped, unknown = 0, []
    for name, value in ms_tensors.items():
        if names.TRAINING_STATE.match(name):
            skipped += 1
            continue
        if names.LORA.search(name):
            raise TunesmithError(f"{ckpt} holds LoRA weights ({name}); merge the adapter in MindFormers first, "
                                 "then convert the merged checkpoint")
        part = names.QWEN_PART.fullmatch(name) if family == "qwen" else None
        if part:
            parts.setdefault((part["n"], part["kind"]), {})[part["part"]] = value
            continue
        target = names.to_hf(family, name)
        if target is None:
            unknown.append(name)
        else:
            hf[target] = value
    if unknown:
        raise TunesmithError(
            f"{ckpt} is not a MindFormers {family}-family checkpoint: {len(unknown)} parameters such as "
            f"{unknown[0]} have no HF name (expected names like {names.to_mindformers(family, 'lm_head.weight')}); "
            "convert a checkpoint of MindFormers' Qwen/Qwen1.5/Qwen2/Llama models"
        )
    for (n, kind), pieces in parts.items():
        if set(pieces) != set(names.QWEN_SPLIT):
            raise TunesmithError(f"{ckpt}: layer {n} lacks some of attention.wq/wk/wv.{kind}; the checkpoint is incomplete")
        blocks = [pieces[p] for p in names.QWEN_SPLIT]
        hf[f"transformer.h.{n}.attn.c_attn.{kind}"] = (np.concatenate([b[0] for b in blocks]), blocks[0][1])
    return hf, skipped


def _check_against(hf: dict[str, tuple[np.ndarray, str]], expected: dict[str, list[int]], ckpt: Path, ref: Path) -> None:
    missing = [n for n in expected if n not in hf]
    extra = [n for n in hf if n not in expected]
    wrong = [n for n in expected if n in hf and list(hf[n][0].shape) != expected[n]]
    if missing or extra or wrong:
        name = (missing or extra or wrong)[0]
        what = "lacks" if missing else "has an extra" if extra else "has another shape for"
        raise TunesmithError(
            f"{ckpt} {what} parameter {name} compared with {ref / 'config.json'} "
            f"({len(missing)} missing, {len(extra)} extra, {len(wrong)} of another shape); pass --config-from the "
            "HF model the checkpoint was converted from"
        )


def mindspore_to_hf(ckpt: Path, out: Path, reference: str, dtype: str | None = None) -> Converted:
    """Write MindFormers checkpoint ``ckpt`` as an HF folder ``out``, with the config and tokenizer of HF model
    ``reference`` (the model it was made from: a folder, .gguf or alias)."""
    from tunesmith.config.load import check_output_folder
    from tunesmith.model.resolve import resolve_model_path

    check_output_folder("--out", out, TunesmithError)
    ref = resolve_model_path(reference)
    config, family = _model_config(ref)
    hf, skipped = _hf_tensors(family, load_mindspore(ckpt), ckpt)
    _check_against(hf, expected_shapes(family, config), ckpt, ref)
    embed = "model.embed_tokens.weight" if family == "llama" else "transformer.wte.weight"
    if config.get("tie_word_embeddings", False):
        if np.array_equal(hf["lm_head.weight"][0], hf[embed][0]):
            del hf["lm_head.weight"]  # tied: HF saves the embedding once
        else:  # fine-tuned apart in MindSpore: keep both rather than lose the head
            log.warning("lm_head.weight differs from the embedding; writing tie_word_embeddings: false")
            config["tie_word_embeddings"] = False
    used = {dtype or kind for _, kind in hf.values()}
    key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"  # transformers < 4.56
    config[key] = used.pop() if len(used) == 1 else "float32"
    out.mkdir(parents=True, exist_ok=True)
    _copy_reference_files(ref, out)
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_safetensors({n: (a, dtype or k) for n, (a, k) in hf.items()}, out)
    return Converted(out, len(hf), config[key], skipped)


def _copy_reference_files(ref: Path, out: Path) -> None:
    """The reference's tokenizer, generation config and any code of its own; never its weights."""
    for path in ref.iterdir():
        if path.is_file() and path.name not in _SKIP_FILES and not path.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copyfile(path, out / path.name)


def _narrow(array: np.ndarray, target: str) -> np.ndarray:
    """A float array as the bytes of ``target``; bf16 rounds to nearest even (exact for bf16-born values)."""
    if target != "bfloat16":
        return np.ascontiguousarray(array.astype(np.float16 if target == "float16" else np.float32))
    bits = np.ascontiguousarray(array.astype(np.float32)).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(array), np.uint16(0x7FC0), rounded)


def write_safetensors(tensors: dict[str, tuple[np.ndarray, str]], out: Path) -> list[Path]:
    """``model.safetensors`` (or 5 GB shards with their index, as transformers writes them) in ``out``."""
    shards: list[dict[str, tuple[np.ndarray, str]]] = [{}]
    size = 0
    for name, (array, kind) in tensors.items():
        nbytes = array.size * (4 if kind == "float32" else 2)
        if shards[-1] and size + nbytes > _SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = (array, kind)
        size += nbytes
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    weight_map = {}
    for file, shard in zip(files, shards, strict=True):
        _write_one(shard, out / file)
        weight_map |= {name: file for name in shard}
    if len(files) > 1:
        total = sum(a.size * (4 if k == "float32" else 2) for a, k in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [out / f for f in files]


def _write_one(tensors: dict[str, tuple[np.ndarray, str]], path: Path) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (array, kind) in tensors.items():  # offsets from the sizes: each tensor is narrowed only once written
        nbytes = array.size * (4 if kind == "float32" else 2)
        header[name] = {"dtype": _ST_CODES[kind], "shape": list(array.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for array, kind in tensors.values():
            fh.write(_narrow(array, kind).tobytes())
    os.replace(tmp, path)
