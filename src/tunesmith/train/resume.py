"""Resume policy: which checkpoint a run continues from, whether the config still fits it, and what the saved
progress means for this run (the data position carries over world-size-free; counters are recomputed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tunesmith.config import Config
from tunesmith.config.load import check_output_folder
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.logging import get_logger, is_main_process
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.state import SIGNATURE_HARD_KEYS, SIGNATURE_SOFT_KEYS, TrainState, run_signature

log = get_logger("train")

FINAL_MODEL_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


def _resolve_checkpoint_arg(value: str, output_dir: Path) -> Path:
    path = Path(value).expanduser()
    if not path.exists() and (output_dir / value).exists():
        path = output_dir / value  # `resume_from_checkpoint: checkpoint-20` names one inside output_dir
    if not path.is_dir():
        raise ConfigError(
            f"resume_from_checkpoint {value} is not a folder; point it at an output_dir/checkpoint-N"
        )
    if not ckpt.is_complete(path):
        raise ConfigError(
            f"resume_from_checkpoint {path} is not a complete checkpoint (no {ckpt.COMPLETE_MARKER}); "
            "pick another checkpoint-N"
        )
    return path


def check_resume_compatible(cfg: Config, path: Path) -> None:
    """Refuse a checkpoint the current config cannot load; warn about changes that only break exactness."""
    saved_state = TrainState.load(path / ckpt.STATE_FILE)
    saved = saved_state.signature
    current = json.loads(json.dumps(run_signature(cfg)))
    for key in SIGNATURE_HARD_KEYS:
        if key in saved and saved[key] != current[key]:
            raise TunesmithError(
                f"{path} was trained with {key}={saved[key]!r} but the config says {key}={current[key]!r}, so it "
                "cannot be resumed; set it back, choose another output_dir, or set overwrite_output_dir: true"
            )
    soft = SIGNATURE_SOFT_KEYS
    if saved_state.global_batch_size:  # the global batch, not its split, decides exactness: see _resumed_state
        soft = tuple(k for k in soft if k not in ("per_device_train_batch_size", "gradient_accumulation_steps"))
    changed = [k for k in soft if k in saved and saved[k] != current[k]]
    if changed:
        log.warning(
            "resuming from %s with a changed %s; the run will not reproduce the interrupted one exactly",
            path,
            ", ".join(f"{k} ({saved[k]!r} → {current[k]!r})" for k in changed),
        )


def find_resume_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint this run continues from: ``resume_from_checkpoint``, else the newest complete one in
    ``output_dir`` (unless ``overwrite_output_dir``). Raises when the folder's run cannot be continued."""
    output_dir = Path(cfg.output_dir)
    check_output_folder("output_dir", output_dir)  # a file there is one sentence, not a FileExistsError later
    if cfg.use_tensorboard and cfg.logging_dir:
        check_output_folder("logging_dir", Path(cfg.logging_dir))
    if cfg.overwrite_output_dir and cfg.resume_from_checkpoint:
        raise ConfigError("overwrite_output_dir and resume_from_checkpoint are both set; choose one")
    for path in ckpt.remove_partial(output_dir) if is_main_process() else []:
        log.info("removed %s, a checkpoint an earlier run did not finish writing", path)
    if cfg.resume_from_checkpoint:
        found = _resolve_checkpoint_arg(cfg.resume_from_checkpoint, output_dir)
    elif cfg.overwrite_output_dir:
        return None
    else:
        found = ckpt.latest_checkpoint(output_dir)
        if found is None:
            finished = [name for name in FINAL_MODEL_FILES if (output_dir / name).is_file()]
            if finished:
                raise TunesmithError(
                    f"output_dir {output_dir} already holds a trained model ({finished[0]}) but no checkpoint to "
                    "resume from; set overwrite_output_dir: true to replace it or choose another output_dir"
                )
            return None
    check_resume_compatible(cfg, found)
    return found


def clear_previous_run(output_dir: Path, tensorboard_dir: Path | None) -> None:
    """overwrite_output_dir: drop the old checkpoints (and logs) now that the new run is about to start (rank 0)."""
    if not is_main_process():
        return
    old = ckpt.list_checkpoints(output_dir, complete_only=False)
    for path in old:
        shutil.rmtree(path)
    if old:
        log.info(
            "overwrite_output_dir: deleted %d checkpoint(s) of the previous run in %s (%s)",
            len(old),
            output_dir,
            ", ".join(p.name for p in old),
        )
    if tensorboard_dir is not None and tensorboard_dir == output_dir / "runs" and tensorboard_dir.is_dir():
        shutil.rmtree(tensorboard_dir)


def resumed_state(saved: TrainState, fresh: TrainState, num_samples: int | None, per_round: int) -> TrainState:
    """The checkpoint's progress, with the data position carried over in samples (world-size-free) and the
    per-round counters recomputed for this run's batch size and world size. ``num_samples`` None: a stream,
    whose position (pass, samples, cursor) carries over as saved."""
    consumed = saved.samples_consumed()
    old_samples = saved.samples_per_epoch or None
    state = TrainState.from_dict(
        {
            **saved.to_dict(),
            "total_steps": fresh.total_steps,
            "signature": fresh.signature,
            "samples_per_epoch": num_samples or 0,
            "batches_per_epoch": fresh.batches_per_epoch,
            "world_size": fresh.world_size,
            "global_batch_size": fresh.global_batch_size,
        }
    )
    old_batch = int(saved.signature.get("per_device_train_batch_size") or 1)
    if num_samples is None:
        changed = False
    elif old_samples:
        changed = old_samples != num_samples
    else:
        changed = saved.batches_per_epoch != -(-num_samples // old_batch)
    if changed:
        log.warning(
            "the dataset now has %d samples (the checkpoint's run had %s); the data order differs from the "
            "interrupted run",
            num_samples,
            old_samples if old_samples else f"{saved.batches_per_epoch} micro-batches of {old_batch}",
        )
    if saved.global_batch_size and saved.global_batch_size != fresh.global_batch_size:
        log.warning(
            "resuming a run trained with a global batch of %d (%d rank(s)) with a global batch of %d (%d rank(s)): "
            "the data position carries over, but each step now averages a different number of samples",
            saved.global_batch_size,
            saved.world_size,
            fresh.global_batch_size,
            fresh.world_size,
        )
    state.sample_index = consumed
    if num_samples is not None and consumed >= num_samples:
        state.epoch, state.sample_index = state.epoch + 1, 0
    state.batch_index = -(-state.sample_index // per_round)
    return state
