"""`tunesmith data convert CONFIG --to mindrecord`: MindSpore's own FileReader reads the file, and every row is
tunesmith's own encoding of the same conversation (same template, same label mask), padded to seq_length + 1
the way guide 002's preprocessing pads (pad id, label -100, attention 0)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from bad_input_helpers import assert_refused, run_cli, write_config

from tunesmith.config import load_config
from tunesmith.data import encode_conversation, get_template, load_conversations
from tunesmith.data.mindrecord import import_mindspore

if importlib.util.find_spec("mindspore") is None:
    pytest.skip("MindSpore is an optional extra: pip install 'tunesmith[mindspore]'", allow_module_level=True)
FileReader = import_mindspore().mindrecord.FileReader  # without MindSpore's process-wide limits (see there)

ROWS = 24
SEQ = 160


def _read(path: Path) -> list[dict[str, np.ndarray]]:
    reader = FileReader(str(path))
    try:
        return list(reader.get_next())
    finally:
        reader.close()


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_model_dir, shared_dir) -> Path:
    root = tmp_path_factory.mktemp("mindrecord")
    return write_config(
        root / "cfg.yaml",
        model_name_or_path=str(tiny_model_dir),
        dataset=str(shared_dir / "data" / "alpaca_en_demo.json"),
        template="qwen",
        cutoff_len=SEQ,
        max_samples=ROWS,
    )


def _own_encoding(config: Path, tiny_tokenizer, seq_length: int) -> list[tuple[list[int], list[int]]]:
    cfg = load_config(str(config))
    convs, _ = load_conversations(cfg)
    template = get_template("qwen", tiny_tokenizer)
    encoded = [encode_conversation(c, tiny_tokenizer, template, seq_length + 1) for c in convs]
    return [(list(e.input_ids), list(e.labels)) for e in encoded if e is not None]


def test_filereader_reads_our_rows_and_their_ids_equal_our_own_encoding(config, tiny_tokenizer, capsys):
    out = config.parent / "alpaca.mindrecord"
    code, stdout, _ = run_cli(["data", "convert", config, "--to", "mindrecord", "--out", out], capsys)
    assert code == 0 and f"wrote {ROWS} rows of {SEQ + 1} tokens" in stdout
    rows = _read(out)
    expected = _own_encoding(config, tiny_tokenizer, SEQ)
    assert len(rows) == len(expected) == ROWS
    pad = tiny_tokenizer.pad_token_id
    for row, (ids, labels) in zip(rows, expected, strict=True):
        assert set(row) == {"input_ids", "target_ids", "attention_mask"}
        assert all(v.dtype == np.int32 and v.shape == (SEQ + 1,) for v in row.values())
        n = len(ids)
        assert row["input_ids"][:n].tolist() == ids and set(row["input_ids"][n:].tolist()) <= {pad}
        assert row["target_ids"][:n].tolist() == labels and set(row["target_ids"][n:].tolist()) <= {-100}
        assert row["attention_mask"].tolist() == [1] * n + [0] * (SEQ + 1 - n)
    assert any(len(ids) < SEQ + 1 for ids, _ in expected), "no row exercised the padding"


def test_a_bare_file_with_model_and_template_writes_a_labels_column(tmp_path, tiny_model_dir, capsys):
    rows = [{"instruction": "Who are you?", "input": "", "output": "I am Ada."},
            {"instruction": "Capital of France?", "input": "", "output": "Paris."}]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    out = tmp_path / "out" / "rows.mindrecord"
    argv = ["data", "convert", data, "--to", "mindrecord", "--out", out, "--model", tiny_model_dir,
            "--template", "qwen", "--seq-length", "32", "--label-column", "labels"]
    code, _, _ = run_cli(argv, capsys)
    assert code == 0
    first = run_cli(argv, capsys)  # a second run replaces the earlier output (MindRecord alone refuses to)
    assert first[0] == 0
    read = _read(out)
    assert len(read) == 2 and set(read[0]) == {"input_ids", "labels", "attention_mask"}
    assert read[0]["labels"].shape == (33,)


def test_packing_and_a_wrong_out_are_refused_in_one_sentence(config, tmp_path, capsys):
    assert_refused(["data", "convert", config, "--to", "mindrecord", "--out", tmp_path / "x.json"], capsys, "x.json")
    assert_refused(
        ["data", "convert", config, "packing=true", "--to", "mindrecord", "--out", tmp_path / "x.mindrecord"],
        capsys, "packing",
    )
    data = tmp_path / "rows.json"
    assert_refused(["data", "convert", data, "--to", "mindrecord", "--out", tmp_path / "x.mindrecord"],
                   capsys, "--model")
    assert_refused(["data", "convert", data, "--to", "alpaca", "--out", tmp_path / "x.json", "--seq-length", "8"],
                   capsys, "--seq-length")


def test_importing_mindspore_leaves_the_process_csv_field_limit_alone():
    """MindSpore's import sets csv.field_size_limit to 10 MiB for its own tools; tunesmith's import restores it, so
    a CSV cell over the standard 128 KiB limit is still named as bad input later in the same process."""
    import csv

    import_mindspore()
    assert csv.field_size_limit() == 128 * 1024
