"""User-facing errors.

Anything a user can fix (a bad config key, a malformed data row, a missing file) is raised as a
``TunesmithError`` whose message is one sentence: what is wrong, where, and how to fix it. The CLI prints
the message without a traceback and exits non-zero; everything else is a bug and keeps its traceback.
"""


def short_repr(value: object, limit: int = 80) -> str:
    """repr(value), cut to ``limit`` characters: a message quotes the value, not a whole pasted file."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}…{text[-4:]}"


class TunesmithError(Exception):
    """An error the user can fix; ``str(err)`` is the whole message shown to them."""


class ConfigError(TunesmithError):
    """The YAML config or a command-line override is invalid."""


class DataError(TunesmithError):
    """A dataset file, row or dataset_info.json entry is invalid."""


class ModelError(TunesmithError):
    """A model, tokenizer or adapter cannot be loaded or merged as asked."""
