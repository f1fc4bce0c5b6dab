"""Mixing several datasets: mix_strategy concat / interleave_under / interleave_over with interleave_probs, as HF
datasets' interleave_datasets (LLaMA-Factory) does it; max_samples applies to each dataset before mixing."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tunesmith.config import Config
from tunesmith.data import load_conversations
from tunesmith.data.mix import mix, mix_lists
from tunesmith.errors import ConfigError

D3 = [[0, 1, 2], [10, 11, 12], [20, 21, 22]]


def test_interleave_reproduces_hf_interleave_datasets():
    """The outputs documented in HF datasets' interleave_datasets docstring, row for row."""
    probs = [0.7, 0.2, 0.1]
    assert mix_lists(D3, "interleave_over", probs, 42) == [
        10, 0, 11, 1, 2, 20, 12, 10, 0, 1, 2, 21, 0, 11, 1, 2, 0, 1, 12, 2, 10, 0, 22
    ]  # fmt: skip
    assert mix_lists(D3, "interleave_under", probs, 42) == [10, 0, 11, 1, 2]
    assert mix_lists(D3, "interleave_under", None, 42) == [0, 10, 20, 1, 11, 21, 2, 12, 22]
    assert mix_lists(D3, "interleave_over", None, 42) == [0, 10, 20, 1, 11, 21, 2, 12, 22]
    uneven = [[0, 1, 2], [10, 11, 12, 13], [20, 21, 22, 23, 24]]
    assert mix_lists(uneven, "interleave_under", None, 0) == [0, 10, 20, 1, 11, 21, 2, 12, 22]
    assert mix_lists(uneven, "interleave_over", None, 0) == [
        0, 10, 20, 1, 11, 21, 2, 12, 22, 0, 13, 23, 1, 10, 24
    ]  # fmt: skip
    assert mix_lists(uneven, "concat", [0.1, 0.1, 0.8], 0) == [0, 1, 2, 10, 11, 12, 13, 20, 21, 22, 23, 24]


def test_interleave_probs_set_the_proportions():
    big_a, big_b = [("a", i) for i in range(3000)], [("b", i) for i in range(3000)]
    under = mix_lists([big_a, big_b], "interleave_under", [0.8, 0.2], 7)
    counts = Counter(source for source, _ in under)
    # stops when the first dataset runs out: all of a, and about a quarter as many of b
    assert counts["a"] == 3000 and abs(counts["b"] / len(under) - 0.2) < 0.02, counts
    over = mix_lists([big_a, big_b], "interleave_over", [0.8, 0.2], 7)
    counts = Counter(source for source, _ in over)
    # goes on until b has run out too: a repeats (about 4 × as many as b), every row of both is used
    assert set(over) == set(big_a) | set(big_b)
    assert abs(counts["b"] / len(over) - 0.2) < 0.02 and counts["a"] > 3000, counts
    # the probabilities need not sum to 1 (they are normalised); the seed fixes the order
    assert mix_lists([big_a, big_b], "interleave_under", [4, 1], 7) == under
    assert mix_lists([big_a, big_b], "interleave_under", [0.8, 0.2], 8) != under


def test_mix_is_lazy():
    """A stream is mixed without reading ahead: only one row of look-ahead per dataset."""
    pulled = Counter()

    def endless(name):
        def source():
            i = 0
            while True:
                pulled[name] += 1
                yield name, i
                i += 1

        return source

    rows = mix([endless("a"), endless("b")], "interleave_over", [0.5, 0.5], 1)
    first = [next(rows) for _ in range(10)]
    assert len(first) == 10 and sum(pulled.values()) <= 12


def _write_jsonl(path: Path, prefix: str, count: int) -> None:
    rows = [{"instruction": f"{prefix}{i}", "output": "x"} for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _firsts(convs) -> list[str]:
    return [c.turns[0].content for c in convs]


def test_config_mixes_datasets_after_max_samples(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", "a", 10)
    _write_jsonl(tmp_path / "b.jsonl", "b", 6)

    def load(**kw) -> list[str]:
        return _firsts(load_conversations(Config(dataset="a.jsonl,b.jsonl", dataset_dir=str(tmp_path), **kw))[0])

    assert load(max_samples=3) == ["a0", "a1", "a2", "b0", "b1", "b2"]
    assert load(max_samples=3, mix_strategy="interleave_under") == ["a0", "b0", "a1", "b1", "a2", "b2"]
    # max_samples cuts a to 8 rows first; b (6 rows) repeats until a has run out once
    over = load(max_samples=8, mix_strategy="interleave_over")
    assert over == [x for i in range(8) for x in (f"a{i}", f"b{i % 6}")]
    under = load(mix_strategy="interleave_under", interleave_probs=[0.5, 0.5], seed=3)
    assert under == load(mix_strategy="interleave_under", interleave_probs="0.5,0.5", seed=3)
    # it ends with the row that used up one dataset, each row taken at most once
    assert under[-1] in ("a9", "b5") and len(set(under)) == len(under) and under != sorted(under)


def test_config_proportions_through_prepare_datasets(tmp_path, tiny_tokenizer):
    from tunesmith.data import prepare_datasets

    _write_jsonl(tmp_path / "a.jsonl", "a", 400)
    _write_jsonl(tmp_path / "b.jsonl", "b", 400)
    cfg = Config(
        dataset="a.jsonl,b.jsonl",
        dataset_dir=str(tmp_path),
        template="chatml",
        cutoff_len=64,
        mix_strategy="interleave_under",
        interleave_probs=[0.75, 0.25],
        tokenized_path=str(tmp_path / "cache"),
    )
    data = prepare_datasets(cfg, tiny_tokenizer)
    texts = [tiny_tokenizer.decode(s.input_ids) for s in data.train]
    from_b = sum("user\nb" in t for t in texts)
    assert sum("user\na" in t for t in texts) == 400  # a ran out first
    assert abs(from_b / len(texts) - 0.25) < 0.04, from_b


def test_wrong_probabilities_are_config_errors():
    with pytest.raises(ConfigError, match="one probability per dataset"):
        mix_lists(D3, "interleave_under", [0.5, 0.5], 0)
    with pytest.raises(ConfigError, match="non-negative"):
        mix_lists(D3, "interleave_under", [0.5, -0.5, 1], 0)
    with pytest.raises(ConfigError, match="mix_strategy 'zip' is unknown"):
        mix_lists(D3, "zip", None, 0)
    with pytest.raises(ValueError, match="interleave_probs has 3 values for 2 datasets"):
        Config(dataset="a.json,b.json", interleave_probs=[0.2, 0.3, 0.5], mix_strategy="interleave_under")
