"""`tunesmith data inspect` lists every malformed row with its line, counts tokens and packing efficiency;
`tunesmith data convert` round-trips between the formats without changing a conversation."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from file_helpers import write_json

from tunesmith.cli import main
from tunesmith.data.convert import convert_file
from tunesmith.data.inspect import inspect_source
from tunesmith.data.sources import DatasetSource
from tunesmith.errors import DataError

GOOD = {"instruction": "Who are you?", "input": "", "output": "I am Ada."}


def _jsonl(path, rows_or_text):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows_or_text) + "\n")
    return path


def test_inspect_lists_every_malformed_row_with_its_line(tmp_path, capsys):
    data = _jsonl(
        tmp_path / "d.jsonl",
        [GOOD, '{"instruction": "broken', GOOD, {"instruction": "q"}, GOOD, {"output": "a"}],
    )
    assert main(["data", "inspect", str(data), "--no-plot"]) == 1
    out = capsys.readouterr().out
    assert "6 rows, format alpaca, 3 malformed" in out
    assert "d.jsonl:line 2: invalid JSON" in out
    assert "d.jsonl:line 4: missing column 'output'" in out
    assert "d.jsonl:line 6: missing column 'instruction'" in out
    assert "token stats skipped" in out


def test_inspect_gives_lines_of_a_pretty_printed_json_list(tmp_path):
    data = write_json(tmp_path / "d.json", [GOOD, {"instruction": "q"}, GOOD, {"output": "a"}])
    (report,) = inspect_source(DatasetSource("d", [data], None))
    text = data.read_text().splitlines()
    locations = [where for where, _ in report.problems]
    assert len(locations) == 2 and report.rows == 4
    for where, row in zip(locations, (2, 4), strict=True):
        line = int(where.split(":line ")[1].split(" ")[0])
        assert text[line - 1].strip() == "{" and f"(row {row})" in where


def test_inspect_config_counts_tokens_truncation_and_packing(tmp_path, tiny_model_dir, capsys):
    rows = [
        {"instruction": "Question " + "word " * (i % 7) * 5, "input": "", "output": "Answer."}
        for i in range(30)
    ]
    write_json(tmp_path / "d.json", rows)
    cfg = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset": "d.json",
        "dataset_dir": str(tmp_path),
        "template": "chatml",
        "cutoff_len": 64,
        "per_device_train_batch_size": 4,
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    plot = tmp_path / "h.png"
    assert main(["data", "inspect", str(tmp_path / "c.yaml"), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "30 rows, format alpaca, 0 malformed" in out
    assert "p50=" in out and "samples truncated" in out
    unpacked, packed = (float(x) for x in re.findall(r"([\d.]+)% ", out.split("batch size 4:")[1])[:2])
    assert packed > unpacked
    assert plot.read_bytes()[:4] == b"\x89PNG"


MULTI = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name?"},
        {"role": "assistant", "content": "Ada."},
    ]
}


@pytest.mark.parametrize("via", ["alpaca", "sharegpt", "openai"])
def test_convert_round_trips(tmp_path, via):
    src = _jsonl(tmp_path / "in.jsonl", [MULTI, {"messages": MULTI["messages"][1:3]}])
    mid, back = tmp_path / f"mid-{via}.json", tmp_path / "back.jsonl"
    assert convert_file(src, via, mid) == (2, 0)
    convert_file(mid, "openai", back)
    assert [json.loads(line) for line in back.read_text().splitlines()] == [
        json.loads(line) for line in src.read_text().splitlines()
    ]
    if via == "alpaca":  # multi-turn went into alpaca's history, not lost
        row = json.loads(mid.read_text())[0]
        assert row["history"] == [["Hi", "Hello."]] and row["system"] == "Be brief."


def test_convert_alpaca_round_trip_and_refusals(tmp_path, capsys):
    rows = [GOOD, {**GOOD, "history": [["a", "b"]], "system": "s"}]
    src = write_json(tmp_path / "a.json", rows)
    assert main(["data", "convert", str(src), "--to", "sharegpt", "--out", str(tmp_path / "s.jsonl")]) == 0
    assert (
        main(
            [
                "data",
                "convert",
                str(tmp_path / "s.jsonl"),
                "--to",
                "alpaca",
                "--out",
                str(tmp_path / "b.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "b.json").read_text()) == rows
    write_json(tmp_path / "bad.json", [GOOD, {"instruction": "q"}])
    with pytest.raises(DataError, match=r"(?s)1 malformed rows.*bad\.json:line \d+ \(row 2\)"):
        convert_file(tmp_path / "bad.json", "openai", tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()
