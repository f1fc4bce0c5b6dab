"""Conversations → ``Encoded`` (input_ids, labels) within ``cutoff_len``, and a report of what that did.

Labels are -100 except on assistant replies (their end-of-turn tokens included; labels are never derived from
pad_token_id, so an eos that doubles as pad is still learned), plus the prompts with ``train_on_prompt``.
``mask_history`` keeps only the last reply as a target.

Truncation never leaves a sample without targets:
1. Whole exchanges are dropped first: the later ones (or, with mask_history, the earlier ones — the last reply
   is the target — keeping the system prompt in front).
2. When a single exchange is still too long, the prompt is shortened first: the reply stays whole when it fits
   in half of cutoff_len, otherwise prompt and reply are cut in proportion to their lengths (LLaMA-Factory's
   rule). A cut prompt keeps its head (system prompt and the start of the user turn) and its tail (end of the
   user turn and the assistant header, so the reply still follows the header it will follow at generation);
   a cut reply keeps its beginning.
3. When not even the assistant header plus one reply token fits, the sample is dropped and counted.

Speed and memory (:func:`encode_dataset`): conversations are consumed from any iterable in batches of
``preprocessing_batch_size``; each batch is rendered and tokenized in ONE fast-tokenizer batch call (Rust,
see segments.py), then assembled. Only one batch of texts and encodings is alive at a time, and every kept
sample stores its ids and labels as ``array('i')`` (:class:`TokenIds`, 4 bytes a token instead of a Python
int object and a list slot). ``preprocessing_num_workers: N`` (> 1) encodes batches in N worker processes,
at most 2·N batches in flight, results taken back in input order: the samples, the report and the log lines
are exactly those of one worker. The cyclic garbage collector is paused meanwhile (:func:`gc_paused`).
"""

from __future__ import annotations

import gc
import math
import multiprocessing
import os
import sys
from array import array
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Any

from tunesmith.config.schema import DataArgs
from tunesmith.data.conversation import Conversation
from tunesmith.data.segments import EncodedTurns
from tunesmith.data.templates import Template
from tunesmith.errors import DataError
from tunesmith.logging import get_logger

IGNORE_INDEX = -100
_BATCH = 1000  # conversations per tokenizer call when the config has no preprocessing_batch_size

logger = get_logger("data")


class TokenIds(array):
    """Token ids (or labels) as a compact ``array('i')`` that still compares equal to a list of the same ints
    (so ``sample.input_ids == tokenizer(text)["input_ids"]`` keeps its meaning)."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]  # mutable, like list

    def __new__(cls, values: Iterable[int] = ()) -> TokenIds:
        return super().__new__(cls, "i", values)

    def __reduce_ex__(self, protocol: Any) -> Any:  # pickles (worker results) as raw bytes, as array does
        return _token_ids_from_bytes, (self.tobytes(),)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple)):
            return len(self) == len(other) and self.tolist() == list(other)
        return super().__eq__(other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __repr__(self) -> str:
        return f"TokenIds({self.tolist()})"


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while preprocessing allocates millions of short-lived objects.

    Preprocessing builds no reference cycles (rows, strings, token lists and samples are freed by reference
    counting alone), but every few hundred allocations the collector still scans the ever-growing set of live
    objects: on 22k alpaca rows that was a fifth of the cold prepare time (bench/preprocess.py). Restores the
    previous state, so nested uses and a caller that had disabled gc itself are left as they were."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _token_ids_from_bytes(raw: bytes) -> TokenIds:
    ids = TokenIds()
    ids.frombytes(raw)
    return ids


def as_token_ids(values: Iterable[int]) -> TokenIds:
    return values if type(values) is TokenIds else TokenIds(values)  # type: ignore[return-value]


@dataclass
class Encoded:
    """One training sample; lists given to the constructor are stored as :class:`TokenIds`."""

    input_ids: TokenIds
    labels: TokenIds

    def __post_init__(self) -> None:
        self.input_ids = as_token_ids(self.input_ids)
        self.labels = as_token_ids(self.labels)


@dataclass
class EncodeReport:
    kept: int
    dropped: int
    truncated: int
    bad_rows: int
    length_percentiles: dict[str, int] = field(default_factory=dict)  # p50, p90, p99, max (tokens)
    cutoff_len: int | None = None

    def format(self) -> str:
        cutoff = f" to cutoff_len={self.cutoff_len}" if self.cutoff_len else ""
        p = self.length_percentiles
        return (
            f"data: {self.kept} samples kept, {self.truncated} of them truncated{cutoff}; {self.dropped} dropped "
            f"(no reply token fits); {self.bad_rows} bad rows skipped\n"
            f"data: tokens per sample p50={p.get('p50', 0)} p90={p.get('p90', 0)} p99={p.get('p99', 0)} "
            f"max={p.get('max', 0)}"
        )


def percentiles(lengths: list[int]) -> dict[str, int]:
    """Nearest-rank percentiles (an actual sample length, no interpolation)."""
    if not lengths:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    ordered = sorted(lengths)

    def rank(q: float) -> int:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": ordered[-1]}


def shorten_exchange(
    prompt: list[int], reply: list[int], tail: int, cutoff: int
) -> tuple[list[int], list[int]] | None:
    """Fit one exchange into cutoff tokens (rule 2 of the module docstring); None when impossible."""
    src, tgt = len(prompt), len(reply)
    if tgt * 2 < cutoff:
        max_tgt = cutoff
    elif src * 2 < cutoff:
        max_tgt = cutoff - src
    else:
        max_tgt = int(cutoff * tgt / (src + tgt))
    new_tgt = min(max_tgt, tgt)
    new_src = min(cutoff - new_tgt, src)
    min_src = min(src, tail + 1)  # the assistant header and at least the first prompt token
    if new_src < min_src:
        new_src, new_tgt = min_src, cutoff - min_src
    if new_tgt < 1:
        return None
    if new_src < src:
        prompt = prompt[: new_src - tail] + prompt[src - tail :]
    return prompt, reply[:new_tgt]


def prompt_and_last_reply(turns: EncodedTurns) -> tuple[list[int], list[int]]:
    """A rendered conversation as (everything before its last reply, the last reply): the split of the stages
    whose only target is one final reply (dpo, rm, kto)."""
    prompt = [t for p, r in turns.pairs[:-1] for t in (*p, *r)] + list(turns.pairs[-1][0])
    return prompt, list(turns.pairs[-1][1])


def assemble(
    turns: EncodedTurns, cutoff_len: int, train_on_prompt: bool = False, mask_history: bool = False
) -> tuple[Encoded | None, bool]:
    """Concatenate exchanges into one sample within cutoff_len; returns (sample or None, truncated)."""
    pairs, head_len = turns.pairs, turns.head_len
    if sum(len(p) + len(r) for p, r in pairs) <= cutoff_len:  # the common case: everything fits as it is
        everything = [(p, r, i) for i, (p, r) in enumerate(pairs)]
        return _labelled(everything, len(pairs) - 1, train_on_prompt, mask_history), False
    tails = turns.tail_lens or [0] * len(pairs)
    head = pairs[0][0][:head_len]
    exchanges = [(pairs[0][0][head_len:], pairs[0][1]), *pairs[1:]]
    n = len(exchanges)
    costs = [len(p) + len(r) for p, r in exchanges]
    budget = cutoff_len - len(head)
    first, end = 0, n  # kept exchanges: [first, end)
    if sum(costs) > budget:
        used = 0
        if mask_history:  # keep the last exchange (the only target) and as much recent history as fits
            first = n
            while first > 0 and used + costs[first - 1] <= budget:
                first -= 1
                used += costs[first]
            first = min(first, n - 1)
        else:
            end = 0
            while end < n and used + costs[end] <= budget:
                used += costs[end]
                end += 1
            end = max(end, 1)
    kept = [(list(p), r, tails[i], i) for i, (p, r) in enumerate(exchanges) if first <= i < end]
    kept[0] = (head + kept[0][0], *kept[0][1:])
    truncated = (first, end) != (0, n)
    if sum(len(p) + len(r) for p, r, _, _ in kept) > cutoff_len:  # one exchange alone is too long
        fitted = shorten_exchange(kept[0][0], kept[0][1], kept[0][2], cutoff_len)
        if fitted is None:
            return None, True
        kept[0] = (*fitted, kept[0][2], kept[0][3])
        truncated = True
    return _labelled([(p, r, i) for p, r, _, i in kept], n - 1, train_on_prompt, mask_history), truncated


def _labelled(
    kept: list[tuple[list[int], list[int], int]], last: int, train_on_prompt: bool, mask_history: bool
) -> Encoded | None:
    """(prompt, reply, exchange index) in order → the sample, or None when no token is a target.
    ``last`` is the index of the conversation's last exchange (the only target with mask_history)."""
    input_ids: list[int] = []
    labels: list[int] = []
    for prompt, reply, index in kept:
        input_ids += prompt
        labels += prompt if train_on_prompt else [IGNORE_INDEX] * len(prompt)
        input_ids += reply
        labels += reply if (not mask_history or index == last) else [IGNORE_INDEX] * len(reply)
    if labels.count(IGNORE_INDEX) == len(labels):
        return None
    return Encoded(TokenIds(input_ids), TokenIds(labels))


def encode_conversation(
    conv: Conversation,
    tokenizer: Any,
    template: Template,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    default_system: str | None = None,
) -> Encoded | None:
    """One conversation → a training sample, or None when no reply token fits in cutoff_len."""
    turns = template.encode_many(tokenizer, [conv], default_system)[0]
    if isinstance(turns, DataError):
        raise turns
    return assemble(turns, cutoff_len, train_on_prompt, mask_history)[0]


@dataclass(frozen=True)
class _Options:
    """The config keys encoding reads (a small picklable copy for worker processes)."""

    cutoff_len: int
    train_on_prompt: bool = False
    mask_history: bool = False
    default_system: str | None = None
    skip_bad_rows: bool = False

    @classmethod
    def of(cls, data: DataArgs) -> _Options:
        return cls(data.cutoff_len, data.train_on_prompt, data.mask_history, data.default_system, data.skip_bad_rows)


# One batch's outcome, in input order: a kept sample, None (dropped), or the DataError of a bad row; and
# whether each kept sample was truncated.
_Outcome = list[tuple[Encoded | None | DataError, bool]]


def _encode_batch(convs: list[Conversation], tokenizer: Any, template: Template, opts: _Options) -> _Outcome:
    out: _Outcome = []
    for turns in template.encode_many(tokenizer, convs, opts.default_system):
        if isinstance(turns, DataError):
            out.append((turns, False))
            continue
        out.append(assemble(turns, opts.cutoff_len, opts.train_on_prompt, opts.mask_history))
    return out


def _batches(convs: Iterable[Conversation], size: int) -> Iterator[list[Conversation]]:
    if isinstance(convs, list):  # slicing a list is cheaper than islice
        for start in range(0, len(convs), size):
            yield convs[start : start + size]
        return
    it = iter(convs)
    while batch := list(islice(it, size)):
        yield batch


# The worker processes' tokenizer, template and options: set once per worker by the pool initializer.
_WORKER: tuple[Any, Template, _Options] | None = None


def _init_worker(tokenizer: Any, template: Template, opts: _Options) -> None:
    global _WORKER
    _WORKER = (tokenizer, template, opts)
    gc.disable()  # a worker only encodes: see gc_paused


def _worker_batch(convs: list[Conversation]) -> _Outcome:
    assert _WORKER is not None
    return _encode_batch(convs, *_WORKER)


def _pool_context() -> Any:
    """fork where the platform has it: workers start in milliseconds and inherit the loaded tokenizer (the
    parent only waits on them). Elsewhere spawn, which pickles the tokenizer to every worker once."""
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _outcomes(
    convs: Iterable[Conversation], tokenizer: Any, template: Template, opts: _Options, size: int, workers: int
) -> Iterator[_Outcome]:
    """Each batch's outcome in input order, from this process or from ``workers`` processes."""
    batches = _batches(convs, size)
    if workers <= 1:
        for batch in batches:
            yield _encode_batch(batch, tokenizer, template, opts)
        return
    first = next(batches, None)
    second = next(batches, None)
    if second is None:  # a single batch: a pool would only add its start-up time
        if first is not None:
            yield _encode_batch(first, tokenizer, template, opts)
        return
    with _worker_pool(workers, tokenizer, template, opts) as pool:
        pending: deque[Any] = deque()
        # at most 2 batches per worker in flight: the input is consumed lazily, memory stays bounded
        for batch in chain((first, second), batches):
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
            pending.append(pool.apply_async(_worker_batch, (batch,)))
        while pending:
            yield pending.popleft().get()


@contextmanager
def _worker_pool(workers: int, tokenizer: Any, template: Template, opts: _Options) -> Iterator[Any]:
    # Each worker tokenizes single-threaded (N processes already use N cores). Setting the variable while the
    # workers fork also keeps `tokenizers` from printing its "process just got forked" warning in each one.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = _pool_context().Pool(workers, _init_worker, (tokenizer, template, opts))
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    with pool:
        yield pool


def encode_dataset(
    convs: Iterable[Conversation], tokenizer: Any, template: Template, data: DataArgs
) -> tuple[list[Encoded], EncodeReport]:
    """All conversations → samples (in order), with the kept / dropped / truncated counts and lengths.

    ``convs`` may be any iterable (a list, a generator over a large file, a mixed stream); it is read one
    batch of ``preprocessing_batch_size`` at a time. ``preprocessing_num_workers`` only changes the speed.
    ``report.bad_rows`` counts only conversations the template could not render here (with skip_bad_rows);
    prepare_datasets adds the rows skipped while loading.
    """
    opts = _Options.of(data)
    size = data.preprocessing_batch_size
    workers = data.preprocessing_num_workers or 1
    out: list[Encoded] = []
    dropped = truncated = bad = 0
    with gc_paused():
        for outcome in _outcomes(convs, tokenizer, template, opts, size, workers):
            for sample, was_truncated in outcome:
                if isinstance(sample, DataError):
                    if not opts.skip_bad_rows:
                        raise sample
                    bad += 1
                    logger.warning("skipped: %s", sample)
                elif sample is None:
                    dropped += 1
                else:
                    truncated += was_truncated
                    out.append(sample)
    report = EncodeReport(
        kept=len(out),
        dropped=dropped,
        truncated=truncated,
        bad_rows=bad,
        length_percentiles=percentiles([len(s.input_ids) for s in out]),
        cutoff_len=data.cutoff_len,
    )
    return out, report
