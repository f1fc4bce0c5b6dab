"""Batches for training: a seeded per-epoch permutation with a resumable position, and right-padding collate.

The order of epoch ``e`` depends only on ``(seed, e)`` (its own ``torch.Generator``, never the global RNG), so a
resumed run can rebuild the permutation and skip the micro-batches it already consumed without drawing a single
random number.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

IGNORE_INDEX = -100


class EncodedLike(Protocol):
    input_ids: list[int]
    labels: list[int]


@dataclass
class Batch:
    """A padded micro-batch (CPU tensors); ``num_targets`` counts the tokens the loss is computed on."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def num_targets(self) -> int:
        return count_targets(self.labels)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            *(t.to(device, non_blocking=True) for t in (self.input_ids, self.labels, self.attention_mask))
        )


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that are predicted by the causal-LM loss: labels shifted left by one, minus the ignored ones."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def collate(samples: Sequence[EncodedLike], pad_token_id: int) -> Batch:
    """Right-pad ``input_ids`` with ``pad_token_id`` and ``labels`` with -100; mask marks the real tokens."""
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
    return Batch(input_ids=input_ids, labels=labels, attention_mask=attention_mask)


class EpochLoader:
    """Micro-batches of ``dataset`` for one epoch at a time, in a permutation fixed by ``(seed, epoch)``.

    ``len(loader)`` is the number of micro-batches per epoch (the last one may be smaller). Iterate with
    :meth:`epoch_batches`, giving the position (micro-batches already consumed) to resume mid-epoch.
    """

    def __init__(
        self,
        dataset: Sequence[EncodedLike],
        batch_size: int,
        pad_token_id: int,
        seed: int = 42,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.dataset = dataset
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.seed = seed
        self.shuffle = shuffle

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.dataset)))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.dataset), generator=generator).tolist()

    def batch_indices(self, epoch: int) -> list[list[int]]:
        order = self.permutation(epoch)
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Batch]]:
        """Yield ``(position, batch)`` from micro-batch ``start`` on; ``position`` counts batches consumed after it."""
        for index, ids in enumerate(self.batch_indices(epoch)[start:], start=start):
            yield index + 1, collate([self.dataset[i] for i in ids], self.pad_token_id)

    def epoch_windows(self, epoch: int, start: int, size: int) -> Iterator[tuple[int, list[Batch]]]:
        """Group the epoch's micro-batches from ``start`` into accumulation windows of ``size`` (the last may be
        shorter; windows never cross an epoch). Yields ``(position after the window, its micro-batches)``."""
        indices = self.batch_indices(epoch)
        for first in range(start, len(indices), size):
            group = indices[first : first + size]
            yield (
                first + len(group),
                [collate([self.dataset[i] for i in ids], self.pad_token_id) for ids in group],
            )
