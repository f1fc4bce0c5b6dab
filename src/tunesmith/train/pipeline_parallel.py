"""Pipeline parallel (``pipeline_parallel_size: N``) through ``torch.distributed.pipelining``: the decoder layers
of a Llama / Qwen2-family causal LM are cut into N consecutive stages, one per rank of a pipeline group, and the
micro-batches of an accumulation window flow through them under a 1F1B schedule.

The mesh. ``world = DP × PP``; ranks ``[d·N, (d+1)·N)`` form replica ``d`` (rank ``d·N + s`` runs stage ``s``),
and the loader splits the samples over the replicas only (:class:`~tunesmith.train.mesh.Mesh`), so the stages of a
replica collate the very same rows. Every rank creates every pipeline group (one per replica, for the activations'
send / receive) and every stage group (the ranks that hold the same stage in each replica, for the gradients).

The stages (:class:`Stage`). Stage 0 holds the embeddings, the last one the final norm and the head, and the
layers are shared out by count (the first ``L mod N`` stages take one more). Each stage is a module whose
parameter names are the HF model's own (``model.layers.5.mlp.up_proj.weight``), so the stages' state dicts and
optimizer states are pieces of the whole model's and a checkpoint written by the stages loads into one process.
Its inputs are the previous stage's hidden states (stage 0: the token ids) plus, as keyword inputs every stage
receives from its own copy of the batch, the position ids (each stage computes its rotary embeddings from them)
and segment ids: which packed sample, or which pad token, each position belongs to, from which each stage builds
the block-diagonal causal mask that one process would use. What a stage does not hold is freed (moved to the meta
device) once the stage is cut.

A window (:func:`window_inputs`). The schedule splits one tensor into equal micro-batches, so the window's
micro-batches are padded to a common shape (extra rows and columns are pads of their own segment and carry no
labels) and stacked. The last stage's loss per micro-batch is its summed token cross entropy divided by the
target tokens of the whole window on all replicas, as :func:`~tunesmith.train.loop.train_step` normalises, so the
gradients (summed over micro-batches, then over the replicas of each stage) are those of one big batch. 1F1B needs
at least as many micro-batches as stages; a shorter window runs GPipe (all forwards, then all backwards), which
computes the same thing. The clipping norm is taken over all stages' gradients.

Checkpoints (:class:`PipelineEngine`): ``dcp/`` (torch.distributed.checkpoint: each stage writes its parameters and
optimizer state under the HF names), which the single, ddp and fsdp2 engines read on any number of ranks, plus the
stages' weights gathered on rank 0 as a plain HF folder, as for the final model. A single / ddp checkpoint resumes
on stages too: each takes its share of the HF weights and of ``optimizer.pt``.

Not yet: validation (val_size / eval_dataset), fp16, optimizers with their own parameter groups or steps (GaLore,
BAdam, …), heads tied to the embeddings, sliding-window layers; each is refused in one sentence.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file

from tunesmith.config import Config
from tunesmith.config.schema import MethodArgs, TrainArgs
from tunesmith.data.loader import IGNORE_INDEX, Batch
from tunesmith.data.pack import block_causal, segment_carrier
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.logging import get_logger
from tunesmith.model.segment_attention import SEGMENT_ATTENTION
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.distributed import Collectives
from tunesmith.train.mesh import Mesh, mesh_of
from tunesmith.train.objectives.head import token_loss_sum
from tunesmith.train.optimizers import build_optimizer, param_groups
from tunesmith.train.precision import Precision, autocast, frozen_base_dtype
from tunesmith.train.state import TrainState

__all__ = ["PipelineEngine", "Stage", "check_stages", "pipelined", "stage_layers", "validate", "window_inputs"]

log = get_logger("train")

# the masks a stage builds are these implementations' (bool / additive float; segment ids for attention by segments)
_ATTENTION = ("sdpa", "eager", SEGMENT_ATTENTION)


# ------------------------------------------------------------------------------------------------ the split


def stage_layers(layers: int, stages: int) -> list[range]:
    """Consecutive layer ranges, one per stage, balanced by count (the first ``layers % stages`` get one more)."""
    check_stages(layers, stages)
    base, extra = divmod(layers, stages)
    ranges, start = [], 0
    for stage in range(stages):
        end = start + base + (stage < extra)
        ranges.append(range(start, end))
        start = end
    return ranges


def check_stages(layers: int, stages: int) -> None:
    if stages > layers:
        raise ConfigError(f"pipeline_parallel_size: {stages} asks for more stages than the model's {layers} decoder "
                          f"layers; set pipeline_parallel_size to at most {layers}")


def validate(cfg: Config, world_size: int) -> None:
    """Before anything is loaded (and before launching): a stage per rank of each group, at least one layer per
    stage when the model's config.json says how many there are."""
    from tunesmith.train.sequence_parallel import saved_model_config

    stages = cfg.pipeline_parallel_size
    if stages == 1:
        return
    special = [key for key in ("use_galore", "use_apollo", "use_badam", "use_adam_mini", "use_muon")
               if getattr(cfg, key, False)] + (["loraplus_lr_ratio"] if getattr(cfg, "loraplus_lr_ratio", None) else [])
    if special:
        raise ConfigError(f"pipeline_parallel_size: {stages} steps a plain optimizer (optim), not {special[0]}; "
                          f"remove {special[0]} or set pipeline_parallel_size: 1")
    if world_size % stages:
        raise ConfigError(f"pipeline_parallel_size: {stages} needs a multiple of {stages} ranks but this job runs "
                          f"{world_size}; launch a multiple of {stages} processes or change pipeline_parallel_size")
    saved = saved_model_config(cfg) or {}
    layers = saved.get("num_hidden_layers")
    if isinstance(layers, int):
        check_stages(layers, stages)


class Stage(torch.nn.Module):
    """One stage of an HF Llama / Qwen2-family causal LM (see the module docstring); its parameter names are the
    whole model's. ``forward(inputs, position_ids, segments)``: token ids (stage 0) or hidden states in; hidden
    states out (the last stage: after the final norm; the loss runs its head, see :meth:`PipelineEngine._loss`)."""

    def __init__(self, model: torch.nn.Module, index: int, layers: range, last: bool) -> None:
        super().__init__()
        inner = model.model
        self.first, self.last = index == 0, last
        self.attention = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
        self.model = torch.nn.Module()  # the HF names: model.embed_tokens, model.layers.<i>, model.norm, lm_head
        if self.first:
            self.model.embed_tokens = inner.embed_tokens
        self.model.layers = torch.nn.ModuleDict({str(i): inner.layers[i] for i in layers})
        self.model.rotary_emb = inner.rotary_emb
        if last:
            self.model.norm = inner.norm
            self.lm_head = model.lm_head

    def forward(self, inputs: torch.Tensor, position_ids: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        hidden = self.model.embed_tokens(inputs) if self.first else inputs
        rotary = self.model.rotary_emb(hidden, position_ids=position_ids)
        mask = self._mask(segments, hidden.dtype)
        for layer in self.model.layers.values():
            out = layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary)
            hidden = out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple
        return self.model.norm(hidden) if self.last else hidden

    def _mask(self, segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.attention == SEGMENT_ATTENTION:
            return segment_carrier(segments)
        allowed = block_causal(segments)[:, None]  # [B, 1, T, T]: causal within each sample (each pad: itself)
        if self.attention == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)


def split_model(model: torch.nn.Module, mesh: Mesh) -> Stage:
    """This rank's stage of ``model``; the parts other stages hold are freed (moved to the meta device)."""
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")) or not hasattr(
            model, "lm_head"):
        raise ConfigError(f"pipeline_parallel_size: {mesh.pipeline_parallel} splits Llama / Qwen2-family causal LMs "
                          f"(model.embed_tokens, .layers, .norm, lm_head), not {type(model).__name__}; set "
                          "pipeline_parallel_size: 1")
    config = model.config
    attention = getattr(config, "_attn_implementation", "sdpa") or "sdpa"
    if attention not in _ATTENTION:
        raise ConfigError(f"pipeline_parallel_size: {mesh.pipeline_parallel} runs attention sdpa or eager, not "
                          f"{attention}; set flash_attn: sdpa (or auto)")
    if getattr(config, "tie_word_embeddings", False) and model.lm_head.weight is inner.embed_tokens.weight:
        raise ConfigError(f"pipeline_parallel_size: {mesh.pipeline_parallel} needs an LM head of its own, but "
                          f"{type(model).__name__} ties it to the embeddings (tie_word_embeddings) across the first "
                          "and last stage; set pipeline_parallel_size: 1 or use fsdp2")
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        raise ConfigError(f"pipeline_parallel_size: {mesh.pipeline_parallel} builds full causal masks, but the model "
                          "has sliding-window layers (layer_types); set pipeline_parallel_size: 1")
    ranges = stage_layers(len(inner.layers), mesh.pipeline_parallel)
    index = mesh.pp_rank
    stage = Stage(model, index, ranges[index], last=index == mesh.pipeline_parallel - 1)
    kept = {id(p) for p in stage.parameters()}
    for module in [inner.embed_tokens, *inner.layers, inner.norm, model.lm_head]:
        if not any(id(p) in kept for p in module.parameters()):
            module.to("meta")
    return stage


# ------------------------------------------------------------------------------------------------ the data


def segment_ids(batch: Batch) -> torch.Tensor:
    """[B, T]: each position's sample (its start position) in a packed row, 0 in a plain row, and every pad its
    own (its position): :func:`~tunesmith.data.pack.block_causal` of them is the mask one process uses."""
    if batch.segments is not None:  # collated rows, packed or not
        return batch.segments
    positions = torch.arange(batch.input_ids.size(1)).expand_as(batch.input_ids)
    return torch.where(batch.attention_mask.bool(), torch.zeros_like(positions), positions)


def window_inputs(window: Sequence[Batch], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The window's micro-batches padded to one shape and stacked: ``input_ids``, ``labels``, ``position_ids`` and
    ``segments``, each ``[micro-batches × rows, width]``; padding is its own segment and has no labels."""
    rows = max(batch.input_ids.size(0) for batch in window)
    width = max(batch.input_ids.size(1) for batch in window)
    parts: dict[str, list[torch.Tensor]] = {"input_ids": [], "labels": [], "position_ids": [], "segments": []}
    for batch in window:
        n, w = batch.input_ids.shape
        given = {
            "input_ids": batch.input_ids, "labels": batch.labels, "segments": segment_ids(batch),
            "position_ids": batch.position_ids if batch.position_ids is not None
            else torch.arange(w).expand(n, w),
        }
        fill = {"input_ids": torch.full((rows, width), pad_token_id), "labels": torch.full((rows, width), IGNORE_INDEX),
                "position_ids": torch.zeros((rows, width), dtype=torch.long),
                "segments": torch.arange(width).expand(rows, width).clone()}
        for name, tensor in given.items():
            fill[name][:n, :w] = tensor
            parts[name].append(fill[name])
    return {name: torch.cat(tensors).long() for name, tensors in parts.items()}


# ------------------------------------------------------------------------------------------------ the engine


def pipelined(engine: Any, cfg: Config) -> Any:
    """The engine the loop runs: ``engine`` itself, or with ``pipeline_parallel_size > 1`` a
    :class:`PipelineEngine` on its device, precision and process group."""
    if cfg.pipeline_parallel_size == 1 or isinstance(engine, PipelineEngine):
        return engine
    return PipelineEngine(engine.device, engine.precision, engine.comm, cfg.pipeline_parallel_size)


class PipelineEngine:
    """The stages of one model, replicated over data parallel (see the module docstring). The loop runs a whole
    window through :meth:`train_window` instead of forward / backward per micro-batch."""

    name: ClassVar[str] = "ddp"  # each stage replicated over data parallel, as ddp replicates the model
    needs_process_group: ClassVar[bool] = True
    model: torch.nn.Module  # this rank's Stage
    optimizer: torch.optim.Optimizer

    def __init__(self, device: torch.device, precision: Precision, comm: Collectives, stages: int) -> None:
        self.device, self.precision, self.comm, self.stages = device, precision, comm, stages
        self.full: torch.nn.Module | None = None
        self.pad_token_id = 0
        self.head: Any = None
        self.denominator = 1
        self._schedule: tuple[tuple[int, ...], Any] | None = None
        self.max_grad_norm = 1.0

    @classmethod
    def validate(cls, cfg: Config, world_size: int) -> None:
        validate(cfg, world_size)

    @property
    def whole_model_on_each_rank(self) -> bool:
        return False

    @property
    def data_replicas(self) -> int:
        """How many ranks run the same rows: the stages of a replica."""
        return self.stages

    def load_device(self, quantized: bool) -> torch.device:
        return self.device

    def load_dtype(self, method: MethodArgs) -> torch.dtype:
        return frozen_base_dtype(method, self.precision, self.device)

    def setup(self, model: torch.nn.Module, train: TrainArgs, total_steps: int) -> None:
        self.mesh = mesh_of(train, self.comm)  # type: ignore[arg-type]  # a Config
        self.pp_group, self.dp_group = _groups(self.mesh)
        self.full = model
        self.model = split_model(model, self.mesh).to(self.device)
        self.optimizer = build_optimizer(self.model, train, train)  # type: ignore[arg-type]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.max_grad_norm = train.max_grad_norm
        self.accumulation = train.gradient_accumulation_steps
        pad = getattr(model.config, "pad_token_id", None)
        self.pad_token_id = pad if isinstance(pad, int) else 0
        layers = [int(name) for name in self.model.model.layers]
        log.info("pipeline parallel: %s; rank %d runs stage %d of %d (layers %d-%d), schedule %s over %d "
                 "micro-batches", self.mesh.describe(), self.mesh.rank, self.mesh.pp_rank,
                 self.mesh.pipeline_parallel, layers[0], layers[-1], self._schedule_name(), self.accumulation)

    def _schedule_name(self) -> str:
        return "1F1B" if self.accumulation >= self.mesh.pipeline_parallel else "GPipe (fewer micro-batches than stages)"

    def autocast(self) -> AbstractContextManager:
        return autocast(self.precision, self.device)

    def unwrapped(self) -> torch.nn.Module:
        return self.full if self.full is not None else self.model

    # ------------------------------------------------------------------------------------------ a step

    def train_window(self, objective: Any, window: Sequence[Batch]) -> tuple[float, int, int, float]:
        """One optimizer step over ``window``: (mean loss per target over all replicas, targets, tokens,
        pre-clip gradient norm), as :func:`~tunesmith.train.loop.train_step` reports them."""
        stages = self.mesh.pipeline_parallel
        # every stage of a replica holds the same rows: the world's sums count each replica `stages` times
        units, tokens = (int(x) // stages for x in self.comm.all_reduce_sum(
            [sum(objective.units(b) for b in window), sum(objective.tokens(b) for b in window)]))
        self.denominator = max(units, 1)
        self.head = getattr(objective, "head", None)  # sft / pt: their LMHead
        inputs = {k: v.to(self.device) for k, v in window_inputs(window, self.pad_token_id).items()}
        schedule = self._schedule_for(len(window), inputs["input_ids"].shape)
        losses: list[torch.Tensor] = []
        kwargs = {"position_ids": inputs["position_ids"], "segments": inputs["segments"]}
        args = (inputs["input_ids"],) if self.mesh.pp_rank == 0 else ()
        last = self.mesh.pp_rank == stages - 1
        with self.autocast():
            schedule.step(*args, target=inputs["labels"] if last else None, losses=losses if last else None,
                          return_outputs=False, **kwargs)
        self._reduce_gradients()
        norm = self._clip_and_step()
        mine = float(sum(float(loss.detach()) for loss in losses)) if last else 0.0
        return self.comm.all_reduce_sum([mine])[0], units, tokens, norm

    def _loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The last stage's loss of one micro-batch: its summed cross entropy through the objective's LM head (on
        the target positions only, fused in chunks with loss_chunk_size), over the window's targets."""
        call = _HeadCall(self.model.lm_head, hidden)
        if self.head is None:
            return token_loss_sum(call().logits, labels) / self.denominator
        return self.head.loss_sum(call, {"input_ids": labels}, labels) / self.denominator

    def _schedule_for(self, micro_batches: int, shape: torch.Size) -> Any:
        """The stage and schedule for windows of this shape (made anew when the shape changes: the stages
        exchange fixed-shape buffers)."""
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        key = (micro_batches, *shape)
        if self._schedule is not None and self._schedule[0] == key:
            return self._schedule[1]
        rows, width = shape[0] // micro_batches, shape[1]
        hidden_size = self.full.config.hidden_size  # type: ignore[union-attr]
        dtype = next(self.model.parameters()).dtype
        # requires_grad: the stages exchange these tensors' gradients in backward
        hidden = torch.empty((rows, width, hidden_size), dtype=dtype, device="meta", requires_grad=True)
        first = self.mesh.pp_rank == 0
        inputs = torch.empty((rows, width), dtype=torch.long, device="meta") if first else hidden
        stage = PipelineStage(self.model, self.mesh.pp_rank, self.mesh.pipeline_parallel, self.device,
                              input_args=inputs, output_args=hidden, group=self.pp_group)
        kind = Schedule1F1B if micro_batches >= self.mesh.pipeline_parallel else ScheduleGPipe
        schedule = kind(stage, micro_batches, loss_fn=self._loss, scale_grads=False)
        self._schedule = (key, schedule)
        return schedule

    def _reduce_gradients(self) -> None:
        """Sum each stage's gradients over its replicas (each is a share of one big batch's)."""
        if self.dp_group is None:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in self.params if p.grad is not None]
        flat = _flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat, group=self.dp_group)
        for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(reduced)

    def _clip_and_step(self) -> float:
        """clip_grad_norm_ over the whole model (the norm summed over the stages), step, zero the gradients."""
        grads = [p.grad for p in self.params if p.grad is not None]
        squares = torch.zeros((), dtype=torch.float32, device=self.device)
        if grads:
            squares = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) ** 2
        torch.distributed.all_reduce(squares, group=self.pp_group)
        norm = squares.sqrt()
        if self.max_grad_norm > 0 and grads:
            torch._foreach_mul_(grads, torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    # ------------------------------------------------------------------------------------------ checkpoints

    def save_model(self, tokenizer: Any, directory: Path) -> None:
        """The stages' weights gathered on rank 0 and written as one HF folder (every rank must call it)."""
        mine = {k: v.detach().cpu() for k, v in self.model.state_dict().items()} if self.mesh.dp_rank == 0 else {}
        gathered: list[Any] = [None] * self.comm.world_size if self.comm.is_main else []
        torch.distributed.gather_object(mine, gathered if self.comm.is_main else None, dst=0)
        if self.comm.is_main:
            whole = {k: v for part in gathered for k, v in part.items()}
            ckpt.save_model(self.unwrapped(), tokenizer, directory, state_dict=whole)

    def save_checkpoint(self, output_dir: Path, tokenizer: Any, scheduler: Any, state: TrainState) -> Path:
        from tunesmith.train.sharded import save_sharded

        def write(tmp: Path) -> None:
            save_sharded(Path(tmp) / ckpt.SHARDED_DIR, self.model, self.optimizer)
            self.save_model(tokenizer, tmp)

        return ckpt.write_checkpoint(output_dir, state, scheduler, self.comm, write=write, model=self.model)

    def load_checkpoint(self, path: Path, scheduler: Any) -> TrainState:
        """From the stages' ``dcp/`` (any layout), or from a single / ddp checkpoint: this stage's share of its
        HF weights and of ``optimizer.pt``, whose states are numbered by the whole model's parameter groups."""
        path = ckpt.check_complete(path)
        if (path / ckpt.SHARDED_DIR).is_dir() or not (path / ckpt.OPTIMIZER_FILE).is_file():
            return ckpt.load_checkpoint(path, self.model, self.optimizer, scheduler, rank=self.comm.rank)
        saved: dict[str, torch.Tensor] = {}
        for shard in sorted(path.glob("model*.safetensors")):
            saved.update(load_file(shard, device="cpu"))
        mine = self.model.state_dict()
        missing = [name for name in mine if name not in saved]
        if missing:
            raise TunesmithError(f"the checkpoint {path} lacks this stage's weight {missing[0]}; resume with the "
                                 "same model or use another output_dir")
        self.model.load_state_dict({name: saved[name] for name in mine})
        whole = torch.load(path / ckpt.OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(_stage_optimizer_state(whole, self.unwrapped(), self.model, self.optimizer))
        return ckpt.restore_training_state(path, self.optimizer, scheduler, rank=self.comm.rank)


def _names_in_order(model: torch.nn.Module) -> list[str]:
    """The trainable parameters' names in the order build_optimizer numbers them (its decay / no-decay groups)."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for group in param_groups(model, 0.0) for p in group["params"]]


def _stage_optimizer_state(whole: dict, model: torch.nn.Module, stage: torch.nn.Module,
                           optimizer: torch.optim.Optimizer) -> dict:
    """The whole model's optimizer state dict (single / ddp) cut down to this stage's parameters, renumbered."""
    index = {name: i for i, name in enumerate(_names_in_order(model))}
    own = optimizer.state_dict()
    names = _names_in_order(stage)
    state = {i: whole["state"][index[name]] for i, name in enumerate(names) if index[name] in whole["state"]}
    return {"state": state, "param_groups": own["param_groups"]}


class _HeadCall:
    """The LM head on the last stage's hidden states, called as objectives call a model (``.logits``)."""

    def __init__(self, head: torch.nn.Module, hidden: torch.Tensor) -> None:
        self.head, self.hidden, self.device = head, hidden, hidden.device

    def __call__(self, **inputs: Any) -> Any:
        return SimpleNamespace(logits=self.head(self.hidden))


def _groups(mesh: Mesh) -> tuple[Any, Any]:
    """(this rank's pipeline group, its stage's data-parallel group or None); every rank creates every group,
    in the same order."""
    stages, replicas = mesh.pipeline_parallel, mesh.data_parallel
    mine: list[Any] = [None, None]
    for replica in range(replicas):
        group = torch.distributed.new_group([replica * stages + s for s in range(stages)])
        if replica == mesh.dp_rank:
            mine[0] = group
    if replicas > 1:
        for stage in range(stages):
            group = torch.distributed.new_group([d * stages + stage for d in range(replicas)])
            if stage == mesh.pp_rank:
                mine[1] = group
    return mine[0], mine[1]
