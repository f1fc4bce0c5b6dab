"""Unpaired feedback (``stage: kto``): conversations whose last reply is tagged desirable or not.

Layout (LLaMA-Factory's kto_en_demo): a sharegpt / openai / alpaca row whose ``kto_tag`` column (named in
dataset_info.json, e.g. ``columns: {messages: messages, kto_tag: label}``) holds true or false; a file without an
entry is read as feedback when its first row has a boolean ``kto_tag`` or ``label``. The last reply is the
completion (the only target); everything before it is the prompt, fitted within ``cutoff_len`` as an SFT
exchange is.

KTO's KL estimate needs mismatched pairs: each sample also carries another sample's completion (the previous one
in dataset order, the first takes the last, as TRL cycles completions within a batch), cut to fit after its own
prompt. They are fixed here, before shuffling, so they do not depend on the batch size or the number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch

from tunesmith.config import Config
from tunesmith.config.schema import DataArgs
from tunesmith.data.conversation import Conversation
from tunesmith.data.encode import (
    IGNORE_INDEX,
    Encoded,
    EncodeReport,
    TokenIds,
    percentiles,
    prompt_and_last_reply,
    shorten_exchange,
)
from tunesmith.data.formats import (
    FormatSpec,
    RowError,
    detect_format,
    fill_placeholders,
    kind_of,
    require_object,
    row_to_conversation,
)
from tunesmith.data.loader import Batch, collate
from tunesmith.data.pairs import stacked_reference
from tunesmith.data.segments import EncodedTurns
from tunesmith.data.sources import BadRows, DatasetSource, iter_examples, read_mixed
from tunesmith.data.templates import Template
from tunesmith.errors import DataError

_FEEDBACK_LAYOUTS = (
    "stage: kto needs feedback: conversations with a true / false kto_tag column (kto_tag: label in "
    "dataset_info.json)"
)


@dataclass
class Feedback:
    conversation: Conversation
    desirable: bool


@dataclass
class FeedbackSample:
    """One encoded example: prompt, completion, the mismatched completion for the KL estimate, and its tag."""

    prompt: TokenIds
    completion: TokenIds
    kl_completion: TokenIds
    desirable: bool
    # the reference's log-probs of completion and kl_completion, when precomputed (precompute_ref_log_probs)
    reference: tuple[float, float] | None = None

    @property
    def input_ids(self) -> TokenIds:
        return TokenIds([*self.prompt, *self.completion])

    @property
    def labels(self) -> TokenIds:
        return TokenIds([IGNORE_INDEX] * len(self.prompt) + [*self.completion])


def detect_feedback_format(row: Any) -> FormatSpec | None:
    if not isinstance(row, dict):
        return None
    tag = next((key for key in ("kto_tag", "label") if isinstance(row.get(key), bool)), None)
    spec = detect_format(row)
    if tag is None or spec is None:
        return None
    return FormatSpec.build(spec.formatting, {**spec.columns, "kto_tag": tag})


def row_to_feedback(row: Any, spec: FormatSpec, source: str = "") -> Feedback:
    row = require_object(row)
    column = spec.columns.get("kto_tag", "kto_tag")
    tag = row.get(column)
    if not isinstance(tag, bool):
        raise RowError(f"column '{column}' is {kind_of(tag)}, expected true or false (the kto_tag)")
    return Feedback(row_to_conversation(row, spec, source), tag)


def read_feedback(cfg: Config, bad: BadRows) -> Iterator[Feedback]:
    def reader(source: DatasetSource, rows_bad: BadRows) -> Iterator[Feedback]:
        if source.spec is not None and "kto_tag" not in source.spec.columns:
            raise DataError(f"{source.where} has no kto_tag column; {_FEEDBACK_LAYOUTS}")
        for item in iter_examples(source, cfg.max_samples, rows_bad, row_to_feedback, detect_feedback_format,
                                  _FEEDBACK_LAYOUTS):
            yield Feedback(fill_placeholders(item.conversation, cfg.placeholders), item.desirable)

    return read_mixed(cfg, bad, reader, "feedback examples")


def fit_feedback(turns: EncodedTurns, cutoff_len: int) -> tuple[tuple[list[int], list[int]] | None, bool]:
    """(prompt, completion) within cutoff_len, fitted as one SFT exchange is (None when the prompt alone leaves
    no room for a completion token), and whether it was truncated."""
    prompt, completion = prompt_and_last_reply(turns)
    if len(prompt) + len(completion) <= cutoff_len:
        return (prompt, completion), False
    tail = turns.tail_lens[-1] if turns.tail_lens else 0
    return shorten_exchange(prompt, completion, tail, cutoff_len), True


def encode_feedback(
    items: Iterable[Feedback], tokenizer: Any, template: Template, data: DataArgs
) -> tuple[list[FeedbackSample], EncodeReport]:
    """Feedback → samples within cutoff_len, then each paired with its mismatched completion."""
    kept: list[tuple[list[int], list[int], bool]] = []
    dropped = truncated = bad = 0
    it = iter(items)
    while batch := list(islice(it, data.preprocessing_batch_size)):
        encoded = template.encode_many(tokenizer, [item.conversation for item in batch], data.default_system)
        for item, turns in zip(batch, encoded, strict=True):
            if isinstance(turns, DataError):
                if not data.skip_bad_rows:
                    raise turns
                bad += 1
                continue
            fitted, was_truncated = fit_feedback(turns, data.cutoff_len)
            if fitted is None:
                dropped += 1
                continue
            truncated += was_truncated
            kept.append((*fitted, item.desirable))
    samples = [
        FeedbackSample(TokenIds(prompt), TokenIds(completion),
                       TokenIds(kept[i - 1][1][: max(data.cutoff_len - len(prompt), 1)]), desirable)
        for i, (prompt, completion, desirable) in enumerate(kept)
    ]
    report = EncodeReport(kept=len(samples), dropped=dropped, truncated=truncated, bad_rows=bad,
                          length_percentiles=percentiles([len(p) + len(c) for p, c, _ in kept]),
                          cutoff_len=data.cutoff_len)
    return samples, report


@dataclass
class TaggedBatch(Batch):
    """B examples as 2B rows (prompt + completion, then prompt + mismatched completion) and their tags."""

    desirable: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> TaggedBatch:
        moved = super().to(device)
        tags = None if self.desirable is None else self.desirable.to(device)
        return TaggedBatch(moved.input_ids, moved.labels, moved.attention_mask, moved.position_ids,
                           moved.reference_logps, moved.segments, desirable=tags)


@dataclass(frozen=True)
class FeedbackCollator:
    pad_token_id: int

    def collate(self, samples: Sequence[FeedbackSample]) -> TaggedBatch:
        rows = [(s.prompt, s.completion) for s in samples] + [(s.prompt, s.kl_completion) for s in samples]
        batch = collate([Encoded(TokenIds([*p, *c]), TokenIds([IGNORE_INDEX] * len(p) + [*c])) for p, c in rows],
                        self.pad_token_id)
        tags = torch.tensor([s.desirable for s in samples], dtype=torch.bool)
        return TaggedBatch(batch.input_ids, batch.labels, batch.attention_mask, None,
                           stacked_reference(samples), batch.segments, desirable=tags)

    def masked(self, sample: FeedbackSample) -> TaggedBatch:
        batch = self.collate([sample])
        batch.labels = torch.full_like(batch.labels, IGNORE_INDEX)
        return batch
