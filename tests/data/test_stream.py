"""streaming: true at the data level: lazy reading, seeded buffer shuffle, passes, the validation head, packing,
and a resume position that continues with exactly the next samples on any number of ranks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunesmith.config import Config
from tunesmith.data import StreamingData, load_conversations, prepare_datasets
from tunesmith.data.loader import DataPosition
from tunesmith.data.pack import PackedSample
from tunesmith.data.stream import StreamLoader, shuffle_buffer
from tunesmith.errors import ConfigError, DataError


def _rows(prefix: str, count: int) -> list[dict]:
    return [{"instruction": f"{prefix}{i}", "input": "", "output": f"answer {i}"} for i in range(count)]


def _write_jsonl(path: Path, rows: list[dict], broken_line: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if broken_line is not None:
        lines[broken_line - 1] = '{"instruction": "cut off'
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cfg(tmp_path: Path, dataset: str = "d.jsonl", **kw) -> Config:
    values = dict(
        dataset=dataset,
        dataset_dir=str(tmp_path),
        template="chatml",
        cutoff_len=64,
        streaming=True,
        max_steps=100,
        buffer_size=8,
        preprocessing_batch_size=5,
        seed=11,
    )
    values.update(kw)
    return Config(**values)


def _stream(cfg: Config, tokenizer) -> StreamingData:
    data = prepare_datasets(cfg, tokenizer)
    assert isinstance(data.train, StreamingData)
    return data.train


def _question(tokenizer, sample) -> str:
    text = tokenizer.decode(sample.input_ids)
    return text.split("user\n", 1)[1].split("<|im_end|>", 1)[0]


def _ids(windows) -> list[list[tuple[int, ...]]]:
    return [[tuple(unit.sample.input_ids) for unit in window] for _, window in windows]


def _flat(windows) -> list[tuple[int, ...]]:
    return [sample for window in _ids(windows) for sample in window]


def test_streaming_reads_lazily(tmp_path, tiny_tokenizer):
    """Line 400 of the file is broken JSON: a full read fails there, but the first training windows of the stream
    only parse the rows they need, so they come out fine."""
    _write_jsonl(tmp_path / "d.jsonl", _rows("q", 3000), broken_line=400)
    with pytest.raises(DataError, match=r"d\.jsonl:line 400: invalid JSON"):
        load_conversations(_cfg(tmp_path, streaming=False, max_steps=-1))
    stream = _stream(_cfg(tmp_path), tiny_tokenizer)
    loader = StreamLoader(stream, batch_size=2, pad_token_id=0)
    windows = loader.windows_from(DataPosition(), accumulation=2)
    for _ in range(5):
        after, batches = next(windows)
        assert len(batches) == 2 and batches[0].input_ids.shape[0] == 2
    assert after.samples == 20 and stream.report.kept < 40  # encoded: a few preprocessing batches, not 3000 rows
    with pytest.raises(DataError, match=r"d\.jsonl:line 400: invalid JSON"):
        for _ in windows:  # reading on does reach the broken line
            pass


def test_streamed_files_read_like_loaded_ones(tmp_path):
    """jsonl / csv / parquet read lazily give the same conversations as the in-memory path, mixing included."""
    _write_jsonl(tmp_path / "a.jsonl", _rows("a", 30))
    with (tmp_path / "b.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(_rows("b", 2500))
    pq.write_table(pa.Table.from_pylist(_rows("c", 2100)), tmp_path / "c.parquet", row_group_size=700)
    for strategy in ("concat", "interleave_over"):
        cfg = _cfg(tmp_path, "a.jsonl,b.csv,c.parquet", mix_strategy=strategy, max_samples=2200)
        streamed = StreamingData(cfg, None, None).mixed_rows()
        loaded, _ = load_conversations(cfg)
        assert [(c.source, c.turns) for c in streamed] == [(c.source, c.turns) for c in loaded]


def test_shuffle_buffer_is_a_seeded_permutation():
    rows = list(range(100))
    once = list(shuffle_buffer(iter(rows), 16, seed=3))
    assert sorted(once) == rows and once != rows
    assert list(shuffle_buffer(iter(rows), 16, seed=3)) == once
    assert list(shuffle_buffer(iter(rows), 16, seed=4)) != once
    assert list(shuffle_buffer(iter(rows), 1000, seed=3)) != once  # a buffer larger than the data shuffles all
    # a row can only move up to buffer_size places earlier
    assert all(once.index(row) >= row - 16 for row in rows)


def test_passes_cover_every_sample_once_and_reshuffle(tmp_path, tiny_tokenizer):
    _write_jsonl(tmp_path / "d.jsonl", _rows("q", 23))
    cfg = _cfg(tmp_path, val_size=3)
    data = prepare_datasets(cfg, tiny_tokenizer)
    assert [_question(tiny_tokenizer, s) for s in data.val] == ["q0", "q1", "q2"]  # the stream's head
    loader = StreamLoader(data.train, batch_size=3, pad_token_id=0)
    passes = {}
    position = DataPosition()
    for _ in range(3):
        start = position
        windows = list(loader.unit_windows(start, accumulation=2))
        questions = [_question(tiny_tokenizer, unit.sample) for _, window in windows for unit in window]
        position = windows[-1][0]
        assert position == DataPosition(start.epoch + 1)  # the last window rolled over to the next pass
        passes[start.epoch] = questions
    for questions in passes.values():
        assert sorted(questions) == sorted(f"q{i}" for i in range(3, 23))
    assert passes[0] != passes[1] != passes[2]  # seed + pass


def test_resume_position_continues_exactly_on_any_world_size(tmp_path, tiny_tokenizer):
    """The position after a window, taken on 2 ranks, continues on 1 or 3 ranks with the very next samples, in
    the same order as an uninterrupted read (mid-preprocessing-batch and across a pass boundary)."""
    _write_jsonl(tmp_path / "d.jsonl", _rows("q", 37))
    stream = _stream(_cfg(tmp_path), tiny_tokenizer)
    whole = list(StreamLoader(stream, 2, 0).unit_windows(DataPosition(), 2))  # 4 samples per window
    whole += list(StreamLoader(stream, 2, 0).unit_windows(whole[-1][0], 2))  # and pass 1
    two = [StreamLoader(stream, 1, 0, rank=r, world_size=2) for r in range(2)]
    windows = list(two[0].unit_windows(DataPosition(), 2))
    assert _ids(windows) == _ids(whole[: len(windows)])  # the global window is the same on 2 ranks
    batches = [list(loader.windows_from(DataPosition(), 2))[3][1] for loader in two]
    assert sorted(tuple(b.input_ids[0][b.attention_mask[0].bool()].tolist()) for r in batches for b in r) == sorted(
        _ids(whole[3:4])[0]
    )  # each of window 3's samples on exactly one rank
    pass_end = next(i for i, (after, _) in enumerate(whole) if after.epoch == 1) + 1
    for cut in (3, 7, pass_end - 1, pass_end):  # mid-pass (mid-preprocessing-batch), at and around the pass end
        position = whole[cut - 1][0]
        expected = _flat(whole[cut:pass_end] if cut < pass_end else whole[cut:])
        for world in (1, 3):  # windows of 3 samples on 3 ranks: other windows, the same samples in the same order
            loader = StreamLoader(stream, 1, 0, rank=0, world_size=world)
            assert _flat(loader.unit_windows(position, 4 // world)) == expected


def test_streaming_packs_within_preprocessing_batches(tmp_path, tiny_tokenizer):
    _write_jsonl(tmp_path / "d.jsonl", _rows("q", 40))
    plain = _stream(_cfg(tmp_path), tiny_tokenizer)
    packed = _stream(_cfg(tmp_path, packing=True, preprocessing_batch_size=10, cutoff_len=128), tiny_tokenizer)
    rows = [unit.sample for unit in packed.units(0)]
    assert all(isinstance(r, PackedSample) for r in rows) and len(rows) < 40
    assert sum(len(r.seq_lens) for r in rows) == 40 == len(list(plain.units(0)))
    assert max(len(r.input_ids) for r in rows) <= 128
    assert [r.input_ids for r in packed.head(2)] == [r.input_ids for r in rows[:2]]
    cut = list(packed.units(0))[4]
    resumed = list(packed.units(0, cut.batch_row, cut.index + 1))
    assert [r.sample.input_ids for r in resumed] == [r.input_ids for r in rows[5:]]


def test_streaming_refuses_a_val_fraction_and_an_empty_stream(tmp_path, tiny_tokenizer):
    _write_jsonl(tmp_path / "d.jsonl", _rows("q", 5))
    with pytest.raises(ConfigError, match="val_size=0.1 is a fraction.*row count"):
        prepare_datasets(_cfg(tmp_path, val_size=0.1), tiny_tokenizer)
    stream = _stream(_cfg(tmp_path, val_size=5), tiny_tokenizer)
    with pytest.raises(DataError, match="yields no training samples"):
        next(StreamLoader(stream, 2, 0).windows_from(DataPosition(), 1))
    with pytest.raises(ValueError, match="streaming: true needs max_steps"):
        _cfg(tmp_path, max_steps=-1)


def test_streaming_checks_dataset_names_before_training(tmp_path, tiny_tokenizer):
    """Nothing is read up front, but a wrong dataset name still fails in prepare_datasets, not mid-run."""
    _write_jsonl(tmp_path / "d.jsonl", _rows("q", 5))
    with pytest.raises(DataError, match="missing.jsonl does not exist"):
        prepare_datasets(_cfg(tmp_path, "d.jsonl,missing.jsonl"), tiny_tokenizer)


def test_streaming_memory_stays_bounded(tmp_path, tiny_tokenizer):
    """Training from a 40 000-row file holds the shuffle buffer and one preprocessing batch, not the file: the peak
    of Python allocations while taking the first windows is a small fraction of what the rows need in memory."""
    import tracemalloc

    path = tmp_path / "d.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(40_000):
            f.write(json.dumps({"instruction": f"Question number {i}?", "output": f"Answer {i}."}) + "\n")
    stream = _stream(_cfg(tmp_path, buffer_size=200, preprocessing_batch_size=50), tiny_tokenizer)
    tracemalloc.start()
    try:
        windows = StreamLoader(stream, 4, 0).windows_from(DataPosition(), accumulation=2)
        for _ in range(20):
            next(windows)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < path.stat().st_size / 4, (peak, path.stat().st_size)
