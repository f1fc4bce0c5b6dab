"""What ``tunesmith data inspect`` reads a row as, per stage, and the token counts of pairs, feedback and raw text.

A config's ``stage`` decides the row kind (sft: conversations; dpo / rm: preference pairs; kto: tagged feedback;
pt: raw-text documents); a bare file is read as the kind its first row looks like. Pairs and feedback examples
count the prompt and the (longer) reply, as their encoders do, and each one whose prompt alone is longer than
``cutoff_len`` is listed with its location: its prompt is cut, or the example is dropped when no reply token fits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from tunesmith.config import Config
from tunesmith.data.documents import detect_document_format, row_to_document, tokenize_documents
from tunesmith.data.encode import percentiles, prompt_and_last_reply
from tunesmith.data.feedback import Feedback, detect_feedback_format, fit_feedback, row_to_feedback
from tunesmith.data.formats import FormatSpec, detect_format, row_to_conversation
from tunesmith.data.pairs import PreferencePair, detect_pair_format, fit_pair, row_to_pair
from tunesmith.data.segments import EncodedTurns
from tunesmith.data.templates import Template, get_template
from tunesmith.errors import DataError


@dataclass(frozen=True)
class RowKind:
    noun: str
    convert: Callable[[Any, FormatSpec, str], Any]
    detect: Callable[[Any], FormatSpec | None]


CONVERSATIONS = RowKind("conversations", row_to_conversation, detect_format)
PAIRS = RowKind("preference pairs", row_to_pair, detect_pair_format)
FEEDBACK = RowKind("feedback examples", row_to_feedback, detect_feedback_format)
DOCUMENTS = RowKind("documents", row_to_document, detect_document_format)
_BY_STAGE = {"sft": CONVERSATIONS, "dpo": PAIRS, "rm": PAIRS, "kto": FEEDBACK, "pt": DOCUMENTS}


def row_kind(stage: str | None, spec: FormatSpec | None = None, first_row: Any = None) -> RowKind:
    """The config's stage decides; without one (a bare file), dataset_info.json's ranking / kto_tag, else the
    first row's columns."""
    if stage is not None:
        return _BY_STAGE[stage]
    if spec is not None:
        return PAIRS if spec.ranking else FEEDBACK if "kto_tag" in spec.columns else CONVERSATIONS
    for kind in (PAIRS, FEEDBACK):
        if first_row is not None and kind.detect(first_row) is not None:
            return kind
    return CONVERSATIONS


@dataclass
class LengthReport:
    """Untruncated lengths (prompt + longer reply, or a document's tokens), and what cutoff_len does to them."""

    lengths: list[int]
    truncated: int
    dropped: int
    long_prompts: list[tuple[str, str]]  # (location, problem)
    lines: list[str]


def _turns(examples: Sequence[Any], conversations: Callable[[Any], list[Any]], tokenizer: Any, template: Template,
           cfg: Config) -> Iterator[tuple[Any, list[EncodedTurns | DataError]]]:
    """Each example with the encoded turns of its conversations, a batch of examples per tokenizer call."""
    it = iter(examples)
    while batch := list(islice(it, cfg.preprocessing_batch_size)):
        convs = [conv for example in batch for conv in conversations(example)]
        encoded = template.encode_many(tokenizer, convs, cfg.default_system)
        per = len(encoded) // len(batch)
        for index, example in enumerate(batch):
            yield example, encoded[index * per : (index + 1) * per]


def _long_prompt(where: str, prompt: int, cutoff_len: int, dropped: bool) -> tuple[str, str]:
    fate = "no reply token fits, so it is dropped" if dropped else "the prompt is cut to fit"
    return where, f"the prompt alone is {prompt} tokens, more than cutoff_len={cutoff_len}: {fate}"


def pair_lengths(pairs: Sequence[PreferencePair], tokenizer: Any, template: Template, cfg: Config) -> LengthReport:
    report = LengthReport([], 0, 0, [], [])
    for pair, encoded in _turns(pairs, lambda p: [p.chosen, p.rejected], tokenizer, template, cfg):
        if any(isinstance(turns, DataError) for turns in encoded):
            continue  # not renderable: preview and training name it
        chosen, rejected = encoded
        prompt, reply = prompt_and_last_reply(chosen)  # type: ignore[arg-type]
        longer = max(len(reply), len(prompt_and_last_reply(rejected)[1]))  # type: ignore[arg-type]
        sample, truncated = fit_pair(chosen, rejected, cfg.cutoff_len)  # type: ignore[arg-type]
        _count(report, pair.chosen.source, len(prompt), len(prompt) + longer, sample is None, truncated, cfg)
    return report


def feedback_lengths(items: Sequence[Feedback], tokenizer: Any, template: Template, cfg: Config) -> LengthReport:
    report = LengthReport([], 0, 0, [], [])
    for item, (turns,) in _turns(items, lambda f: [f.conversation], tokenizer, template, cfg):
        if isinstance(turns, DataError):
            continue
        prompt, completion = prompt_and_last_reply(turns)
        fitted, truncated = fit_feedback(turns, cfg.cutoff_len)
        _count(report, item.conversation.source, len(prompt), len(prompt) + len(completion), fitted is None,
               truncated, cfg)
    desirable = sum(item.desirable for item in items)
    report.lines.append(f"kto_tag: {desirable} desirable, {len(items) - desirable} undesirable")
    return report


def _count(report: LengthReport, where: str, prompt: int, full: int, dropped: bool, truncated: bool,
           cfg: Config) -> None:
    report.lengths.append(full)
    report.dropped += dropped
    report.truncated += truncated and not dropped
    if prompt > cfg.cutoff_len or dropped:
        report.long_prompts.append(_long_prompt(where, prompt, cfg.cutoff_len, dropped))


def document_lengths(docs: Sequence[Any], tokenizer: Any, cfg: Config) -> LengthReport:
    lengths = [len(ids) for ids in tokenize_documents(docs, tokenizer, cfg.preprocessing_batch_size)]
    total, cutoff = sum(lengths), cfg.cutoff_len
    longer = sum(n > cutoff for n in lengths)
    unit = "pieces (packing: true)" if cfg.packing or cfg.neat_packing else "blocks"
    line = (f"{len(lengths)} documents, {total} tokens (EOS between documents) → about "
            f"{-(-total // cutoff)} {unit} of cutoff_len={cutoff}; {longer} documents span more than one")
    return LengthReport(lengths, longer, 0, [], [line])


def stage_lengths(kind: RowKind, examples: Sequence[Any], tokenizer: Any, cfg: Config) -> LengthReport:
    """The lengths of pairs, feedback or documents (conversations are inspect.py's token_stats)."""
    if kind is DOCUMENTS:
        return document_lengths(examples, tokenizer, cfg)
    template = get_template(cfg.template, tokenizer)
    if kind is PAIRS:
        return pair_lengths(examples, tokenizer, template, cfg)
    return feedback_lengths(examples, tokenizer, template, cfg)


def length_lines(kind: RowKind, report: LengthReport, cfg: Config) -> list[str]:
    """The report's lines for pairs, feedback or documents (SFT's are inspect.py's own)."""
    p = percentiles(report.lengths)
    what = "document" if kind is DOCUMENTS else "example (prompt + longest reply)"
    out = [f"tokens per {what}, before truncation: p50={p['p50']} p90={p['p90']} p99={p['p99']} max={p['max']}"]
    out += report.lines
    if kind is not DOCUMENTS:
        out.append(f"cutoff_len={cfg.cutoff_len}: {report.truncated} of {len(report.lengths)} {kind.noun} "
                   f"truncated, {report.dropped} dropped (no reply token fits)")
    if report.long_prompts:
        out.append(f"{len(report.long_prompts)} {kind.noun} with a prompt longer than cutoff_len:")
        out += [f"  {where}: {problem}" for where, problem in report.long_prompts]
    return out
