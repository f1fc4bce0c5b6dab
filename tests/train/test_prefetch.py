"""dataloader_num_workers: the next windows are collated in a background thread, and nothing else changes —
the same batches in the same order, the same losses, errors raised where the loop reads, the thread gone when
the loop stops."""

from __future__ import annotations

import threading

import pytest
from train_helpers import encode_pairs, make_cfg, tiny_model

from tunesmith.data.loader import prefetch
from tunesmith.train import fit
from tunesmith.train.observe import read_log


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tunesmith-prefetch"]


def test_prefetch_yields_the_same_items_in_order_and_raises_the_producers_error():
    assert list(prefetch(iter(range(100)), depth=3)) == list(range(100))

    def failing():
        yield 1
        raise ValueError("bad row 7")

    got = []
    with pytest.raises(ValueError, match="bad row 7"):
        for item in prefetch(failing(), depth=2):
            got.append(item)
    assert got == [1]


def test_closing_a_prefetch_early_stops_its_thread():
    endless = iter(int, 1)  # never ends
    stream = prefetch(endless, depth=2)
    assert next(stream) == 0
    stream.close()
    assert not _prefetch_threads()


def test_training_with_dataloader_workers_gives_the_same_losses(tmp_path, tiny_model_dir, tiny_tokenizer):
    samples = encode_pairs(tiny_tokenizer)
    logs = []
    for workers in (0, 2):
        cfg = make_cfg(tmp_path / f"w{workers}", tiny_model_dir, max_steps=6, per_device_train_batch_size=2,
                       gradient_accumulation_steps=2, dataloader_num_workers=workers)
        fit(cfg, tiny_model(tiny_model_dir, cfg), tiny_tokenizer, samples, resume_from=None)
        logs.append([entry["loss"] for entry in read_log(tmp_path / f"w{workers}") if "loss" in entry])
    assert len(logs[0]) == 6 and logs[0] == logs[1]
    assert not _prefetch_threads()
