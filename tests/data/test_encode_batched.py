"""Batched and parallel encoding give exactly the samples of encoding one conversation at a time, from any
iterable, and keep the samples compact (4 bytes a token)."""

from __future__ import annotations

import gc
import pickle
import tracemalloc
from itertools import accumulate

import pytest

from tunesmith.config import Config
from tunesmith.data import Conversation, Turn, encode_conversation, encode_dataset, get_template
from tunesmith.data.encode import Encoded, TokenIds
from tunesmith.data.loader import collate
from tunesmith.data.segments import _quick_cuts, encode_rendered
from tunesmith.data.sources import load_conversations
from tunesmith.errors import DataError


def _conv(pairs: list[tuple[str, str]], system: str | None = None) -> Conversation:
    turns = [
        Turn(role, text) for user, reply in pairs for role, text in (("user", user), ("assistant", reply))
    ]
    return Conversation(turns, system, "test:row 1")


@pytest.fixture(scope="module")
def shared_convs(shared_dir) -> list[Conversation]:
    """The shared alpaca rows (en + zh) and multi-turn conversations built from them, some with a system
    prompt and replies that start with newlines (a token then crosses the prompt/reply seam)."""
    files = [str(shared_dir / "data" / n) for n in ("alpaca_en_demo.json", "alpaca_zh_demo.json")]
    convs, _ = load_conversations(Config(dataset=files))
    multi = [
        _conv(
            [
                (convs[i + k].turns[0].content, "\n" * (k % 2) + convs[i + k].turns[1].content)
                for k in range(3)
            ],
            "Be brief." if i % 2 else None,
        )
        for i in range(0, 600, 3)
    ]
    return convs + multi


@pytest.mark.parametrize("name", ["qwen", "qwen3"])
def test_quick_seams_equal_the_reference_rule(qwen_tokenizer, shared_convs, name):
    template = get_template(name, qwen_tokenizer)
    rendered = [template.render(qwen_tokenizer, c) for c in shared_convs[::3]]
    quick = encode_rendered(qwen_tokenizer, rendered)
    slow = encode_rendered(qwen_tokenizer, rendered, quick=False)
    assert [(t.pairs, t.head_len, t.tail_lens) for t in quick] == [
        (t.pairs, t.head_len, t.tail_lens) for t in slow
    ]
    # and the shortcut is what ran for almost all of them (not the reference rule as a fallback)
    texts = ["".join(r.pieces()) for r in rendered]
    encodings = qwen_tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    seams = [list(accumulate(len(p) for p in r.pieces()))[:-1] for r in rendered]
    shortcut = sum(_quick_cuts(e, s) is not None for e, s in zip(encodings, seams, strict=True))
    assert shortcut > 0.9 * len(rendered)


@pytest.mark.parametrize("extra", [{}, {"mask_history": True}, {"train_on_prompt": True}])
def test_batched_equals_one_by_one(qwen_tokenizer, shared_convs, extra):
    convs = shared_convs[::7]  # every sort of row, fast enough one by one
    cfg = Config(template="qwen", cutoff_len=160, preprocessing_batch_size=64, **extra)  # truncates many
    template = get_template("qwen", qwen_tokenizer)
    batched, report = encode_dataset(convs, qwen_tokenizer, template, cfg)
    one_by_one = [
        encode_conversation(
            c, qwen_tokenizer, template, cfg.cutoff_len, cfg.train_on_prompt, cfg.mask_history
        )
        for c in convs
    ]
    kept = [s for s in one_by_one if s is not None]
    assert report.truncated > 20 and report.kept == len(kept)
    assert [(s.input_ids, s.labels) for s in batched] == [(s.input_ids, s.labels) for s in kept]


def _pairs(samples: list[Encoded]) -> list[tuple[list[int], list[int]]]:
    return [(s.input_ids.tolist(), s.labels.tolist()) for s in samples]


def test_workers_and_batch_size_do_not_change_the_result(qwen_tokenizer, shared_convs):
    template = get_template("qwen", qwen_tokenizer)
    base = Config(template="qwen", cutoff_len=256)
    convs = shared_convs[::3]
    one, one_report = encode_dataset(convs, qwen_tokenizer, template, base)
    cfg = base.model_copy(update={"preprocessing_num_workers": 3, "preprocessing_batch_size": 50})
    many, many_report = encode_dataset(iter(convs), qwen_tokenizer, template, cfg)  # a one-pass iterator
    assert _pairs(many) == _pairs(one) and many_report == one_report and one_report.truncated > 0


def test_workers_report_bad_rows_like_one_worker(qwen_tokenizer):
    # Qwen3's own template (`auto`) rewrites earlier replies: every multi-turn conversation is a bad row
    good, bad = _conv([("Hi", "Hello")]), _conv([("a", "b"), ("c", "d")])
    convs = [good, good, bad, good, bad, good] * 5
    template = get_template("auto", qwen_tokenizer)
    results = []
    for workers in (1, 2):
        cfg = Config(
            template="auto", cutoff_len=64, preprocessing_num_workers=workers, preprocessing_batch_size=4
        )
        with pytest.raises(DataError, match="not prefix-stable") as err:
            encode_dataset(convs, qwen_tokenizer, template, cfg)
        skipping = cfg.model_copy(update={"skip_bad_rows": True})
        samples, report = encode_dataset(convs, qwen_tokenizer, template, skipping)
        results.append((str(err.value), _pairs(samples), report))
    assert results[0] == results[1] and results[0][2].bad_rows == 10 and results[0][2].kept == 20


def test_samples_are_compact_and_behave_like_lists(qwen_tokenizer, shared_convs):
    template = get_template("qwen", qwen_tokenizer)
    convs = shared_convs[:500]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    samples, _ = encode_dataset((c for c in convs), qwen_tokenizer, template, Config(template="qwen"))
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    tokens = sum(len(s.input_ids) for s in samples)
    # ids + labels at 4 bytes each, plus a small per-sample overhead; Python int lists would take ~45 bytes a token
    assert held / tokens < 12, held / tokens
    sample = samples[0]
    assert isinstance(sample.input_ids, TokenIds) and sample.input_ids.itemsize == 4
    assert sample.input_ids == sample.input_ids.tolist() and sample.labels != sample.input_ids.tolist()
    assert pickle.loads(pickle.dumps(sample)) == sample
    assert Encoded([1, 2, 3], [-100, 2, 3]).labels == [-100, 2, 3]
    batch = collate(samples[:3], 0)
    assert batch.input_ids[0, : len(sample.input_ids)].tolist() == sample.input_ids.tolist()
    assert qwen_tokenizer.decode(sample.input_ids) == qwen_tokenizer.decode(sample.input_ids.tolist())


def test_encoding_pauses_the_garbage_collector_and_restores_it(qwen_tokenizer, shared_convs):
    """The cyclic collector is off while encoding (a fifth of the cold prepare time otherwise), and the caller's
    gc state is back afterwards: after success, after an error, and when the caller had turned gc off itself."""
    template = get_template("qwen", qwen_tokenizer)
    collections: list[str] = []
    track = lambda phase, info: collections.append(phase) if phase == "start" else None  # noqa: E731
    gc.callbacks.append(track)
    try:
        samples, _ = encode_dataset(shared_convs[:800], qwen_tokenizer, template, Config(template="qwen"))
    finally:
        gc.callbacks.remove(track)
    # none while encoding 800 conversations (dozens without the pause); at most the one gc.enable() triggers
    assert samples and len(collections) <= 1 and gc.isenabled()
    broken = [_conv([("a", "b"), ("c", "d")])]  # not prefix-stable under Qwen3's own template: a DataError
    with pytest.raises(DataError):
        encode_dataset(broken, qwen_tokenizer, get_template("auto", qwen_tokenizer), Config(template="auto"))
    assert gc.isenabled()
    gc.disable()
    try:
        encode_dataset(shared_convs[:10], qwen_tokenizer, template, Config(template="qwen"))
        assert not gc.isenabled()
    finally:
        gc.enable()
