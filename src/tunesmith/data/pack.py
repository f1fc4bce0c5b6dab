"""Packing: several encoded samples per row of ``cutoff_len`` tokens, each sample still seeing only itself.

``packing: true`` (and LLaMA-Factory's ``neat_packing: true``, which behaves the same here) turns the encoded
samples into :class:`PackedSample` rows before the EpochLoader sees them, so the packed rows *are* the dataset:
the seeded epoch order, the resumable data position and the exact-resume guarantees apply unchanged.

Which samples share a row: best-fit decreasing. Samples are taken longest first (ties by their index, so the
result depends only on the lengths) and each goes into the open row with the *least* room that still fits it,
else into a new row. This is deterministic and wastes little (a row is rarely left with room another sample
could use); the rows are then in creation order and the loader shuffles them per epoch.

Balanced rows (:func:`balanced_groups`, what pack_samples uses): a batch is padded to its longest row, so what
costs compute is not the rows' room up to cutoff_len but the *difference* between rows. Best-fit decreasing
at cutoff_len leaves most rows a few tokens short and the last rows half empty (on the alpaca demo, 1024
tokens, batches of 4: 3.7 % of the batch positions were padding). So after it has found the number of rows R,
the capacity is lowered to the smallest one (binary search, each probe a best-fit decreasing) that still packs
everything into R rows: every row then ends within a few tokens of total/R, and the padding drops to ~0.4 %.
Same rows count, same samples, still deterministic (a function of the lengths only), every row ≤ cutoff_len.

Isolation (see :func:`packed_inputs`): position ids restart at 0 for every sample, and the attention mask is a
4-D block-diagonal causal float mask (0 where attention is allowed, -inf elsewhere) of shape
``[batch, 1, seq, seq]``, which HF models (SDPA and eager) use as-is. Position ids alone do not isolate samples
on SDPA; the mask does. Padding tokens attend only to themselves, so no softmax row is all -inf (no NaN), and
they carry no labels. The first token of every sample gets label -100: in a packed row it sits right after
the previous sample, whose last token would otherwise be trained to predict it; unpacked, the first label is
never predicted either, so the target tokens (and the token-normalised loss) are exactly the same.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tunesmith.data.encode import TokenIds, as_token_ids

IGNORE_INDEX = -100


class _Sample(Protocol):
    input_ids: list[int]
    labels: list[int]


@dataclass
class PackedSample:
    """One packed row (unpadded): the samples' tokens concatenated; ``seq_lens`` are their lengths in order.
    ids and labels are stored as :class:`~tunesmith.data.encode.TokenIds` (compact, list-comparable)."""

    input_ids: TokenIds
    labels: TokenIds
    seq_lens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.input_ids = as_token_ids(self.input_ids)
        self.labels = as_token_ids(self.labels)


@dataclass
class PackingStats:
    samples: int
    rows: int
    tokens: int
    cutoff_len: int
    width: int = 0  # the longest row (balanced rows end at most here, often a little under cutoff_len)

    @property
    def fill(self) -> float:
        """Fraction of the rows' cutoff_len slots that hold real tokens."""
        return self.tokens / max(self.rows * self.cutoff_len, 1)

    @property
    def balance(self) -> float:
        """Real tokens over rows × the longest row. A batch is padded to its longest row, never beyond the
        longest of all, so 1 − this bounds the padding fraction of the batches (over an epoch)."""
        return self.tokens / max(self.rows * (self.width or self.cutoff_len), 1)

    def format(self) -> str:
        return (
            f"data: packed {self.samples} samples into {self.rows} rows of cutoff_len={self.cutoff_len} "
            f"({self.fill:.1%} filled; rows of {self.width} tokens at most, {self.balance:.1%} of that filled)"
        )


def pack_groups(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of the samples in each row (best-fit decreasing; see the module docstring)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    # open rows as a sorted list of (room left, row index): bisect finds the tightest row that fits
    room: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the packing capacity {capacity}")
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            left, row = room.pop(at)
            rows[row].append(i)
            left -= n
        else:
            row, left = len(rows), capacity - n
            rows.append([i])
        if left > 0:
            bisect.insort(room, (left, row))
    return rows


def balanced_groups(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """As many rows as best-fit decreasing needs at ``capacity``, at the smallest capacity that keeps that row
    count (module docstring): rows of near-equal length, so batches carry almost no padding."""
    groups = pack_groups(lengths, capacity)
    if len(groups) <= 1:
        return groups
    rows = len(groups)
    # lo: no capacity below the longest sample or the mean row can hold everything in `rows` rows
    lo, hi = max(max(lengths), -(-sum(lengths) // rows)), capacity
    while lo < hi:  # the smallest capacity found that still packs into `rows` rows (each probe verified)
        mid = (lo + hi) // 2
        probe = pack_groups(lengths, mid)
        if len(probe) <= rows:
            hi, groups = mid, probe
        else:
            lo = mid + 1
    return groups


def pack_samples(samples: Sequence[_Sample], cutoff_len: int) -> tuple[list[PackedSample], PackingStats]:
    """Pack samples (each at most cutoff_len tokens) into balanced rows; each sample's first label is -100."""
    groups = balanced_groups([len(s.input_ids) for s in samples], cutoff_len)
    rows: list[PackedSample] = []
    for group in groups:
        row = PackedSample(TokenIds(), TokenIds())
        # within a row, keep the dataset order (readable previews; the order does not change the loss)
        for i in sorted(group):
            sample = samples[i]
            row.input_ids.extend(sample.input_ids)
            row.labels.append(IGNORE_INDEX)
            row.labels.extend(sample.labels[1:])
            row.seq_lens.append(len(sample.input_ids))
        rows.append(row)
    tokens = sum(len(s.input_ids) for s in samples)
    width = max((len(r.input_ids) for r in rows), default=0)
    stats = PackingStats(
        samples=len(samples), rows=len(rows), tokens=tokens, cutoff_len=cutoff_len, width=width
    )
    return rows, stats


def row_segments(seq_lens: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """[batch, width] segment ids of right-padded packed rows: sample k of a row is segment k, and every pad
    token is a segment of its own, so it attends to itself only (its softmax row stays finite)."""
    segments = torch.empty((len(seq_lens), width), dtype=torch.long)
    for row, lens in enumerate(seq_lens):
        ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens, dtype=torch.long))
        segments[row, : len(ids)] = ids
        segments[row, len(ids):] = torch.arange(len(lens), len(lens) + width - len(ids))
    return segments


def block_causal(segments: torch.Tensor) -> torch.Tensor:
    """[batch, width, width] bool, True where query t may attend key s: s ≤ t within the same segment."""
    position = torch.arange(segments.size(1), device=segments.device)
    causal = position[:, None] >= position[None, :]
    return (segments[:, :, None] == segments[:, None, :]) & causal


def packed_positions(seq_lens: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """[batch, width] position ids of right-padded packed rows: restarting at 0 for every sample (pads at 0)."""
    position_ids = torch.zeros((len(seq_lens), width), dtype=torch.long)
    for row, lens in enumerate(seq_lens):
        start = 0
        for n in lens:
            position_ids[row, start : start + n] = torch.arange(n)
            start += n
    return position_ids


def block_mask(segments: torch.Tensor) -> torch.Tensor:
    """[batch, 1, width, width] float mask (0 where allowed, -inf elsewhere) of :func:`block_causal`: what SDPA and
    eager attention take for packed rows; made where ``segments`` are (a batch already on the GPU builds it there)."""
    width = segments.size(1)
    mask = torch.zeros((segments.size(0), 1, width, width), dtype=torch.float32, device=segments.device)
    return mask.masked_fill_(~block_causal(segments)[:, None], float("-inf"))


def segment_carrier(segments: torch.Tensor) -> torch.Tensor:
    """[batch, 1, 1, width] integer segment ids: the form in which they travel to the attention in the
    ``attention_mask`` slot (see :mod:`tunesmith.model.segment_attention`); a real mask is bool or float."""
    return segments[:, None, None, :]


# per row, (start, end, is_sample): a sample of ≥ 2 tokens, or a run of one-token segments (pads, 1-token samples)
Runs = list[list[tuple[int, int, bool]]]


def segment_runs(segments: torch.Tensor) -> Runs:
    """Each row's samples (runs of equal ids longer than one token) and runs of one-token segments."""
    rows: Runs = []
    for ids in segments.tolist():
        bounds = [0] + [t for t in range(1, len(ids)) if ids[t] != ids[t - 1]] + [len(ids)]
        runs: list[tuple[int, int, bool]] = []
        for start, end in zip(bounds, bounds[1:], strict=False):
            sample = end - start > 1
            if not sample and runs and not runs[-1][2]:  # extend the previous run of one-token segments
                runs[-1] = (runs[-1][0], end, False)
            else:
                runs.append((start, end, sample))
        rows.append(runs)
    return rows


def sequence_bounds(runs: Runs, width: int) -> tuple[list[int], int]:
    """(cumulative offsets of the sequences in the flattened ``[rows × width]`` batch, the longest one): each
    sample one sequence, each one-token segment one of its own."""
    bounds, longest = [0], 1
    for row, row_runs in enumerate(runs):
        base = row * width
        for start, end, sample in row_runs:
            if sample:
                bounds.append(base + end)
                longest = max(longest, end - start)
            else:
                bounds.extend(range(base + start + 1, base + end + 1))
    return bounds, longest


# the model keywords that carry :func:`sequence_offsets` to the attention (Batch.model_inputs("segment_offsets"))
OFFSETS_KWARG = "tunesmith_offsets"
LONGEST_KWARG = "tunesmith_longest"


def sequence_offsets(segments: torch.Tensor) -> tuple[torch.Tensor, int]:
    """:func:`sequence_bounds` of ``segments`` ([batch, width] ids) as int32 offsets on their device, and the
    longest sequence: the form variable-length attention kernels take, made outside the model, so a compiled block
    receives them as inputs instead of reading data-dependent bounds itself."""
    bounds, longest = sequence_bounds(segment_runs(segments.detach().cpu()), segments.size(1))
    return torch.tensor(bounds, dtype=torch.int32).to(segments.device, non_blocking=True), longest


def packed_inputs(seq_lens: Sequence[Sequence[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids [batch, width], float mask [batch, 1, width, width]) for right-padded packed rows."""
    return packed_positions(seq_lens, width), block_mask(row_segments(seq_lens, width))
