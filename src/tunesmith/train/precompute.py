"""What an objective computes once per sample before the first step (``Objective.precomputes``), spread over the
ranks: rank r takes samples r, r + W, r + 2W, … in batches of per_device_eval_batch_size; every rank runs the
same number of forwards (the short ones repeat a batch), which sharded engines (fsdp2, ZeRO-3) need since each
forward gathers parameters from all ranks; then the values are gathered, so every rank stores them for every
sample, as it holds every sample.

The values (the reference log-probs of precompute_ref_log_probs) are computed once and cached with the data:
``<cache>/reference_logps/<key>.npz`` under the data cache's root (``cache_dir``, ``$TUNESMITH_CACHE`` or
``~/.cache/tunesmith``; ``TUNESMITH_DATA_CACHE=0`` turns it off), a float32 [examples, values] array written by
rank 0 (a temporary file renamed into place). A later start with the same key (a fresh run, or a resume: the
values are those of the initial weights either way) reads them instead of running the reference. The key is a
sha256 over everything the values depend on, conservatively: the samples' token ids and labels (hashed), the
objective (stage, pref_loss), every key of the model and method sections of the config, the precision keys
(and the speed keys of the head), the precision the engine resolved and the dtype it loads the model in, the
engine, the number of ranks and the eval batch size (they decide the batches, hence the last bits), ref_model /
ref_model_adapters, the (name, size, mtime) of every file of each local model_name_or_path /
adapter_name_or_path / ref_model / ref_model_adapters (and a deepspeed config file), and tunesmith's version
and source. Whether the cache is used is decided by all ranks together (each looks, then it is used only if
every rank found it), since a rank that computed alone would wait forever in a sharded forward.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tunesmith
from tunesmith import __version__
from tunesmith.config import Config
from tunesmith.config.lf_methods import LFMethodArgs
from tunesmith.config.schema import MethodArgs, ModelArgs
from tunesmith.data.cache import cache_root, samples_fingerprint
from tunesmith.data.loader import Collator
from tunesmith.logging import get_logger
from tunesmith.train.engines import Engine
from tunesmith.train.objectives import Objective
from tunesmith.train.objectives.base import ModelCall

log = get_logger("train")

FORMAT_VERSION = 1
# besides every key of the model and method sections: what decides the dtype the reference computes in, how its
# head runs, and the batches it runs on (a key the config does not have is left out)
_COMPUTE_KEYS = ("bf16", "fp16", "pure_bf16", "fp8", "fp8_backend", "use_cpu", "device", "engine", "deepspeed",
                 "target_only_head", "loss_chunk_size", "enable_liger_kernel", "seed", "per_device_eval_batch_size")
_PATH_KEYS = ("model_name_or_path", "adapter_name_or_path", "ref_model", "ref_model_adapters", "deepspeed")


def precompute(engine: Engine, call: ModelCall, objective: Objective, samples: Sequence[Any],
               collator: Collator, cfg: Config) -> None:
    """Run ``objective.precompute`` over ``samples`` (train and validation together) in batches of
    per_device_eval_batch_size and store the values, or store the cached values of an earlier start (see the
    module docstring)."""
    if not objective.precomputes or not samples:
        return
    comm = engine.comm
    batch_size = cfg.per_device_eval_batch_size
    root = cache_root(cfg)
    key = path = cached = None
    if root is not None:
        key = reference_key(cfg, engine, objective, samples)
        path = root / "reference_logps" / f"{key[:32]}.npz"
        cached = load_values(path, key, len(samples))
    agreed = comm.all_gather_object((key, cached is not None))  # every rank uses the cache, or none does
    if cached is not None and all(found and theirs == key for theirs, found in agreed):
        objective.store_precomputed(samples, cached.tolist())
        log.info("reused the precomputed reference log-probs of %d examples from %s", len(samples), path)
        return
    values = _compute(engine, call, objective, samples, collator, batch_size)
    objective.store_precomputed(samples, values)
    where = "" if path is None else f"; cached at {path}"
    if path is not None and key is not None and comm.is_main:
        if not save_values(path, key, np.asarray(values, dtype=np.float32)):
            where = ""
    log.info("precomputed the reference log-probs of %d examples (precompute_ref_log_probs%s)", len(samples), where)


def _compute(engine: Engine, call: ModelCall, objective: Objective, samples: Sequence[Any], collator: Collator,
             batch_size: int) -> list[Any]:
    comm = engine.comm
    mine = list(range(comm.rank, len(samples), comm.world_size))
    rounds = math.ceil(math.ceil(len(samples) / comm.world_size) / batch_size)
    values: list[list[float]] = []
    engine.model.eval()
    with torch.no_grad():
        for index in range(rounds):
            chunk = mine[index * batch_size : (index + 1) * batch_size]
            batch = collator.collate([samples[i] for i in chunk or mine[:1] or [0]]).to(engine.device)
            computed = objective.precompute(call, batch).float().cpu().tolist()
            values += computed[: len(chunk)]  # a repeated batch (this rank had no samples left) keeps nothing
    engine.model.train()
    everyone = comm.all_gather_object((mine, values))
    ordered: list[Any] = [None] * len(samples)
    for indices, rank_values in everyone:
        for i, value in zip(indices, rank_values, strict=True):
            ordered[i] = value
    return ordered


# ------------------------------------------------------------------------------------------------ the cache


@functools.cache
def _code_fingerprint() -> str:
    """Of tunesmith's source as this process imported it (any code change during development misses the cache)."""
    digest = hashlib.sha256(__version__.encode())
    package = Path(tunesmith.__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + path.read_bytes())
    return digest.hexdigest()


def _file_stats(value: Any) -> list[tuple[str, int, int]] | None:
    """(relative name, size, mtime_ns) of a local file or of every file below a local folder; None otherwise
    (a packaged alias: its name and tunesmith's version say what it is)."""
    if not isinstance(value, str):
        return None
    path = Path(value).expanduser()
    if path.is_file():
        stat = path.stat()
        return [(path.name, stat.st_size, stat.st_mtime_ns)]
    if not path.is_dir():
        return None
    stats = []
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            try:
                stat = (Path(folder) / name).stat()
            except OSError:  # a dangling link
                continue
            stats.append((str((Path(folder) / name).relative_to(path)), stat.st_size, stat.st_mtime_ns))
    return stats


def reference_key(cfg: Config, engine: Engine, objective: Objective, samples: Sequence[Any]) -> str:
    """sha256 over everything the precomputed values depend on (see the module docstring)."""
    keys = {*ModelArgs.model_fields, *MethodArgs.model_fields, *LFMethodArgs.model_fields, *_COMPUTE_KEYS}
    parts = {
        "format": FORMAT_VERSION,
        "code": _code_fingerprint(),
        "samples": samples_fingerprint(list(samples)),
        "objective": [type(objective).__name__, cfg.stage, cfg.pref_loss, getattr(objective, "trim", None)],
        "config": cfg.model_dump(include=keys, mode="json"),
        "engine": [engine.name, str(engine.precision), str(engine.load_dtype(cfg)), engine.device.type,
                   engine.comm.world_size],
        "files": {key: _file_stats(getattr(cfg, key)) for key in _PATH_KEYS},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def load_values(path: Path, key: str, count: int) -> np.ndarray | None:
    """The cached [count, k] values when ``path`` holds this key's, else None."""
    try:
        with np.load(path) as stored:
            if str(stored["key"]) != key:
                return None
            values = stored["values"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as err:  # unreadable: computed again (and rewritten)
        log.warning("ignoring the unreadable cached reference log-probs %s (%s)", path, err)
        return None
    if values.ndim != 2 or values.shape[0] != count:
        return None
    return values


def save_values(path: Path, key: str, values: np.ndarray) -> bool:
    """Write atomically (a temporary sibling renamed into place); a failure only costs the cache (warned)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".tmp-{path.stem}-", suffix=".npz", dir=path.parent)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, key=np.array(key), values=values)
        os.replace(tmp, path)
        tmp = None
        return True
    except OSError as err:
        log.warning("could not cache the precomputed reference log-probs in %s (%s); the next start computes "
                    "them again", path, err)
        return False
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
