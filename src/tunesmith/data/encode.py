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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.conversation import Conversation
from tunesmith.data.segments import EncodedTurns
from tunesmith.data.templates import Template
from tunesmith.errors import DataError
from tunesmith.logging import get_logger

IGNORE_INDEX = -100
_BATCH = 2048  # conversations per tokenizer call: big enough for Rust-side parallelism, bounded memory

logger = get_logger("data")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


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


def _shorten(
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


def assemble(
    turns: EncodedTurns, cutoff_len: int, train_on_prompt: bool = False, mask_history: bool = False
) -> tuple[Encoded | None, bool]:
    """Concatenate exchanges into one sample within cutoff_len; returns (sample or None, truncated)."""
    pairs, head_len = turns.pairs, turns.head_len
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
        fitted = _shorten(kept[0][0], kept[0][1], kept[0][2], cutoff_len)
        if fitted is None:
            return None, True
        kept[0] = (*fitted, kept[0][2], kept[0][3])
        truncated = True
    input_ids: list[int] = []
    labels: list[int] = []
    for prompt, reply, _, index in kept:
        input_ids += prompt
        labels += prompt if train_on_prompt else [IGNORE_INDEX] * len(prompt)
        input_ids += reply
        labels += reply if (not mask_history or index == n - 1) else [IGNORE_INDEX] * len(reply)
    if all(label == IGNORE_INDEX for label in labels):
        return None, truncated
    return Encoded(input_ids, labels), truncated


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


def encode_dataset(
    convs: list[Conversation], tokenizer: Any, template: Template, cfg: Any
) -> tuple[list[Encoded], EncodeReport]:
    """All conversations → samples (in order), with the kept / dropped / truncated counts and lengths.

    ``report.bad_rows`` counts only conversations the template could not render here (with skip_bad_rows);
    prepare_datasets adds the rows skipped while loading.
    """
    out: list[Encoded] = []
    dropped = truncated = bad = 0
    for start in range(0, len(convs), _BATCH):
        for turns in template.encode_many(tokenizer, convs[start : start + _BATCH], cfg.default_system):
            if isinstance(turns, DataError):
                if not cfg.skip_bad_rows:
                    raise turns
                bad += 1
                logger.warning("skipped: %s", turns)
                continue
            sample, was_truncated = assemble(turns, cfg.cutoff_len, cfg.train_on_prompt, cfg.mask_history)
            if sample is None:
                dropped += 1
                continue
            truncated += was_truncated
            out.append(sample)
    report = EncodeReport(
        kept=len(out),
        dropped=dropped,
        truncated=truncated,
        bad_rows=bad,
        length_percentiles=percentiles([len(s.input_ids) for s in out]),
        cutoff_len=cfg.cutoff_len,
    )
    return out, report
