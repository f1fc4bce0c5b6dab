"""Preference pairs (``stage: dpo``): rows with a prompt and a chosen and a rejected reply → token ids.

Layouts (LLaMA-Factory's ``ranking: true`` entries, as in its dpo_en_demo): sharegpt / openai rows whose
``messages`` column ends with the user turn and whose ``chosen`` / ``rejected`` columns each hold one assistant
message (or just its text); alpaca rows with instruction / input (and history) and ``chosen`` / ``rejected``
strings. A file without a dataset_info.json entry is read as pairs when its first row has both columns.

Each pair is rendered twice with the chat template (prompt + chosen, prompt + rejected); both share the prompt
ids. A pair longer than ``cutoff_len`` is fitted as one SFT exchange is (:func:`~tunesmith.data.encode.shorten_exchange`
on the prompt and the longer reply), then both replies are cut to the same budget, so the prompt stays identical
for both; a pair whose prompt alone leaves no room for a reply token is dropped and counted.
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
    require_string,
    row_to_conversation,
)
from tunesmith.data.loader import Batch, collate
from tunesmith.data.segments import EncodedTurns
from tunesmith.data.sources import BadRows, DatasetSource, iter_examples, read_mixed
from tunesmith.data.templates import Template
from tunesmith.errors import DataError
from tunesmith.logging import get_logger

logger = get_logger("data")
_PAIR_LAYOUTS = (
    "stage: dpo and rm need preference pairs: rows with chosen and rejected columns and the prompt as instruction / "
    "input or as conversations / messages"
)


@dataclass
class PreferencePair:
    chosen: Conversation
    rejected: Conversation


@dataclass
class PairSample:
    """One encoded pair: the shared prompt and the two replies (their end-of-turn tokens included)."""

    prompt: TokenIds
    chosen: TokenIds
    rejected: TokenIds
    # the reference's log-probs of chosen and rejected, when precomputed (precompute_ref_log_probs)
    reference: tuple[float, float] | None = None

    @property
    def input_ids(self) -> TokenIds:
        """All ids of the pair (for lengths and fingerprints)."""
        return TokenIds([*self.prompt, *self.chosen, *self.rejected])

    @property
    def labels(self) -> TokenIds:
        return TokenIds([IGNORE_INDEX] * len(self.prompt) + [*self.chosen, *self.rejected])

    def rows(self) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
        """(input_ids, labels) of prompt + chosen and of prompt + rejected; the prompt is never a target."""
        prompt, masked = list(self.prompt), [IGNORE_INDEX] * len(self.prompt)
        return (
            (prompt + list(self.chosen), masked + list(self.chosen)),
            (prompt + list(self.rejected), masked + list(self.rejected)),
        )


def detect_pair_format(row: Any) -> FormatSpec | None:
    """Pairs are rows with ``chosen`` and ``rejected``; the prompt's layout is detected as for SFT."""
    if not (isinstance(row, dict) and "chosen" in row and "rejected" in row):
        return None
    if "instruction" in row:
        return FormatSpec.build("alpaca", ranking=True)
    spec = detect_format(row)
    return None if spec is None else FormatSpec.build(spec.formatting, spec.columns, ranking=True)


def _reply_message(value: Any, column: str, spec: FormatSpec) -> Any:
    """A chosen / rejected value as an assistant message of the row's own layout."""
    if isinstance(value, str):
        return {spec.tags["role_tag"]: spec.tags["assistant_tag"], spec.tags["content_tag"]: value}
    if isinstance(value, list) and len(value) == 1:  # some exports wrap the message in a list
        value = value[0]
    if not isinstance(value, dict):
        raise RowError(f"column '{column}' is {kind_of(value)}, expected an assistant message or its text")
    return value


def row_to_pair(row: Any, spec: FormatSpec, source: str = "") -> PreferencePair:
    """One pairwise row; raises RowError when either side is not a valid conversation."""
    row = require_object(row)
    sides = []
    for side in ("chosen", "rejected"):
        column = spec.columns.get(side, side)
        if row.get(column) is None:
            raise RowError(f"missing column '{column}' (a preference pair needs chosen and rejected)")
        if spec.formatting == "alpaca":
            one = {**row, spec.columns["response"]: require_string(row[column], f"column '{column}'")}
        else:
            messages_column = spec.columns["messages"]
            messages = row.get(messages_column)
            if not isinstance(messages, list):
                raise RowError(f"column '{messages_column}' is {kind_of(messages)}, expected a list of messages")
            one = {**row, messages_column: [*messages, _reply_message(row[column], column, spec)]}
        try:
            sides.append(row_to_conversation(one, spec, source))
        except RowError as err:
            raise RowError(f"{side}: {err}") from None
    return PreferencePair(*sides)


def read_pairs(cfg: Config, bad: BadRows) -> Iterator[PreferencePair]:
    """The preference pairs of ``cfg.dataset``, lazily, mixed as conversations are."""

    def reader(source: DatasetSource, rows_bad: BadRows) -> Iterator[PreferencePair]:
        if source.spec is not None and not source.spec.ranking:
            raise DataError(
                f"{source.where} is not preference data; stage: {cfg.stage} needs pairs (ranking: true in "
                "dataset_info.json, with chosen and rejected columns)"
            )
        pairs = iter_examples(source, cfg.max_samples, rows_bad, row_to_pair, detect_pair_format, _PAIR_LAYOUTS)
        for pair in pairs:
            yield PreferencePair(fill_placeholders(pair.chosen, cfg.placeholders),
                                 fill_placeholders(pair.rejected, cfg.placeholders))

    return read_mixed(cfg, bad, reader, "preference pairs")


def fit_pair(
    turns_chosen: EncodedTurns, turns_rejected: EncodedTurns, cutoff_len: int
) -> tuple[PairSample | None, bool]:
    """One pair within cutoff_len (see the module docstring): (sample or None when dropped, truncated)."""
    prompt, chosen = prompt_and_last_reply(turns_chosen)
    prompt_rejected, rejected = prompt_and_last_reply(turns_rejected)
    if prompt != prompt_rejected:  # the template rendered the shared history differently: never expected
        raise DataError("the chosen and rejected replies of a pair got different prompts from the template")
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer <= cutoff_len:
        return PairSample(TokenIds(prompt), TokenIds(chosen), TokenIds(rejected)), False
    tail = turns_chosen.tail_lens[-1] if turns_chosen.tail_lens else 0
    fitted = shorten_exchange(prompt, chosen if len(chosen) >= len(rejected) else rejected, tail, cutoff_len)
    if fitted is None:
        return None, True
    prompt, budget = fitted[0], len(fitted[1])
    return PairSample(TokenIds(prompt), TokenIds(chosen[:budget]), TokenIds(rejected[:budget])), True


def encode_pairs(
    pairs: Iterable[PreferencePair], tokenizer: Any, template: Template, data: DataArgs
) -> tuple[list[PairSample], EncodeReport]:
    """All pairs → samples, with the kept / dropped / truncated counts (a batch of
    ``preprocessing_batch_size`` pairs per tokenizer call)."""
    out: list[PairSample] = []
    dropped = truncated = bad = 0
    it = iter(pairs)
    while batch := list(islice(it, data.preprocessing_batch_size)):
        convs = [conv for pair in batch for conv in (pair.chosen, pair.rejected)]
        encoded = template.encode_many(tokenizer, convs, data.default_system)
        for chosen, rejected in zip(encoded[0::2], encoded[1::2], strict=True):
            error = next((e for e in (chosen, rejected) if isinstance(e, DataError)), None)
            if error is not None:
                if not data.skip_bad_rows:
                    raise error
                bad += 1
                logger.warning("skipped: %s", error)
                continue
            sample, was_truncated = fit_pair(chosen, rejected, data.cutoff_len)  # type: ignore[arg-type]
            if sample is None:
                dropped += 1
                continue
            truncated += was_truncated
            out.append(sample)
    lengths = [len(s.prompt) + max(len(s.chosen), len(s.rejected)) for s in out]
    report = EncodeReport(kept=len(out), dropped=dropped, truncated=truncated, bad_rows=bad,
                          length_percentiles=percentiles(lengths), cutoff_len=data.cutoff_len)
    return out, report


@dataclass(frozen=True)
class PairCollator:
    """B pairs → one batch of 2B rows: prompt + chosen for each pair, then prompt + rejected for each."""

    pad_token_id: int

    def collate(self, samples: Sequence[PairSample]) -> Batch:
        rows = [sample.rows()[side] for side in (0, 1) for sample in samples]
        batch = collate([Encoded(ids, labels) for ids, labels in rows], self.pad_token_id)
        batch.reference_logps = stacked_reference(samples)
        return batch

    def masked(self, sample: PairSample) -> Batch:
        batch = self.collate([sample])
        return Batch(batch.input_ids, torch.full_like(batch.labels, IGNORE_INDEX), batch.attention_mask,
                     reference_logps=batch.reference_logps)


def stacked_reference(samples: Sequence[PairSample] | Sequence[Any]) -> torch.Tensor | None:
    """The precomputed reference log-probs of B two-row samples in row order (every first row, then every
    second), or None unless every sample has them."""
    if not samples or any(sample.reference is None for sample in samples):
        return None
    return torch.tensor([sample.reference[side] for side in (0, 1) for sample in samples], dtype=torch.float32)


def pairs_with_targets(batch: Batch) -> torch.Tensor:
    """Per pair of a collated batch (chosen rows first): whether it has targets (a masked filler pair has none)."""
    chosen_labels = batch.labels[: batch.labels.size(0) // 2, 1:]
    return (chosen_labels != IGNORE_INDEX).any(dim=1)
