"""The preprocessing cache: the encoded samples of every stage saved on disk, reused only when nothing they depend
on changed: token rows (:class:`~tunesmith.data.encode.Encoded`, sft / pt, and packed
:class:`~tunesmith.data.pack.PackedSample` rows), preference pairs (:class:`~tunesmith.data.pairs.PairSample`, dpo
/ rm) and feedback examples (:class:`~tunesmith.data.feedback.FeedbackSample`, kto). A sample's ``reference``
(precompute_ref_log_probs) is not part of it: that is filled later, and cached on its own under
``<cache>/reference_logps/`` (:mod:`tunesmith.train.precompute`).

Where: ``tokenized_path`` when set (as in LLaMA-Factory: saved there, loaded from there), else automatically under
``<cache>/datasets/<key>/`` with ``<cache>`` = ``cache_dir``, ``$TUNESMITH_CACHE`` or ``~/.cache/tunesmith``.
``overwrite_cache: true`` rebuilds it; ``TUNESMITH_DATA_CACHE=0`` turns the automatic cache off.

The key is a sha256 over everything the samples depend on: the bytes of every data file (and of
dataset_info.json), the tokenizer (its serialized backend: vocab, merges, normalizer, added/special tokens; plus
its chat template and special tokens), the template's full definition, the data config keys (stage, cutoff_len,
packing, train_on_prompt, mask_history, default_system, placeholders, max_samples, mix_strategy,
interleave_probs, val_size, seed, ...; not preprocessing_num_workers / preprocessing_batch_size, which change
only the speed) and
tunesmith's version together with a hash of the data package's own source (so a code change during development
never reuses samples the new code would encode differently). Unlike LLaMA-Factory, a ``tokenized_path`` whose key
differs is rebuilt (with a warning), never silently reused.

Layout (compact, loads in a few numpy reads, no pickle): ``meta.json`` (key, report, counts) and ``train.npz`` /
``val.npz``, each holding per token field a flat int32 array and int64 offsets into it: ``input_ids`` and
``labels`` sharing ``offsets`` (token rows; packed rows add flat ``seq_lens`` with ``seq_offsets``); ``prompt``,
``chosen``, ``rejected`` with ``prompt_offsets``, ... (pairs); ``prompt``, ``completion``, ``kl_completion`` with
their offsets and a bool ``desirable`` (feedback). Which fields a file holds says which samples it holds.
Saving and loading copy raw int32 buffers into the samples'
``array('i')`` ids (no Python int per token): 22k samples / 3.8M tokens load in well under a second. Everything is written into a temporary sibling folder and renamed into
place, so a crash or a concurrent writer (every rank preprocesses) never leaves a half cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith import __version__
from tunesmith.config import Config
from tunesmith.config.load import check_output_folder
from tunesmith.data.encode import Encoded, EncodeReport, TokenIds
from tunesmith.data.feedback import FeedbackSample
from tunesmith.data.pack import PackedSample
from tunesmith.data.pairs import PairSample
from tunesmith.data.sources import read_dataset_info, resolve_source
from tunesmith.errors import DataError
from tunesmith.logging import get_logger

logger = get_logger("data")

FORMAT_VERSION = 2  # 2: pair and feedback samples
META = "meta.json"
CONFIG_KEYS = (
    "stage",
    "dataset",
    "eval_dataset",
    "template",
    "cutoff_len",
    "packing",
    "neat_packing",
    "train_on_prompt",
    "mask_history",
    "default_system",
    "placeholders",
    "max_samples",
    "mix_strategy",
    "interleave_probs",
    "val_size",
    "seed",
    "skip_bad_rows",
)
# Keys deliberately NOT in the key: they change how fast the samples are made, never which ones
# (preprocessing_num_workers, preprocessing_batch_size), only where they are kept (tokenized_path, cache_dir,
# overwrite_cache), or apply to streaming only, which never uses this cache (streaming, buffer_size).

Sample = Encoded | PackedSample | PairSample | FeedbackSample
# the token fields of the samples with fields of their own lengths (each stored flat, with its own offsets)
_SPLIT_FIELDS: dict[type, tuple[str, ...]] = {
    PairSample: ("prompt", "chosen", "rejected"),
    FeedbackSample: ("prompt", "completion", "kl_completion"),
}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        f = path.open("rb")
    except OSError as err:  # permissions, a folder: the same sentence reading it would give
        raise DataError(f"cannot read {path} ({err.strerror or err}); check that it is a readable file") from None
    with f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_files(cfg: Config) -> list[Path]:
    """Every file the config's datasets (eval_dataset too) read, dataset_info.json included when present."""
    dataset_dir = Path(cfg.dataset_dir).expanduser()
    info = read_dataset_info(dataset_dir)
    names = [*(cfg.dataset or []), *(cfg.eval_dataset or [])]
    files = [f for name in names for f in resolve_source(name, dataset_dir, info).files]
    if (dataset_dir / "dataset_info.json").is_file():
        files.append(dataset_dir / "dataset_info.json")
    return files


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the token ids: the backend's serialization (fast tokenizers), else the vocab."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        digest.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary and added tokens are what we can see
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "class": type(tokenizer).__name__,
        "special": getattr(tokenizer, "all_special_tokens", []),
        "pad": tokenizer.pad_token_id,
        "eos": tokenizer.eos_token_id,
        "bos": getattr(tokenizer, "bos_token_id", None),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


@functools.cache
def _code_fingerprint() -> str:
    """Of the data package's source as this process imported it (read once: a file edited while the process
    runs is not the code it runs)."""
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def cache_key(cfg: Config, tokenizer: Any, template: Any) -> str:
    parts = {
        "format": FORMAT_VERSION,
        "code": _code_fingerprint(),
        "files": [[str(p), _sha256_file(p)] for p in data_files(cfg)],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": repr(template),  # the frozen dataclass: every field, the jinja of `auto` included
        "config": cfg.model_dump(include=set(CONFIG_KEYS)),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cache_root(cfg: Config) -> Path | None:
    """The automatic cache's root (``cache_dir``, ``$TUNESMITH_CACHE`` or ``~/.cache/tunesmith``), or None when
    ``TUNESMITH_DATA_CACHE=0`` turns it off."""
    if os.environ.get("TUNESMITH_DATA_CACHE", "1").lower() in ("0", "off", "false", "no"):
        return None
    return Path(cfg.cache_dir or os.environ.get("TUNESMITH_CACHE") or Path.home() / ".cache" / "tunesmith").expanduser()


def cache_location(cfg: Config, key: str) -> Path | None:
    """The folder for this key: tokenized_path, the automatic cache, or None when caching is off."""
    if cfg.tokenized_path:
        return _checked_cache_folder("tokenized_path", Path(cfg.tokenized_path).expanduser())
    root = cache_root(cfg)
    if root is None:
        return None
    location = root / "datasets" / key[:32]
    if not location.is_dir():  # it will be written: the cache root must be a folder this user can write in
        key_name = "TUNESMITH_CACHE" if not cfg.cache_dir and os.environ.get("TUNESMITH_CACHE") else "cache_dir"
        check_output_folder(key_name, root, DataError)
    return location


def _checked_cache_folder(key: str, path: Path) -> Path:
    """``path`` if the cache may live there: save_cache replaces the folder, so it must be new or a cache already
    (never a file or a folder of the user's), and creatable. An existing cache may be read-only."""
    if path.is_dir():
        if any(path.iterdir()) and not (path / META).is_file():
            raise DataError(
                f"{key} {path} is a folder that holds other files, not a tunesmith data cache; set {key} to a new "
                "folder (saving the cache replaces the folder's contents)"
            )
        return path
    check_output_folder(key, path, DataError)  # a file, a path below a file, a dangling link, no permission
    return path


# ------------------------------------------------------------------------------------------ save and load


def _flat(seqs: list[Any]) -> np.ndarray:
    """Concatenate int sequences into one int32 array (TokenIds are read as raw buffers: no Python ints)."""
    if not seqs:
        return np.zeros(0, dtype=np.int32)
    return np.concatenate(
        [
            np.frombuffer(x, dtype=np.int32) if isinstance(x, TokenIds) else np.asarray(x, np.int32)
            for x in seqs
        ]
    )


def _offsets(lengths: Any, count: int) -> np.ndarray:
    offsets = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(np.fromiter(lengths, dtype=np.int64, count=count), out=offsets[1:])
    return offsets


def _to_arrays(samples: list[Sample]) -> dict[str, np.ndarray]:
    fields = _SPLIT_FIELDS.get(type(samples[0])) if samples else None
    if fields is not None:  # pairs / feedback: each token field with its own offsets
        arrays = {}
        for name in fields:
            seqs = [getattr(s, name) for s in samples]
            arrays[name] = _flat(seqs)
            arrays[f"{name}_offsets"] = _offsets(map(len, seqs), len(seqs))
        if isinstance(samples[0], FeedbackSample):
            arrays["desirable"] = np.fromiter((s.desirable for s in samples), dtype=np.bool_, count=len(samples))
        return arrays
    arrays = {
        "input_ids": _flat([s.input_ids for s in samples]),
        "labels": _flat([s.labels for s in samples]),
        "offsets": _offsets((len(s.input_ids) for s in samples), len(samples)),
    }
    if samples and isinstance(samples[0], PackedSample):
        seq_lens = [s.seq_lens for s in samples]  # type: ignore[union-attr]
        arrays["seq_lens"] = np.array([n for x in seq_lens for n in x], dtype=np.int32)
        arrays["seq_offsets"] = _offsets(map(len, seq_lens), len(seq_lens))
    return arrays


def samples_fingerprint(samples: list[Any]) -> str:
    """sha256 of the samples' token fields (ids, labels, ... as stored in the cache) and their order; what is
    filled in later (a pair's ``reference``) is not part of it."""
    digest = hashlib.sha256(str(FORMAT_VERSION).encode())
    start = 0
    while start < len(samples):  # runs of one sample type (a packed training split, then validation rows)
        kind = type(samples[start])
        end = start
        while end < len(samples) and type(samples[end]) is kind:
            end += 1
        digest.update(f"{kind.__name__}:{end - start}".encode())
        for name, array in sorted(_to_arrays(samples[start:end]).items()):
            digest.update(name.encode() + str(array.dtype).encode())
            digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
        start = end
    return digest.hexdigest()


def _slices(flat: np.ndarray, bounds: list[tuple[int, int]]) -> list[TokenIds]:
    """One TokenIds per [a, b) span, copied straight from the array's bytes (no Python int per token)."""
    raw = memoryview(np.ascontiguousarray(flat, dtype=np.int32)).cast("B")
    out = []
    for a, b in bounds:
        ids = TokenIds()
        ids.frombytes(raw[4 * a : 4 * b])
        out.append(ids)
    return out


def _split_fields(arrays: Any, fields: tuple[str, ...]) -> list[list[TokenIds]]:
    """Per field, one TokenIds per sample."""
    columns = []
    for name in fields:
        offsets = arrays[f"{name}_offsets"].tolist()
        columns.append(_slices(arrays[name], list(zip(offsets[:-1], offsets[1:], strict=True))))
    return columns


def _from_arrays(arrays: Any) -> list[Sample]:
    if "chosen" in arrays:
        prompt, chosen, rejected = _split_fields(arrays, _SPLIT_FIELDS[PairSample])
        return [PairSample(*row) for row in zip(prompt, chosen, rejected, strict=True)]
    if "completion" in arrays:
        columns = _split_fields(arrays, _SPLIT_FIELDS[FeedbackSample])
        desirable = arrays["desirable"].tolist()
        return [FeedbackSample(*row) for row in zip(*columns, desirable, strict=True)]
    offsets = arrays["offsets"].tolist()
    spans = list(zip(offsets[:-1], offsets[1:], strict=True))
    ids, labels = _slices(arrays["input_ids"], spans), _slices(arrays["labels"], spans)
    if "seq_lens" not in arrays:
        return [Encoded(a, b) for a, b in zip(ids, labels, strict=True)]
    seq_lens, seq_offsets = arrays["seq_lens"].tolist(), arrays["seq_offsets"].tolist()
    return [
        PackedSample(ids[k], labels[k], seq_lens[seq_offsets[k] : seq_offsets[k + 1]])
        for k in range(len(spans))
    ]


def _key_of(path: Path) -> str | None:
    try:
        return json.loads((path / META).read_text(encoding="utf-8")).get("key")
    except (OSError, ValueError):
        return None


def load_cached(path: Path, key: str) -> tuple[list[Sample], list[Sample], EncodeReport] | None:
    """The cached (train, val, report) when ``path`` holds this key's cache, else None."""
    if _key_of(path) != key:
        return None
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
        with np.load(path / "train.npz") as train, np.load(path / "val.npz") as val:
            loaded = _from_arrays(train), _from_arrays(val)
    except (OSError, ValueError, KeyError) as err:  # unreadable: treat as a miss and rebuild
        logger.warning("data: ignoring the unreadable cache in %s (%s)", path, err)
        return None
    return loaded[0], loaded[1], EncodeReport(**meta["report"])


def save_cache(path: Path, key: str, train: list[Sample], val: list[Sample], report: EncodeReport) -> None:
    """Write atomically: a temporary sibling folder, renamed over ``path`` once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        np.savez(tmp / "train.npz", **_to_arrays(train))
        np.savez(tmp / "val.npz", **_to_arrays(val))
        meta = {
            "key": key,
            "version": __version__,
            "train": len(train),
            "val": len(val),
            "report": asdict(report),
        }
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        if _key_of(path) == key:  # another process (rank) wrote the same cache meanwhile: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = None
        if path.exists():  # a stale cache (tokenized_path with another key): move it aside, then replace
            old = path.parent / f".old-{path.name}-{os.getpid()}"
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:  # another process (rank) renamed its identical cache in first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
