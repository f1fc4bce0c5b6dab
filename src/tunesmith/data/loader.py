"""Batches for training: a seeded per-epoch permutation with a resumable position, and right-padding collate.

The order of epoch ``e`` depends only on ``(seed, e)`` (its own ``torch.Generator``, never the global RNG), so a
resumed run can rebuild the permutation and skip the samples it already consumed without drawing a single random
number.

Across ranks (``world_size`` W, ``batch_size`` B per rank, ``accumulation`` A) every rank builds the same global
permutation and takes its own slices of it, so each sample is trained exactly once per epoch on exactly one rank:

* the permutation is cut into windows of A·B·W samples, one optimizer step each (the epoch's last window may be
  shorter; windows never cross an epoch);
* inside a window, micro-batch k of rank r holds the samples ``[(k·W + r)·B, (k·W + r + 1)·B)``; with W = 1 this is
  the single-process order exactly;
* a short last window keeps this layout (no sample is repeated or dropped): a rank whose slice is empty, or that
  has fewer micro-batches than the others, runs a *masked* micro-batch (a copy of a sample with every label
  ignored: no targets, zero gradient), so that all ranks run the same number of forward/backward passes, which
  DDP's and FSDP's collectives require.

The position in an epoch is the number of samples of its permutation consumed, which does not depend on W: a run
saved on 2 ranks continues on 1 or 3 ranks from the very next sample. :class:`DataPosition` carries it (and, for
``streaming: true``, the stream cursor of :mod:`tunesmith.data.stream`, whose loader has the same
:meth:`EpochLoader.windows_from` and the same rank layout, :func:`rank_slices`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from tunesmith.data.pack import (
    LONGEST_KWARG,
    OFFSETS_KWARG,
    block_mask,
    packed_positions,
    row_segments,
    segment_carrier,
    sequence_offsets,
)

IGNORE_INDEX = -100
T = TypeVar("T")


class EncodedLike(Protocol):
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class DataPosition:
    """Where training stands in the data, counted in the global order shared by all ranks (world-size-free).

    ``samples``: samples (rows of the loader's dataset, packed rows with packing) of epoch ``epoch`` consumed.
    Streaming only: the next sample is number ``stream_skip`` of the preprocessing batch that starts at
    shuffled row ``stream_rows`` of pass ``epoch`` (see :mod:`tunesmith.data.stream`).
    """

    epoch: int = 0
    samples: int = 0
    stream_rows: int = 0
    stream_skip: int = 0


def rank_slices(window: Sequence[T], batch_size: int, rank: int, world_size: int) -> list[Sequence[T]]:
    """This rank's micro-batches of an accumulation window (the layout of the module docstring): micro-batch k
    holds items ``[(k·W + r)·B, (k·W + r + 1)·B)``; an empty one must be filled with a masked copy."""
    per_round = batch_size * world_size
    return [
        window[k + rank * batch_size : k + (rank + 1) * batch_size] for k in range(0, len(window), per_round)
    ]


@dataclass
class Batch:
    """A padded micro-batch (CPU tensors); ``num_targets`` counts the tokens the loss is computed on.

    ``attention_mask`` is the 2-D 0/1 mask of the real tokens. Packed rows (see :mod:`tunesmith.data.pack`) also
    carry ``position_ids`` (restarting per sample). ``segments`` (set by :func:`collate`, packed or not) are the
    rows' segment ids: each sample its own, each pad its own. :meth:`model_inputs` is what the model's forward
    takes, in the form its attention wants.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor | None = None
    # per row, the reference model's summed log-prob of its targets, when computed before training
    # (precompute_ref_log_probs); None: the objective asks the reference model
    reference_logps: torch.Tensor | None = None
    segments: torch.Tensor | None = None

    @property
    def num_targets(self) -> int:
        return count_targets(self.labels)

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    def model_inputs(self, attention: str = "mask") -> dict[str, Any]:
        """The model's keyword arguments for its ``attention``:

        * ``segments`` (attention by segments, :mod:`tunesmith.model.segment_attention`): the segment ids in the
          ``attention_mask`` slot, no mask at all;
        * ``segment_offsets``: the same, plus the samples' cumulative offsets and the longest sample
          (:func:`~tunesmith.data.pack.sequence_offsets`) for the variable-length kernel on CUDA, made here so
          that compiled blocks take them as inputs;
        * ``varlen`` (flash_attn: fa2): packed rows give position_ids and no mask, the form transformers'
          flash-attention path turns into variable-length calls, one sequence per run of position ids from 0;
        * ``mask``: packed rows a 4-D block-diagonal float mask, plain rows the 2-D one."""
        inputs: dict[str, Any] = {"input_ids": self.input_ids}
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        if attention in ("segments", "segment_offsets") and self.segments is not None:
            inputs["attention_mask"] = segment_carrier(self.segments)
            if attention == "segment_offsets":
                inputs[OFFSETS_KWARG], inputs[LONGEST_KWARG] = sequence_offsets(self.segments)
        elif not self.packed:
            inputs["attention_mask"] = self.attention_mask
        elif attention != "varlen":
            inputs["attention_mask"] = block_mask(self.segments.to(self.input_ids.device))  # type: ignore[union-attr]
        return inputs

    def to(self, device: torch.device | str) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            move(self.input_ids), move(self.labels), move(self.attention_mask), move(self.position_ids),
            move(self.reference_logps), move(self.segments),
        )


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad token, else its eos token (models without a pad token), else 0."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad_id if pad_id is not None else 0


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that are predicted by the causal-LM loss: labels shifted left by one, minus the ignored ones."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def masked_copy(sample: EncodedLike, pad_token_id: int) -> Batch:
    """A one-sample batch with every label ignored: it runs forward/backward (keeping ranks in step) but has
    no targets, so it contributes exactly zero to the loss and the gradient."""
    batch = collate([sample], pad_token_id)
    return Batch(
        batch.input_ids, torch.full_like(batch.labels, IGNORE_INDEX), batch.attention_mask, batch.position_ids,
        segments=batch.segments,
    )


def collate(samples: Sequence[EncodedLike], pad_token_id: int) -> Batch:
    """Right-pad ``input_ids`` with ``pad_token_id`` and ``labels`` with -100; mask marks the real tokens.

    Packed rows (samples with ``seq_lens``) get per-sample position ids. Every batch gets its segment ids."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        if len(sample.labels) != n:
            raise ValueError(f"sample {row}: {n} input_ids but {len(sample.labels)} labels")
        input_ids[row, :n] = torch.tensor(sample.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(sample.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    seq_lens = [getattr(sample, "seq_lens", None) for sample in samples]
    lens = [given or [len(s.input_ids)] for given, s in zip(seq_lens, samples, strict=True)]
    position_ids = packed_positions(lens, width) if any(seq_lens) else None
    return Batch(input_ids=input_ids, labels=labels, attention_mask=attention_mask, position_ids=position_ids,
                 segments=row_segments(lens, width))



class Collator(Protocol):
    """How a training objective turns samples into micro-batches (see :mod:`tunesmith.train.objectives`)."""

    def collate(self, samples: Sequence[EncodedLike]) -> Batch:
        """One micro-batch of ``samples``."""

    def masked(self, sample: EncodedLike) -> Batch:
        """A micro-batch that runs forward and backward but holds no targets (zero loss, zero gradient): what a
        rank without samples in a window runs, so that every rank runs the same number of passes."""


@dataclass(frozen=True)
class TokenCollator:
    """Token-level batches (SFT, pre-training): :func:`collate` and :func:`masked_copy`."""

    pad_token_id: int

    def collate(self, samples: Sequence[EncodedLike]) -> Batch:
        return collate(samples, self.pad_token_id)

    def masked(self, sample: EncodedLike) -> Batch:
        return masked_copy(sample, self.pad_token_id)


class Loader(Protocol):
    """What the training loop reads: this rank's micro-batches, one accumulation window at a time, from a
    world-size-free :class:`DataPosition`. :class:`EpochLoader` (samples in memory, reshuffled every epoch) and
    :class:`~tunesmith.data.stream.StreamLoader` (a stream read while training) implement it."""

    @property
    def rounds_per_epoch(self) -> int | None:
        """Micro-batch rounds (``batch_size × world_size`` samples) per epoch; None for a stream (no length)."""

    @property
    def samples_per_epoch(self) -> int | None:
        """Samples per epoch; None for a stream."""

    def windows_from(
        self, position: DataPosition, accumulation: int
    ) -> Iterator[tuple[DataPosition, list[Batch]]]:
        """This rank's windows of ``accumulation`` micro-batches from ``position``, each with the position after
        it (the next epoch's start after an epoch's last window)."""


class EpochLoader:
    """Micro-batches of ``dataset`` for one epoch at a time, in a permutation fixed by ``(seed, epoch)``.

    ``collator`` (default: :class:`TokenCollator`) makes the micro-batches. ``len(loader)`` (=
    :attr:`rounds_per_epoch`) is the number of micro-batch rounds per epoch (rounds of
    ``batch_size × world_size`` samples; the last one may be smaller). :meth:`windows` yields this rank's
    accumulation windows from a sample position.
    """

    def __init__(
        self,
        dataset: Sequence[EncodedLike],
        batch_size: int,
        pad_token_id: int = 0,
        seed: int = 42,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        collator: Collator | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.collator = collator or TokenCollator(pad_token_id)

    def __len__(self) -> int:
        return -(-len(self.dataset) // (self.batch_size * self.world_size))

    @property
    def rounds_per_epoch(self) -> int:
        return len(self)

    @property
    def samples_per_epoch(self) -> int:
        return len(self.dataset)

    def permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.dataset)))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.dataset), generator=generator).tolist()

    def batch_indices(self, epoch: int) -> list[list[int]]:
        order = self.permutation(epoch)
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def window_indices(self, epoch: int, start: int, accumulation: int) -> Iterator[tuple[int, list[list[int]]]]:
        """This rank's sample indices per micro-batch for each window from sample position ``start`` (see the
        module docstring); an empty list is a micro-batch this rank must fill with a masked copy. Yields
        ``(samples of the epoch consumed after the window, micro-batches)``."""
        order = self.permutation(epoch)
        per_round = self.batch_size * self.world_size
        for first in range(start, len(order), accumulation * per_round):
            chunk = order[first : first + accumulation * per_round]
            yield first + len(chunk), [list(ids) for ids in rank_slices(chunk, self.batch_size, self.rank,
                                                                         self.world_size)]

    def windows(self, epoch: int, start: int, accumulation: int) -> Iterator[tuple[int, list[Batch]]]:
        """Like :meth:`window_indices`, collated (masked copies where this rank has no samples)."""
        for position, groups in self.window_indices(epoch, start, accumulation):
            filler = self.dataset[self.permutation(epoch)[position - 1]] if not all(groups) else None
            yield position, [
                self.collator.collate([self.dataset[i] for i in ids]) if ids else self.collator.masked(filler)
                for ids in groups
            ]

    def windows_from(self, position: DataPosition, accumulation: int) -> Iterator[tuple[DataPosition, list[Batch]]]:
        """:meth:`windows` of ``position.epoch`` from ``position.samples``, each with the position after it (the
        next epoch's start after its last window)."""
        for after, window in self.windows(position.epoch, position.samples, accumulation):
            done = after >= len(self.dataset)
            yield (DataPosition(position.epoch + 1) if done else DataPosition(position.epoch, after)), window


def prefetch(items: Iterator[T], depth: int) -> Iterator[T]:
    """``items``, produced by a background thread up to ``depth`` ahead (``dataloader_num_workers``): the next
    windows are collated while the model computes. Same items, same order; an exception in the producer is
    raised here, and closing this generator (the loop stopping early) stops the thread."""
    if depth <= 0:
        yield from items
        return
    ready: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(kind: str, value: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put((kind, value), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put("item", item):
                    return
            put("end", None)
        except BaseException as err:  # handed to the consumer, which raises it
            put("error", err)

    thread = threading.Thread(target=produce, name="tunesmith-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
