"""Sequence parallel, DeepSpeed-Ulysses style (``sequence_parallel_size: N``): the ranks of an SP group train the
same rows, each holding 1/N of every row's tokens, so the activations per rank shrink by about 1/N.

The mesh. ``world = DP × SP``; ranks ``[g·N, (g+1)·N)`` form SP group ``g``, which is data-parallel rank ``g``:
the loader splits the samples over the DP ranks only (:class:`Mesh`), so the ranks of a group collate the very same
rows. Parameters are replicated over the SP ranks as over the DP ranks, so the engines need nothing new: DDP and
FSDP2 reduce gradients over the whole world, which sums every rank's share (see "Gradients" below).

The data (:class:`SequenceParallelCollator`). A collated micro-batch is padded so its width divides by N
(padding is a segment of its own and carries no labels), then each rank keeps its slice of N: the input ids, the
position ids of the *full* row (restarting per packed sample; ``0..width`` unpacked) and the labels shifted on the
full row before the split, so the last token of a slice predicts the first token of the next one. Such a slice
carries one label more than tokens (column ``t + 1`` is position ``t``'s target; see
:func:`~tunesmith.train.objectives.head.shifted_labels`), so the objectives' token counts and losses cover
exactly the slice's targets. The segment ids of the full rows (which packed sample each token belongs to) go to
the model as one keyword argument, which transformers hands on to every attention call.

The attention (:class:`UlyssesAttention`, registered through transformers' ``AttentionInterface``; no model file
is patched). Per layer, one all-to-all turns ``[B, H, T/N, D]`` (all heads, this rank's tokens) into
``[B, H/N, T, D]`` (this rank's heads, every token), each sample of the full row attends to itself with plain
causal SDPA (:func:`~tunesmith.model.segment_attention.segment_sdpa`, by the full rows' segment ids: no
``T × T`` mask is built, and no sample sees another), and a second all-to-all turns the output back. Both are differentiable (the backward of an all-to-all
is the reverse all-to-all), so each rank's loss sends gradients into the other ranks' activations.
Key/value heads follow their query heads; when N does not divide them (GQA) they are repeated up to the query
heads first. N must divide the query heads (:func:`check_heads` says which sizes work).

Loss and gradients. Each rank's loss is the sum over its slice's targets; the loop divides by the targets of the
whole window summed over all ranks, which counts every target of a row once (its SP ranks hold disjoint slices).
Backward on every rank yields, on rank r, the gradient of the *total* loss through rank r's own use of the
parameters (the all-to-all backward routes the other ranks' loss gradients back to it), so the sum over all ranks
(DDP's / FSDP2's average × the world size, as the engines already scale it) is the gradient of one big batch.

Without the segment ids (rank 0 answering ``evaluation_inputs`` alone, say) the attention is plain SDPA on what
the rank holds, so the model still works as a whole model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tunesmith.config import Config
from tunesmith.data.loader import IGNORE_INDEX, Batch, Collator, EncodedLike
from tunesmith.data.pack import row_segments
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.logging import get_logger
from tunesmith.model.eager import eager_only
from tunesmith.model.segment_attention import SegmentAttention, attend_by_segments
from tunesmith.train.distributed import Collectives
from tunesmith.train.mesh import Mesh
from tunesmith.train.mesh import mesh_of as _mesh_of

log = get_logger("train")

ATTENTION_NAME = "tunesmith_ulysses"  # the name registered with transformers' AttentionInterface
SEGMENTS_KWARG = "tunesmith_sp_segments"  # the model keyword that carries the full rows' segment ids

__all__ = [
    "ATTENTION_NAME",
    "Mesh",
    "SequenceParallelBatch",
    "SequenceParallelCollator",
    "UlyssesAttention",
    "check_heads",
    "check_world",
    "mesh_of",
    "setup",
    "split_batch",
    "validate",
]


# ------------------------------------------------------------------------------------------------ the mesh


def mesh_of(cfg: Config, comm: Collectives) -> Mesh:
    """This rank's mesh for ``cfg`` (after :func:`check_world`)."""
    check_world(cfg.sequence_parallel_size, comm.world_size)
    return _mesh_of(cfg, comm)


# ------------------------------------------------------------------------------------------------ checks


def check_world(size: int, world_size: int) -> None:
    """Refuse a world the SP groups cannot tile."""
    if size > 1 and world_size % size:
        raise ConfigError(
            f"sequence_parallel_size: {size} needs a multiple of {size} ranks but this job runs {world_size}; "
            f"launch a multiple of {size} processes (--nproc-per-node) or lower sequence_parallel_size"
        )


def working_sizes(query_heads: int) -> list[int]:
    """The sequence_parallel_size values a model with ``query_heads`` query heads can run (besides 1)."""
    return [n for n in range(2, query_heads + 1) if query_heads % n == 0]


def check_heads(query_heads: int, kv_heads: int, size: int) -> None:
    """Each rank attends with query_heads / size heads, so size must divide them (key/value heads that it does not
    divide are repeated up to the query heads)."""
    if size > 1 and query_heads % size:
        sizes = working_sizes(query_heads)
        which = " or ".join(map(str, sizes)) if sizes else "none above 1"
        raise ConfigError(
            f"sequence_parallel_size: {size} does not divide this model's {query_heads} query heads ({query_heads} "
            f"query and {kv_heads} key/value heads), so each rank could not take an equal share of them; sizes that "
            f"work: {which} (or 1: no sequence parallel)"
        )


def head_counts(config: Any) -> tuple[int, int] | None:
    """(query heads, key/value heads) of an HF config object or config.json dict; None when it names neither."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    heads = get("num_attention_heads")
    if not isinstance(heads, int):
        text = get("text_config")  # multimodal configs keep the decoder's under text_config
        return head_counts(text) if text is not None and text is not config else None
    kv_heads = get("num_key_value_heads")
    return heads, kv_heads if isinstance(kv_heads, int) else heads


def saved_model_config(cfg: Config) -> dict | None:
    """The model folder's config.json (a packaged alias: its converted copy), if it is there already: read before
    launching, so a bad size is one sentence instead of an error on every rank."""
    if not cfg.model_name_or_path:
        return None
    from tunesmith.model.resolve import PACKAGED_MODELS, cache_root

    path = Path(cfg.model_name_or_path).expanduser()
    alias = str(cfg.model_name_or_path).strip().lower()
    if alias in PACKAGED_MODELS and not path.exists():
        path = cache_root(cfg.cache_dir) / "models" / alias
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None  # not a folder with a config yet (GGUF, a typo): checked once the model is loaded
    return data if isinstance(data, dict) else None


def _saved_head_counts(cfg: Config) -> tuple[int, int] | None:
    data = saved_model_config(cfg)
    return None if data is None else head_counts(data)


def _remote_code_sentence(key: str, size: int, name: str) -> str:
    return (f"{key}: {size} needs a model implemented in transformers itself (its attention goes through "
            f"AttentionInterface, its layers by their names), but {name} runs its own remote modelling code, "
            "which picks its attention by itself and would silently ignore the split; for InternLM2, convert the "
            "model once to the Llama layout (InternLM's tools/convert2llama.py) and train that folder without "
            f"trust_remote_code, or set {key}: 1")


def check_native(model_class: type, key: str, size: int) -> None:
    """Refuse a model whose class comes from remote code (``transformers_modules``), which no hook reaches."""
    if size > 1 and model_class.__module__.startswith("transformers_modules"):
        raise ConfigError(_remote_code_sentence(key, size, model_class.__name__))


def check_saved_native(cfg: Config, key: str, size: int) -> None:
    """Before launching: a config.json that maps to remote code with trust_remote_code on is refused."""
    data = saved_model_config(cfg)
    if size > 1 and cfg.trust_remote_code and data and "AutoModelForCausalLM" in (data.get("auto_map") or {}):
        raise ConfigError(_remote_code_sentence(key, size, str(data.get("architectures", ["this model"])[0])))


def validate(cfg: Config, world_size: int) -> None:
    """Before anything is loaded (and before launching): the world tiles into SP groups, and the model's heads
    split over them when its config.json says how many there are. The rest is refused by the config itself."""
    size = cfg.sequence_parallel_size
    if size == 1:
        return
    check_world(size, world_size)
    check_saved_native(cfg, "sequence_parallel_size", size)
    counts = _saved_head_counts(cfg)
    if counts is not None:
        check_heads(*counts, size)


# ------------------------------------------------------------------------------------------------ the data


@dataclass
class SequenceParallelBatch(Batch):
    """This rank's slice of a micro-batch (see the module docstring): ``labels`` hold one column more than the
    tokens (shifted on the full row), ``segments`` the segment ids of the full rows ``[batch, width]``."""

    def model_inputs(self, attention: str = "segments") -> dict[str, torch.Tensor]:
        # no attention mask: the attention works from the full rows' segments, and transformers makes none for an
        # attention function without a mask function of its own
        return {"input_ids": self.input_ids, "position_ids": self.position_ids,  # type: ignore[dict-item]
                SEGMENTS_KWARG: self.segments}  # type: ignore[dict-item]

    def to(self, device: torch.device | str) -> SequenceParallelBatch:
        return SequenceParallelBatch(**vars(super().to(device)))


def sample_lengths(sample: EncodedLike) -> list[int]:
    """The lengths of the samples in one row: a packed row's ``seq_lens``, else the row itself."""
    return list(getattr(sample, "seq_lens", None) or [len(sample.input_ids)])


def split_batch(batch: Batch, lengths: Sequence[Sequence[int]], mesh: Mesh, pad_token_id: int) -> SequenceParallelBatch:
    """This rank's slice of ``batch`` (full rows, right-padded; ``lengths``: each row's sample lengths)."""
    rows, width = batch.input_ids.shape
    size = mesh.sequence_parallel
    full = -(-width // size) * size  # padded so every rank holds as many tokens
    extra = full - width
    input_ids = F.pad(batch.input_ids, (0, extra), value=pad_token_id)
    # position t's target is token t + 1 of the full row: shifted before the split, so none is lost at a boundary
    targets = F.pad(batch.labels[:, 1:], (0, 1 + extra), value=IGNORE_INDEX)
    if batch.position_ids is None:  # unpacked: what the model would count itself, over the full row
        positions = torch.arange(full).expand(rows, full)
    else:  # packed: restarting per sample; padding at 0, as collate pads
        positions = F.pad(batch.position_ids, (0, extra), value=0)
    in_sample = torch.arange(full)[None, :] < torch.tensor([sum(lens) for lens in lengths])[:, None]
    step = full // size
    mine = slice(mesh.sp_rank * step, (mesh.sp_rank + 1) * step)
    labels = torch.cat([torch.full((rows, 1), IGNORE_INDEX, dtype=targets.dtype), targets[:, mine]], dim=1)
    return SequenceParallelBatch(
        input_ids=input_ids[:, mine].clone(),
        labels=labels,
        attention_mask=in_sample[:, mine].long(),
        position_ids=positions[:, mine].clone(),
        reference_logps=batch.reference_logps,
        segments=row_segments(lengths, full),
    )


@dataclass(frozen=True)
class SequenceParallelCollator:
    """Wraps an objective's collator: the same full rows on every rank of an SP group, each keeping its slice."""

    inner: Collator
    mesh: Mesh
    pad_token_id: int

    def collate(self, samples: Sequence[EncodedLike]) -> Batch:
        return split_batch(self.inner.collate(samples), [sample_lengths(s) for s in samples], self.mesh,
                           self.pad_token_id)

    def masked(self, sample: EncodedLike) -> Batch:
        return split_batch(self.inner.masked(sample), [sample_lengths(sample)], self.mesh, self.pad_token_id)


def wrap_collator(collator: Collator, mesh: Mesh, pad_token_id: int) -> Collator:
    """``collator`` itself without sequence parallel."""
    return SequenceParallelCollator(collator, mesh, pad_token_id) if mesh.sequence_parallel > 1 else collator


# ------------------------------------------------------------------------------------------------ attention


class _AllToAll(torch.autograd.Function):
    """Part i of dim 0 goes to rank i of ``group``; part i of the result came from rank i. Its backward is the same
    exchange of the gradients, the other way (torch's own differentiable one is deprecated)."""

    @staticmethod
    def forward(ctx: Any, send: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        received = torch.empty_like(send)
        torch.distributed.all_to_all_single(received, send.contiguous(), group=group)
        return received

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllToAll.apply(grad.contiguous(), ctx.group), None


def _all_to_all(send: torch.Tensor, group: Any) -> torch.Tensor:
    return _AllToAll.apply(send, group)


def scatter_heads(tensors: Sequence[torch.Tensor], group: Any, size: int) -> list[torch.Tensor]:
    """``[B, h, t, D]`` each (all heads, this rank's t tokens) → ``[B, h/size, size·t, D]`` (this rank's share of
    the heads, every token in order), in one all-to-all when the head dims agree."""
    if len({x.size(-1) for x in tensors}) > 1:
        return [part for x in tensors for part in scatter_heads([x], group, size)]
    b, _, t, d = tensors[0].shape
    # [size, B, h/size, t, D]: part j (heads j·h/size onwards) goes to rank j
    parts = [x.reshape(b, size, x.size(1) // size, t, d).transpose(0, 1) for x in tensors]
    received = _all_to_all(torch.cat(parts, dim=2).contiguous(), group)  # part i: rank i's tokens
    whole = received.permute(1, 2, 0, 3, 4).reshape(b, -1, size * t, d)
    return list(whole.split([x.size(1) // size for x in tensors], dim=1))


def gather_heads(x: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """The inverse of :func:`scatter_heads` for one tensor: ``[B, h/size, T, D]`` → ``[B, h, T/size, D]``."""
    b, heads, width, d = x.shape
    step = width // size
    parts = x.reshape(b, heads, size, step, d).permute(2, 0, 1, 3, 4).contiguous()  # part j: rank j's tokens
    received = _all_to_all(parts, group)  # part i: rank i's heads
    return received.permute(1, 0, 2, 3, 4).reshape(b, size * heads, step, d)


class UlyssesAttention(SegmentAttention):
    """A transformers attention function (see the module docstring) for the SP group ``group`` of ``size``
    ranks. The samples of the rows being trained are read once per forward and shared by the layers."""

    def __init__(self, group: Any, size: int) -> None:
        super().__init__()
        self.group = group
        self.size = size

    # torch_compile compiles whole decoder blocks; this part stays eager, the rest of the block compiled (traced by
    # dynamo, the all-to-alls inside the autograd Function gave other gradients: losses 1e-3 off by step 2)
    @eager_only
    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        segments = kwargs.pop(SEGMENTS_KWARG, None)
        if segments is None:  # not a sequence-parallel batch: the whole sequence is here
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if kwargs.get("softcap") is not None:
            raise TunesmithError("sequence_parallel_size > 1 cannot run a model that soft-caps its attention "
                                 "scores; set sequence_parallel_size: 1")
        heads, kv_heads = query.size(1), key.size(1)
        if kv_heads % self.size:  # GQA with fewer key/value heads than ranks: give each query head its own copy
            key = key.repeat_interleave(heads // kv_heads, dim=1)
            value = value.repeat_interleave(heads // kv_heads, dim=1)
        q, k, v = scatter_heads([query, key, value], self.group, self.size)
        out = attend_by_segments(q, k, v, self.runs(segments), scaling=kwargs.get("scaling"),
                                 dropout=kwargs.get("dropout", 0.0), sliding_window=kwargs.get("sliding_window"))
        return gather_heads(out, self.group, self.size).transpose(1, 2).contiguous(), None


# ------------------------------------------------------------------------------------------------ install


def _base_model(model: torch.nn.Module) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def install(model: torch.nn.Module, size: int, group: Any) -> None:
    """Register the all-to-all attention for ``group`` and switch ``model`` (a PEFT wrapper's base too) to it."""
    from transformers import AttentionInterface

    base = _base_model(model)
    check_native(type(base), "sequence_parallel_size", size)
    counts = head_counts(base.config)
    if counts is None:
        raise ConfigError(f"sequence_parallel_size: {size} needs a model whose config names its attention heads "
                          f"(num_attention_heads); {type(base).__name__} does not")
    check_heads(*counts, size)
    AttentionInterface.register(ATTENTION_NAME, UlyssesAttention(group, size))
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(ATTENTION_NAME)
    else:  # older transformers: the config attribute is what the attention layers read
        base.config._attn_implementation = ATTENTION_NAME


def setup(model: torch.nn.Module, cfg: Config, comm: Collectives) -> Mesh:
    """This rank's mesh; with sequence parallel, the SP process groups (every rank creates all of them) and the
    attention installed on ``model``. Called before the engine wraps the model."""
    mesh = mesh_of(cfg, comm)
    if mesh.sequence_parallel == 1:
        return mesh
    group, _ = torch.distributed.new_subgroups(group_size=mesh.sequence_parallel)
    install(model, mesh.sequence_parallel, group)
    log.info("sequence parallel: %s; rank %d holds slice %d of every row, attention by all-to-all over heads",
             mesh.describe(), mesh.rank, mesh.sp_rank)
    return mesh
