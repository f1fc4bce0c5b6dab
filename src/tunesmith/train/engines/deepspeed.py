"""``engine: deepspeed``: DeepSpeed ZeRO (stages 0-3, CPU offload) driven by tunesmith's own loop.

``deepspeed.initialize`` builds the engine and its optimizer from the resolved ds_config
(:mod:`tunesmith.config.deepspeed`); the loop keeps everything else: data order, the loss, the lr schedule,
logging and checkpoints.

The loss. The loop hands each micro-batch's token-loss sum divided by the target tokens of the whole window on
all ranks (see ``train_step``), so summing the gradients of all micro-batches of all ranks gives exactly the
gradient of one big batch. DeepSpeed instead expects per-micro-batch means: ``engine.backward`` divides by
``gradient_accumulation_steps`` and ZeRO averages over the data-parallel ranks. We call ``backward(loss ×
world_size, scale_wrt_gas=False)``: no division by the accumulation steps, and the rank average undone, so
DeepSpeed's reduced gradient is the loop's sum, as under DDP and FSDP2. The accumulation boundary is set
explicitly for every micro-batch (``set_gradient_accumulation_boundary``), since an epoch's last window may
hold fewer micro-batches than ``gradient_accumulation_steps``.

The learning rate. tunesmith's LambdaLR drives the lr of DeepSpeed's (inner) optimizer, stepped by the loop as
on every engine; DeepSpeed gets no scheduler. Clipping (``gradient_clipping`` = ``max_grad_norm``) happens
inside DeepSpeed's step, on the global norm, like the other engines'.

Checkpoints hold ``ds/`` (``engine.save_checkpoint``: DeepSpeed's own format and its ``zero_to_fp32.py``, for
DeepSpeed's tools; it only resumes on the same number of ranks), ``dcp/`` (weights, Adam moments and step by
parameter name: :mod:`tunesmith.train.zero_state`; what tunesmith resumes from, on any number of ranks and
with any engine), and the consolidated HF/PEFT weights from rank 0.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch

from tunesmith.config import Config
from tunesmith.config.deepspeed import ResolvedConfig, RunValues, resolve_ds_config, zero_stage
from tunesmith.config.schema import MethodArgs, TrainArgs
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.logging import get_logger
from tunesmith.model.resolve import cache_root
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import zero_state
from tunesmith.train.distributed import Collectives
from tunesmith.train.optim import warmup_steps
from tunesmith.train.optimizers import param_groups
from tunesmith.train.precision import Precision, frozen_base_dtype
from tunesmith.train.state import TrainState

log = get_logger("train")


def extensions_dir() -> str:
    """Where torch compiles DeepSpeed's C++ ops (CPU Adam, …): ``TORCH_EXTENSIONS_DIR``, else the tunesmith
    cache, so the 40-90 s first build happens once per machine and every later run (and rank) reuses it."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    path = str(cache_root() / "torch_extensions")
    os.environ["TORCH_EXTENSIONS_DIR"] = path
    return path


def import_deepspeed(device: torch.device) -> Any:
    """Import DeepSpeed for ``device``: on a CPU its accelerator is named (instead of guessed with a warning)
    and its C++ ops compile into the tunesmith cache; its INFO chatter is kept out of the training output."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    extensions_dir()
    try:
        import deepspeed
    except ImportError:
        raise ConfigError(
            "engine: deepspeed needs DeepSpeed: pip install --no-build-isolation 'tunesmith[deepspeed]' "
            "(--no-build-isolation: its build then uses the installed torch instead of downloading one)"
        ) from None
    from deepspeed.utils import logger as ds_logger

    # DeepSpeed's ZeRO calls a collective torch deprecates; the warning would repeat on every rank
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)

    if not log.isEnabledFor(logging.DEBUG):
        ds_logger.setLevel(logging.WARNING)
    return deepspeed


class DeepSpeedEngine:
    """The :class:`~tunesmith.train.engines.base.Engine` for DeepSpeed ZeRO (see the module docstring)."""

    name: ClassVar[str] = "deepspeed"
    needs_process_group: ClassVar[bool] = True
    model: torch.nn.Module  # the DeepSpeedEngine, once set up
    optimizer: torch.optim.Optimizer  # the torch optimizer inside ZeRO's wrapper (its param groups hold the lr)

    def __init__(self, device: torch.device, precision: Precision = "fp32", comm: Collectives | None = None) -> None:
        self.device = device
        self.precision = precision
        self.comm = comm or Collectives()
        self.resolved: ResolvedConfig | None = None
        self._norm_from_grads = False  # plain ZeRO-0 fp32 reports no gradient norm: measure it ourselves

    @classmethod
    def validate(cls, cfg: Config, world_size: int) -> None:
        if cfg.save_only_model:
            raise ConfigError(
                "save_only_model: true works with the single and ddp engines; DeepSpeed writes weights and optimizer "
                "shards as one distributed checkpoint: set save_only_model: false (or engine: ddp)"
            )
        if cfg.quantization_bit is not None and cfg.use_dora and zero_stage(cfg.deepspeed) == 3:
            # DoRA's weight-norm pass meets a quantized weight ZeRO-3 did not register; ZeRO 0-2 train it
            raise ConfigError(
                f"use_dora: true with quantization_bit: {cfg.quantization_bit} does not work with DeepSpeed ZeRO-3 "
                f"(deepspeed: {cfg.deepspeed}): DoRA re-reads the quantized weights outside ZeRO-3's parameter "
                "gathering; use ZeRO stage 0-2, engine: fsdp2 or ddp, or use_dora: false"
            )

    @property
    def whole_model_on_each_rank(self) -> bool:
        return self.resolved is not None and self.resolved.stage < 3  # ZeRO-3 partitions the parameters

    @property
    def data_replicas(self) -> int:
        return 1

    def load_device(self, quantized: bool) -> torch.device:
        # ZeRO moves only what the rank keeps to the device; a quantized base is quantized where it computes
        return self.device if quantized else torch.device("cpu")

    def load_dtype(self, method: MethodArgs) -> torch.dtype:
        return frozen_base_dtype(method, self.precision, self.device)

    def unwrapped(self) -> torch.nn.Module:
        return self.model.module

    # ------------------------------------------------------------------------------------------- compute

    def setup(self, model: torch.nn.Module, train: TrainArgs, total_steps: int) -> None:
        deepspeed = import_deepspeed(self.device)
        self.resolved = resolve_ds_config(train.deepspeed, self._run_values(model, train, total_steps))
        if self.comm.is_main:
            for message in self.resolved.notes:
                log.info("%s", message)
            for message in self.resolved.warnings:
                log.warning("%s", message)
        log.info(
            "DeepSpeed ZeRO stage %d%s from %s (C++ ops compile once, into %s)",
            self.resolved.stage,
            " with optimizer offload to the CPU" if self.resolved.offload_optimizer else "",
            self.resolved.source,
            extensions_dir(),
        )
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on it, also in a process group of one
        # tunesmith's decay / no-decay groups (no weight decay on biases and norms), as on every engine
        groups = param_groups(model, train.weight_decay)
        with _quiet_stdout():  # DeepSpeed prints op-build notices on every rank
            self.model, ds_optimizer, _, _ = deepspeed.initialize(
                model=model,
                model_parameters=groups,
                config=self.resolved.for_deepspeed,
                dist_init_required=False,
            )
        # ZeRO / bf16 wrappers keep the torch optimizer (whose param groups hold the lr) in .optimizer
        self.optimizer = getattr(ds_optimizer, "optimizer", ds_optimizer)
        self._norm_from_grads = not any(zero_state.zero_managed(p) for p in self.model.module.parameters())

    def _run_values(self, model: torch.nn.Module, train: TrainArgs, total_steps: int) -> RunValues:
        """The run's own values, which fill the ds_config's "auto" entries and must agree with explicit ones."""
        return RunValues(
            micro_batch=train.per_device_train_batch_size,
            accumulation=train.gradient_accumulation_steps,
            world_size=self.comm.world_size,
            max_grad_norm=train.max_grad_norm,
            learning_rate=train.learning_rate,
            betas=(train.adam_beta1, train.adam_beta2),
            eps=train.adam_epsilon,
            weight_decay=train.weight_decay,
            lr_scheduler_type=train.lr_scheduler_type,
            warmup_steps=warmup_steps(train, total_steps),
            total_steps=total_steps,
            precision=self.precision,
            hidden_size=getattr(getattr(model, "config", None), "hidden_size", None),
            on_cpu=self.device.type == "cpu",
        )

    def autocast(self) -> AbstractContextManager:
        return nullcontext()  # DeepSpeed casts the module itself for bf16 / fp16

    def accumulating(self, last: bool) -> AbstractContextManager:
        # the last micro-batch of a window is DeepSpeed's accumulation boundary, however short the window
        self.model.set_gradient_accumulation_boundary(last)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # see the module docstring: undo DeepSpeed's 1/GAS and its average over ranks
        self.model.backward(loss * self.comm.world_size, scale_wrt_gas=False)

    def step(self) -> float:
        measured = None
        if self._norm_from_grads:  # the gradients are whole and reduced by now; DeepSpeed clips in step()
            grads = [p.grad for p in self.model.module.parameters() if p.requires_grad and p.grad is not None]
            measured = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self.model.step()  # clips to gradient_clipping (= max_grad_norm), steps, zeroes the gradients
        norm = self.model.get_global_grad_norm()
        return measured if norm is None else float(norm)

    # ---------------------------------------------------------------------------------------- checkpoints

    def save_model(self, tokenizer: Any, directory: Path) -> None:
        weights = zero_state.gather_weights(self.model.module, self.optimizer, self.comm.rank)
        self._save_consolidated(tokenizer, directory, weights)

    def save_checkpoint(self, output_dir: Path, tokenizer: Any, scheduler: Any, state: TrainState) -> Path:
        return ckpt.write_checkpoint(
            output_dir,
            state,
            scheduler,
            self.comm,
            write=lambda tmp: self._write_state(tmp, tokenizer, state.global_step),
            model=self.model.module,
        )

    def _write_state(self, directory: Path, tokenizer: Any, step: int) -> None:
        with _quiet_stdout():
            self.model.save_checkpoint(
                str(directory / ckpt.DEEPSPEED_DIR),
                tag=f"global_step{step}",
                client_state={"tunesmith_global_step": step},
                exclude_frozen_parameters=True,  # the frozen base comes from model_name_or_path
            )
        zero_state.link_optimizer_fragments(self.model.optimizer)
        weights = zero_state.save_state(
            directory / ckpt.SHARDED_DIR,
            self.model.module,
            self.optimizer,
            self.comm.rank,
            self.comm.world_size,
            gather_weights_on_main=True,
        )
        self._save_consolidated(tokenizer, directory, weights)

    def load_checkpoint(self, path: Path, scheduler: Any) -> TrainState:
        path = ckpt.check_complete(path)
        if not (path / ckpt.SHARDED_DIR).is_dir():
            raise TunesmithError(
                f"{path} was written by engine single or ddp (no {ckpt.SHARDED_DIR}/ folder); engine: "
                "deepspeed cannot resume it yet: resume with engine: ddp (or one process), or start fresh "
                "with another output_dir"
            )
        self._materialize_optimizer_state()
        zero_state.link_optimizer_fragments(self.model.optimizer)
        zero_state.load_state(path / ckpt.SHARDED_DIR, self.model.module, self.optimizer)
        return ckpt.restore_training_state(path, self.optimizer, scheduler, rank=self.comm.rank)

    # ------------------------------------------------------------------------------------------- helpers

    def _materialize_optimizer_state(self) -> None:
        """Adam creates its moments at its first step (and ZeRO links them to the parameters only then), so a
        resume before any step first takes one with zero gradients and lr 0: moments stay 0, weights unchanged
        (torch's DCP ``get_state_dict`` initialises plain optimizers the same way); the loaded values then
        overwrite them, step count included."""
        if self.optimizer.state:
            return
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        self.model.set_gradient_accumulation_boundary(True)
        token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        logits = self.model(input_ids=token, use_cache=False).logits
        self.model.backward(logits.float().sum() * 0.0, scale_wrt_gas=False)
        self.model.step()
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr

    def _save_consolidated(self, tokenizer: Any, directory: Path, trainable: dict[str, torch.Tensor]) -> None:
        """HF/PEFT weights on rank 0: the gathered fp32 trainable weights, plus (full/freeze) the frozen ones,
        which ZeRO-3 must gather too (a collective, so every rank walks the same parameters)."""
        module = self.model.module
        full: dict[str, torch.Tensor] = dict(trainable)
        if not ckpt.is_peft_model(module):
            full.update(self._frozen_weights(module))
            # tied weights (one parameter, two names) go under both names, as in the model's state_dict
            by_object = {id(p): name for name, p in module.named_parameters()}
            for name, param in module.named_parameters(remove_duplicate=False):
                first = by_object.get(id(param))
                if name not in full and first in full:
                    full[name] = full[first]
            if self.comm.is_main:
                params = dict(module.named_parameters(remove_duplicate=False))
                for name, value in module.state_dict().items():  # persistent buffers
                    if name not in full and name not in params:
                        full[name] = value.detach().cpu()
        if self.comm.is_main:
            ckpt.save_model(module, tokenizer, directory, state_dict=full)

    def _frozen_weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        import deepspeed

        frozen = {}
        for name, param in module.named_parameters():
            if param.requires_grad:
                continue
            if hasattr(param, "ds_id"):  # ZeRO-3: partitioned, gather it (all ranks take part)
                with deepspeed.zero.GatheredParameters([param]):
                    if self.comm.is_main:
                        frozen[name] = param.data.detach().cpu().clone()
            elif self.comm.is_main:
                frozen[name] = param.detach().cpu()
        return frozen


@contextlib.contextmanager
def _quiet_stdout():
    """DeepSpeed ``print``s notices (op builds) on every rank; keep them for ``--verbose`` only."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
