"""Labels, truncation and its report, the validation split, and prepare_datasets end to end."""

from __future__ import annotations

import logging
import time

import pytest
from file_helpers import write_json

from tunesmith.config import Config, load_config
from tunesmith.data import (
    Conversation,
    Turn,
    encode_conversation,
    encode_dataset,
    get_template,
    prepare_datasets,
)
from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.errors import DataError


def conv(*pairs: tuple[str, str], system: str | None = None) -> Conversation:
    turns = [
        Turn(role, text) for user, reply in pairs for role, text in (("user", user), ("assistant", reply))
    ]
    return Conversation(turns, system, "test:row 1")


def targets(tokenizer, sample) -> list[str]:
    """The trained spans, decoded."""
    spans, current = [], []
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans + ([tokenizer.decode(current)] if current else [])


@pytest.fixture
def log_records():
    """Records of the tunesmith logger (caplog misses them once setup_logging stops propagation)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("tunesmith")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_only_replies_are_targets_and_eos_is_one_even_when_pad_is_eos(tiny_tokenizer):
    assert tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id
    template = get_template("chatml", tiny_tokenizer)
    sample = encode_conversation(
        conv(("Who are you?", "I am Ada."), ("Why?", "Because.")), tiny_tokenizer, template, cutoff_len=512
    )
    assert targets(tiny_tokenizer, sample) == ["I am Ada.<|im_end|>\n", "Because.<|im_end|>\n"]
    eos_positions = [i for i, t in enumerate(sample.input_ids) if t == tiny_tokenizer.eos_token_id]
    trained_eos = [i for i in eos_positions if sample.labels[i] == tiny_tokenizer.eos_token_id]
    assert len(trained_eos) == 2  # the two reply ends; the prompt's <|im_end|>s are masked
    assert len(eos_positions) == 4


def test_train_on_prompt_and_mask_history(tiny_tokenizer):
    template = get_template("chatml", tiny_tokenizer)
    c = conv(("Who are you?", "I am Ada."), ("Why?", "Because."), system="Be kind.")
    everything = encode_conversation(c, tiny_tokenizer, template, 512, train_on_prompt=True)
    assert everything.labels == everything.input_ids
    last_only = encode_conversation(c, tiny_tokenizer, template, 512, mask_history=True)
    assert targets(tiny_tokenizer, last_only) == ["Because.<|im_end|>\n"]
    assert last_only.input_ids == everything.input_ids


def planted(tokenizer) -> list[Conversation]:
    long_prompt = "Tell me about the sea. " * 40
    long_reply = "The sea is wide and deep. " * 40
    return [
        conv(("Hi", "Hello!")),  # fits
        conv(("Hi", "Hello!"), (long_prompt, "ok")),  # second exchange dropped
        conv((long_prompt, "Short answer.")),  # prompt shortened, reply whole
        conv((long_prompt, long_reply)),  # both cut in proportion
        conv(("Hi", long_reply)),  # short prompt whole, reply cut
    ]


def test_truncation_keeps_targets_and_reports_numbers(qwen_tokenizer):
    cfg = Config(cutoff_len=64, template="chatml")
    template = get_template("chatml", qwen_tokenizer)
    samples, report = encode_dataset(planted(qwen_tokenizer), qwen_tokenizer, template, cfg)
    assert (report.kept, report.dropped, report.truncated, report.bad_rows) == (5, 0, 4, 0)
    lengths = sorted(len(s.input_ids) for s in samples)
    assert all(length <= 64 for length in lengths) and lengths[-1] == 64
    assert report.length_percentiles == {"p50": lengths[2], "p90": lengths[4], "p99": lengths[4], "max": 64}
    assert all(any(label != IGNORE_INDEX for label in s.labels) for s in samples)
    assert targets(qwen_tokenizer, samples[1]) == ["Hello!<|im_end|>\n"]
    shortened = qwen_tokenizer.decode(samples[2].input_ids)
    assert shortened.startswith("<|im_start|>user\nTell me about the sea.")  # the head of the prompt
    assert shortened.endswith(
        "<|im_end|>\n<|im_start|>assistant\nShort answer.<|im_end|>\n"
    )  # tail + whole reply
    both = qwen_tokenizer.decode(samples[3].input_ids)
    assert "<|im_start|>assistant\nThe sea is wide" in both and both.startswith("<|im_start|>user\nTell me")
    assert qwen_tokenizer.decode(samples[4].input_ids).startswith("<|im_start|>user\nHi<|im_end|>\n")
    assert "truncated to cutoff_len=64" in report.format() and "p50=" in report.format()


def test_mask_history_truncation_drops_old_turns_and_keeps_system(qwen_tokenizer):
    template = get_template("chatml", qwen_tokenizer)
    c = conv(("First question. " * 20, "First answer."), ("Q2", "A2"), ("Q3", "A3"), system="Sys.")
    sample = encode_conversation(c, qwen_tokenizer, template, cutoff_len=48, mask_history=True)
    text = qwen_tokenizer.decode(sample.input_ids)
    assert text.startswith("<|im_start|>system\nSys.<|im_end|>\n<|im_start|>user\nQ2")
    assert targets(qwen_tokenizer, sample) == ["A3<|im_end|>\n"]


def test_sample_that_cannot_keep_a_reply_token_is_dropped(qwen_tokenizer, tmp_path):
    # qwen3's last prompt ends with 9 header/think tokens: with cutoff_len=8 no reply token can follow them.
    template = get_template("qwen3", qwen_tokenizer)
    assert encode_conversation(conv(("Hi", "Hello")), qwen_tokenizer, template, cutoff_len=8) is None
    write_json(tmp_path / "d.json", [{"instruction": "Hi", "output": "Hello"}] * 3)
    cfg = Config(dataset=["d.json"], dataset_dir=str(tmp_path), template="qwen3", cutoff_len=8)
    _, report = encode_dataset([conv(("Hi", "Hello"))] * 3, qwen_tokenizer, template, cfg)
    assert (report.kept, report.dropped) == (0, 3)
    with pytest.raises(DataError, match="no training samples.*3 too long for cutoff_len=8"):
        prepare_datasets(cfg, qwen_tokenizer)


def test_val_split_is_seeded(tmp_path, tiny_tokenizer):
    write_json(tmp_path / "d.json", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)])
    base = [f"dataset_dir={tmp_path}", "dataset=d.json", "template=chatml"]

    def val_ids(*extra: str) -> list[list[int]]:
        data = prepare_datasets(load_config(None, [*base, *extra]), tiny_tokenizer)
        assert len(data.train) + len(data.val) == 20
        return [s.input_ids for s in data.val]

    assert len(val_ids("val_size=0.2")) == 4
    assert val_ids("val_size=0.2", "seed=1") == val_ids("val_size=0.2", "seed=1")
    assert any(val_ids("val_size=0.2", f"seed={s}") != val_ids("val_size=0.2", "seed=1") for s in (2, 3, 4))
    assert len(val_ids("val_size=3")) == 3 and val_ids() == []
    with pytest.raises(DataError, match="val_size=20 holds out 20 of 20"):
        val_ids("val_size=20")


def test_prepare_datasets_logs_the_report(tmp_path, qwen_tokenizer, identity_rows, log_records):
    write_json(tmp_path / "id.json", identity_rows)
    cfg = load_config(
        None,
        [
            f"dataset_dir={tmp_path}",
            "dataset=id.json",
            "template=qwen",
            "placeholders.name=Ada",
            "placeholders.author=Lab",
            "cutoff_len=128",
        ],
    )
    data = prepare_datasets(cfg, qwen_tokenizer)
    assert data.template.name == "qwen" and data.report.kept == 4 and data.val == []
    messages = [r.getMessage() for r in log_records]
    assert data.report.format() in messages
    assert targets(qwen_tokenizer, data.train[0]) == ["I am Ada, an AI assistant made by Lab.<|im_end|>\n"]


def test_thousand_short_rows_encode_fast(tmp_path, qwen_tokenizer):
    rows = [
        {"instruction": f"What is {i} plus {i}?", "input": "", "output": f"It is {2 * i}."}
        for i in range(1000)
    ]
    write_json(tmp_path / "d.json", rows)
    cfg = Config(dataset=["d.json"], dataset_dir=str(tmp_path), template="qwen", val_size=0.1)
    start = time.perf_counter()
    data = prepare_datasets(cfg, qwen_tokenizer)
    elapsed = time.perf_counter() - start
    assert len(data.train) == 900 and len(data.val) == 100
    assert elapsed < 1.0, f"prepare_datasets took {elapsed:.2f} s for 1000 short rows"
