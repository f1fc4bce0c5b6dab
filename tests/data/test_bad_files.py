"""Bad data files and dataset_info.json: one sentence naming the file (and its line or row), exit 2, no traceback,
and an earlier run's checkpoints left byte for byte as they were.

Each case writes the bad file into a complete setup (:func:`bad_input_helpers.make_run`: the tiny model, a valid
config) and runs ``tunesmith train`` in-process; the data is read before the model loads, so a case takes well
under a second. What should simply work (a UTF-8 BOM, a null in an optional column) is read with
``load_conversations`` and checked to load.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from pathlib import Path

import pytest
from bad_input_helpers import (
    GOOD_ROWS,
    assert_refused,
    assert_refused_subprocess,
    copy_run,
    make_run,
    run_cli,
    snapshot,
    trained_run,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunesmith.config import Config
from tunesmith.data import load_conversations
from tunesmith.errors import DataError

NAN = float("nan")
CHINESE = [{"instruction": "你是谁？", "input": "", "output": "我是一个人工智能助手。"}]


def _jsonl(rows) -> bytes:
    return "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode("utf-8")


def _parquet(rows) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def _train_on(tmp_path, tiny_model_dir, name: str, data: bytes, **values) -> tuple[Path, Path]:
    """A complete setup whose dataset is the file ``name`` holding ``data``; (config, data file)."""
    path = tmp_path / "files" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return make_run(tmp_path, tiny_model_dir, dataset=str(path), **values), path


# ------------------------------------------------------------------------------------ encodings and syntax

# (id, file name, bytes, what the message names besides the file: a line or row, a problem)
FILE_CASES = [
    ("gbk-json", "d.json", json.dumps(GOOD_ROWS + CHINESE, ensure_ascii=False).encode("gbk"), ["not UTF-8"]),
    ("gbk-jsonl", "d.jsonl", _jsonl(GOOD_ROWS + CHINESE).decode().encode("gbk"), [":line 5", "not UTF-8"]),
    ("gbk-csv", "d.csv", "instruction,input,output\n你是谁,,我是助手\n".encode("gbk"), [":row 1", "not UTF-8"]),
    ("latin-1-jsonl", "d.jsonl", '{"instruction": "café", "output": "oui"}\n'.encode("latin-1"), [":line 1"]),
    ("utf-16-json", "d.json", json.dumps(GOOD_ROWS).encode("utf-16"), ["not UTF-8"]),
    ("truncated-json", "d.json", json.dumps(GOOD_ROWS, indent=1).encode()[:-40], [":line", "invalid JSON"]),
    ("truncated-jsonl", "d.jsonl", _jsonl(GOOD_ROWS)[:-12], [":line 4", "invalid JSON"]),
    ("truncated-parquet", "d.parquet", _parquet(GOOD_ROWS)[:-30], ["parquet"]),
    ("junk-parquet", "d.parquet", b"PAR1 this is not parquet at all", ["parquet"]),
    ("empty-json", "d.json", b"", ["holds no rows"]),
    ("empty-jsonl", "d.jsonl", b"", ["holds no rows"]),
    ("empty-csv", "d.csv", b"", ["holds no rows"]),
    ("empty-parquet", "d.parquet", b"", ["parquet"]),
    ("blank-lines-jsonl", "d.jsonl", b"\n\n   \n", ["holds no rows"]),
    ("empty-list-json", "d.json", b"[]", ["holds no rows"]),
    ("header-only-csv", "d.csv", b"instruction,input,output\n", ["holds no rows"]),
    ("one-object-json", "d.json", json.dumps(GOOD_ROWS[0], indent=1).encode(), ["one JSON object"]),
    ("scalar-json", "d.json", b"42", [":line 1", "cannot tell the format"]),
    ("list-rows-jsonl", "d.jsonl", b"[1, 2]\n", [":line 1"]),
    ("null-row-jsonl", "d.jsonl", b"null\n", [":line 1"]),
    ("row-is-a-list", "d.json", json.dumps([GOOD_ROWS[0], ["a", "b"]]).encode(), [":row 2", "expected an object"]),
    ("nested-too-deep-json", "d.json", b"[" * 100_000 + b"]" * 100_000, ["nested too deeply"]),
    ("nested-too-deep-jsonl", "d.jsonl", b"[" * 100_000 + b"]" * 100_000, [":line 1", "nested too deeply"]),
    ("huge-integer-json", "d.json", b'[{"instruction": "q", "output": ' + b"9" * 5000 + b"}]", ["cannot read"]),
    ("huge-integer-jsonl", "d.jsonl", b'{"instruction": "q", "output": ' + b"9" * 5000 + b"}", [":line 1"]),
    ("csv-cell-over-the-field-limit", "d.csv", b'instruction,input,output\n"' + b"x" * 200_000 + b'",,a\n', [":row 1"]),
    ("csv-short-row", "d.csv", b"instruction,input,output\nq\n", [":row 1", "missing column 'output'"]),
    ("csv-long-row", "d.csv", b"instruction,input,output\nq,,a,extra\n", [":row 1", "more cells"]),
    ("csv-list-cell-bad-json", "d.csv", b'messages\n"[{""role"": ""user"", ""content"": ""hi""}"\n', [":row 1"]),
    ("unknown-columns", "d.json", json.dumps([{"question": "q", "answer": "a"}]).encode(), ["cannot tell"]),
    ("not-a-data-suffix", "d.txt", b"hello\n", ["not a"]),
]


@pytest.mark.parametrize(("name", "data", "named"), [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_a_bad_data_file_is_named(tmp_path, capsys, tiny_model_dir, name, data, named):
    config, path = _train_on(tmp_path, tiny_model_dir, name, data)
    assert_refused(["train", config], capsys, path, *named)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["d.json", "d.jsonl", "d.csv"])
def test_a_utf8_bom_simply_loads(tmp_path, name):
    if name == "d.csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, ["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(GOOD_ROWS)
        text = out.getvalue()
    elif name == "d.json":
        text = json.dumps(GOOD_ROWS)
    else:
        text = _jsonl(GOOD_ROWS).decode()
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    convs, bad = load_conversations(Config(dataset=[name], dataset_dir=str(tmp_path)))
    assert bad == 0 and [c.turns[0].content for c in convs] == [r["instruction"] for r in GOOD_ROWS]


def test_a_bom_file_trains(tmp_path, capsys, tiny_model_dir):
    config, _ = _train_on(tmp_path, tiny_model_dir, "d.jsonl", b"\xef\xbb\xbf" + _jsonl(GOOD_ROWS), max_steps=1)
    code, _, err = run_cli(["train", config], capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "checkpoint-1").is_dir()


# ------------------------------------------------------------------------------------ NaN and null in every column

ALPACA = {"instruction": "q", "input": "i", "output": "a", "system": "s", "history": [["q0", "a0"]]}
SHAREGPT = {
    "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
    "system": "s",
}
OPENAI = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def _with(row: dict, path: tuple, value) -> dict:
    row = json.loads(json.dumps(row))
    node = row
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return row


# (id, row): every column of each format (and each message field) as NaN and as null
NAN_NULL = [
    *[(f"alpaca-{col}-{kind}", _with(ALPACA, (col,), v)) for col in ALPACA for kind, v in (("nan", NAN), ("null", None))],
    *[(f"sharegpt-{col}-{kind}", _with(SHAREGPT, (col,), v)) for col in SHAREGPT for kind, v in (("nan", NAN), ("null", None))],
    *[
        (f"sharegpt-message-{field}-{kind}", _with(SHAREGPT, ("conversations", 0, field), v))
        for field in ("from", "value")
        for kind, v in (("nan", NAN), ("null", None))
    ],
    *[
        (f"openai-message-{field}-{kind}", _with(OPENAI, ("messages", 1, field), v))
        for field in ("role", "content")
        for kind, v in (("nan", NAN), ("null", None))
    ],
    ("openai-messages-nan", _with(OPENAI, ("messages",), NAN)),
    ("alpaca-history-pair-nan", _with(ALPACA, ("history", 0, 0), NAN)),
]
# a null in an optional column means "not given" (as in LLaMA-Factory): those rows load
OPTIONAL_NULLS = {"alpaca-input-null", "alpaca-system-null", "alpaca-history-null", "sharegpt-system-null"}


@pytest.mark.parametrize("row", [r for i, r in NAN_NULL if i not in OPTIONAL_NULLS],
                         ids=[i for i, _ in NAN_NULL if i not in OPTIONAL_NULLS])
def test_nan_or_null_in_a_column_is_named_with_its_row(tmp_path, capsys, tiny_model_dir, row):
    data = json.dumps([ALPACA if "instruction" in row else SHAREGPT if "conversations" in row else OPENAI, row])
    config, path = _train_on(tmp_path, tiny_model_dir, "d.json", data.encode())  # Python's json writes NaN
    assert_refused(["train", config], capsys, f"{path}:row 2", "skip_bad_rows=true")


@pytest.mark.parametrize("row", [r for i, r in NAN_NULL if i in OPTIONAL_NULLS],
                         ids=[i for i, _ in NAN_NULL if i in OPTIONAL_NULLS])
def test_null_in_an_optional_column_loads(tmp_path, row):
    (tmp_path / "d.json").write_text(json.dumps([row]))
    convs, bad = load_conversations(Config(dataset=["d.json"], dataset_dir=str(tmp_path)))
    assert bad == 0 and len(convs) == 1 and convs[0].turns[-1].content == "a"


def test_nan_rows_are_skipped_and_counted_with_skip_bad_rows(tmp_path):
    rows = [ALPACA] + [r for i, r in NAN_NULL if i.startswith("alpaca") and i not in OPTIONAL_NULLS]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    convs, bad = load_conversations(Config(dataset=["d.json"], dataset_dir=str(tmp_path), skip_bad_rows=True))
    assert len(convs) == 1 and bad == len(rows) - 1


@pytest.mark.parametrize("column", ["instruction", "input", "output"])
@pytest.mark.parametrize("value", [None, NAN], ids=["null", "nan"])
def test_null_and_nan_cells_in_parquet(tmp_path, capsys, tiny_model_dir, column, value):
    """A parquet column is typed: NaN fills a float column (every row), null a gap in a string one (row 3)."""
    rows = [dict(r) for r in GOOD_ROWS]
    for index, row in enumerate(rows):
        if value is not None or index == 2:
            row[column] = value
    config, path = _train_on(tmp_path, tiny_model_dir, "d.parquet", _parquet(rows))
    if value is None and column == "input":  # an optional column: null is "not given", the file trains
        convs, bad = load_conversations(Config(dataset=[str(path)], dataset_dir=str(tmp_path)))
        assert len(convs) == len(GOOD_ROWS) and bad == 0
        return
    message = assert_refused(["train", config], capsys, f"{path}:row {1 if value is not None else 3}", column)
    assert ("NaN" in message) == (value is not None and math.isnan(value))


# ------------------------------------------------------------------------------------ where a file should be


def test_a_folder_named_like_a_data_file(tmp_path, capsys, tiny_model_dir):
    folder = tmp_path / "d.json"
    folder.mkdir()
    config = make_run(tmp_path, tiny_model_dir, dataset=str(folder))
    assert_refused(["train", config], capsys, folder)


def test_a_data_folder_holding_only_a_folder(tmp_path, capsys, tiny_model_dir):
    (tmp_path / "rows" / "inner.json").mkdir(parents=True)
    config = make_run(tmp_path, tiny_model_dir, dataset=str(tmp_path / "rows"))
    assert_refused(["train", config], capsys, tmp_path / "rows", "holds no")


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_a_symlink_that_leads_nowhere(tmp_path, capsys, tiny_model_dir, kind):
    link = tmp_path / "d.json"
    os.symlink(link if kind == "loop" else tmp_path / "gone.json", link)
    config = make_run(tmp_path, tiny_model_dir, dataset=str(link))
    assert_refused(["train", config], capsys, link, "symbolic link")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway (the simulated case runs)")
def test_an_unreadable_data_file(tmp_path, capsys, tiny_model_dir):
    config, path = _train_on(tmp_path, tiny_model_dir, "d.jsonl", _jsonl(GOOD_ROWS))
    path.chmod(0)
    try:
        assert_refused(["train", config], capsys, path, "cannot read")
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize("name", ["d.json", "d.jsonl", "d.csv", "dataset_info.json"])
def test_an_unreadable_file_simulated(tmp_path, capsys, tiny_model_dir, monkeypatch, name):
    """What a non-root user meets with a chmod 000 file, made to happen as root too: every way the data layer
    opens a file (read_text, open) gets the OS's PermissionError for that one path."""
    if name == "dataset_info.json":
        config = make_run(tmp_path, tiny_model_dir)
        path = tmp_path / "data" / name
    else:
        data = b"instruction,input,output\nq,,a\n" if name.endswith(".csv") else _jsonl(GOOD_ROWS)
        config, path = _train_on(tmp_path, tiny_model_dir, name, data)
    real_open = Path.open

    def refuse(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)  # read_text and read_bytes open through it too
    assert_refused(["train", config], capsys, path, "Permission denied")


# ------------------------------------------------------------------------------------ a 100 MB single line


def _big_line(path: Path, head: bytes, tail: bytes, size: int = 100_000_000) -> Path:
    """``path`` ending in one line of ``size`` bytes (``head``, filler, ``tail``), written in 1 MB pieces."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        fh.write(_jsonl(GOOD_ROWS) + b"\n" + head)
        filler = size - len(head) - len(tail)
        for _ in range(filler // 1_000_000):
            fh.write(b"q " * 500_000)
        fh.write(b"q" * (filler % 1_000_000) + tail)
    return path


def test_a_100mb_line_of_junk_fails_fast(tmp_path, capsys, tiny_model_dir):
    path = _big_line(tmp_path / "files" / "d.jsonl", b"", b"")
    config = make_run(tmp_path, tiny_model_dir, dataset=str(path))
    assert_refused(["train", config], capsys, f"{path}:line 5", "invalid JSON")


def test_a_100mb_valid_row_is_refused_before_tokenizing(tmp_path, capsys, tiny_model_dir):
    """Tokenizing 100 MB of text takes many minutes and 20+ GB; the row is refused as too long instead."""
    path = _big_line(tmp_path / "files" / "d.jsonl", b'{"instruction": "', b'", "output": "a"}\n')
    config = make_run(tmp_path, tiny_model_dir, dataset=str(path))
    assert_refused(["train", config], capsys, f"{path}:line 5", "99,999,9", "characters", "skip_bad_rows=true")


def test_a_100mb_row_is_skipped_with_skip_bad_rows(tmp_path, capsys, tiny_model_dir):
    path = _big_line(tmp_path / "files" / "d.jsonl", b'{"instruction": "', b'", "output": "a"}\n')
    config = make_run(tmp_path, tiny_model_dir, dataset=str(path), skip_bad_rows=True, max_steps=1)
    code, _, err = run_cli(["train", config], capsys)
    assert code == 0, err[-2000:]  # the 4 good rows trained; the long one was skipped and counted, not tokenized
    assert (tmp_path / "run" / "checkpoint-1").is_dir()


# ------------------------------------------------------------------------------------ dataset_info.json


def _info(tmp_path, tiny_model_dir, data: bytes, **values) -> tuple[Path, Path]:
    config = make_run(tmp_path, tiny_model_dir, **values)
    info = tmp_path / "data" / "dataset_info.json"
    info.write_bytes(data)
    return config, info


def _entry(**fields) -> bytes:
    return json.dumps({"identity": {"file_name": "identity.json", **fields}}).encode()


# (id, dataset_info.json bytes, what the message names besides the file)
INFO_CASES = [
    ("gbk", '{"identity": {"file_name": "identity.json", "columns": {"prompt": "问题"}}}'.encode("gbk"), ["not UTF-8"]),
    ("truncated", _entry()[:-5], [":line 1", "invalid JSON"]),
    ("empty", b"", ["is empty"]),
    ("whitespace", b"  \n", ["is empty"]),
    ("a-list", b'[{"file_name": "identity.json"}]', ["must map dataset names"]),
    ("nested-too-deep", b"[" * 100_000 + b"]" * 100_000, ["nested too deeply"]),
    ("entry-is-a-list", b'{"identity": ["identity.json"]}', ["entry identity"]),
    ("entry-is-null", b'{"identity": null}', ["entry identity"]),
    ("file-name-null", _entry(file_name=None), ["no file_name"]),
    ("file-name-nan", _entry(file_name=NAN), ["file_name nan"]),
    ("file-name-number", _entry(file_name=3), ["file_name 3"]),
    ("file-name-list", _entry(file_name=["identity.json"]), ["file_name ['identity.json']"]),
    ("file-name-missing-file", _entry(file_name="gone.json"), ["gone.json", "does not exist"]),
    ("columns-nan", _entry(columns=NAN), ["columns must be an object"]),
    ("columns-a-list", _entry(columns=["instruction"]), ["columns must be an object"]),
    ("column-name-nan", _entry(columns={"prompt": NAN}), ["columns.prompt"]),
    ("column-name-null", _entry(columns={"response": None}), ["columns.response"]),
    ("column-name-list", _entry(columns={"prompt": ["instruction"]}), ["columns.prompt"]),
    ("column-unknown", _entry(columns={"question": "instruction"}), ["columns key question"]),
    ("tags-number", _entry(formatting="sharegpt", tags=3), ["tags must be an object"]),
    ("tag-null", _entry(formatting="sharegpt", tags={"role_tag": None}), ["tags.role_tag"]),
    ("formatting-nan", _entry(formatting=NAN), ["formatting nan"]),
    ("formatting-unknown", _entry(formatting="chatml"), ["formatting 'chatml'"]),
    ("ranking", _entry(ranking=True), ["ranking"]),
    ("hub-only", b'{"identity": {"hf_hub_url": "org/name"}}', ["offline-first"]),
]


@pytest.mark.parametrize(("data", "named"), [c[1:] for c in INFO_CASES], ids=[c[0] for c in INFO_CASES])
def test_a_broken_dataset_info_is_named(tmp_path, capsys, tiny_model_dir, data, named):
    config, info = _info(tmp_path, tiny_model_dir, data)
    assert_refused(["train", config], capsys, info, *named)


def test_a_dataset_info_with_a_bom_simply_works(tmp_path):
    (tmp_path / "identity.json").write_text(json.dumps(GOOD_ROWS))
    (tmp_path / "dataset_info.json").write_bytes(b"\xef\xbb\xbf" + _entry())
    convs, _ = load_conversations(Config(dataset=["identity"], dataset_dir=str(tmp_path)))
    assert len(convs) == len(GOOD_ROWS)


@pytest.mark.parametrize("kind", ["folder", "loop"])
def test_a_dataset_info_that_is_not_a_file(tmp_path, capsys, tiny_model_dir, kind):
    config = make_run(tmp_path, tiny_model_dir)
    info = tmp_path / "data" / "dataset_info.json"
    info.unlink()
    if kind == "folder":
        info.mkdir()
    else:
        os.symlink(info, info)
    assert_refused(["train", config], capsys, info)


@pytest.mark.parametrize("kind", ["folder-without-data", "loop", "dangling"])
def test_a_dataset_info_entry_pointing_nowhere_useful(tmp_path, capsys, tiny_model_dir, kind):
    config = make_run(tmp_path, tiny_model_dir)
    target = tmp_path / "data" / "target.json"
    if kind == "folder-without-data":
        target.mkdir()
    else:
        os.symlink(target if kind == "loop" else tmp_path / "gone", target)
    (tmp_path / "data" / "dataset_info.json").write_bytes(_entry(file_name="target.json"))
    assert_refused(["train", config], capsys, target)


# ------------------------------------------------------------------------------------ the other data commands


def test_data_inspect_names_a_gbk_json(tmp_path, capsys):
    path = tmp_path / "d.json"
    path.write_bytes(json.dumps(CHINESE, ensure_ascii=False).encode("gbk"))
    assert_refused(["data", "inspect", path, "--no-plot"], capsys, path, "not UTF-8")


def test_data_convert_names_a_junk_file(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xff\xfe junk")
    assert_refused(["data", "convert", path, "--to", "openai", "--out", tmp_path / "o.jsonl"], capsys, path)


@pytest.mark.parametrize("where", ["below-a-file", "a-folder"])
def test_data_convert_out_that_cannot_be_written(tmp_path, capsys, where):
    source = tmp_path / "d.json"
    source.write_text(json.dumps(GOOD_ROWS))
    blocker = tmp_path / ("blocker" if where == "below-a-file" else "out.jsonl")
    if where == "below-a-file":
        blocker.write_text("keep me")
    else:
        blocker.mkdir()
    out = blocker / "out.jsonl" if where == "below-a-file" else blocker
    assert_refused(["data", "convert", source, "--to", "openai", "--out", out], capsys, "--out", out)
    assert where == "a-folder" or blocker.read_text() == "keep me"


@pytest.mark.parametrize("where", ["below-a-file", "a-folder"])
def test_data_inspect_plot_that_cannot_be_written(tmp_path, capsys, tiny_model_dir, where):
    source = tmp_path / "d.json"
    source.write_text(json.dumps(GOOD_ROWS))
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me") if where == "below-a-file" else blocker.mkdir()
    plot = blocker / "h.png" if where == "below-a-file" else blocker
    argv = ["data", "inspect", source, "--model", tiny_model_dir, "--plot", plot]
    assert_refused(argv, capsys, "--plot", plot)


def test_data_preview_in_a_real_process(tmp_path, tiny_model_dir):
    config, path = _train_on(tmp_path, tiny_model_dir, "d.jsonl", _jsonl(GOOD_ROWS)[:-12])
    assert_refused_subprocess(["data", "preview", config], f"{path}:line 4", "invalid JSON")


# ------------------------------------------------------------------------------------ property-based


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(max_size=400), suffix=st.sampled_from([".json", ".jsonl", ".csv", ".parquet"]))
def test_junk_bytes_as_a_data_file_load_or_raise_data_error(tmp_path, junk, suffix):
    """Whatever the bytes, reading them as a dataset gives conversations or a DataError naming the file."""
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(junk)
    try:
        load_conversations(Config(dataset=[str(path)], dataset_dir=str(tmp_path)))
    except DataError as err:
        assert str(path) in str(err) and "\n" not in str(err), str(err)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.dictionaries(
            st.sampled_from(["instruction", "input", "output", "system", "history", "conversations", "messages"]),
            st.recursive(
                st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
                lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(
                    ["from", "value", "role", "content"]), inner, max_size=3),
                max_leaves=8,
            ),
            max_size=5,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_random_rows_load_or_raise_data_error(tmp_path, rows):
    """Random values in every column (NaN, null, lists, maps) become conversations or a DataError at a row."""
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    try:
        load_conversations(Config(dataset=[str(path)], dataset_dir=str(tmp_path)))
    except DataError as err:
        assert str(path) in str(err) and "\n" not in str(err), str(err)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_junk_as_dataset_info_is_a_data_error(tmp_path, junk):
    (tmp_path / "identity.json").write_text(json.dumps(GOOD_ROWS))
    (tmp_path / "dataset_info.json").write_bytes(junk)
    try:
        load_conversations(Config(dataset=["identity"], dataset_dir=str(tmp_path)))
    except DataError as err:
        assert "dataset_info.json" in str(err) and "\n" not in str(err), str(err)


def test_one_junk_data_file_through_the_cli(tmp_path, capsys, tiny_model_dir):
    config, path = _train_on(tmp_path, tiny_model_dir, "d.jsonl", bytes(range(256)) * 4)
    assert_refused(["train", config], capsys, path)


# ------------------------------------------------------------------------------------ no earlier checkpoint harmed


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_dir):
    return trained_run(tmp_path_factory, tiny_model_dir)


def _gbk(root: Path) -> Path:
    path = root / "data" / "identity.json"
    path.write_bytes(json.dumps(GOOD_ROWS + CHINESE, ensure_ascii=False).encode("gbk"))
    return path


def _truncate(root: Path) -> Path:
    path = root / "data" / "identity.json"
    path.write_bytes(path.read_bytes()[:-20])
    return path


def _nan_row(root: Path) -> Path:
    path = root / "data" / "identity.json"
    path.write_text(json.dumps([*GOOD_ROWS, {"instruction": NAN, "output": "a"}]))
    return path


def _empty(root: Path) -> Path:
    path = root / "data" / "identity.json"
    path.write_bytes(b"")
    return path


def _broken_info(root: Path) -> Path:
    path = root / "data" / "dataset_info.json"
    path.write_bytes(path.read_bytes()[:-3])
    return path


def _folder_instead(root: Path) -> Path:
    path = root / "data" / "identity.json"
    path.unlink()
    path.mkdir()
    return path


RERUN_BREAKS = [_gbk, _truncate, _nan_row, _empty, _broken_info, _folder_instead]


@pytest.mark.parametrize("overwrite", [False, True], ids=["resume", "overwrite_output_dir"])
@pytest.mark.parametrize("break_it", RERUN_BREAKS, ids=[f.__name__.strip("_") for f in RERUN_BREAKS])
def test_a_refused_rerun_leaves_the_checkpoints_alone(
    tmp_path, capsys, reference_run, tiny_model_dir, break_it, overwrite
):
    """The same command again over a trained run, its data broken meanwhile: refused, and the run folder (every
    checkpoint, the adapter, the logs) is byte for byte what it was, also with overwrite_output_dir: true."""
    root = tmp_path / "copy"
    config = copy_run(reference_run, root, tiny_model_dir, overwrite_output_dir=overwrite or None)
    culprit = break_it(root)
    before = snapshot(root / "run")
    assert {"checkpoint-1", "checkpoint-2"} <= set(before)
    assert_refused(["train", config], capsys, culprit)
    assert snapshot(root / "run") == before


def test_a_refused_rerun_in_a_real_process_leaves_the_checkpoints_alone(tmp_path, reference_run, tiny_model_dir):
    root = tmp_path / "copy"
    config = copy_run(reference_run, root, tiny_model_dir)
    culprit = _gbk(root)
    before = snapshot(root / "run")
    assert_refused_subprocess(["train", config], culprit, "not UTF-8")
    assert snapshot(root / "run") == before
    shutil.rmtree(root)
