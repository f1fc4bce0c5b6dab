"""YAML + dotted ``key=value`` overrides → a validated :class:`Config`, with errors that name the key."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tunesmith.config.schema import NOT_SUPPORTED_YET, Config
from tunesmith.errors import ConfigError


def _read_yaml_with_lines(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse a YAML mapping and remember the line of each top-level key (for error messages)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; check the path") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML ({problem}); fix the syntax at that line") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of key: value pairs, not a {type(data).__name__}")
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            lines[str(key_node.value)] = key_node.start_mark.line + 1
    return data, lines


def parse_override(text: str) -> tuple[str, Any]:
    """``learning_rate=5e-4`` → ("learning_rate", 5e-4); the value is parsed as YAML (so 3, true, [a, b])."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE; write it like learning_rate=5e-4")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        if raw.lstrip().startswith(("[", "{")):  # meant as a list or map: a plain string would be a silent typo
            problem = str(err).splitlines()[0]
            raise ConfigError(
                f"command line ({text}): {raw.strip()!r} is not a valid YAML list or map ({problem}); close the "
                f"brackets, as in {key}=[a, b], or write a comma list such as {key}=a,b"
            ) from None
        value = raw  # any other text YAML cannot parse is taken as the plain string it looks like
    return key, value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b=1`` as data["a"]["b"] = 1 (maps such as placeholders.name=Ada); plain keys set directly."""
    parts = key.split(".")
    target = data
    for part in parts[:-1]:
        nxt = target.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            target[part] = nxt
        target = nxt
    target[parts[-1]] = value


def _describe_type(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    for old, new in (("<class '", ""), ("'>", "")):
        text = text.replace(old, new)
    return text


def _check_keys(data: dict[str, Any], where: dict[str, str]) -> None:
    valid = list(Config.model_fields)
    for key in data:
        if key in Config.model_fields:
            continue
        loc = where.get(key, "command line")
        if key in NOT_SUPPORTED_YET:
            raise ConfigError(f"{loc}: not supported yet: {key}; remove it from the config")
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "see the config reference in README.md"
        raise ConfigError(f"{loc}: unknown config key {key!r}; {hint}")


def _raise_validation(err: ValidationError, where: dict[str, str]) -> None:
    first = err.errors()[0]
    key = str(first["loc"][0]) if first["loc"] else ""
    loc = where.get(key, "config")
    value = first.get("input")
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if key in Config.model_fields and first["type"] not in ("value_error",):
        expected = _describe_type(Config.model_fields[key].annotation)
        raise ConfigError(f"{loc}: {key} expects {expected} but got {value!r} ({msg}); fix the value") from None
    raise ConfigError(f"{loc}: {key}: {msg}" if key else f"{loc}: {msg}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **defaults: Any) -> Config:
    """Read ``path`` (optional), apply ``defaults`` below it and ``overrides`` above it, and validate.

    Errors are :class:`ConfigError` with the file:line (or "command line") of the offending key.
    """
    data: dict[str, Any] = dict(defaults)
    where: dict[str, str] = {}
    if path is not None:
        file_data, lines = _read_yaml_with_lines(Path(path))
        data.update(file_data)
        where.update({k: f"{path}:{line}" for k, line in lines.items()})
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
        where[key.split(".")[0]] = f"command line ({text})"
    _check_keys(data, where)
    try:
        return Config(**data)
    except ValidationError as err:
        _raise_validation(err, where)
        raise  # unreachable: _raise_validation always raises


def dump_config(config: Config) -> str:
    """The resolved config as YAML (only keys that differ from the defaults, then all the rest)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
