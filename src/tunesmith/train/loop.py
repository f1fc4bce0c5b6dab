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
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from tunesmith.config import Config
from tunesmith.data.loader import IGNORE_INDEX, Batch, EncodedLike, EpochLoader
from tunesmith.errors import ConfigError, DataError, TunesmithError
from tunesmith.logging import get_logger, is_main_process
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.observe import RunObserver, plot_loss, write_run_info
from tunesmith.train.optim import build_optimizer, build_scheduler, total_steps
from tunesmith.train.state import SIGNATURE_HARD_KEYS, SIGNATURE_SOFT_KEYS, TrainState, run_signature

log = get_logger("train")

Precision = Literal["fp32", "bf16", "fp16"]
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


def resolve_precision(cfg: Config, device: torch.device) -> Precision:
    """bf16/fp16 autocast where the device supports it; fp16 on CPU falls back to float32 with a warning."""
    if cfg.bf16:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(
                "bf16: true but this GPU has no bfloat16 support; set fp16: true or bf16: false"
            )
        return "bf16"
    if cfg.fp16:
        if device.type == "cpu":
            log.warning(
                "fp16: true needs a GPU (float16 autocast with loss scaling); training in float32 on CPU "
                "instead (bf16: true works on CPU)"
            )
            return "fp32"
        return "fp16"
    return "fp32"


def model_dtype(cfg: Config, precision: Precision, device: torch.device) -> torch.dtype:
    """Master weights stay float32 for full/freeze; LoRA on a GPU keeps the frozen base in the autocast dtype."""
    if cfg.finetuning_type == "lora" and device.type != "cpu" and precision != "fp32":
        return torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.float32


class SingleDeviceEngine:
    """Where the model meets the hardware: placement, autocast, backward and the optimizer step.

    This is the seam for distributed engines (DDP/FSDP wrap the model in ``prepare`` and reduce in ``backward``
    / ``step``); the loop only talks to these few methods.
    """

    def __init__(self, device: torch.device, precision: Precision = "fp32") -> None:
        self.device = device
        self.precision = precision
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(
        self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_grad_norm: float
    ) -> float:
        """Unscale (fp16), clip to ``max_grad_norm`` (0: measure only), step, zero the grads; the pre-clip norm."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def extra_state(self) -> dict[str, Any]:
        """Objects with state_dict/load_state_dict that checkpoints must carry besides model/optimizer/scheduler."""
        return {"scaler": self.scaler} if self.scaler is not None else {}


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
    saved = TrainState.load(path / ckpt.STATE_FILE).signature
    current = json.loads(json.dumps(run_signature(cfg)))
    for key in SIGNATURE_HARD_KEYS:
        if key in saved and saved[key] != current[key]:
            raise TunesmithError(
                f"{path} was trained with {key}={saved[key]!r} but the config says {key}={current[key]!r}, so it "
                "cannot be resumed; set it back, choose another output_dir, or set overwrite_output_dir: true"
            )
    changed = [k for k in SIGNATURE_SOFT_KEYS if k in saved and saved[k] != current[k]]
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
    for path in ckpt.remove_partial(output_dir):
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
    """overwrite_output_dir: drop the old checkpoints (and logs) now that the new run is about to start."""
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


def evaluate(model: torch.nn.Module, loader: EpochLoader, engine: SingleDeviceEngine) -> float:
    """Mean token loss over the whole validation set (each target token weighs the same)."""
    model.eval()
    loss_sum, targets = 0.0, 0
    with torch.no_grad():
        for _, batch in loader.epoch_batches(epoch=0):
            batch = batch.to(engine.device)
            with engine.autocast():
                logits = model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                ).logits
            loss_sum += float(token_loss_sum(logits, batch.labels))
            targets += batch.num_targets
    model.train()
    return loss_sum / max(targets, 1)


def train_step(
    model: torch.nn.Module,
    window: Sequence[Batch],
    engine: SingleDeviceEngine,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    max_grad_norm: float,
) -> tuple[float, int, float]:
    """One optimizer step over an accumulation window; returns (mean token loss, target tokens, grad norm).

    Every target token of the window weighs the same: each micro-batch's summed token loss is divided by the
    number of targets in the *whole* window (counted before any backward), so the gradient equals that of one big
    batch no matter how the tokens are spread over the micro-batches.
    """
    num_targets = sum(batch.num_targets for batch in window)
    denominator = max(num_targets, 1)
    window_loss = torch.zeros((), device=engine.device)
    for batch in window:
        batch = batch.to(engine.device)
        with engine.autocast():
            logits = model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).logits
        loss = token_loss_sum(logits, batch.labels) / denominator
        engine.backward(loss)
        window_loss += loss.detach().float()
    grad_norm = engine.step(optimizer, params, max_grad_norm)
    return float(window_loss), num_targets, grad_norm


def fit(
    cfg: Config,
    model: torch.nn.Module,
    tokenizer: Any,
    train_data: Sequence[EncodedLike],
    val_data: Sequence[EncodedLike] = (),
    *,
    device: torch.device | str | None = None,
    resume_from: Path | str | None | Literal["auto"] = "auto",
    callbacks: Sequence[StepCallback] = (),
) -> TrainResult:
    """Train ``model`` (already set up for cfg.finetuning_type) on encoded samples; checkpoints, logs and the
    final model go to ``cfg.output_dir``. ``resume_from``: a checkpoint, None (fresh) or ``"auto"`` (see
    :func:`find_resume_checkpoint`). ``callbacks`` run after every optimizer step."""
    cfg.require("output_dir")
    output_dir = Path(cfg.output_dir)
    if not train_data:
        raise DataError(
            "there are no training samples after preprocessing; check dataset, max_samples and val_size"
        )
    if resume_from == "auto":
        resume_from = find_resume_checkpoint(cfg)
    elif resume_from is not None:
        resume_from = Path(resume_from)
        check_resume_compatible(cfg, resume_from)
    device = torch.device(device) if device is not None else _pick_device(cfg.device)
    engine = SingleDeviceEngine(device, resolve_precision(cfg, device))
    tensorboard_dir = Path(cfg.logging_dir or output_dir / "runs") if cfg.use_tensorboard else None

    # ---- model, data, optimizer, schedule
    model = engine.prepare(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    for param in params:  # optimizer state and updates in float32, whatever the frozen base's dtype
        if param.dtype != torch.float32:
            param.data = param.data.float()
    model.train()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loader = EpochLoader(
        train_data, cfg.per_device_train_batch_size, pad_id if pad_id is not None else 0, cfg.seed
    )
    val_loader = (
        EpochLoader(val_data, cfg.per_device_eval_batch_size, pad_id or 0, shuffle=False)
        if val_data
        else None
    )
    do_eval = val_loader is not None and cfg.eval_strategy == "steps"
    total = total_steps(cfg, len(loader))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total)
    state = TrainState(total_steps=total, batches_per_epoch=len(loader), signature=run_signature(cfg))

    # ---- fresh start or resume (restores weights, optimizer, scheduler, RNG and the data position)
    seed_everything(cfg.seed)
    if resume_from is not None:
        saved = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler, extra=engine.extra_state())
        state = TrainState.from_dict({**saved.to_dict(), "total_steps": total, "signature": state.signature})
        if saved.batches_per_epoch != len(loader):
            log.warning(
                "the dataset now has %d micro-batches per epoch (the checkpoint had %d); the data order "
                "differs from the interrupted run",
                len(loader),
                saved.batches_per_epoch,
            )
            state.batches_per_epoch = len(loader)
            if state.batch_index >= len(loader):
                state.epoch, state.batch_index = state.epoch + 1, 0
        log.info(
            "resuming from %s (step %d of %d, epoch %.2f)",
            resume_from,
            state.global_step,
            total,
            state.epoch_float,
        )
    elif cfg.overwrite_output_dir:
        _clear_previous_run(output_dir, tensorboard_dir)
    write_run_info(output_dir, cfg)
    log.info(
        "training %d samples: %d micro-batches of %d per epoch, %d accumulation, %d optimizer steps, "
        "%s on %s",
        len(train_data),
        len(loader),
        cfg.per_device_train_batch_size,
        cfg.gradient_accumulation_steps,
        total,
        engine.precision,
        device,
    )

    observer = RunObserver(output_dir, total, state.global_step, tensorboard_dir)
    start = interval_start = time.perf_counter()
    interval_targets = 0
    last_saved = state.global_step if resume_from is not None else None
    try:
        while state.global_step < total:
            windows = loader.epoch_windows(state.epoch, state.batch_index, cfg.gradient_accumulation_steps)
            for position, window in windows:
                lr = scheduler.get_last_lr()[0]
                loss, targets, grad_norm = train_step(
                    model, window, engine, optimizer, params, cfg.max_grad_norm
                )
                scheduler.step()
                state.global_step += 1
                state.batch_index = position
                if position >= len(loader):
                    state.epoch, state.batch_index = state.epoch + 1, 0
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

                if cfg.save_strategy == "steps" and (
                    state.global_step % cfg.save_steps == 0 or state.global_step == total
                ):
                    _save(
                        output_dir,
                        model,
                        tokenizer,
                        optimizer,
                        scheduler,
                        state,
                        engine,
                        cfg.save_total_limit,
                    )
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
    if is_main_process():
        ckpt.save_model(model, tokenizer, output_dir)
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
    log.info("saved the final %s to %s", "adapter" if ckpt.is_peft_model(model) else "model", output_dir)
    return TrainResult(
        output_dir=output_dir,
        global_step=state.global_step,
        final_loss=state.last_loss if state.last_loss is not None else math.nan,
        checkpoints=ckpt.list_checkpoints(output_dir),
        eval_loss=state.last_eval_loss,
    )


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
    output_dir,
    model,
    tokenizer,
    optimizer,
    scheduler,
    state: TrainState,
    engine: SingleDeviceEngine,
    limit: int | None,
) -> None:
    if not is_main_process():
        return
    path = ckpt.save_checkpoint(
        output_dir,
        model,
        tokenizer,
        optimizer,
        scheduler,
        state,
        extra={k: v.state_dict() for k, v in engine.extra_state().items()},
    )
    log.debug("saved %s", path)
    for old in ckpt.rotate_checkpoints(output_dir, limit):
        log.debug("save_total_limit %s: deleted %s", limit, old)


def _pick_device(name: str) -> torch.device:
    from tunesmith.model.load import pick_device

    return pick_device(name)


# ------------------------------------------------------------------------------------------- the pipeline


def train(cfg: Config, callbacks: Sequence[StepCallback] = ()) -> TrainResult:
    """The whole run: tokenizer → datasets → model → fine-tuning method → :func:`fit`. Re-running the same config
    continues from the newest complete checkpoint in ``output_dir``."""
    from tunesmith.data import prepare_datasets
    from tunesmith.model.adapt import apply_finetuning
    from tunesmith.model.load import load_model, load_tokenizer, pick_device

    cfg.require("model_name_or_path", "dataset", "output_dir")
    resume_from = find_resume_checkpoint(cfg)  # fail before the slow part when the folder cannot be continued
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg, device)
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(
        cfg.model_name_or_path, cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code
    )
    data = prepare_datasets(cfg, tokenizer)
    model = load_model(
        cfg.model_name_or_path,
        dtype=model_dtype(cfg, precision, device),
        cache_dir=cfg.cache_dir,
        trust_remote_code=cfg.trust_remote_code,
        allow_pickle=cfg.allow_pickle,
        device=device,
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
