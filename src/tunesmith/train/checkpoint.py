"""Checkpoints: atomic save, discovery of the newest complete one, restore, rotation.

Layout of ``output_dir/checkpoint-N/``::

    adapter_model.safetensors + adapter_config.json   (lora)  | model*.safetensors + config.json (full/freeze)
    tokenizer files
    optimizer.pt                                              (single / ddp: the optimizer's own state dict)
    dcp/                                                      (fsdp2, deepspeed: sharded model + optimizer, DCP)
    ds/                                                       (deepspeed: DeepSpeed's own checkpoint, zero_to_fp32.py)
    scheduler.pt  rng_state.pt  [rng_state_rankR.pt]  [scaler.pt]   (torch.save of plain state dicts)
    trainer_state.json                                        (TrainState: step, data position, log tail, …)
    checkpoint_complete                                       (written last: the completeness marker)

A checkpoint is written into ``output_dir/.tmp-checkpoint-N`` and renamed into place only once every file is on
disk, so a crash leaves either a complete ``checkpoint-N`` or a ``.tmp-`` folder that is ignored and cleaned up.
Only folders holding the marker are ever resumed from. In a distributed run rank 0 creates and renames the folder;
the engines (``tunesmith.train.engines``) decide which rank writes what in between.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from tunesmith.errors import TunesmithError
from tunesmith.logging import get_logger
from tunesmith.train.distributed import Collectives
from tunesmith.train.state import TrainState

log = get_logger("train")

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
COMPLETE_MARKER = "checkpoint_complete"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SHARDED_DIR = "dcp"
DEEPSPEED_DIR = "ds"
_CHECKPOINT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")


# ---------------------------------------------------------------------------------------------- discovery


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    path = Path(path)
    return (path / COMPLETE_MARKER).is_file() and (path / STATE_FILE).is_file()


def list_checkpoints(output_dir: Path, complete_only: bool = True) -> list[Path]:
    """``checkpoint-N`` folders of ``output_dir``, oldest first (by N); incomplete ones left out by default."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    if complete_only:
        found = [p for p in found if is_complete(p)]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def remove_partial(output_dir: Path) -> list[Path]:
    """Delete ``.tmp-checkpoint-*`` leftovers of a crash during a save; returns what was removed."""
    output_dir = Path(output_dir)
    removed = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            if path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


# -------------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU, and every CUDA device when present) generator states, as plain tensors."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_python_state(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            log.warning(
                "the checkpoint saved %d CUDA RNG states but %d devices are visible; CUDA RNG not restored",
                len(state["cuda"]),
                torch.cuda.device_count(),
            )


def _as_python_state(value: Any) -> tuple:
    """random.setstate wants tuples all the way down (a state that went through a list stays usable)."""
    version, internal, gauss = value
    return (version, tuple(internal), gauss)


# ------------------------------------------------------------------------------------------------ weights


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # engines that wrap the model (DDP) keep it in .module


def is_peft_model(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(_unwrap(model), PeftModel)


def save_model(
    model: torch.nn.Module,
    tokenizer: Any,
    directory: Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """The adapter (PEFT) or the full model, in HF/PEFT safetensors format, plus the tokenizer. ``state_dict``:
    the weights to write instead of the module's own (FSDP2 passes the gathered full state dict)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = _unwrap(model)
    extra = {} if state_dict is None else {"state_dict": state_dict}
    with _quiet_hf_progress():  # no "Writing model shards" bar in the middle of the training bar
        if is_peft_model(model):
            model.save_pretrained(directory, safe_serialization=True, **extra)
        else:
            model.save_pretrained(directory, **extra)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    _convert_pissa(model, directory)


def _convert_pissa(model: torch.nn.Module, directory: Path) -> None:
    """pissa_convert: the final adapter becomes a plain LoRA adapter for the unmodified base; a checkpoint (always
    written into a ``.tmp-checkpoint-N`` folder) keeps the PiSSA form that resuming loads into the rebuilt
    residual base."""
    from tunesmith.model.pissa import convert_saved_adapter, initial_adapter

    initial = initial_adapter(model)
    if initial is None or directory.name.startswith(TMP_PREFIX):
        return
    convert_saved_adapter(directory, initial)


@contextmanager
def _quiet_hf_progress() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_model_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load the weights saved by :func:`save_model` into ``model`` (same architecture / adapter layout)."""
    directory = Path(directory)
    model = _unwrap(model)
    if is_peft_model(model):
        from peft import set_peft_model_state_dict

        adapter_file = directory / "adapter_model.safetensors"
        if not adapter_file.is_file():
            raise TunesmithError(
                f"{directory} holds no adapter_model.safetensors but this run trains LoRA adapters; the checkpoint "
                "comes from a different finetuning_type: use another output_dir or set overwrite_output_dir: true"
            )
        result = set_peft_model_state_dict(model, load_file(adapter_file, device="cpu"))
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise TunesmithError(
                f"the adapter in {directory} does not match this run's LoRA layout (e.g. {unexpected[0]}); "
                "resume with the same lora_target / lora_rank or use another output_dir"
            )
        return
    shards = sorted(directory.glob("model*.safetensors"))
    if not shards:
        raise TunesmithError(
            f"{directory} holds no model*.safetensors but this run trains the full model; the checkpoint comes "
            "from a different finetuning_type: use another output_dir or set overwrite_output_dir: true"
        )
    saved: dict[str, torch.Tensor] = {}
    for shard in shards:
        saved.update(load_file(shard, device="cpu"))
    own = model.state_dict()
    if set(saved) <= set(own) and not [k for k in own if k not in saved and not _is_tied(model, k)]:
        _copy_into(model, saved)
        return
    # Key names differ (transformers renames some architectures' weights on save): let it load them back.
    del saved
    reloaded = type(model).from_pretrained(directory, dtype=next(model.parameters()).dtype)
    _copy_into(model, reloaded.state_dict())
    del reloaded


def _is_tied(model: torch.nn.Module, key: str) -> bool:
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return key in tied


def _copy_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:  # shape mismatch
        raise TunesmithError(
            f"the checkpoint's weights do not fit this model ({str(err).splitlines()[-1].strip()}); "
            "resume with the same model or use another output_dir"
        ) from None
    if result.unexpected_keys:
        raise TunesmithError(
            f"the checkpoint holds weights this model lacks (e.g. {result.unexpected_keys[0]}); "
            "resume with the same model or use another output_dir"
        )


# -------------------------------------------------------------------------------------------- save / load


def _fsync_tree(directory: Path) -> None:
    for path in [*directory.rglob("*"), directory]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def rng_file(rank: int) -> str:
    """Rank 0 keeps the single-process name; other ranks (whose dropout streams differ) get their own file."""
    return "rng_state.pt" if rank == 0 else f"rng_state_rank{rank}.pt"


def tmp_checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"{TMP_PREFIX}{step}"


def begin_checkpoint(output_dir: Path, step: int) -> Path:
    """Create an empty ``.tmp-checkpoint-<step>`` (rank 0 only) and return it."""
    tmp = tmp_checkpoint_dir(output_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def save_rng_state(directory: Path, rank: int = 0) -> None:
    torch.save(capture_rng_state(), Path(directory) / rng_file(rank))


def finish_checkpoint(
    tmp: Path, scheduler: Any, state: TrainState, extra: dict[str, dict] | None = None
) -> Path:
    """Write the world-size-free files (scheduler, ``extra``, trainer state), then the marker, then rename
    ``.tmp-checkpoint-N`` into ``checkpoint-N`` (rank 0 only, after every rank wrote its part)."""
    step = state.global_step
    final = tmp.parent / f"{CHECKPOINT_PREFIX}{step}"
    torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
    for name, value in (extra or {}).items():
        torch.save(value, tmp / f"{name}.pt")
    state.save(tmp / STATE_FILE)
    (tmp / COMPLETE_MARKER).write_text(json.dumps({"global_step": step}) + "\n", encoding="utf-8")
    _fsync_tree(tmp)
    if final.exists():  # an incomplete folder of the same step (never one we renamed: those are complete)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_tree(tmp.parent)
    return final


def write_checkpoint(
    output_dir: Path,
    state: TrainState,
    scheduler: Any,
    comm: Collectives,
    write: Callable[[Path], None],
    extra: dict[str, Any] | None = None,
    model: torch.nn.Module | None = None,
) -> Path:
    """``output_dir/checkpoint-<step>``, atomically, on every rank: rank 0 creates ``.tmp-checkpoint-<step>``,
    every rank runs ``write(tmp)`` (its part of the weights and optimizer, as its engine dictates) and saves its
    RNG state, rank 0 adds the world-size-free files (scheduler, ``extra`` objects' state dicts, trainer state)
    and renames the folder into place. A full disk on any rank removes the partial folder and raises one
    sentence on every rank (:func:`disk_full_error`); ``model`` sizes the estimate of the space needed."""
    output_dir, step = Path(output_dir), state.global_step
    tmp = tmp_checkpoint_dir(output_dir, step)
    if comm.is_main:
        begin_checkpoint(output_dir, step)
    comm.barrier()
    failure = _attempt(lambda: (write(tmp), save_rng_state(tmp, comm.rank)), output_dir)
    # every rank learns whether any part failed (this also waits for every part to be on disk) ...
    failures = comm.all_gather_object(failure)
    if comm.is_main and not any(failures):
        extra_states = {name: value.state_dict() for name, value in (extra or {}).items()}
        failure = _attempt(lambda: finish_checkpoint(tmp, scheduler, state, extra_states), output_dir)
    # ... and whether rank 0 completed it: nobody goes on (and maybe crashes) before it is
    failures = [f for f in [*failures, *comm.all_gather_object(failure)] if f]
    if failures:
        if comm.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise disk_full_error(output_dir, f"saving {CHECKPOINT_PREFIX}{step}", model)
    return output_dir / f"{CHECKPOINT_PREFIX}{step}"


def _attempt(action: Callable[[], Any], where: Path) -> str | None:
    """Run ``action``, which writes under ``where``; a full disk is returned as text (every rank must learn of it
    before anyone stops: the others would wait in the next collective forever), any other error is raised."""
    try:
        action()
    except Exception as err:
        if is_disk_full(err, where):
            return f"{type(err).__name__}: {err}"
        raise
    return None


DISK_FULL_BYTES = 1 << 20  # less than this free after a failed write: the disk filled up


def is_disk_full(err: BaseException, where: Path) -> bool:
    """Whether ``err``, raised while writing under ``where``, means the disk is full. safetensors and
    torch.save wrap the OS error in their own types (torch.save's says only "unexpected pos"), so the free space
    left on that disk decides as well."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
        return True
    try:
        return shutil.disk_usage(where).free < DISK_FULL_BYTES
    except OSError:
        return False


def disk_full_error(output_dir: Path, what: str, model: torch.nn.Module | None = None) -> TunesmithError:
    """One sentence for a disk that filled up while ``what`` (saving checkpoint-N, the final model): where, how
    much the save needs, and which complete checkpoint a re-run resumes from."""
    last = latest_checkpoint(output_dir)
    need = folder_bytes(last) if last is not None else estimate_checkpoint_bytes(model)
    free = shutil.disk_usage(output_dir).free if output_dir.exists() else 0
    kept = (
        f"the last complete checkpoint, {last.name}, is intact: free space and re-run the same command to resume "
        "from it"
        if last is not None
        else "no complete checkpoint exists yet: free space and re-run the same command to start again"
    )
    return TunesmithError(
        f"no space left on the disk of {output_dir} while {what}: it needs about {_megabytes(need)} and "
        f"{_megabytes(free)} are free; the partial folder was removed and {kept}"
    )


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def estimate_checkpoint_bytes(model: torch.nn.Module | None) -> int:
    """What a single-process checkpoint of ``model`` takes: the saved weights (the adapter, or every weight)
    plus AdamW's two float32 moments per trainable value."""
    if model is None:
        return 0
    params = list(_unwrap(model).parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    saved = sum(p.numel() * p.element_size() for p in params if p.requires_grad or not is_peft_model(model))
    return saved + 8 * trainable


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any] | None = None,
    rank: int = 0,
) -> TrainState:
    """Restore weights, optimizer, scheduler, RNG (and ``extra`` objects with ``load_state_dict``) from ``path``.

    Weights and optimizer come from ``dcp/`` when the checkpoint has it (written by fsdp2 or deepspeed on any
    number of ranks, resharded to this model's layout, sharded or not), else from the HF/PEFT weights and
    ``optimizer.pt``. Each rank restores its own RNG file, or rank 0's when the checkpoint was written by fewer
    ranks.
    """
    path = check_complete(path)
    if (path / SHARDED_DIR).is_dir():
        from tunesmith.train.sharded import load_sharded

        load_sharded(path / SHARDED_DIR, model, optimizer)
    else:
        if not (path / OPTIMIZER_FILE).is_file():
            raise TunesmithError(
                f"checkpoint {path} holds no optimizer state (it was saved with save_only_model: true), so it cannot "
                f"resume a run; start a new one from its weights (model_name_or_path={path}) or set "
                "overwrite_output_dir: true"
            )
        load_model_weights(model, path)
        from tunesmith.train.optimizers import state_classes

        try:
            with torch.serialization.safe_globals(state_classes()):  # GaLore / APOLLO keep projector objects
                state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
            optimizer.load_state_dict(state)
        except ValueError as err:
            raise TunesmithError(
                f"the optimizer state in {path} does not match this run's trainable parameters ({err}); "
                "resume with the same finetuning settings or use another output_dir"
            ) from None
    return restore_training_state(path, optimizer, scheduler, extra, rank)


def check_complete(path: Path) -> Path:
    path = Path(path)
    if not is_complete(path):
        raise TunesmithError(
            f"checkpoint {path} is incomplete (no {COMPLETE_MARKER} marker); pick another one"
        )
    return path


def restore_training_state(
    path: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any] | None = None,
    rank: int = 0,
) -> TrainState:
    """Everything but weights and optimizer state: scheduler (and the lr it implies), ``extra``, RNG, progress."""
    path = Path(path)
    state = TrainState.load(path / STATE_FILE)
    scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, map_location="cpu", weights_only=True))
    # The scheduler's last lr is the one the next step uses; set it explicitly rather than trust the optimizer's
    # saved param groups, which sharded (dcp/) checkpoints do not carry and other engines' optimizers name
    # differently.
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=False):
        group["lr"] = lr
    for name, target in (extra or {}).items():
        file = path / f"{name}.pt"
        if file.is_file():
            target.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    rng = path / rng_file(rank)
    if not rng.is_file():
        rng = path / rng_file(0)
    restore_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
    return state


def rotate_checkpoints(output_dir: Path, limit: int | None) -> list[Path]:
    """Keep the newest ``limit`` complete checkpoints; delete older ones. Returns the deleted folders."""
    if not limit:
        return []
    found = list_checkpoints(output_dir)
    doomed = found[:-limit] if len(found) > limit else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
