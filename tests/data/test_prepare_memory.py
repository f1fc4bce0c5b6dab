"""Preprocessing reads while it encodes: a large JSON-lines dataset is never held as text all at once."""

from __future__ import annotations

import json
import random
import tracemalloc

from tunesmith.config import Config
from tunesmith.data import load_conversations, prepare_datasets


def _traced_peak(fn) -> tuple[object, int]:
    """(fn's result, the peak of Python allocations while it ran, above what was allocated before)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_prepare_holds_one_batch_of_text_not_the_whole_file(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "the", "quick", "brown", "fox", "你好", "世界"]
    with (tmp_path / "long.jsonl").open("w", encoding="utf-8") as f:
        for i in range(800):  # ~6 KB of reply per row, cut to 64 tokens: the text dwarfs the samples
            reply = " ".join(rng.choice(words) for _ in range(1200))
            f.write(json.dumps({"instruction": f"Question {i}?", "output": reply}, ensure_ascii=False) + "\n")
    cfg = Config(
        dataset=["long.jsonl"], dataset_dir=str(tmp_path), template="chatml", cutoff_len=64,
        preprocessing_batch_size=8,
    )

    (convs, _), every_text = _traced_peak(lambda: load_conversations(cfg))
    assert len(convs) == 800
    del convs
    prepared, peak = _traced_peak(lambda: prepare_datasets(cfg, tiny_tokenizer))
    assert len(prepared.train) == 800 and prepared.report.truncated == 800
    # Holding every conversation (as a list would; 1.28 × every_text measured) needs every_text; reading batch by
    # batch needs the samples (800 × 64 tokens) plus one batch of 8 rows (0.21 × measured).
    assert peak < 0.4 * every_text, (peak, every_text)
