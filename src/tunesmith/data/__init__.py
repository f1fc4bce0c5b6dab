"""The data layer: files → conversations → template → token ids and labels → train / validation split.

``prepare_datasets(cfg, tokenizer)`` runs the whole path; the modules hold the steps:
sources (files, dataset_info.json) → formats (alpaca / sharegpt / openai → Conversation) → templates
(registry and ``auto``) → segments (exact tokenization) → encode (labels, truncation, report) → split.
Several datasets are mixed by ``mix_strategy`` (:mod:`tunesmith.data.mix`); ``streaming: true`` returns a lazy
:class:`~tunesmith.data.stream.StreamingData` instead of a list (:mod:`tunesmith.data.stream`). The prepared samples
of every stage (token rows, packed rows, pairs, feedback examples) are cached on disk (:mod:`tunesmith.data.cache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunesmith.config import Config
from tunesmith.data.cache import cache_key, cache_location, load_cached, save_cache
from tunesmith.data.conversation import Conversation, Turn
from tunesmith.data.documents import encode_documents, read_documents
from tunesmith.data.encode import Encoded, EncodeReport, encode_conversation, encode_dataset, gc_paused
from tunesmith.data.feedback import FeedbackSample, encode_feedback, read_feedback
from tunesmith.data.pack import PackedSample, pack_samples
from tunesmith.data.pairs import PairSample, encode_pairs, read_pairs
from tunesmith.data.sources import BadRows, load_conversations, read_conversations
from tunesmith.data.split import split_train_val
from tunesmith.data.stream import StreamingData
from tunesmith.data.templates import TEMPLATES, Template, get_template
from tunesmith.errors import DataError
from tunesmith.logging import get_logger

__all__ = [
    "TEMPLATES",
    "Conversation",
    "EncodeReport",
    "Encoded",
    "PreparedData",
    "StreamingData",
    "Template",
    "Turn",
    "encode_conversation",
    "encode_dataset",
    "get_template",
    "load_conversations",
    "prepare_datasets",
]

logger = get_logger("data")


@dataclass
class PreparedData:
    # packed rows with packing: true; a lazy stream with streaming: true; pairs (dpo, rm), feedback examples (kto)
    train: list[Encoded] | list[PackedSample] | list[PairSample] | list[FeedbackSample] | StreamingData
    val: list[Encoded] | list[PairSample] | list[FeedbackSample]
    report: EncodeReport
    template: Template


def prepare_datasets(cfg: Config, tokenizer: Any) -> PreparedData:
    """Load ``cfg.dataset``, encode it with ``cfg.template`` and split off ``cfg.val_size`` (seeded by cfg.seed)."""
    template = get_template(
        cfg.template, tokenizer
    )  # first: a template/tokenizer mismatch fails before reading
    if cfg.streaming:
        return _prepare_stream(cfg, tokenizer, template)  # nothing to cache: the stream is encoded while training
    with gc_paused():  # reading, encoding, packing and the cache allocate millions of objects and no cycles
        return _prepare_or_load(cfg, tokenizer, template)


def _prepare_or_load(cfg: Config, tokenizer: Any, template: Template) -> PreparedData:
    key = cache_key(cfg, tokenizer, template)
    location = cache_location(cfg, key)  # every stage: token rows, packed rows, pairs or feedback examples
    if location is not None and not cfg.overwrite_cache:
        cached = load_cached(location, key)
        if cached is not None:
            train, val, report = cached
            logger.info(report.format())
            logger.info(
                "data: %d training and %d validation rows loaded from the cache %s",
                len(train),
                len(val),
                location,
            )
            return PreparedData(train=train, val=val, report=report, template=template)  # type: ignore[arg-type]
        if cfg.tokenized_path and (location / "meta.json").exists():
            logger.warning(
                "data: tokenized_path %s was made from other data, tokenizer, template or settings; "
                "rebuilding it",
                location,
            )
    prepared = _prepare(cfg, tokenizer, template)
    if location is not None:
        save_cache(location, key, prepared.train, prepared.val, prepared.report)  # type: ignore[arg-type]
        logger.debug("data: cached the encoded samples in %s", location)
    return prepared


def _prepare(cfg: Config, tokenizer: Any, template: Template) -> PreparedData:
    bad = BadRows(cfg.skip_bad_rows)
    # read while encoding: only the batch being encoded is held as text, never every conversation at once
    samples, report, noun = _encode_stage(cfg, tokenizer, template, bad)
    report.bad_rows += bad.count
    if noun is not None:  # pt logs its own line (documents → blocks)
        logger.info(report.format().replace("samples", noun, 1))
    if not samples:
        raise DataError(
            f"no training samples left from dataset={','.join(cfg.dataset)} ({report.dropped} too long for "
            f"cutoff_len={cfg.cutoff_len}, {report.bad_rows} bad rows); raise cutoff_len or fix the data"
        )
    if cfg.eval_dataset:
        train, val = samples, _encode_eval_dataset(cfg, tokenizer, template)
    else:
        train, val = split_train_val(samples, cfg.val_size, cfg.seed)
    if val:
        logger.info("data: %d training and %d validation samples (seed %d)", len(train), len(val), cfg.seed)
    if cfg.packing or cfg.neat_packing:
        # only the training split: validation stays one sample per row, its loss is the same either way
        train, stats = pack_samples(train, cfg.cutoff_len)
        logger.info(stats.format())
    return PreparedData(train=train, val=val, report=report, template=template)


def _encode_stage(cfg: Config, tokenizer: Any, template: Template, bad: BadRows) -> tuple[list, EncodeReport, str | None]:
    """The stage's examples read and encoded (bad rows go to ``bad``), and what its report counts."""
    if cfg.stage == "pt":
        return (*encode_documents(read_documents(cfg, bad), tokenizer, cfg), None)
    if cfg.stage == "kto":
        return (*encode_feedback(read_feedback(cfg, bad), tokenizer, template, cfg), "feedback examples")
    if cfg.stage in ("dpo", "rm"):
        return (*encode_pairs(read_pairs(cfg, bad), tokenizer, template, cfg), "pairs")
    return (*encode_dataset(read_conversations(cfg, bad), tokenizer, template, cfg), "samples")


def _encode_eval_dataset(cfg: Config, tokenizer: Any, template: Template) -> list:
    """eval_dataset, read whole and in order (the training mix and its probabilities are not its own) and
    encoded like the training data of the stage."""
    only_eval = {"dataset": cfg.eval_dataset, "mix_strategy": "concat", "interleave_probs": None, "streaming": False}
    bad = BadRows(cfg.skip_bad_rows)
    samples, report, _ = _encode_stage(cfg.model_copy(update=only_eval), tokenizer, template, bad)
    if not samples:
        raise DataError(
            f"no validation samples left from eval_dataset={','.join(cfg.eval_dataset or [])} ({report.dropped} too "
            f"long for cutoff_len={cfg.cutoff_len}, {bad.count} bad rows); raise cutoff_len or fix the data"
        )
    return samples


def _prepare_stream(cfg: Config, tokenizer: Any, template: Template) -> PreparedData:
    stream = StreamingData(cfg, tokenizer, template)
    val: list[Encoded] = []
    report = stream.report
    if cfg.eval_dataset:
        val = _encode_eval_dataset(cfg, tokenizer, template)
        logger.info("data: %d validation samples from eval_dataset=%s", len(val), ",".join(cfg.eval_dataset))
    elif stream.val_rows:
        val, report = encode_dataset(stream.val_conversations(), tokenizer, template, cfg)
        logger.info(
            "data: streaming; the first %d rows of the stream are the validation set (%d samples)",
            stream.val_rows,
            len(val),
        )
    logger.info(
        "data: streaming %s (%s); rows are read, shuffled in a buffer of %d rows (seed %d) and encoded while "
        "training",
        ",".join(cfg.dataset),
        cfg.mix_strategy,
        cfg.buffer_size,
        cfg.seed,
    )
    return PreparedData(train=stream, val=val, report=report, template=template)
