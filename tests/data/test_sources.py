"""Files and dataset_info.json → conversations: every format, column / tag mapping, resolution and hub errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from file_helpers import write_json

from tunesmith.config import Config, load_config
from tunesmith.data import Conversation, load_conversations
from tunesmith.errors import DataError


def cfg_for(tmp_path: Path, dataset: str, **kw) -> Config:
    return Config(dataset=dataset, dataset_dir=str(tmp_path), **kw)


def roles(conv: Conversation) -> list[tuple[str, str]]:
    return [(t.role, t.content) for t in conv.turns]


def test_alpaca_with_input_system_and_history(tmp_path):
    write_json(
        tmp_path / "a.json",
        [
            {
                "instruction": "Translate",
                "input": "bonjour",
                "output": "hello",
                "system": "Be brief.",
                "history": [["q1", "a1"], ["q2", "a2"]],
            },
            {"instruction": "Hi", "input": "", "output": "Hello!"},
        ],
    )
    convs, bad = load_conversations(cfg_for(tmp_path, "a.json"))
    assert bad == 0 and len(convs) == 2
    assert convs[0].system == "Be brief."
    assert roles(convs[0]) == [
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2"),
        ("assistant", "a2"),
        ("user", "Translate\nbonjour"),
        ("assistant", "hello"),
    ]
    assert convs[1].system is None and roles(convs[1]) == [("user", "Hi"), ("assistant", "Hello!")]
    assert convs[1].source.endswith("a.json:row 2")


def test_sharegpt_default_tags_and_system_message(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "u1"},
                {"from": "gpt", "value": "a1"},
                {"from": "user", "value": "u2"},
                {"from": "assistant", "value": "a2"},
            ]
        }
    ]
    write_json(tmp_path / "s.json", rows)
    (conv,), _ = load_conversations(cfg_for(tmp_path, "s.json"))
    assert conv.system == "S"
    assert roles(conv) == [("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2")]


def test_openai_jsonl(tmp_path):
    lines = [
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"},
            ]
        },
        {"messages": [{"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]},
    ]
    (tmp_path / "o.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    convs, _ = load_conversations(cfg_for(tmp_path, "o.jsonl"))
    assert [c.system for c in convs] == ["S", None]
    assert roles(convs[1]) == [("user", "u2"), ("assistant", "a2")]
    assert convs[1].source.endswith("o.jsonl:line 2")


def test_csv_and_parquet(tmp_path):
    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "input", "output"])
        writer.writerow(["Say hi", "", 'hi, "friend"\nbye'])
    table = pa.Table.from_pylist(
        [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}]
    )
    pq.write_table(table, tmp_path / "m.parquet")
    convs, _ = load_conversations(cfg_for(tmp_path, "a.csv,m.parquet"))
    assert roles(convs[0]) == [("user", "Say hi"), ("assistant", 'hi, "friend"\nbye')]
    assert roles(convs[1]) == [("user", "u"), ("assistant", "a")]


def test_dataset_info_columns_and_custom_tags(tmp_path):
    (tmp_path / "sub").mkdir()
    write_json(tmp_path / "sub" / "qa.json", [{"q": "Why?", "ctx": "sky", "a": "Because.", "sys": "S"}])
    write_json(
        tmp_path / "chat.json",
        [{"dialog": [{"speaker": "me", "text": "u"}, {"speaker": "bot", "text": "a"}], "persona": "P"}],
    )
    write_json(
        tmp_path / "dataset_info.json",
        {
            "qa": {
                "file_name": "sub/qa.json",
                "formatting": "alpaca",
                "columns": {"prompt": "q", "query": "ctx", "response": "a", "system": "sys"},
            },
            "chat": {
                "file_name": "chat.json",
                "formatting": "sharegpt",
                "columns": {"messages": "dialog", "system": "persona"},
                "tags": {
                    "role_tag": "speaker",
                    "content_tag": "text",
                    "user_tag": "me",
                    "assistant_tag": "bot",
                },
            },
        },
    )
    convs, _ = load_conversations(load_config(None, [f"dataset_dir={tmp_path}", "dataset=qa,chat"]))
    assert convs[0].system == "S" and roles(convs[0]) == [("user", "Why?\nsky"), ("assistant", "Because.")]
    assert convs[1].system == "P" and roles(convs[1]) == [("user", "u"), ("assistant", "a")]


def test_dataset_info_openai_style_sharegpt_entries(tmp_path):
    """LLaMA-Factory describes openai-style files as sharegpt with role/content tags (or none at all)."""
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u\u2028x"},
        {"role": "assistant", "content": "a"},
    ]
    (tmp_path / "o.jsonl").write_text(
        json.dumps({"msgs": messages}, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    openai_tags = {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
        "system_tag": "system",
    }
    write_json(
        tmp_path / "dataset_info.json",
        {
            "tagged": {
                "file_name": "o.jsonl",
                "formatting": "sharegpt",
                "columns": {"messages": "msgs"},
                "tags": openai_tags,
            },
            "untagged": {"file_name": "o.jsonl", "formatting": "sharegpt", "columns": {"messages": "msgs"}},
            "hub_and_file": {"file_name": "o.jsonl", "hf_hub_url": "org/x", "columns": {"messages": "msgs"}},
        },
    )
    convs, _ = load_conversations(cfg_for(tmp_path, "tagged,untagged,hub_and_file"))
    assert len(convs) == 3
    for c in convs:
        assert c.system == "S" and roles(c) == [("user", "u\u2028x"), ("assistant", "a")]


def test_relative_path_prefers_cwd_then_dataset_dir(tmp_path, monkeypatch):
    data_dir, cwd = tmp_path / "data", tmp_path / "cwd"
    data_dir.mkdir()
    cwd.mkdir()
    write_json(data_dir / "x.json", [{"instruction": "from dataset_dir", "output": "a"}])
    monkeypatch.chdir(cwd)
    (conv,), _ = load_conversations(cfg_for(data_dir, "x.json"))
    assert conv.turns[0].content == "from dataset_dir"
    write_json(cwd / "x.json", [{"instruction": "from cwd", "output": "a"}])
    (conv,), _ = load_conversations(cfg_for(data_dir, "x.json"))
    assert conv.turns[0].content == "from cwd"


def test_max_samples_takes_first_rows_of_each_dataset(tmp_path):
    write_json(tmp_path / "a.json", [{"instruction": f"a{i}", "output": "x"} for i in range(5)])
    write_json(tmp_path / "b.json", [{"instruction": f"b{i}", "output": "x"} for i in range(5)])
    convs, _ = load_conversations(cfg_for(tmp_path, "a.json,b.json", max_samples=2))
    assert [c.turns[0].content for c in convs] == ["a0", "a1", "b0", "b1"]


def test_placeholders_filled_and_missing_one_named(tmp_path, identity_rows):
    write_json(tmp_path / "id.json", identity_rows)
    cfg = load_config(
        None,
        [f"dataset_dir={tmp_path}", "dataset=id.json", "placeholders.name=Ada", "placeholders.author=Lab"],
    )
    convs, _ = load_conversations(cfg)
    assert convs[0].turns[1].content == "I am Ada, an AI assistant made by Lab."
    assert convs[2].turns[1].content == "我是Ada，由Lab开发的人工智能助手。"
    cfg = load_config(
        None, [f"dataset_dir={tmp_path}", "dataset=id.json", "placeholders.name=Ada", "skip_bad_rows=true"]
    )
    with pytest.raises(DataError, match=r"id\.json:row 1: placeholder \{\{author\}\}.*placeholders\.author="):
        load_conversations(cfg)


def test_hub_names_are_refused_offline(tmp_path):
    write_json(
        tmp_path / "dataset_info.json",
        {"alpaca_gpt4": {"hf_hub_url": "llamafactory/alpaca_gpt4_en"}, "local": {"file_name": "l.json"}},
    )
    with pytest.raises(DataError, match="offline-first.*file_name"):
        load_conversations(cfg_for(tmp_path, "alpaca_gpt4"))
    with pytest.raises(DataError, match="tatsu-lab/alpaca is a hub name.*offline-first.*path"):
        load_conversations(cfg_for(tmp_path, "tatsu-lab/alpaca"))


def test_unknown_name_lists_available_names(tmp_path):
    write_json(
        tmp_path / "dataset_info.json",
        {"identity": {"file_name": "i.json"}, "alpaca": {"file_name": "a.json"}},
    )
    with pytest.raises(DataError, match="names there: alpaca, identity"):
        load_conversations(cfg_for(tmp_path, "idenity"))
    with pytest.raises(DataError, match="missing.json does not exist"):
        load_conversations(cfg_for(tmp_path, "missing.json"))
    with pytest.raises(DataError, match="set dataset="):
        load_conversations(Config(dataset_dir=str(tmp_path)))


def test_unknown_format_is_explained(tmp_path):
    write_json(tmp_path / "w.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        DataError, match=r"w\.json:row 1: cannot tell the format.*answer, question.*dataset_info"
    ):
        load_conversations(cfg_for(tmp_path, "w.json"))


def test_shared_alpaca_demo_loads(shared_dir):
    cfg = Config(dataset=[str(shared_dir / "data" / "alpaca_zh_demo.json")], max_samples=50)
    convs, bad = load_conversations(cfg)
    assert len(convs) == 50 and bad == 0


def test_jsonl_is_read_line_by_line_with_exact_line_numbers(tmp_path):
    """The lazy reader cuts lines at \\n only (a raw U+2028 inside a string stays), drops a BOM, skips blank lines
    and counts lines like an editor; parquet row groups are read one batch at a time, rows numbered across them."""
    rows = [{"instruction": "a\u2028b", "output": "x"}, {"instruction": "c", "output": "y"}]
    text = "\ufeff" + json.dumps(rows[0], ensure_ascii=False) + "\r\n\n" + json.dumps(rows[1]) + "\n{broken\n"
    (tmp_path / "l.jsonl").write_text(text, encoding="utf-8", newline="")
    convs, bad = load_conversations(cfg_for(tmp_path, "l.jsonl", skip_bad_rows=True))
    assert bad == 1 and [c.turns[0].content for c in convs] == ["a\u2028b", "c"]
    assert [c.source.rsplit(":", 1)[1] for c in convs] == ["line 1", "line 3"]
    with pytest.raises(DataError, match=r"l\.jsonl:line 4: invalid JSON"):
        load_conversations(cfg_for(tmp_path, "l.jsonl"))
    table = pa.Table.from_pylist([{"instruction": f"q{i}", "output": "a"} for i in range(2500)])
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=1000)
    convs, _ = load_conversations(cfg_for(tmp_path, "p.parquet"))
    assert len(convs) == 2500 and convs[2499].turns[0].content == "q2499"
    assert convs[2499].source.endswith("p.parquet:row 2500")
