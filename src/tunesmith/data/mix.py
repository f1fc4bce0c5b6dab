"""Several datasets → one sequence of rows: ``mix_strategy`` concat, interleave_under or interleave_over.

The interleaving is HF datasets' ``interleave_datasets`` (what LLaMA-Factory calls), reproduced row for row so a
config means the same here as there:

* ``concat``: the datasets one after another (the loader shuffles them together afterwards);
* ``interleave_under`` (``stopping_strategy="first_exhausted"``) and ``interleave_over`` (``"all_exhausted"``):
  without ``interleave_probs`` the datasets take turns, one row each, for as many full rounds as the shortest
  (under) or the longest (over, the shorter ones starting again from their first row) dataset has rows; with
  ``interleave_probs`` each row comes from a dataset drawn with those probabilities by
  ``numpy.random.default_rng(seed)``, until one dataset (under) or every dataset (over) has run out once —
  a dataset that runs out starts again from its first row.

Everything is lazy (one row of look-ahead per dataset), so the same code mixes in-memory lists and streams: each
source is a *factory* that opens a fresh iterator, which interleave_over calls again to repeat a dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np

from tunesmith.errors import ConfigError

T = TypeVar("T")
Source = Callable[[], Iterator[T]]  # opens the dataset from its first row
STRATEGIES = ("concat", "interleave_under", "interleave_over")
_DRAWS = 1000  # sources drawn per numpy call (HF's chunk size: the sequence of draws depends on it)

_END = object()


class _Cursor:
    """One dataset's iterator with one row of look-ahead, so exhaustion is known right after its last row."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.it = source()
        self.head = next(self.it, _END)

    @property
    def empty(self) -> bool:
        return self.head is _END

    def take(self) -> object:
        row, self.head = self.head, next(self.it, _END)
        return row

    def restart(self) -> None:
        self.it = self.source()
        self.head = next(self.it, _END)


def normalized_probs(probs: Sequence[float] | None, count: int) -> list[float] | None:
    if probs is None:
        return None
    if len(probs) != count:
        raise ConfigError(
            f"interleave_probs has {len(probs)} values for {count} datasets; give one probability per dataset"
        )
    total = float(sum(probs))
    if total <= 0 or any(p < 0 for p in probs):
        raise ConfigError("interleave_probs must be non-negative and not all zero; fix interleave_probs")
    return [float(p) / total for p in probs]


def _round_robin(cursors: list[_Cursor], oversample: bool) -> Iterator[object]:
    exhausted = [False] * len(cursors)
    while True:
        # checked once per round, before it starts: only full rounds, like HF's map-style interleave
        for i, cursor in enumerate(cursors):
            if cursor.empty:
                if not oversample:
                    return
                exhausted[i] = True
                cursor.restart()
        if all(exhausted):
            return
        for cursor in cursors:
            yield cursor.take()


def _random(cursors: list[_Cursor], probs: list[float], seed: int, oversample: bool) -> Iterator[object]:
    rng = np.random.default_rng(seed)
    exhausted = [False] * len(cursors)
    stop = all if oversample else any
    while True:
        for i in rng.choice(len(cursors), size=_DRAWS, p=probs):
            if stop(exhausted):
                return
            cursor = cursors[int(i)]
            yield cursor.take()
            if cursor.empty:  # this dataset has run out: note it, and start it over for the next draw
                exhausted[int(i)] = True
                cursor.restart()


def mix(
    sources: Sequence[Source[T]], strategy: str = "concat", probs: Sequence[float] | None = None, seed: int = 42
) -> Iterator[T]:
    """The rows of ``sources`` mixed by ``strategy`` (see the module docstring), lazily."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"mix_strategy {strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
    if strategy == "concat" or len(sources) == 1:
        for source in sources:
            yield from source()
        return
    cursors = [_Cursor(source) for source in sources]
    if any(cursor.empty for cursor in cursors):  # an empty dataset would make interleave_over loop forever
        return
    weights = normalized_probs(probs, len(sources))
    oversample = strategy == "interleave_over"
    rows = _round_robin(cursors, oversample) if weights is None else _random(cursors, weights, seed, oversample)
    yield from rows  # type: ignore[misc]


def mix_lists(datasets: Sequence[Iterable[T]], strategy: str, probs: Sequence[float] | None, seed: int) -> list[T]:
    """:func:`mix` for in-memory datasets."""
    lists = [list(d) for d in datasets]
    return list(mix([(lambda rows=rows: iter(rows)) for rows in lists], strategy, probs, seed))
