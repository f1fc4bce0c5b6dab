"""alpaca / sharegpt / openai rows → :class:`Conversation`, with LLaMA-Factory's column and tag names.

A row that cannot become a valid conversation raises :class:`RowError` with the problem only; sources.py
adds where it is (file and row or line) and decides whether to stop or skip it (``skip_bad_rows``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.conversation import Conversation, Turn
from tunesmith.errors import DataError

FORMATS = ("alpaca", "sharegpt", "openai")

# LLaMA-Factory's defaults: dataset_info.json entries only list the names they change.
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "system": "system",
        "history": "history",
    },
    "sharegpt": {"messages": "conversations", "system": "system"},
    "openai": {"messages": "messages", "system": "system"},
}
DEFAULT_TAGS: dict[str, dict[str, str]] = {
    "sharegpt": {
        "role_tag": "from",
        "content_tag": "value",
        "user_tag": "human",
        "assistant_tag": "gpt",
        "system_tag": "system",
        "observation_tag": "observation",
        "function_tag": "function_call",
    },
    "openai": {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
        "system_tag": "system",
        "observation_tag": "tool",
        "function_tag": "function",
    },
}
# Role names accepted in every sharegpt/openai file besides the configured tags: files mix the two
# conventions often enough that refusing `user` in a sharegpt file would only annoy.
_ROLE_SYNONYMS = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
# Exact `{{word}}` only: code in datasets usually writes `{{ var }}` with spaces, which stays untouched.
PLACEHOLDER_RE = re.compile(r"\{\{(\w+)\}\}")


class RowError(Exception):
    """One row is malformed; the message is the problem, without its location."""


@dataclass
class FormatSpec:
    """How to read one dataset's rows: its formatting, column names and (sharegpt/openai) role tags."""

    formatting: str
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    explicit_tags: bool = False  # tags came from dataset_info.json (no guessing role/content keys then)
    ranking: bool = False  # preference pairs: chosen / rejected columns (stage: dpo)

    @classmethod
    def build(
        cls,
        formatting: str,
        columns: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
        ranking: bool = False,
    ) -> FormatSpec:
        merged_columns = {**DEFAULT_COLUMNS[formatting], **(columns or {})}
        base_tags = DEFAULT_TAGS.get(formatting, {})
        return cls(formatting, merged_columns, {**base_tags, **(tags or {})}, explicit_tags=bool(tags),
                   ranking=ranking)


def detect_format(row: Any) -> FormatSpec | None:
    """Guess the format from one row's keys (used when dataset_info.json does not say)."""
    if not isinstance(row, dict):
        return None
    for key in ("messages", "conversations"):
        if key in row:
            try:
                messages = _maybe_json(row[key])
            except RowError:  # row_to_conversation names the problem with the row's location
                messages = None
            first = messages[0] if isinstance(messages, list) and messages else {}
            style = "openai" if isinstance(first, dict) and "role" in first else "sharegpt"
            return FormatSpec.build(style, {"messages": key})
    if "instruction" in row and "output" in row:
        return FormatSpec.build("alpaca")
    return None


def _maybe_json(value: Any) -> Any:
    """CSV cells hold nested lists (history, messages) as JSON text; decode those."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise RowError(f"a list column holds invalid JSON ({err.msg})") from None
        except RecursionError:
            raise RowError("a list column holds JSON nested too deeply to read") from None
        except ValueError as err:  # e.g. an integer of more than 4300 digits
            raise RowError(f"a list column holds JSON that cannot be read ({err})") from None
    return value


def _text(row: dict[str, Any], column: str | None, *, required: bool) -> str | None:
    if not column or row.get(column) is None:
        if required:
            raise RowError(f"missing column '{column}'")
        return None
    value = row[column]
    if not isinstance(value, str):
        raise RowError(f"column '{column}' is {kind_of(value)}, expected a string")
    return value


def kind_of(value: Any) -> str:
    """'a int', 'null', 'NaN (a float)': what a non-string value is, for a row's problem."""
    if value is None:
        return "null"
    if isinstance(value, float) and value != value:
        return "NaN (a float)"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return f"{value} (a float)"
    return f"a {type(value).__name__}"


def _alpaca(row: dict[str, Any], spec: FormatSpec) -> tuple[str | None, list[tuple[str, str]]]:
    cols = spec.columns
    prompt = _text(row, cols.get("prompt"), required=True)
    query = _text(row, cols.get("query"), required=False)
    response = _text(row, cols.get("response"), required=True)
    system = _text(row, cols.get("system"), required=False)
    # LLaMA-Factory joins instruction and input with a newline; an empty input adds nothing.
    user = "\n".join(part for part in (prompt, query) if part)
    turns: list[tuple[str, str]] = []
    history = _maybe_json(row.get(cols.get("history") or "", None))
    if history is not None and history != "":  # an empty CSV cell is no history
        if not isinstance(history, list):
            raise RowError(f"column '{cols['history']}' must be a list of [question, answer] pairs")
        for i, pair in enumerate(history, 1):
            if not (
                isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
            ):
                raise RowError(f"history entry {i} is not a [question, answer] pair of strings")
            turns += [("user", pair[0]), ("assistant", pair[1])]
    return system, turns + [("user", user), ("assistant", response)]


def _chat(row: dict[str, Any], spec: FormatSpec) -> tuple[str | None, list[tuple[str, str]]]:
    column = spec.columns["messages"]
    if row.get(column) is None:
        raise RowError(f"missing column '{column}'")
    messages = _maybe_json(row[column])
    if not isinstance(messages, list):
        raise RowError(f"column '{column}' is {kind_of(messages)}, expected a list of messages")
    tags = spec.tags
    roles = dict(_ROLE_SYNONYMS)
    roles.update({tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"})
    unsupported = {tags.get("observation_tag"), tags.get("function_tag"), "tool", "function", "observation"}
    role_key, content_key = tags["role_tag"], tags["content_tag"]
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise RowError(f"message {i} is a {type(message).__name__}, expected an object")
        if not spec.explicit_tags and role_key not in message and "role" in message:
            role_key, content_key = "role", "content"  # openai-style messages under a sharegpt entry
        if role_key not in message or content_key not in message:
            raise RowError(f"message {i} lacks '{role_key}' or '{content_key}'")
        tag, content = message[role_key], message[content_key]
        if not isinstance(content, str):
            raise RowError(f"message {i} content is {kind_of(content)}, expected a string")
        if not isinstance(tag, str):
            raise RowError(f"message {i} role ('{role_key}') is {kind_of(tag)}, expected a string such as 'user'")
        if tag in unsupported:
            raise RowError(f"message {i} has role '{tag}' (tool calls are not supported yet)")
        if tag not in roles:
            raise RowError(
                f"message {i} has unknown role {tag!r} (set tags.user_tag/assistant_tag "
                "in dataset_info.json for custom role names)"
            )
        turns.append((roles[tag], content))
    system = _text(row, spec.columns.get("system"), required=False)
    if turns and turns[0][0] == "system":
        system = turns.pop(0)[1]
    return system, turns


def require_object(row: Any) -> dict[str, Any]:
    """A row must be a JSON object (a dict) to have columns."""
    if not isinstance(row, dict):
        raise RowError(f"the row is a {type(row).__name__}, expected an object")
    return row


def require_string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{what} is {kind_of(value)}, expected a string")
    return value


def row_to_conversation(row: Any, spec: FormatSpec, source: str = "") -> Conversation:
    """Convert one row; raises RowError when it is not a valid user/assistant conversation."""
    row = require_object(row)
    system, pairs = _alpaca(row, spec) if spec.formatting == "alpaca" else _chat(row, spec)
    if not pairs:
        raise RowError("the conversation has no messages")
    for i, (role, content) in enumerate(pairs):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            what = "a system message is only allowed first" if role == "system" else "roles must alternate"
            raise RowError(
                f"message {i + 1} is '{role}' but '{expected}' was expected ({what}, starting with user)"
            )
        if role == "assistant" and not content.strip():
            raise RowError(f"message {i + 1} is an empty assistant reply")
    if pairs[-1][0] != "assistant":
        raise RowError(
            "the conversation ends with a user message; the last message must be the assistant's reply"
        )
    turns = [Turn(role, content) for role, content in pairs]  # type: ignore[arg-type]
    return Conversation(turns=turns, system=system or None, source=source)


def fill_placeholders(conv: Conversation, values: dict[str, str]) -> Conversation:
    """Replace ``{{key}}`` in every text with ``values[key]``; an unknown key is a config error, never skipped."""

    def fill(text: str) -> str:
        if "{{" not in text:  # the common case costs one substring check
            return text

        def sub(match: re.Match[str]) -> str:
            key = match.group(1)
            if key not in values:
                raise DataError(
                    f"{conv.source}: placeholder {{{{{key}}}}} has no value; set placeholders.{key}=... "
                    f"(or placeholders: {{{key}: ...}} in the YAML)"
                )
            return str(values[key])

        return PLACEHOLDER_RE.sub(sub, text)

    for turn in conv.turns:
        turn.content = fill(turn.content)
    if conv.system is not None:
        conv.system = fill(conv.system)
    return conv
