"""``streaming: true``: train on data larger than memory, read, mixed, shuffled, encoded and packed lazily.

A pass over the stream, for pass ``p`` (0, 1, ...):

1. every dataset is read row by row (``.jsonl`` line by line, ``.csv`` record by record, ``.parquet`` batch by
   batch; a ``.json`` array file is parsed whole, so use ``.jsonl`` for really large data), at most
   ``max_samples`` rows each;
2. the datasets are mixed by ``mix_strategy`` / ``interleave_probs`` with ``seed`` (:mod:`tunesmith.data.mix`,
   the same rows in every pass);
3. the first ``val_size`` rows (a row count: a stream has no known length, so a fraction is refused) are the
   validation set, kept out of every pass;
4. the rest goes through a shuffle buffer of ``buffer_size`` rows seeded with ``seed + p`` (HF datasets' buffer
   shuffle: each new row replaces a random row of the full buffer, which is emitted), so every pass has its own
   order;
5. the shuffled rows are encoded in batches of ``preprocessing_batch_size`` rows; with ``packing`` each batch's
   samples are packed together (best-fit decreasing within the batch, :mod:`tunesmith.data.pack`), so the
   packing window is ``preprocessing_batch_size`` rows.

Memory: the shuffle buffer, one preprocessing batch and one accumulation window; never the dataset.

Steps take windows of ``gradient_accumulation_steps × per_device_train_batch_size × world_size`` samples from the
stream in order, with the rank layout of :mod:`tunesmith.data.loader` (every rank reads the whole stream and
collates only its own micro-batches), so each sample is trained once per pass on one rank. When the stream ends
before ``max_steps``, pass ``p + 1`` starts (the last window of a pass may be short; windows never cross passes).

The position (:class:`~tunesmith.data.loader.DataPosition`) is world-size-free: the pass, the samples consumed in
it, and the cursor ``(stream_rows, stream_skip)``: the next sample is number ``stream_skip`` of the
preprocessing batch that starts at shuffled row ``stream_rows``. Resuming re-reads and re-shuffles the first
``stream_rows`` rows without encoding them (the buffer must be replayed to reproduce the order), encodes the
batch from there and skips ``stream_skip`` samples: the run continues with exactly the samples the interrupted
one would have seen next.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import islice
from typing import Any, NamedTuple

from tunesmith.config import Config
from tunesmith.config.schema import DataArgs
from tunesmith.data.conversation import Conversation
from tunesmith.data.encode import EncodeReport, encode_dataset
from tunesmith.data.loader import Batch, Collator, DataPosition, EncodedLike, TokenCollator, rank_slices
from tunesmith.data.mix import mix
from tunesmith.data.pack import pack_samples
from tunesmith.data.sources import BadRows, DatasetSource, iter_conversations, resolve_sources
from tunesmith.data.templates import Template
from tunesmith.errors import ConfigError, DataError
from tunesmith.logging import get_logger

logger = get_logger("data")


def shuffle_buffer(rows: Iterator[Any], size: int, seed: int) -> Iterator[Any]:
    """Shuffle a stream with a buffer of ``size`` rows (HF datasets' algorithm; ``random.Random(seed)``)."""
    rng = random.Random(seed)
    buffer: list[Any] = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = row
    rng.shuffle(buffer)
    yield from buffer


def stream_val_rows(data: DataArgs) -> int:
    """``val_size`` as a row count taken from the head of the stream; a fraction cannot be computed."""
    if data.val_size <= 0:
        return 0
    if data.val_size < 1 or data.val_size != int(data.val_size):
        raise ConfigError(
            f"val_size={data.val_size:g} is a fraction, but with streaming: true the data has no known length; "
            "give a row count instead (val_size: 500 holds out the stream's first 500 rows)"
        )
    return int(data.val_size)


class Unit(NamedTuple):
    """A training sample (a packed row with packing) and where it sits in its pass."""

    sample: EncodedLike
    batch_row: int  # shuffled row at which its preprocessing batch starts
    index: int  # its index among that batch's samples


class StreamingData:
    """The training stream of a config (see the module docstring); :meth:`units` opens one pass of it."""

    def __init__(self, cfg: Config, tokenizer: Any, template: Template) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.template = template
        self.sources: list[DatasetSource] = resolve_sources(cfg)  # fail on a bad name now, not mid-run
        self.val_rows = stream_val_rows(cfg)
        self.packing = bool(cfg.packing or cfg.neat_packing)
        self.bad = BadRows(cfg.skip_bad_rows)
        self.report = EncodeReport(0, 0, 0, 0, cutoff_len=cfg.cutoff_len)  # counts of the samples encoded so far

    def __repr__(self) -> str:
        names = ",".join(source.name for source in self.sources)
        return f"StreamingData({names}, buffer_size={self.cfg.buffer_size})"

    def mixed_rows(self) -> Iterator[Conversation]:
        """Every dataset's conversations, lazily, mixed by mix_strategy (the same order in every pass)."""
        cfg = self.cfg
        factories = [
            (lambda source=source: iter_conversations(source, cfg.max_samples, cfg.placeholders, self.bad))
            for source in self.sources
        ]
        return mix(factories, cfg.mix_strategy, cfg.interleave_probs, cfg.seed)

    def val_conversations(self) -> list[Conversation]:
        return list(islice(self.mixed_rows(), self.val_rows))

    def rows(self, pass_index: int) -> Iterator[Conversation]:
        """Pass ``pass_index``'s training rows: the mixed rows after the validation head, buffer-shuffled."""
        rows = islice(self.mixed_rows(), self.val_rows, None)
        return shuffle_buffer(rows, self.cfg.buffer_size, self.cfg.seed + pass_index)

    def units(self, pass_index: int, start_row: int = 0, skip: int = 0) -> Iterator[Unit]:
        """The samples of pass ``pass_index`` from cursor ``(start_row, skip)`` on (see the module docstring)."""
        rows = self.rows(pass_index)
        if start_row:
            skipped = sum(1 for _ in islice(rows, start_row))  # replay the shuffle buffer; no encoding
            if skipped < start_row:
                return
        batch_row, size = start_row, self.cfg.preprocessing_batch_size
        while True:
            convs = list(islice(rows, size))
            if not convs:
                return
            samples, report = encode_dataset(convs, self.tokenizer, self.template, self.cfg)
            self._count(report)
            if self.packing and samples:
                samples, _ = pack_samples(samples, self.cfg.cutoff_len)
            # skip carries over batches: resuming with another preprocessing_batch_size (no packing) stays exact
            for index in range(skip, len(samples)):
                yield Unit(samples[index], batch_row, index)
            skip = max(0, skip - len(samples))
            batch_row += len(convs)

    def head(self, count: int) -> list[EncodedLike]:
        """The first ``count`` training samples of pass 0 (for previews; reads only what they need)."""
        return [unit.sample for unit in islice(self.units(0), count)]

    def _count(self, report: EncodeReport) -> None:
        total = self.report
        total.kept += report.kept
        total.dropped += report.dropped
        total.truncated += report.truncated
        total.bad_rows += report.bad_rows


class StreamLoader:
    """Micro-batches of a :class:`StreamingData` for this rank, by accumulation window, from a position; the
    streaming twin of :class:`~tunesmith.data.loader.EpochLoader` (same :meth:`windows_from`)."""

    def __init__(
        self,
        data: StreamingData,
        batch_size: int,
        pad_token_id: int = 0,
        rank: int = 0,
        world_size: int = 1,
        collator: Collator | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.data = data
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.rank = rank
        self.world_size = world_size
        self.collator = collator or TokenCollator(pad_token_id)

    @property
    def rounds_per_epoch(self) -> None:
        return None  # a stream has no known length (epoch_float then counts whole passes)

    @property
    def samples_per_epoch(self) -> None:
        return None

    def unit_windows(self, position: DataPosition, accumulation: int) -> Iterator[tuple[DataPosition, list[Unit]]]:
        """The global windows (all ranks' samples) from ``position``, each with the position after it."""
        size = accumulation * self.batch_size * self.world_size
        units = self.data.units(position.epoch, position.stream_rows, position.stream_skip)
        upcoming = next(units, None)
        if upcoming is None:
            if position.samples == 0 and position.stream_rows == 0:
                raise DataError(
                    f"the stream of dataset={','.join(self.data.cfg.dataset)} yields no training samples "
                    f"(val_size takes its first {self.data.val_rows} rows; the rest are dropped or too long for "
                    f"cutoff_len={self.data.cfg.cutoff_len}); check the data, val_size and cutoff_len"
                )
            # resumed exactly at the end of a pass: go on with the next one
            yield from self.unit_windows(DataPosition(position.epoch + 1), accumulation)
            return
        consumed = position.samples
        while upcoming is not None:
            window = [upcoming, *islice(units, size - 1)]
            upcoming = next(units, None)  # one sample of look-ahead: the position after a pass's end is the next pass
            consumed += len(window)
            last = window[-1]
            if upcoming is None:
                logger.info("data: stream pass %d done after %d samples", position.epoch, consumed)
                after = DataPosition(position.epoch + 1)
            else:
                after = DataPosition(position.epoch, consumed, last.batch_row, last.index + 1)
            yield after, window

    def windows_from(self, position: DataPosition, accumulation: int) -> Iterator[tuple[DataPosition, list[Batch]]]:
        """This rank's collated micro-batches per window (masked copies where it has none, as in EpochLoader)."""
        for after, window in self.unit_windows(position, accumulation):
            mine = rank_slices(window, self.batch_size, self.rank, self.world_size)
            yield after, [
                self.collator.collate([unit.sample for unit in units]) if units
                else self.collator.masked(window[-1].sample)
                for units in mine
            ]
