"""Malformed rows: one-sentence errors that name the file and row (or line), or skip-and-count."""

from __future__ import annotations

import json

import pytest
from file_helpers import write_json

from tunesmith.config import Config
from tunesmith.data import get_template, load_conversations, prepare_datasets
from tunesmith.errors import DataError

GOOD = {"instruction": "q", "output": "a"}
BAD_JSON_ROWS = [
    ({"instruction": "q"}, r"missing column 'output'"),
    ({"instruction": "q", "output": 3}, r"column 'output' is a int, expected a string"),
    ({"instruction": "q", "output": "  "}, r"message 2 is an empty assistant reply"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, r"history entry 1 is not"),
]


def cfg_for(tmp_path, dataset, **kw):
    return Config(dataset=dataset, dataset_dir=str(tmp_path), **kw)


@pytest.mark.parametrize(("row", "problem"), BAD_JSON_ROWS[:-1])
def test_json_bad_row_names_file_and_row(tmp_path, row, problem):
    write_json(tmp_path / "d.json", [GOOD, row, GOOD])
    with pytest.raises(DataError, match=r"d\.json:row 2: " + problem + ".*skip_bad_rows=true"):
        load_conversations(cfg_for(tmp_path, "d.json"))
    convs, bad = load_conversations(cfg_for(tmp_path, "d.json", skip_bad_rows=True))
    assert len(convs) == 2 and bad == 1


def test_non_object_row(tmp_path):
    write_json(tmp_path / "d.json", [GOOD, ["not", "an", "object"]])
    with pytest.raises(DataError, match=r"d\.json:row 2: the row is a list, expected an object"):
        load_conversations(cfg_for(tmp_path, "d.json"))


def test_sharegpt_roles_must_alternate(tmp_path):
    write_json(
        tmp_path / "s.json",
        [
            {
                "conversations": [
                    {"from": "human", "value": "u"},
                    {"from": "human", "value": "u"},
                    {"from": "gpt", "value": "a"},
                ]
            },
            {"conversations": [{"from": "human", "value": "u"}]},
            {"conversations": [{"from": "human", "value": "u"}, {"from": "robot", "value": "a"}]},
        ],
    )
    with pytest.raises(DataError, match=r"s\.json:row 1: message 2 is 'user' but 'assistant' was expected"):
        load_conversations(cfg_for(tmp_path, "s.json"))
    convs, bad = load_conversations(cfg_for(tmp_path, "s.json", skip_bad_rows=True))
    assert convs == [] and bad == 3


def test_jsonl_invalid_line_is_named_by_line_number(tmp_path):
    text = json.dumps(GOOD) + "\n\n" + '{"instruction": "q", "output": }\n' + json.dumps(GOOD) + "\n"
    (tmp_path / "d.jsonl").write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:line 3: invalid JSON"):
        load_conversations(cfg_for(tmp_path, "d.jsonl"))
    convs, bad = load_conversations(cfg_for(tmp_path, "d.jsonl", skip_bad_rows=True))
    assert len(convs) == 2 and bad == 1


def test_broken_json_file_names_the_line(tmp_path):
    (tmp_path / "d.json").write_text(
        '[\n {"instruction": "q", "output": "a"},\n {"instruction": \n]', encoding="utf-8"
    )
    with pytest.raises(DataError, match=r"d\.json:line 4: invalid JSON"):
        load_conversations(cfg_for(tmp_path, "d.json"))


def test_csv_bad_rows(tmp_path):
    (tmp_path / "d.csv").write_text(
        "instruction,input,output\nq,,a\nq,only two\nq,,a,extra\nq,,\n", encoding="utf-8"
    )
    with pytest.raises(DataError, match=r"d\.csv:row 2: missing column 'output'"):
        load_conversations(cfg_for(tmp_path, "d.csv"))
    convs, bad = load_conversations(cfg_for(tmp_path, "d.csv", skip_bad_rows=True))
    assert len(convs) == 1 and bad == 3


def test_skipped_rows_appear_in_the_report(tmp_path, tiny_tokenizer, caplog):
    write_json(tmp_path / "d.json", [GOOD, {"instruction": "q"}, GOOD, {"output": "a"}])
    cfg = cfg_for(tmp_path, "d.json", skip_bad_rows=True, template="chatml")
    with caplog.at_level("INFO", logger="tunesmith"):
        data = prepare_datasets(cfg, tiny_tokenizer)
    assert data.report.bad_rows == 2 and data.report.kept == 2
    assert "2 bad rows skipped" in data.report.format()
    assert "2 bad rows skipped" in caplog.text


def test_unstable_auto_template_is_a_bad_row(tmp_path, qwen_tokenizer):
    # Qwen3's own template rewrites earlier replies, so `auto` cannot split a multi-turn conversation.
    multi = {
        "messages": [
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
        ]
    }
    single = {"messages": multi["messages"][:2]}
    write_json(tmp_path / "m.json", [single, multi])
    cfg = cfg_for(tmp_path, "m.json", template="auto")
    with pytest.raises(DataError, match=r"m\.json:row 2: .*not prefix-stable.*qwen3"):
        prepare_datasets(cfg, qwen_tokenizer)
    data = prepare_datasets(cfg_for(tmp_path, "m.json", template="auto", skip_bad_rows=True), qwen_tokenizer)
    assert data.report.kept == 1 and data.report.bad_rows == 1
    assert get_template("qwen3", qwen_tokenizer).encode_turns(qwen_tokenizer, load_conversations(cfg)[0][1])
