"""Find the files behind ``dataset`` (paths or dataset_info.json names) and read their rows as conversations.

Local files only: tunesmith is offline-first, so hub entries fail with a message that says how to point at a
file instead. Rows and lines count from 1 (``x.json:row 1`` is the first record, ``x.jsonl:line 7`` the 7th
line of the file, ``x.csv:row 1`` the first record after the header). A dataset_info.json entry with both
file_name and a hub url uses the file.

Reading is lazy (``.jsonl`` line by line, ``.csv`` record by record, ``.parquet`` batch by batch; a ``.json``
file is parsed whole), so ``streaming: true`` (:mod:`tunesmith.data.stream`) reads only the rows it trains on.
Several datasets are mixed by ``mix_strategy`` (:mod:`tunesmith.data.mix`) after ``max_samples`` cut each one.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tunesmith.config import Config
from tunesmith.config.schema import DataArgs
from tunesmith.data.conversation import Conversation
from tunesmith.data.formats import (
    FORMATS,
    FormatSpec,
    RowError,
    detect_format,
    fill_placeholders,
    row_to_conversation,
)
from tunesmith.data.mix import mix
from tunesmith.errors import DataError
from tunesmith.logging import get_logger

logger = get_logger("data")
T = TypeVar("T")

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")  # .txt: one raw-text document per line (stage: pt)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
_COLUMN_KEYS = {"prompt", "query", "response", "history", "messages", "system", "tools", "chosen", "rejected", "kto_tag"}
_TAG_KEYS = {
    "role_tag",
    "content_tag",
    "user_tag",
    "assistant_tag",
    "observation_tag",
    "function_tag",
    "system_tag",
}
_MAX_WARNED_ROWS = 5  # skipped rows logged one by one before only the count is kept


@dataclass
class DatasetSource:
    """One entry of ``dataset``: its files and, when dataset_info.json says, how to read them."""

    name: str
    files: list[Path]
    spec: FormatSpec | None  # None: detect the format of each file from its first row
    described_in: Path | None = None  # the dataset_info.json whose entry this is

    @property
    def where(self) -> str:
        """Where a problem of the whole dataset is: its dataset_info.json entry, or its path."""
        return f"{self.described_in}: dataset {self.name}" if self.described_in else f"dataset {self.name}"


def _offline_error(name: str, what: str) -> DataError:
    return DataError(
        f"dataset {name} is {what}, but tunesmith is offline-first and does not download datasets; download "
        f"the file yourself and give its path in dataset=..., or set file_name for it in dataset_info.json"
    )


def read_dataset_info(dataset_dir: Path) -> dict[str, Any]:
    path = dataset_dir / "dataset_info.json"
    if not os.path.lexists(path):
        return {}
    if not path.is_file():
        what = "a symbolic link that leads nowhere (or loops)" if path.is_symlink() else "not a file"
        raise DataError(f"{path} is {what}; make it the JSON file that maps dataset names to files, or remove it")
    text = _read_text(path)
    if not text.strip():
        raise DataError(f'{path} is empty; map dataset names to files in it ({{"name": {{"file_name": ...}}}})')
    info = _parse_json(path, text)
    if not isinstance(info, dict):
        raise DataError(f'{path} must map dataset names to entries ({{"name": {{"file_name": ...}}}})')
    return info


def _files_of(path: Path, name: str) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"dataset {name}: folder {path} holds no {'/'.join(SUFFIXES)} files; add some")
        return files
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(
            f"dataset {name}: {path} is not a {' / '.join(SUFFIXES)} file; convert it to one of those"
        )
    return [path]


def _spec_from_entry(name: str, entry: dict[str, Any], where: Path) -> FormatSpec | None:
    columns = entry.get("columns") or {}
    tags = entry.get("tags") or {}
    for key, allowed, kind in ((columns, _COLUMN_KEYS, "columns"), (tags, _TAG_KEYS, "tags")):
        if not isinstance(key, dict):
            raise DataError(f"{where}: dataset {name}: {kind} must be an object of names")
        unknown = sorted(set(key) - allowed)
        if unknown:
            raise DataError(
                f"{where}: dataset {name}: {kind} key {unknown[0]} is not supported; "
                f"use {', '.join(sorted(allowed))}"
            )
        for field_name, value in key.items():
            if not isinstance(value, str) or not value:
                raise DataError(
                    f"{where}: dataset {name}: {kind}.{field_name} is {value!r}; give the name as a non-empty string"
                )
    formatting = entry.get("formatting")
    ranking = bool(entry.get("ranking"))
    if formatting is None:
        if "messages" in columns or tags:
            formatting = "sharegpt"
        elif columns or ranking:
            formatting = "alpaca"
        else:
            return None
    if formatting not in FORMATS:
        raise DataError(
            f"{where}: dataset {name} has formatting {formatting!r}; use one of {', '.join(FORMATS)}"
        )
    columns = {k: v for k, v in columns.items() if k != "tools"}  # tool definitions are not used yet
    return FormatSpec.build(formatting, columns, tags, ranking=ranking)


def _source_of_entry(name: str, entry: Any, dataset_dir: Path) -> DatasetSource:
    """The dataset_info.json entry ``name``: its file_name checked, its columns and tags read."""
    info_path = dataset_dir / "dataset_info.json"
    if not isinstance(entry, dict):
        raise DataError(f"{info_path}: entry {name} must be an object with file_name (and formatting)")
    file_name = entry.get("file_name")
    if not file_name:
        hub = next((key for key in _HUB_KEYS if key in entry), None)
        if hub:
            raise _offline_error(name, f"a hub dataset ({hub}: {entry[hub]} in {info_path})")
        raise DataError(
            f"{info_path}: entry {name} has no file_name; set it to a file under {dataset_dir}"
        )
    if not isinstance(file_name, str):
        raise DataError(
            f"{info_path}: entry {name} has file_name {file_name!r}; set it to the path of a file under "
            f"{dataset_dir} (a string)"
        )
    path = Path(file_name).expanduser()
    path = path if path.is_absolute() else dataset_dir / path
    if path.is_symlink() and not path.exists():
        raise DataError(
            f"{info_path}: dataset {name} points at {path}, a symbolic link that leads nowhere (or loops); "
            "fix the link or file_name"
        )
    if not path.exists():
        raise DataError(
            f"{info_path}: dataset {name} points at {path}, which does not exist; fix file_name"
        )
    return DatasetSource(name, _files_of(path, name), _spec_from_entry(name, entry, info_path), info_path)


def resolve_source(name: str, dataset_dir: Path, info: dict[str, Any]) -> DatasetSource:
    """A dataset_info.json name wins over a path; relative paths try the CWD, then dataset_dir."""
    info_path = dataset_dir / "dataset_info.json"
    if name in info:
        return _source_of_entry(name, info[name], dataset_dir)
    path = Path(name).expanduser()
    for candidate in (path,) if path.is_absolute() else (path, dataset_dir / path):
        if candidate.exists():
            return DatasetSource(name, _files_of(candidate, name), None)
        if candidate.is_symlink():
            raise DataError(
                f"dataset file {candidate} is a symbolic link that leads nowhere (or loops); point it at the data "
                "file, or give the file's own path"
            )
    if _HUB_NAME.match(name) and Path(name).suffix.lower() not in SUFFIXES:
        raise _offline_error(name, "a hub name and not a local file")
    if Path(name).suffix.lower() in SUFFIXES:
        raise DataError(
            f"dataset file {name} does not exist (looked in the current folder and {dataset_dir}); "
            "check the path"
        )
    known = ", ".join(sorted(info)) or f"none ({info_path} is missing or empty)"
    raise DataError(
        f"dataset {name} is neither a file nor a name in {info_path} (names there: {known}); "
        f"give a {'/'.join(SUFFIXES)} path or add the name to dataset_info.json"
    )


# Each reader yields (location, row, problem); problem is set when the row could not even be parsed.
RowItem = tuple[str, Any, str | None]
_PARQUET_BATCH = 1024  # rows per pyarrow record batch: bounded memory for files larger than RAM


def _not_utf8(where: str) -> DataError:
    return DataError(f"{where} is not UTF-8 text; re-save the file as UTF-8")


def _unreadable(path: Path, err: OSError) -> DataError:
    """A data file the OS will not hand over (permissions, a folder, an I/O error): one sentence, no traceback."""
    return DataError(f"cannot read {path} ({err.strerror or err}); check that it is a readable file")


def _read_text(path: Path) -> str:
    """A whole UTF-8 file (a byte-order mark dropped), with its problems as DataError."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _not_utf8(str(path)) from None
    except OSError as err:
        raise _unreadable(path, err) from None


def _parse_json(path: Path, text: str) -> Any:
    """``json.loads`` of a whole file, its problems as DataError naming file and line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:line {err.lineno}: invalid JSON ({err.msg}); fix the syntax at that line") from None
    except RecursionError:
        raise DataError(f"{path}: the JSON is nested too deeply to read; a dataset holds rows of text") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise DataError(f"{path}: cannot read the JSON ({err}); fix the file") from None


def _read_jsonl_lines(path: Path, text: str) -> Iterator[RowItem]:
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which splitlines() would cut at
    for lineno, line in enumerate(text.split("\n"), 1):
        yield from _jsonl_line(path, lineno, line)


def _jsonl_line(path: Path, lineno: int, line: str) -> Iterator[RowItem]:
    if not line.strip():
        return
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        yield f"{path}:line {lineno}", None, f"invalid JSON ({err.msg} at column {err.colno})"
    except RecursionError:
        yield f"{path}:line {lineno}", None, "the JSON is nested too deeply to read"
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        yield f"{path}:line {lineno}", None, f"cannot read the JSON ({err})"
    else:
        yield f"{path}:line {lineno}", row, None


def _stream_jsonl(path: Path) -> Iterator[RowItem]:
    """JSON lines one at a time: the file is never held whole. Lines are cut at b"\n" only (the same lines as
    ``text.split("\n")``), then decoded."""
    try:
        f = path.open("rb")
    except OSError as err:
        raise _unreadable(path, err) from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _not_utf8(f"{path}:line {lineno}") from None
            yield from _jsonl_line(path, lineno, line.lstrip("\ufeff") if lineno == 1 else line)


def _stream_parquet(path: Path) -> Iterator[RowItem]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH)
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                index += 1
                yield f"{path}:row {index}", row, None
    except DataError:
        raise
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot read it as parquet ({err}); check the file") from None


def _stream_csv(path: Path) -> Iterator[RowItem]:
    try:
        f = path.open(encoding="utf-8-sig", newline="")
    except OSError as err:
        raise _unreadable(path, err) from None
    with f:
        reader = csv.DictReader(f)
        index = 0
        try:
            for row in reader:
                index += 1
                extra = row.pop(None, None)  # DictReader files surplus cells under the key None
                problem = f"it has {len(extra)} more cells than the header" if extra else None
                yield f"{path}:row {index}", row, problem
        except UnicodeDecodeError:
            raise _not_utf8(f"{path}:row {index + 1}") from None
        except csv.Error as err:  # e.g. a cell longer than the csv module's field limit (128 KiB)
            raise DataError(f"{path}:row {index + 1}: cannot read the CSV ({err}); fix the file") from None


def _read_json(path: Path) -> Iterator[RowItem]:
    """A .json file is read whole: a JSON array cannot be parsed row by row with the standard library (use
    .jsonl for files larger than memory)."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        rows = _parse_json(path, text)
        del text
        for i, row in enumerate(rows, 1):
            yield f"{path}:row {i}", row, None
        return
    if text.lstrip().startswith("{") and "\n" in text.strip():
        try:  # one pretty-printed object is not a list of rows; say so instead of failing line by line
            json.loads(text)
        except (ValueError, RecursionError):  # not one object: read as JSON lines, each line's problem named
            pass
        else:
            raise DataError(
                f"{path} holds one JSON object; a dataset file must be a list of rows ([{{...}}, ...]) "
                "or JSON lines (one row per line)"
            )
    # .json files holding JSON lines (HF datasets reads both shapes as "json")
    yield from _read_jsonl_lines(path, text)


def _stream_text_lines(path: Path) -> Iterator[RowItem]:
    """A .txt file: each non-blank line is a row ``{"text": line}`` (LLaMA-Factory's text files), read lazily."""
    try:
        with path.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if line.strip():
                    yield f"{path}:line {lineno}", {"text": line.rstrip("\r\n")}, None
    except UnicodeDecodeError:
        raise _not_utf8(str(path)) from None
    except OSError as err:
        raise _unreadable(path, err) from None


def _read_rows(path: Path) -> Iterator[RowItem]:
    """The rows of one file, lazily: .jsonl line by line, .csv record by record, .parquet batch by batch, .txt
    line by line; .json whole (see :func:`_read_json`)."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _stream_text_lines(path)
    if suffix == ".parquet":
        return _stream_parquet(path)
    if suffix == ".csv":
        return _stream_csv(path)
    if suffix == ".json":
        return _read_json(path)
    return _stream_jsonl(path)


class BadRows:
    """Raise at the first bad row, or (skip_bad_rows) count them and log the first few."""

    def __init__(self, skip: bool, quiet: bool = False) -> None:
        self.skip = skip
        self.quiet = quiet  # a dataset read again (interleave_over): its bad rows were reported the first time
        self.count = 0

    def __call__(self, where: str, problem: str) -> None:
        message = f"{where}: {problem}; fix the row or set skip_bad_rows=true to skip such rows"
        if not self.skip:
            raise DataError(message)
        self.count += 1
        if self.count <= _MAX_WARNED_ROWS and not self.quiet:
            logger.warning("skipped %s: %s", where, problem)


def iter_examples(
    source: DatasetSource,
    max_samples: int | None,
    bad: BadRows,
    convert: Callable[[Any, FormatSpec, str], T],
    detect: Callable[[Any], FormatSpec | None] = detect_format,
    layouts: str = "use alpaca (instruction/input/output), sharegpt (conversations) or openai (messages) rows",
) -> Iterator[T]:
    """The examples of one dataset, lazily, in file order, each row made one by ``convert`` (a conversation,
    a raw-text document, …); ``max_samples`` counts rows (bad ones too). A file whose entry does not say its
    format gets the one ``detect`` sees in its first row (``layouts``: what to use instead, when it sees none)."""
    taken = 0
    for path in source.files:
        if max_samples is not None and taken >= max_samples:
            return
        spec = source.spec
        rows = 0
        for where, row, problem in _read_rows(path):
            if max_samples is not None and taken >= max_samples:
                return
            taken += 1
            rows += 1
            if problem is None and spec is None:
                spec = detect(row)
                if spec is None:
                    keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
                    raise DataError(
                        f"{where}: cannot tell the format of {path} (keys: {keys}); {layouts}, or describe the "
                        "columns in dataset_info.json"
                    )
            if problem is None:
                try:
                    example = convert(row, spec, where)  # type: ignore[arg-type]
                except RowError as err:
                    problem = str(err)
            if problem is not None:
                bad(where, problem)
                continue
            yield example
        if not rows:
            named = "" if source.name == str(path) else f" (dataset {source.name})"
            raise DataError(f"{path}{named} holds no rows; add rows to it or take it out of dataset")


def iter_conversations(
    source: DatasetSource, max_samples: int | None, placeholders: dict[str, str], bad: BadRows
) -> Iterator[Conversation]:
    """The conversations of one dataset, lazily, in file order; ``max_samples`` counts rows (bad ones too)."""
    for path in source.files:
        if path.suffix.lower() == ".txt":
            conversation_suffixes = " / ".join(suffix for suffix in SUFFIXES if suffix != ".txt")
            raise DataError(
                f"dataset {source.name}: {path} is not a {conversation_suffixes} file; convert it to one of those "
                "(a .txt file is raw text, which only stage: pt reads)"
            )
    if source.spec is not None and source.spec.ranking:
        raise DataError(
            f"{source.where} has ranking: true (preference pairs), which stage: dpo and rm train on; set stage: "
            "dpo (or rm), or give an SFT dataset"
        )
    for conv in iter_examples(source, max_samples, bad, row_to_conversation):
        yield fill_placeholders(conv, placeholders)


def resolve_sources(data: DataArgs) -> list[DatasetSource]:
    """The sources of ``dataset``, in order (files resolved, nothing read yet)."""
    if not data.dataset:
        raise DataError(
            "no dataset given; set dataset=NAME_OR_PATH (a .json/.jsonl/.csv/.parquet file or a name "
            "in dataset_dir/dataset_info.json)"
        )
    dataset_dir = Path(data.dataset_dir).expanduser()
    info = read_dataset_info(dataset_dir)
    return [resolve_source(name, dataset_dir, info) for name in data.dataset]


def read_conversations(cfg: Config, bad: BadRows) -> Iterator[Conversation]:
    """The conversations of ``cfg.dataset``, lazily (one pass, nothing held but the current rows), at most
    ``max_samples`` rows of each dataset, mixed by ``mix_strategy`` (see :mod:`tunesmith.data.mix`; seeded by
    ``seed``). Bad rows go to ``bad``; each dataset's count is logged when its first reading ends."""

    def reader(source: DatasetSource, rows_bad: BadRows) -> Iterator[Conversation]:
        return iter_conversations(source, cfg.max_samples, cfg.placeholders, rows_bad)

    return read_mixed(cfg, bad, reader, "conversations")


def read_mixed(
    cfg: Config, bad: BadRows, reader: Callable[[DatasetSource, BadRows], Iterator[T]], what: str
) -> Iterator[T]:
    """The examples ``reader`` makes of each dataset of ``cfg.dataset``, mixed by ``mix_strategy``."""
    sources = resolve_sources(cfg)

    def first_reading(source: DatasetSource) -> Iterator[T]:
        count, bad_before = 0, bad.count
        for conv in reader(source, bad):
            count += 1
            yield conv
        logger.info(
            "dataset %s: %d %s from %s%s",
            source.name,
            count,
            what,
            ", ".join(str(f) for f in source.files),
            f" ({bad.count - bad_before} bad rows skipped)" if bad.count > bad_before else "",
        )

    def opener(source: DatasetSource) -> Callable[[], Iterator[T]]:
        readings = 0

        def open_reading() -> Iterator[T]:
            nonlocal readings
            readings += 1
            if readings == 1:
                return first_reading(source)
            # interleave_over starts a shorter dataset again: the same rows, their problems already reported
            return reader(source, BadRows(True, quiet=True))

        return open_reading

    strategy = cfg.mix_strategy
    mixed = 0
    for conv in mix([opener(s) for s in sources], strategy, cfg.interleave_probs, cfg.seed):
        mixed += 1
        yield conv
    if strategy != "concat" and len(sources) > 1:
        logger.info("data: %s of %d datasets → %d %s (seed %d)", strategy, len(sources), mixed, what, cfg.seed)


def load_conversations(cfg: Config) -> tuple[list[Conversation], int]:
    """:func:`read_conversations` as a list, and how many bad rows were skipped."""
    bad = BadRows(cfg.skip_bad_rows)
    convs = list(read_conversations(cfg, bad))
    return convs, bad.count
