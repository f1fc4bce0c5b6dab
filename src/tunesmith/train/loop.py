"""The training recipe, top to bottom: setup, then for each optimizer step

    forward each micro-batch of the accumulation window → sum of token losses / targets in the whole window →
    backward → clip → AdamW step → lr schedule → log → (eval) → (checkpoint)

``train(cfg)`` is the whole pipeline (tokenizer, data, model, fine-tuning method, then ``fit``); ``fit`` is the
loop itself and takes an already prepared model, so tests and other front ends can call it directly.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
import zlib
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from tunesmith.config import Config
from tunesmith.data.loader import IGNORE_INDEX, Batch, EncodedLike, EpochLoader
from tunesmith.data.stream import StreamingData, StreamLoader
from tunesmith.errors import ConfigError, DataError, TunesmithError
from tunesmith.evaluate.samples import log_sample_generations, sample_generation_due
from tunesmith.launch.distributed import (
    dist_info,
    init_distributed,
    main_process_first,
    prepare_datasets_once,
    rank_device,
)
from tunesmith.logging import get_logger, is_main_process
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.engines import Engine, Precision, SingleDeviceEngine, create_engine, engine_name
from tunesmith.train.engines import resolve_precision as resolve_precision
from tunesmith.train.observe import RunObserver, plot_loss, write_run_info
from tunesmith.train.optim import build_scheduler, total_steps
from tunesmith.train.state import SIGNATURE_HARD_KEYS, SIGNATURE_SOFT_KEYS, TrainState, run_signature

log = get_logger("train")

__all__ = ["SingleDeviceEngine", "TrainResult", "fit", "resolve_precision", "train"]

StepCallback = Callable[[TrainState], None]
FINAL_MODEL_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    final_loss: float
    checkpoints: list[Path] = field(default_factory=list)
    eval_loss: float | None = None


# ------------------------------------------------------------------------------------------ setup helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def model_dtype(cfg: Config, precision: Precision, device: torch.device, engine: str = "single") -> torch.dtype:
    """Master weights stay float32 for full/freeze; LoRA on a GPU keeps the frozen base in the autocast dtype
    (except under fsdp2, whose units want one parameter dtype and compute in bf16 through their own policy)."""
    if cfg.finetuning_type == "lora" and device.type != "cpu" and precision != "fp32" and engine != "fsdp2":
        return torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.float32


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in backward (non-reentrant checkpointing), unless the model already does."""
    if any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules()):
        return  # apply_finetuning turned it on
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross entropy summed over the target tokens (position t predicts labels[t + 1]), in float32.

    The labels are shifted, not the logits: slicing the (batch × seq × vocab) logits would copy the largest
    tensor of the step (and keep a second one alive for backward).
    """
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).to(logits.device)
    if logits.dtype != torch.float32:  # autocast: compute the softmax in float32
        logits = logits.float()
    return F.cross_entropy(
        logits.view(-1, logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


# ---------------------------------------------------------------------------------------- resume helpers


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


def _clear_previous_run(output_dir: Path, tensorboard_dir: Path | None) -> None:
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


# ------------------------------------------------------------------------------------------------ the loop


def evaluate(model: torch.nn.Module, loader: EpochLoader, engine: Engine) -> float:
    """Mean token loss over the whole validation set (each target token weighs the same), each rank scoring its
    share of the samples (masked fillers where the shares are uneven; they hold no targets)."""
    model.eval()
    loss_sum, targets = 0.0, 0
    with torch.no_grad():
        for _, window in loader.windows(epoch=0, start=0, accumulation=1):
            batch = window[0].to(engine.device)
            with engine.autocast():
                logits = model(**batch.model_inputs(engine.varlen), use_cache=False).logits
            loss_sum += float(token_loss_sum(logits, batch.labels))
            targets += batch.num_targets
    model.train()
    loss_sum, targets = engine.all_reduce_sum([loss_sum, targets])
    return loss_sum / max(targets, 1)


def train_step(
    model: torch.nn.Module,
    window: Sequence[Batch],
    engine: Engine,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    max_grad_norm: float,
) -> tuple[float, int, float]:
    """One optimizer step over an accumulation window; returns (mean token loss, target tokens, grad norm), the
    loss and token count taken over all ranks.

    Every target token of the window weighs the same: each micro-batch's summed token loss is divided by the
    number of targets in the *whole* window on *all* ranks (counted before any backward), so the gradient equals
    that of one big batch no matter how the tokens are spread over micro-batches and ranks.
    """
    num_targets = int(engine.all_reduce_sum([sum(batch.num_targets for batch in window)])[0])
    denominator = max(num_targets, 1)
    window_loss = torch.zeros((), device=engine.device)
    for index, batch in enumerate(window):
        batch = batch.to(engine.device)
        with engine.no_sync(model, skip=index < len(window) - 1):
            with engine.autocast():
                logits = model(**batch.model_inputs(engine.varlen), use_cache=False).logits
            loss = token_loss_sum(logits, batch.labels) / denominator
            engine.backward(loss)
        window_loss += loss.detach().float()
    grad_norm = engine.step(optimizer, params, max_grad_norm)
    return engine.all_reduce_sum([float(window_loss)])[0], num_targets, grad_norm


def data_fingerprint(samples: Sequence[EncodedLike]) -> tuple[int, int]:
    """Sample count and a checksum of the sample lengths: cheap, and enough to catch ranks whose preprocessing
    produced different data (say, differing files on two nodes)."""
    lengths = array("q", (len(sample.input_ids) for sample in samples))
    return len(samples), zlib.crc32(lengths.tobytes())


def fit(
    cfg: Config,
    model: torch.nn.Module,
    tokenizer: Any,
    train_data: Sequence[EncodedLike] | StreamingData,
    val_data: Sequence[EncodedLike] = (),
    *,
    device: torch.device | str | None = None,
    resume_from: Path | str | None | Literal["auto"] = "auto",
    callbacks: Sequence[StepCallback] = (),
) -> TrainResult:
    """Train ``model`` (already set up for cfg.finetuning_type) on encoded samples, or on a stream of them
    (:mod:`tunesmith.data.stream`); checkpoints, logs and the final model go to ``cfg.output_dir``.
    ``resume_from``: a checkpoint, None (fresh) or ``"auto"`` (see :func:`find_resume_checkpoint`).
    ``callbacks`` run after every optimizer step (on every rank).

    Under torchrun every rank calls this with the same model and data; the engine (``cfg.engine``) decides how
    they share the work."""
    cfg.require("output_dir")
    output_dir = Path(cfg.output_dir)
    streaming = isinstance(train_data, StreamingData)
    if streaming and cfg.max_steps <= 0:
        raise ConfigError("streaming: true needs max_steps (a stream has no known length); set max_steps: N")
    if not streaming and not train_data:
        raise DataError(
            "there are no training samples after preprocessing; check dataset, max_samples and val_size"
        )
    if resume_from == "auto":
        resume_from = find_resume_checkpoint(cfg)
    elif resume_from is not None:
        resume_from = Path(resume_from)
        check_resume_compatible(cfg, resume_from)
    device = torch.device(device) if device is not None else _pick_device(cfg.device)
    if engine_name(cfg) != "single":
        device = rank_device(device, dist_info().local_rank)
    engine = create_engine(cfg, device)
    tensorboard_dir = Path(cfg.logging_dir or output_dir / "runs") if cfg.use_tensorboard else None
    if not streaming:  # a stream is read while training: every rank reads the same files with the same config
        _check_same_data(engine, train_data, val_data)

    # ---- model, data, optimizer, schedule
    if cfg.gradient_checkpointing:  # before wrapping: DDP/FSDP2 wrappers do not expose the HF switch
        enable_gradient_checkpointing(model)
    for param in model.parameters():  # optimizer state and updates in float32, whatever the frozen base's dtype
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    shard = dict(rank=engine.rank, world_size=engine.world_size)
    pad_id = pad_id if pad_id is not None else 0
    if isinstance(train_data, StreamingData):
        loader: EpochLoader | StreamLoader = StreamLoader(train_data, cfg.per_device_train_batch_size, pad_id, **shard)
    else:
        loader = EpochLoader(train_data, cfg.per_device_train_batch_size, pad_id, cfg.seed, **shard)
    num_samples = None if streaming else len(train_data)  # per epoch; a stream's is unknown
    val_loader = (
        EpochLoader(val_data, cfg.per_device_eval_batch_size, pad_id, shuffle=False, **shard)
        if val_data
        else None
    )
    do_eval = val_loader is not None and cfg.eval_strategy == "steps"
    total = total_steps(cfg, len(loader))
    model, optimizer = engine.setup(model, cfg, total)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    scheduler = build_scheduler(optimizer, cfg, total)
    per_round = cfg.per_device_train_batch_size * engine.world_size
    global_batch = per_round * cfg.gradient_accumulation_steps
    state = TrainState(
        total_steps=total,
        batches_per_epoch=len(loader),
        sample_index=0,
        samples_per_epoch=num_samples or 0,
        world_size=engine.world_size,
        global_batch_size=global_batch,
        signature=run_signature(cfg),
    )

    # ---- fresh start or resume (restores weights, optimizer, scheduler, RNG and the data position)
    seed_everything(cfg.seed)
    if resume_from is not None:
        saved = engine.load_checkpoint(resume_from, model, optimizer, scheduler)
        state = _resumed_state(saved, state, num_samples, per_round)
        log.info(
            "resuming from %s (step %d of %d, %s %d, sample %d of its %s)",
            resume_from,
            state.global_step,
            total,
            "pass" if streaming else "epoch",
            state.epoch,
            state.sample_index,
            "stream" if streaming else f"{num_samples}",
        )
    elif cfg.overwrite_output_dir:
        _clear_previous_run(output_dir, tensorboard_dir)
    write_run_info(output_dir, cfg)
    log.info(
        "training %s with engine %s on %d rank(s): global batch %d = %d per device × %d accumulation × "
        "%d rank(s); %s micro-batch rounds per epoch, %d optimizer steps, %s on %s",
        "a stream of samples" if streaming else f"{num_samples} samples",
        engine.name,
        engine.world_size,
        global_batch,
        cfg.per_device_train_batch_size,
        cfg.gradient_accumulation_steps,
        engine.world_size,
        len(loader) if not streaming else "?",
        total,
        engine.precision,
        device,
    )

    observer = RunObserver(output_dir, total, state.global_step, tensorboard_dir)
    start = interval_start = time.perf_counter()
    interval_targets = 0
    last_saved = state.global_step if resume_from is not None else None
    try:
        while state.global_step < total:  # one epoch (a pass over the stream) per round of this loop
            windows = loader.windows_from(state.position(), cfg.gradient_accumulation_steps)
            for position, window in windows:
                lr = scheduler.get_last_lr()[0]
                loss, targets, grad_norm = train_step(
                    model, window, engine, optimizer, params, cfg.max_grad_norm
                )
                scheduler.step()
                state.global_step += 1
                state.move_to(position, per_round)
                state.last_loss = loss
                state.best_loss = loss if state.best_loss is None else min(state.best_loss, loss)
                state.interval_loss_sum += loss
                state.interval_steps += 1
                interval_targets += targets
                observer.step()

                if state.global_step % cfg.logging_steps == 0 or state.global_step == total:
                    now = time.perf_counter()
                    entry = {
                        "step": state.global_step,
                        "epoch": round(state.epoch_float, 4),
                        "loss": state.interval_loss_sum / state.interval_steps,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens_per_s": interval_targets / max(now - interval_start, 1e-9),
                        "elapsed": round(now - start, 3),
                    }
                    state.record(entry)
                    observer.log(entry)
                    state.interval_loss_sum, state.interval_steps = 0.0, 0
                    interval_start, interval_targets = now, 0

                if do_eval and (state.global_step % cfg.eval_steps == 0 or state.global_step == total):
                    _log_eval(model, val_loader, engine, state, observer, start)

                # Answers to fixed questions (evaluation_inputs): rank 0 alone generates, so not under fsdp2 or
                # ZeRO-3, where every rank must join each forward. Uses no global RNG: exact resume still holds.
                alone = engine.is_main and engine.whole_model_on_each_rank
                if alone and sample_generation_due(cfg, state.global_step, total):
                    log_sample_generations(engine.unwrap(model), tokenizer, cfg.template, cfg.evaluation_inputs,
                                           state.global_step, output_dir, observer.writer,
                                           system=cfg.default_system, max_new_tokens=cfg.max_new_tokens)

                if cfg.save_strategy == "steps" and (
                    state.global_step % cfg.save_steps == 0 or state.global_step == total
                ):
                    _save(output_dir, model, tokenizer, optimizer, scheduler, state, engine, cfg.save_total_limit)
                    last_saved = state.global_step

                for callback in callbacks:
                    callback(state)
                if state.global_step >= total:
                    break
    finally:
        observer.close()

    # ---- the end: final checkpoint (if the loop did not just write it), final model at the root, plot
    if cfg.save_strategy == "steps" and last_saved != state.global_step:
        _save(output_dir, model, tokenizer, optimizer, scheduler, state, engine, cfg.save_total_limit)
    engine.save_model(model, tokenizer, output_dir)
    if engine.is_main:
        results = {
            "global_step": state.global_step,
            "epoch": round(state.epoch_float, 4),
            "final_loss": state.last_loss,
            "eval_loss": state.last_eval_loss,
            "train_runtime_s": round(time.perf_counter() - start, 3),
        }
        (output_dir / "train_results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        if cfg.plot_loss:
            plot_loss(output_dir)
    engine.barrier()  # on every rank, fit returns once the run folder is complete
    log.info("saved the final %s to %s", "adapter" if ckpt.is_peft_model(model) else "model", output_dir)
    return TrainResult(
        output_dir=output_dir,
        global_step=state.global_step,
        final_loss=state.last_loss if state.last_loss is not None else math.nan,
        checkpoints=ckpt.list_checkpoints(output_dir),
        eval_loss=state.last_eval_loss,
    )


def _check_same_data(engine: Engine, train_data: Sequence[EncodedLike], val_data: Sequence[EncodedLike]) -> None:
    """Every rank preprocesses the data itself (deterministic and cheap), so all must hold the same samples:
    the global permutation is only meaningful if it permutes the same list everywhere."""
    if engine.world_size == 1:
        return
    mine = (data_fingerprint(train_data), data_fingerprint(val_data))
    everyone = engine.all_gather_object(mine)
    if any(theirs != mine for theirs in everyone):
        raise DataError(
            "the ranks prepared different data (samples, checksum per rank: "
            f"{[theirs[0] for theirs in everyone]}); every rank must read the same dataset files and config"
        )


def _resumed_state(saved: TrainState, fresh: TrainState, num_samples: int | None, per_round: int) -> TrainState:
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


def _log_eval(model, val_loader, engine, state: TrainState, observer: RunObserver, start: float) -> None:
    eval_loss = evaluate(model, val_loader, engine)
    state.last_eval_loss = eval_loss
    state.best_eval_loss = eval_loss if state.best_eval_loss is None else min(state.best_eval_loss, eval_loss)
    entry = {
        "step": state.global_step,
        "epoch": round(state.epoch_float, 4),
        "eval_loss": eval_loss,
        "elapsed": round(time.perf_counter() - start, 3),
    }
    state.record(entry)
    observer.log(entry)


def _save(
    output_dir, model, tokenizer, optimizer, scheduler, state: TrainState, engine: Engine, limit: int | None
) -> None:
    path = engine.save_checkpoint(output_dir, model, tokenizer, optimizer, scheduler, state)
    if not engine.is_main:
        return
    log.debug("saved %s", path)
    for old in ckpt.rotate_checkpoints(output_dir, limit):
        log.debug("save_total_limit %s: deleted %s", limit, old)


def _pick_device(name: str) -> torch.device:
    from tunesmith.model.load import pick_device

    return pick_device(name)


# ------------------------------------------------------------------------------------------- the pipeline


def train(cfg: Config, callbacks: Sequence[StepCallback] = ()) -> TrainResult:
    """The whole run: tokenizer → datasets → model → fine-tuning method → :func:`fit`. Re-running the same config
    continues from the newest complete checkpoint in ``output_dir``.

    Distributed (under torchrun, or ``engine: ddp``/``fsdp2``/``deepspeed``): the process group is joined first;
    rank 0 loads (and, for packaged or GGUF models, converts into the cache) tokenizer and model, and preprocesses
    the data into the data cache, before the other ranks, which wait on the store without any timeout and then read
    the caches (with ``TUNESMITH_DATA_CACHE=0`` every rank preprocesses itself); :func:`fit` checks the ranks' data
    agree. With ``streaming: true`` every rank reads the whole stream while training and collates only its own
    micro-batches."""
    from tunesmith.model.adapt import apply_finetuning
    from tunesmith.model.load import (
        attention_implementation,
        load_model,
        load_tokenizer,
        pick_device,
        quantization_from_config,
    )
    from tunesmith.train.engines import check_quantization_supported

    cfg.require("model_name_or_path", "dataset", "output_dir")
    device = pick_device(cfg.device)
    engine = engine_name(cfg)
    check_quantization_supported(cfg)  # before the process group and the slow part
    attention = attention_implementation(cfg.flash_attn, device)
    if engine != "single":
        device = rank_device(device, dist_info().local_rank)
        init_distributed(device, cfg.ddp_timeout)
    resume_from = find_resume_checkpoint(cfg)  # fail before the slow part when the folder cannot be continued
    precision = resolve_precision(cfg, device)
    if is_main_process():  # warn before an obvious out-of-memory, from the config alone (see tunesmith plan)
        from tunesmith.plan import preflight

        for message in preflight(cfg, dist_info().world_size, device):
            log.warning("%s", message)
    quantization = quantization_from_config(cfg, precision)
    seed_everything(cfg.seed)
    with main_process_first("loading the tokenizer"):
        tokenizer = load_tokenizer(
            cfg.model_name_or_path, cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code
        )
    data = prepare_datasets_once(cfg, tokenizer)
    with main_process_first("loading the model"):
        model = load_model(
            cfg.model_name_or_path,
            dtype=model_dtype(cfg, precision, device, engine),
            cache_dir=cfg.cache_dir,
            trust_remote_code=cfg.trust_remote_code,
            allow_pickle=cfg.allow_pickle,
            # fsdp2 and deepspeed shard from the CPU copy onto the device, so no rank holds the whole model there;
            # a quantized base is quantized on (and stays on) the device it computes on
            device=torch.device("cpu") if engine in ("fsdp2", "deepspeed") and quantization is None else device,
            quantization=quantization,
            attn_implementation=attention,
        )
    model = apply_finetuning(model, cfg)
    return fit(
        cfg,
        model,
        tokenizer,
        data.train,
        data.val,
        device=device,
        resume_from=resume_from,
        callbacks=callbacks,
    )
