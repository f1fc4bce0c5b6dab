"""`tunesmith data convert IN --to openai|alpaca|sharegpt --out OUT`: rewrite a dataset file in another format.

Rows are read the way training reads them (format detected per file, LLaMA-Factory's default column names), so
what is written is exactly the conversations training would see. Nothing of a conversation is lost in any
direction: a multi-turn conversation becomes an alpaca row whose ``history`` holds the earlier exchanges
(LLaMA-Factory's alpaca ``history`` column), and the system prompt goes to ``system``. What does not survive:

* alpaca's instruction / input split — training joins them with a newline, and so does the conversion, so
  alpaca → chat → alpaca gives ``instruction: "<instruction>\\n<input>"`` with an empty input: the same
  conversation, the same tokens;
* columns that are no part of a conversation (ids, metadata): they are dropped, and the count is reported.

Any malformed row stops the conversion, listing every malformed row with its location.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tunesmith.config.load import check_output_folder
from tunesmith.data.conversation import Conversation
from tunesmith.data.formats import DEFAULT_COLUMNS, FORMATS
from tunesmith.data.inspect import inspect_source
from tunesmith.data.sources import DatasetSource, _read_rows
from tunesmith.errors import DataError


def to_openai(conv: Conversation) -> dict[str, Any]:
    return {"messages": conv.to_messages()}


def to_sharegpt(conv: Conversation) -> dict[str, Any]:
    names = {"user": "human", "assistant": "gpt"}
    row: dict[str, Any] = {"conversations": [{"from": names[t.role], "value": t.content} for t in conv.turns]}
    if conv.system is not None:
        row["system"] = conv.system
    return row


def to_alpaca(conv: Conversation) -> dict[str, Any]:
    *history, (user, reply) = conv.exchanges()
    row: dict[str, Any] = {"instruction": user, "input": "", "output": reply}
    if conv.system is not None:
        row["system"] = conv.system
    if history:  # the earlier exchanges: alpaca's history column carries multi-turn conversations losslessly
        row["history"] = [[q, a] for q, a in history]
    return row


WRITERS = {"openai": to_openai, "sharegpt": to_sharegpt, "alpaca": to_alpaca}


# every conversation column of any format: anything else in a row (ids, metadata) is dropped and counted
_CONVERSATION_COLUMNS = {column for columns in DEFAULT_COLUMNS.values() for column in columns.values()}


def convert_file(src: Path, to: str, out: Path) -> tuple[int, int]:
    """Write ``src``'s conversations to ``out`` (.json list or .jsonl) in format ``to``; returns (rows written,
    rows that had columns which are no part of a conversation, dropped)."""
    if to not in FORMATS:
        raise DataError(f"unknown format {to!r}; use one of {', '.join(FORMATS)}")
    if out.suffix.lower() not in (".json", ".jsonl"):
        raise DataError(f"{out}: write .json (a list of rows) or .jsonl (one row per line)")
    if out.resolve() == src.resolve():
        raise DataError(f"{out} is the input file; write the converted rows to another file")
    if out.is_dir():
        raise DataError(f"--out {out} is a folder; give the file to write, such as {out / ('rows' + out.suffix)}")
    if not out.is_file():  # an earlier output may be replaced; anything else must be creatable
        check_output_folder("--out", out, DataError)
    (report,) = inspect_source(DatasetSource(src.name, [src], None), "sft")
    if report.problems:
        listed = "\n".join(f"  {where}: {problem}" for where, problem in report.problems)
        raise DataError(f"{src}: {len(report.problems)} malformed rows, nothing converted:\n{listed}")
    if not report.examples:
        raise DataError(f"{src} holds no rows")
    extra = sum(
        1 for _, row, _ in _read_rows(src) if isinstance(row, dict) and set(row) - _CONVERSATION_COLUMNS
    )
    rows = [WRITERS[to](conv) for conv in report.examples]
    if out.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    else:
        text = json.dumps(rows, ensure_ascii=False, indent=2) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)  # a reader never sees half a file
    return len(rows), extra
