"""The training loop: ``fit`` = setup → loop → finish, on an already prepared model (``train(cfg)`` in
:mod:`tunesmith.train.pipeline` prepares one from a config). Each optimizer step:

    forward each micro-batch of the accumulation window → the objective's summed loss / its units (target
    tokens for SFT) in the whole window →
    backward → clip → AdamW step → lr schedule → whatever is due (log, eval, sample answers, checkpoint)

The engine (:mod:`tunesmith.train.engines`) decides how the ranks share the work, the objective
(:mod:`tunesmith.train.objectives`) what a batch and its loss are; the loop knows neither by name.
"""

from __future__ import annotations

import json
import math
import random
import time
import zlib
from array import array
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from tunesmith.config import Config
from tunesmith.data.loader import (
    Batch,
    Collator,
    DataPosition,
    EncodedLike,
    EpochLoader,
    Loader,
    pad_token_id,
    prefetch,
)
from tunesmith.data.stream import StreamingData, StreamLoader
from tunesmith.errors import DataError
from tunesmith.logging import get_logger
from tunesmith.model.saved_recipes import saved_as_recipes
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import pipeline_parallel, resume, sequence_parallel
from tunesmith.train.compile import Compiled, compile_blocks
from tunesmith.train.distributed import Collectives
from tunesmith.train.engines import Engine, create_engine
from tunesmith.train.mesh import Mesh
from tunesmith.train.objectives import Objective, create_objective, token_loss_sum
from tunesmith.train.observe import RunObserver, plot_loss, write_run_info
from tunesmith.train.optim import build_scheduler, total_steps
from tunesmith.train.precompute import precompute
from tunesmith.train.samples import log_sample_generations, sample_every
from tunesmith.train.speed_line import log_speed_features
from tunesmith.train.state import TrainState, run_signature

log = get_logger("train")

__all__ = ["TrainResult", "fit", "token_loss_sum"]  # token_loss_sum: where it lived before objectives

StepCallback = Callable[[TrainState], None]


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    final_loss: float
    checkpoints: list[Path] = field(default_factory=list)
    eval_loss: float | None = None


@dataclass
class StepOutcome:
    """One optimizer step: its window's result and the lr it was taken with."""

    result: WindowResult
    lr: float


@dataclass
class Run:
    """What the loop works with, built by :func:`setup`."""

    cfg: Config
    engine: Engine
    objective: Objective
    tokenizer: Any
    loader: Loader
    val_loader: EpochLoader | None
    scheduler: Any
    state: TrainState
    observer: RunObserver
    total: int
    resumed: bool
    started: float = field(default_factory=time.perf_counter)
    interval_started: float = field(default_factory=time.perf_counter)
    interval_tokens: int = 0
    interval_metrics: dict[str, float] = field(default_factory=dict)  # metric sums over the interval's steps
    last_saved: int | None = None
    mesh: Mesh = field(default_factory=Mesh)  # data × pipeline × sequence × tensor parallel
    compiled: Compiled = field(default_factory=Compiled)  # torch_compile: which blocks, and the warm-up

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir or ".")

    @property
    def per_round(self) -> int:
        """Samples of one micro-batch round over all ranks (the ranks of an SP group share theirs)."""
        return self.cfg.per_device_train_batch_size * self.mesh.data_parallel


# ------------------------------------------------------------------------------------------------ math


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


@dataclass
class WindowResult:
    """One accumulation window over all ranks: the mean loss per unit, the units (target tokens for SFT) and
    throughput tokens, the objective's metric means, and the pre-clip gradient norm."""

    loss: float
    units: int
    tokens: int
    metrics: dict[str, float]
    grad_norm: float


class EngineCall:
    """The engine's model as objectives call it (:class:`~tunesmith.train.objectives.ModelCall`)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.device = engine.device

    def __call__(self, **inputs: Any) -> Any:
        return self.other(self.engine.model, **inputs)

    def other(self, module: torch.nn.Module, **inputs: Any) -> Any:
        with self.engine.autocast(), saved_as_recipes():  # lean modules' outputs are recomputed, not kept
            return module(**inputs, use_cache=False)


def train_step(engine: Engine, objective: Objective, window: Sequence[Batch]) -> WindowResult:
    """One optimizer step over an accumulation window, the loss and metrics taken over all ranks.

    Every unit of the window (a target token for SFT) weighs the same: each micro-batch's summed loss is
    divided by the units of the *whole* window on *all* ranks (counted before any backward), so the gradient
    equals that of one big batch no matter how the units are spread over micro-batches and ranks.
    """
    if isinstance(engine, pipeline_parallel.PipelineEngine):  # the stages run the whole window in one schedule
        loss, units, tokens, grad_norm = engine.train_window(objective, window)
        return WindowResult(loss, units, tokens, {}, grad_norm)
    replicas = engine.data_replicas  # tensor parallel: the ranks of a group run the same rows and the same loss
    units, tokens = (total / replicas for total in engine.comm.all_reduce_sum(
        [sum(objective.units(batch) for batch in window), sum(objective.tokens(batch) for batch in window)]
    ))
    denominator = max(int(units), 1)
    window_loss = torch.zeros((), device=engine.device)
    metric_sums = dict.fromkeys(objective.metric_names, 0.0)
    call = EngineCall(engine)
    objective.prepare_window(call, window, engine.comm)
    for index, batch in enumerate(window):
        batch = batch.to(engine.device)
        with engine.accumulating(last=index == len(window) - 1):
            parts = objective.loss(call, batch)
            loss = parts.loss / denominator
            engine.backward(loss)
        window_loss += loss.detach().float()
        for name, value in parts.metrics.items():
            metric_sums[name] += value
    grad_norm = engine.step()
    totals = [total / replicas for total in engine.comm.all_reduce_sum([float(window_loss), *metric_sums.values()])]
    metrics = metric_means(objective, dict(zip(metric_sums, totals[1:], strict=True)), denominator)
    return WindowResult(totals[0], int(units), int(tokens), metrics, grad_norm)


def metric_means(objective: Objective, sums: dict[str, float], units: int) -> dict[str, float]:
    """Each metric's sum over units, or over the sum of the metric the objective names as its denominator."""
    denominators = objective.metric_denominators
    return {
        name: total / max(sums[denominators[name]] if name in denominators else units, 1e-12)
        for name, total in sums.items()
    }


def evaluate(engine: Engine, objective: Objective, loader: EpochLoader) -> dict[str, float]:
    """The objective's evaluation report (``eval_loss`` first: the mean loss per unit over the whole validation
    set), each rank scoring its share of the samples (masked fillers where the shares are uneven; they hold no
    units)."""
    engine.model.eval()
    loss_sum, units = 0.0, 0
    metric_sums = dict.fromkeys(objective.metric_names, 0.0)
    call = EngineCall(engine)
    with torch.no_grad():
        batches = [window[0] for _, window in loader.windows(epoch=0, start=0, accumulation=1)]
        objective.prepare_window(call, batches, engine.comm)
        for batch in batches:
            batch = batch.to(engine.device)
            parts = objective.loss(call, batch)
            loss_sum += float(parts.loss)
            units += objective.units(batch)
            for name, value in parts.metrics.items():
                metric_sums[name] += value
    engine.model.train()
    loss_sum, units, *totals = (total / engine.data_replicas
                                for total in engine.comm.all_reduce_sum([loss_sum, units, *metric_sums.values()]))
    means = metric_means(objective, dict(zip(metric_sums, totals, strict=True)), max(int(units), 1))
    return objective.eval_metrics(loss_sum / max(units, 1), means)


# ------------------------------------------------------------------------------------------------ fit


def fit(
    cfg: Config,
    model: torch.nn.Module,
    tokenizer: Any,
    train_data: Sequence[EncodedLike] | StreamingData,
    val_data: Sequence[EncodedLike] = (),
    *,
    engine: Engine | None = None,
    objective: Objective | None = None,
    device: torch.device | str | None = None,
    resume_from: Path | str | None | Literal["auto"] = "auto",
    callbacks: Sequence[StepCallback] = (),
) -> TrainResult:
    """Train ``model`` (already set up for cfg.finetuning_type) on encoded samples, or on a stream of them
    (:mod:`tunesmith.data.stream`); checkpoints, logs and the final model go to ``cfg.output_dir``.
    ``engine``: the one :func:`tunesmith.train.pipeline.train` created (default: one for ``cfg`` on ``device``);
    ``objective``: the stage's (default: the one of ``cfg.stage``). ``resume_from``: a checkpoint, None (fresh)
    or ``"auto"`` (see :func:`tunesmith.train.resume.find_resume_checkpoint`).
    ``callbacks`` run after every optimizer step (on every rank).

    Under torchrun every rank calls this with the same model and data; the engine decides how they share it."""
    run = setup(cfg, model, tokenizer, train_data, val_data, engine or create_engine(cfg, device),
                objective or create_objective(cfg), resume_from)
    try:
        loop(run, callbacks)
    finally:
        run.observer.close()
    return finish(run)


def setup(
    cfg: Config,
    model: torch.nn.Module,
    tokenizer: Any,
    train_data: Sequence[EncodedLike] | StreamingData,
    val_data: Sequence[EncodedLike],
    engine: Engine,
    objective: Objective,
    resume_from: Path | str | None | Literal["auto"],
) -> Run:
    """Everything before the first step: checks, model and optimizer on the engine, loaders, schedule, and the
    state (fresh, or restored from a checkpoint: weights, optimizer, scheduler, RNG and data position)."""
    resume_path = _setup_inputs(cfg, train_data, val_data, engine.comm, resume_from)
    engine = pipeline_parallel.pipelined(engine, cfg)  # pipeline_parallel_size > 1: the stages' engine
    model = objective.prepare_model(model)
    _setup_model(model, cfg.gradient_checkpointing, keep_dtype=cfg.pure_bf16)
    mesh = sequence_parallel.setup(model, cfg, engine.comm)  # its attention, before the engine wraps the model
    compiled = compile_blocks(model, cfg, engine.name, engine.device)  # before wrapping too: hooks stay eager
    collator = sequence_parallel.wrap_collator(objective.collator(pad_token_id(tokenizer)), mesh,
                                               pad_token_id(tokenizer))
    loader, val_loader = _setup_loaders(cfg, collator, train_data, val_data, mesh)
    total = total_steps(cfg, loader.rounds_per_epoch)
    engine.setup(model, cfg, total)
    engine.model.train()
    if objective.precomputes:  # with the initial weights: before a checkpoint is loaded
        precompute(engine, EngineCall(engine), objective, [*train_data, *val_data], collator, cfg)
    scheduler = build_scheduler(engine.optimizer, cfg, total)
    state = _setup_state(cfg, engine, loader, scheduler, resume_path, total, mesh)
    tensorboard_dir = Path(cfg.logging_dir or Path(cfg.output_dir) / "runs") if cfg.use_tensorboard else None
    if resume_path is None and cfg.overwrite_output_dir:
        resume.clear_previous_run(Path(cfg.output_dir), tensorboard_dir)
    write_run_info(Path(cfg.output_dir), cfg)
    _log_start(cfg, engine, loader, total, mesh)
    log_speed_features(cfg, engine, objective, compiled)
    observer = RunObserver(Path(cfg.output_dir), total, state.global_step, tensorboard_dir)
    run = Run(cfg, engine, objective, tokenizer, loader, val_loader, scheduler, state, observer, total,
              resumed=resume_path is not None, mesh=mesh, compiled=compiled)
    run.last_saved = state.global_step if run.resumed else None
    return run


def loop(run: Run, callbacks: Sequence[StepCallback] = ()) -> None:
    """Optimizer steps until ``run.total``: one epoch (a pass over a stream) per round of the outer loop."""
    due = periodic_actions(run)
    state, accumulation = run.state, run.cfg.gradient_accumulation_steps
    if run.cfg.eval_on_start and state.global_step == 0:
        evaluate_on_start(run)
    while state.global_step < run.total:
        upcoming = run.loader.windows_from(state.position(), accumulation)
        with closing(prefetch(upcoming, run.cfg.dataloader_num_workers)) as windows:  # closing: stop the thread
            for position, window in windows:
                step(run, position, window, due)
                for callback in callbacks:
                    callback(state)
                if state.global_step >= run.total:
                    break


def step(run: Run, position: DataPosition, window: Sequence[Batch], due: list[tuple[int, Action]]) -> None:
    """One optimizer step on ``window``, the schedule, the state, and whatever is due after it."""
    state, lr = run.state, run.scheduler.get_last_lr()[0]
    started = time.perf_counter()
    result = train_step(run.engine, run.objective, window)
    run.compiled.after_first_step(time.perf_counter() - started)
    run.scheduler.step()
    state.advance(position, run.per_round, result.loss)
    run.interval_tokens += result.tokens
    for name, value in result.metrics.items():
        run.interval_metrics[name] = run.interval_metrics.get(name, 0.0) + value
    run.observer.step()
    outcome = StepOutcome(result, lr)
    for every, action in due:
        if state.global_step % every == 0 or state.global_step == run.total:
            action(run, outcome)

def finish(run: Run) -> TrainResult:
    """The final checkpoint (unless the loop just wrote it), the final model at the root of output_dir, the
    results file and the loss plot; every rank returns once the run folder is complete."""
    cfg, state, engine = run.cfg, run.state, run.engine
    if cfg.save_strategy == "steps" and run.last_saved != state.global_step:
        save(run)
    _save_final_model(run)
    if engine.comm.is_main:
        results = {
            "global_step": state.global_step,
            "epoch": round(state.epoch_float, 4),
            "final_loss": state.last_loss,
            "eval_loss": state.last_eval_loss,
            "train_runtime_s": round(time.perf_counter() - run.started, 3),
        }
        (run.output_dir / "train_results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        if cfg.plot_loss:
            plot_loss(run.output_dir)
    engine.comm.barrier()
    log.info("saved the final %s to %s", "adapter" if ckpt.is_peft_model(engine.unwrapped()) else "model",
             run.output_dir)
    return TrainResult(
        output_dir=run.output_dir,
        global_step=state.global_step,
        final_loss=state.last_loss if state.last_loss is not None else math.nan,
        checkpoints=ckpt.list_checkpoints(run.output_dir),
        eval_loss=state.last_eval_loss,
    )


# ------------------------------------------------------------------------------------------- setup steps


def _setup_inputs(
    cfg: Config,
    train_data: Sequence[EncodedLike] | StreamingData,
    val_data: Sequence[EncodedLike],
    comm: Collectives,
    resume_from: Path | str | None | Literal["auto"],
) -> Path | None:
    """Refuse what cannot train; the checkpoint to resume from (checked against the config)."""
    cfg.require("output_dir")
    if isinstance(train_data, StreamingData):
        pass  # a stream is read while training: every rank reads the same files with the same config
    elif not train_data:
        raise DataError("there are no training samples after preprocessing; check dataset, max_samples and val_size")
    else:
        _check_same_data(comm, train_data, val_data)
    if resume_from == "auto":
        return resume.find_resume_checkpoint(cfg)
    if resume_from is not None:
        resume.check_resume_compatible(cfg, Path(resume_from))
        return Path(resume_from)
    return None


def _setup_model(model: torch.nn.Module, gradient_checkpointing: bool, keep_dtype: bool = False) -> None:
    """Before the engine wraps the model: DDP / FSDP2 wrappers do not expose the HF switches. Trainable weights
    become float32 (optimizer state and updates in float32), unless pure_bf16 keeps them bfloat16."""
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if keep_dtype:
        return
    for param in model.parameters():  # optimizer state and updates in float32, whatever the frozen base's dtype
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


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


def _setup_loaders(
    cfg: Config,
    collator: Collator,
    train_data: Sequence[EncodedLike] | StreamingData,
    val_data: Sequence[EncodedLike],
    mesh: Mesh,
) -> tuple[Loader, EpochLoader | None]:
    # the samples are split over the data-parallel ranks: the ranks of an SP group read the same ones
    shard: dict[str, Any] = dict(rank=mesh.dp_rank, world_size=mesh.data_parallel, collator=collator)
    batch = cfg.per_device_train_batch_size
    loader: Loader
    if isinstance(train_data, StreamingData):
        loader = StreamLoader(train_data, batch, **shard)
    else:
        loader = EpochLoader(train_data, batch, seed=cfg.seed, **shard)
    val_loader = (
        EpochLoader(val_data, cfg.per_device_eval_batch_size, shuffle=False, **shard) if val_data else None
    )
    return loader, val_loader


def _setup_state(
    cfg: Config, engine: Engine, loader: Loader, scheduler: Any, resume_path: Path | None, total: int,
    mesh: Mesh,
) -> TrainState:
    """A fresh state, or the checkpoint's (weights, optimizer, scheduler and RNG restored on the way)."""
    per_round = cfg.per_device_train_batch_size * mesh.data_parallel
    fresh = TrainState(
        total_steps=total,
        batches_per_epoch=loader.rounds_per_epoch or 0,
        sample_index=0,
        samples_per_epoch=loader.samples_per_epoch or 0,
        world_size=engine.comm.world_size,
        global_batch_size=per_round * cfg.gradient_accumulation_steps,
        signature=run_signature(cfg),
    )
    seed_everything(cfg.seed)
    if resume_path is None:
        return fresh
    state = resume.resumed_state(
        engine.load_checkpoint(resume_path, scheduler), fresh, loader.samples_per_epoch, per_round
    )
    log.info(
        "resuming from %s (step %d of %d, %s %d, sample %d of its %s)",
        resume_path,
        state.global_step,
        total,
        "epoch" if loader.samples_per_epoch is not None else "pass",
        state.epoch,
        state.sample_index,
        loader.samples_per_epoch if loader.samples_per_epoch is not None else "stream",
    )
    return state


def _log_start(cfg: Config, engine: Engine, loader: Loader, total: int, mesh: Mesh) -> None:
    world = mesh.data_parallel  # the ranks that read their own samples
    ranks, sharing = (mesh.describe(), " data-parallel") if mesh.enabled else (f"{world} rank(s)", "")
    samples = loader.samples_per_epoch
    log.info(
        "training %s with engine %s on %s: global batch %d = %d per device × %d accumulation × "
        "%d%s rank(s); %s micro-batch rounds per epoch, %d optimizer steps, %s on %s",
        "a stream of samples" if samples is None else f"{samples} samples",
        engine.name,
        ranks,
        cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world,
        cfg.per_device_train_batch_size,
        cfg.gradient_accumulation_steps,
        world,
        sharing,
        loader.rounds_per_epoch if loader.rounds_per_epoch is not None else "?",
        total,
        engine.precision,
        engine.device,
    )


def data_fingerprint(samples: Sequence[EncodedLike]) -> tuple[int, int]:
    """Sample count and a checksum of the sample lengths: cheap, and enough to catch ranks whose preprocessing
    produced different data (say, differing files on two nodes)."""
    lengths = array("q", (len(sample.input_ids) for sample in samples))
    return len(samples), zlib.crc32(lengths.tobytes())


def _check_same_data(comm: Collectives, train_data: Sequence[EncodedLike], val_data: Sequence[EncodedLike]) -> None:
    """Every rank holds its own copy of the samples, so all must hold the same ones: the global permutation is
    only meaningful if it permutes the same list everywhere."""
    if comm.world_size == 1:
        return
    mine = (data_fingerprint(train_data), data_fingerprint(val_data))
    everyone = comm.all_gather_object(mine)
    if any(theirs != mine for theirs in everyone):
        raise DataError(
            "the ranks prepared different data (samples, checksum per rank: "
            f"{[theirs[0] for theirs in everyone]}); every rank must read the same dataset files and config"
        )


# ------------------------------------------------------------------------------------ what is due each step

Action = Callable[[Run, StepOutcome], None]


def periodic_actions(run: Run) -> list[tuple[int, Action]]:
    """What runs every N steps (and at the last step), in this order: log, validation loss, answers to
    evaluation_inputs, checkpoint."""
    cfg = run.cfg
    due: list[tuple[int, Action]] = [(cfg.logging_steps, log_step)]
    if _validates(run):
        due.append((cfg.eval_steps or cfg.logging_steps, log_eval))
    if _answers_questions(run):
        due.append((sample_every(cfg), log_samples))
    if cfg.save_strategy == "steps":
        due.append((cfg.save_steps, lambda run, _: save(run)))
    return due


def _validates(run: Run) -> bool:
    return run.val_loader is not None and run.cfg.eval_strategy == "steps"


def _answers_questions(run: Run) -> bool:
    # rank 0 alone generates, so not under fsdp2 or ZeRO-3, where every rank must join each forward
    return bool(run.cfg.evaluation_inputs) and run.engine.comm.is_main and run.engine.whole_model_on_each_rank


def evaluate_on_start(run: Run) -> None:
    """eval_on_start: the validation metrics and the answers to evaluation_inputs of the untrained model, logged
    as step 0, so every later entry has a baseline to compare with."""
    if _validates(run):
        log_eval(run, None)
    if _answers_questions(run):
        log_samples(run, None)


def log_step(run: Run, outcome: StepOutcome) -> None:
    """Loss (mean over the steps since the last line), lr, gradient norm and throughput of the interval."""
    state, now = run.state, time.perf_counter()
    entry = {
        "step": state.global_step,
        "epoch": round(state.epoch_float, 4),
        "loss": state.interval_loss_sum / state.interval_steps,
        **{name: total / state.interval_steps for name, total in run.interval_metrics.items()},
        "lr": outcome.lr,
        "grad_norm": outcome.result.grad_norm,
        "tokens_per_s": run.interval_tokens / max(now - run.interval_started, 1e-9),
        "elapsed": round(now - run.started, 3),
    }
    state.record(entry)
    run.observer.log(entry)
    state.interval_loss_sum, state.interval_steps = 0.0, 0
    run.interval_started, run.interval_tokens, run.interval_metrics = now, 0, {}


def log_eval(run: Run, outcome: StepOutcome | None) -> None:
    assert run.val_loader is not None
    state = run.state
    report = evaluate(run.engine, run.objective, run.val_loader)
    eval_loss = report["eval_loss"]
    state.last_eval_loss = eval_loss
    state.best_eval_loss = eval_loss if state.best_eval_loss is None else min(state.best_eval_loss, eval_loss)
    entry = {
        "step": state.global_step,
        "epoch": round(state.epoch_float, 4),
        **report,
        "elapsed": round(time.perf_counter() - run.started, 3),
    }
    state.record(entry)
    run.observer.log(entry)


def log_samples(run: Run, outcome: StepOutcome | None) -> None:
    """Answers to fixed questions (evaluation_inputs); uses no global RNG, so exact resume still holds."""
    cfg = run.cfg
    log_sample_generations(run.engine.unwrapped(), run.tokenizer, cfg.template, cfg.evaluation_inputs or [],
                           run.state.global_step, run.output_dir, run.observer.writer,
                           system=cfg.default_system, max_new_tokens=cfg.max_new_tokens)


def save(run: Run) -> None:
    """A checkpoint of this step, then rotation (save_total_limit)."""
    path = run.engine.save_checkpoint(run.output_dir, run.tokenizer, run.scheduler, run.state)
    run.last_saved = run.state.global_step
    if not run.engine.comm.is_main:
        return
    log.debug("saved %s", path)
    for old in ckpt.rotate_checkpoints(run.output_dir, run.cfg.save_total_limit):
        log.debug("save_total_limit %s: deleted %s", run.cfg.save_total_limit, old)


def _save_final_model(run: Run) -> None:
    """The final model or adapter at the root of output_dir; a full disk is one sentence, as for checkpoints."""
    failure = None
    try:
        run.engine.save_model(run.tokenizer, run.output_dir)
    except Exception as err:
        if not ckpt.is_disk_full(err, run.output_dir):
            raise
        failure = str(err)
    if any(run.engine.comm.all_gather_object(failure)):
        raise ckpt.disk_full_error(run.output_dir, "saving the final model", run.engine.unwrapped())
