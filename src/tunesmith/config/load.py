"""YAML + dotted ``key=value`` overrides → a validated :class:`Config`, with errors that name the key."""

from __future__ import annotations

import difflib
import math
import os
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import ValidationError

from tunesmith.config.deepspeed import check_sections
from tunesmith.config.schema import NOT_SUPPORTED_YET, Config
from tunesmith.errors import ConfigError, TunesmithError, short_repr


def _read_config_text(path: Path) -> str:
    """The config file's text: a missing, unreadable or non-UTF-8 file is one ConfigError naming it."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder, not a YAML file; give the path of the file") from None
    except OSError as err:  # permission denied, a symbolic-link loop, an I/O error: nothing YAML could fix
        raise ConfigError(f"cannot read config file {path} ({err.strerror or err}); check the path") from None
    try:
        return raw.decode("utf-8-sig")  # a UTF-8 byte-order mark is harmless: drop it
    except UnicodeDecodeError as err:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")) and _decodes(raw, "utf-16"):
            raise ConfigError(f"config file {path} is UTF-16 text; save it as UTF-8") from None
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: the config file is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
            "save it as UTF-8 YAML"
        ) from None


def _decodes(raw: bytes, encoding: str) -> bool:
    try:
        raw.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


_MAX_VALUES = 1_000_000  # a real config holds a few hundred values, a ds_config inline a few hundred more
_MAX_DEPTH = 32  # a ds_config nests 3 levels; pydantic's serializer (config.yaml of a run) gives up near 250


def _expanded_shape(value: Any) -> tuple[int, int]:
    """(values, nesting depth) of ``value`` with its shared (aliased) parts counted every time they appear;
    computed once per shared object, so a 'billion laughs' file is measured without being expanded."""
    shapes: dict[int, tuple[int, int]] = {}

    def shape(item: Any) -> tuple[int, int]:
        if not isinstance(item, dict | list):
            return 1, 0
        if id(item) not in shapes:
            children = [shape(child) for child in (item.values() if isinstance(item, dict) else item)]
            shapes[id(item)] = (1 + sum(c[0] for c in children), 1 + max((c[1] for c in children), default=0))
        return shapes[id(item)]

    return shape(value)


def _read_yaml_with_lines(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse a YAML mapping and remember the line of each top-level key (for error messages)."""
    text = _read_config_text(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML ({problem}); fix the syntax at that line") from None
    except RecursionError:
        raise ConfigError(f"{path}: the YAML is nested too deeply to read; a config is a flat key: value list") from None
    if node is None:
        raise ConfigError(
            f"the config file {path} is empty (no key: value lines); add at least model_name_or_path, dataset "
            "and output_dir, or start from a ready config (tunesmith recipes list)"
        )
    if not isinstance(data, dict):
        what = "null" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{path}: the config must be a mapping of key: value pairs, not {what}")
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            line = key_node.start_mark.line + 1
            name = str(key_node.value)
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` merges a mapping in
                continue
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                raise ConfigError(
                    f"{path}:{line}: {name!r} is not a key name; write each setting as name: value, "
                    "with a name such as learning_rate"
                )
            if name in lines:
                raise ConfigError(
                    f"{path}:{line}: {name} is set twice (lines {lines[name]} and {line}); keep one of them"
                )
            lines[name] = line
    return data, lines


def _printable(text: str) -> str:
    """``text`` as one printable line: control characters (a newline in a quoted argument) and the lone
    surrogates Python makes of a non-UTF-8 argument become escapes; other characters (Chinese too) stay."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def parse_override(text: str) -> tuple[str, Any]:
    """``learning_rate=5e-4`` → ("learning_rate", 5e-4); the value is parsed as YAML (so 3, true, [a, b])."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE; write it like learning_rate=5e-4")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_")
    if not key:
        raise ConfigError(f"override {text!r} has no key before '='; write it like learning_rate=5e-4")
    if key.encode("utf-8", "surrogatepass").decode("utf-8", "replace") != key:
        raise ConfigError(f"override {text!r} has a key that is not valid UTF-8 text; retype it")
    if "" in key.split("."):
        raise ConfigError(
            f"override {text!r} has an empty name in its dotted key; write a map entry like placeholders.name=Ada"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        if raw.lstrip().startswith(("[", "{")):  # meant as a list or map: a plain string would be a silent typo
            problem = str(err).splitlines()[0]
            raise ConfigError(
                f"command line ({_printable(text)}): {raw.strip()!r} is not a valid YAML list or map ({problem}); close the "
                f"brackets, as in {key}=[a, b], or write a comma list such as {key}=a,b"
            ) from None
        value = raw  # any other text YAML cannot parse is taken as the plain string it looks like
    except RecursionError:
        raise ConfigError(
            f"command line ({_printable(key)}=...): the value is nested too deeply to read; simplify it"
        ) from None
    return key, value


def _set_dotted(data: dict[str, Any], key: str, value: Any, text: str) -> None:
    """Set ``a.b=1`` as data["a"]["b"] = 1 (maps such as placeholders.name=Ada); plain keys set directly."""
    parts = key.split(".")
    if len(parts) > 1 and parts[0] in Config.model_fields and dict not in _plain_types(parts[0]):
        raise ConfigError(
            f"command line ({_printable(text)}): {parts[0]} is not a map, so {_printable(key)} cannot be set; write "
            f"{parts[0]}=VALUE"
        )
    target = data
    for depth, part in enumerate(parts[:-1]):
        nxt = target.get(part)
        if nxt is None:
            nxt = target[part] = {}
        elif not isinstance(nxt, dict):
            name = ".".join(parts[: depth + 1])
            raise ConfigError(
                f"command line ({_printable(text)}): {_printable(name)} is {short_repr(nxt)}, not a map, so "
                f"{_printable(key)} cannot be set; set {_printable(name)} as a whole instead"
            )
        target = nxt
    target[parts[-1]] = value


def _plain_types(key: str) -> set[Any]:
    """The plain types a config key accepts (``int | None`` → {int, NoneType}; list[str] → {list})."""
    found: set[Any] = set()
    pending = [Config.model_fields[key].annotation]
    while pending:
        annotation = pending.pop()
        origin = get_origin(annotation)
        if origin in (Union, types.UnionType):
            pending.extend(get_args(annotation))
        elif origin is Literal:
            found.update(type(value) for value in get_args(annotation))
        else:
            found.add(origin or annotation)
    return found


def _bool_for_number(value: Any, annotation: Any) -> bool:
    """Whether a YAML boolean stands where a number is expected (pydantic would silently read true as 1)."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = get_args(annotation)
        if isinstance(value, bool):
            return bool not in args and any(arg in (int, float) for arg in args)
        return any(_bool_for_number(value, arg) for arg in args if get_origin(arg) is list)
    if origin is list and isinstance(value, list):
        return any(_bool_for_number(item, get_args(annotation)[0]) for item in value)
    return isinstance(value, bool) and annotation in (int, float)


def _join_surrogate_pairs(value: Any) -> Any:
    """JSON writes a character beyond U+FFFF as an escaped UTF-16 pair ("\\ud83d\\ude00"), which PyYAML reads as
    two lone surrogates; join each pair into its character (in keys and items too), as JSON readers do. Lone
    surrogates stay, for :func:`_bad_text` to refuse."""
    if isinstance(value, str):
        try:
            return value.encode("utf-16", "surrogatepass").decode("utf-16")
        except UnicodeDecodeError:
            return value
    if isinstance(value, dict):
        return {_join_surrogate_pairs(k): _join_surrogate_pairs(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_surrogate_pairs(item) for item in value]
    return value


def _bad_text(value: Any) -> str | None:
    """The first string in ``value`` (keys and items too) that is not valid Unicode text, e.g. the lone
    surrogates Python makes of a non-UTF-8 command-line argument, or a YAML "\\udcff" escape."""
    pending, seen = [value], set()
    while pending:
        item = pending.pop()
        if isinstance(item, dict | list | tuple):
            if id(item) in seen:  # YAML aliases share one object: look at it once
                continue
            seen.add(id(item))
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
    return None


def _check_values(data: dict[str, Any], where: dict[str, str], origin: str) -> None:
    """What pydantic would accept silently (a boolean for a number, text that is not Unicode, an inline deepspeed
    section that is not a mapping) or choke on (a value nested or aliased out of all proportion)."""
    for key, value in data.items():
        loc = where.get(key, origin)
        size, depth = _expanded_shape(value)
        if depth > _MAX_DEPTH:
            raise ConfigError(f"{loc}: {key} is nested {depth} levels deep; no setting needs more than a few")
        if size > _MAX_VALUES:
            raise ConfigError(
                f"{loc}: {key} expands to more than {_MAX_VALUES:,} values through YAML anchors and aliases (a "
                "'billion laughs' file); write the values out instead of nesting aliases"
            )
        value = data[key] = _join_surrogate_pairs(value)  # after the size checks: aliases are expanded here
        bad = _bad_text(value)
        if bad is not None:
            raise ConfigError(f"{loc}: {key} holds text that is not valid UTF-8 ({bad!r}); write it as UTF-8 text")
        if key == "deepspeed":
            check_sections(value, loc)
        if _bool_for_number(value, Config.model_fields[key].annotation):
            raise ConfigError(
                f"{loc}: {key} expects a number but got {short_repr(value)} (YAML reads true, false, yes, no, on and off "
                "as booleans); write a number"
            )


def _check_finite(config: Config, where: dict[str, str], origin: str) -> None:
    """NaN and infinity pass pydantic's float checks (``learning_rate: .inf``, ``"nan"``); no key wants them."""
    for key in Config.model_fields:
        value = getattr(config, key)
        numbers = value if isinstance(value, list) else [value]
        for number in numbers:
            if isinstance(number, float) and not math.isfinite(number):
                raise ConfigError(f"{where.get(key, origin)}: {key} is {short_repr(value)}, not a finite number; fix the value")


def _describe_type(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    for old, new in (("<class '", ""), ("'>", "")):
        text = text.replace(old, new)
    return text


def _check_keys(data: dict[str, Any], where: dict[str, str], origin: str) -> None:
    valid = list(Config.model_fields)
    for key in data:
        if key in Config.model_fields:
            continue
        loc = where.get(key, origin)
        if key in NOT_SUPPORTED_YET:
            raise ConfigError(f"{loc}: not supported yet: {key}; remove it from the config")
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "see the config reference in README.md"
        raise ConfigError(f"{loc}: unknown config key {short_repr(key)}; {hint}")


def _raise_validation(err: ValidationError, where: dict[str, str], origin: str) -> None:
    first = err.errors()[0]
    key = str(first["loc"][0]) if first["loc"] else ""
    msg = _printable(first["msg"])  # a validator may quote the value, newlines and all
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if key:
        loc = where.get(key, origin)
    else:  # a check across keys (bf16 and fp16, deepspeed and engine): where the last key it names was set
        named = [k for k in where if re.search(rf"\b{re.escape(k)}\b", msg)]
        loc = where[named[-1]] if named else origin
    if key in Config.model_fields and first["type"] not in ("value_error",):
        expected = _describe_type(Config.model_fields[key].annotation)
        value = short_repr(first.get("input"))
        raise ConfigError(f"{loc}: {key} expects {expected} but got {value} ({msg}); fix the value") from None
    raise ConfigError(f"{loc}: {key}: {msg}" if key else f"{loc}: {msg}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **defaults: Any) -> Config:
    """Read ``path`` (optional), apply ``defaults`` below it and ``overrides`` above it, and validate.

    Errors are :class:`ConfigError` with the file:line (or "command line") of the offending key.
    """
    data: dict[str, Any] = dict(defaults)
    where: dict[str, str] = {}
    origin = "command line" if path is None else str(path)
    if path is not None:
        file_data, lines = _read_yaml_with_lines(Path(path))
        data.update(file_data)
        where.update({k: f"{path}:{line}" for k, line in lines.items()})
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(data, key, value, text)
        where[key.split(".")[0]] = f"command line ({_printable(text)})"
    _check_keys(data, where, origin)
    _check_values(data, where, origin)
    try:
        config = Config(**data)
    except ValidationError as err:
        _raise_validation(err, where, origin)
        raise  # unreachable: _raise_validation always raises
    _check_finite(config, where, origin)
    return config


def check_output_folder(key: str, path: Path, error: type[TunesmithError] = ConfigError) -> None:
    """Refuse, in one sentence, a folder a command is about to write into (``output_dir``, ``export_dir``) that
    cannot be one: an existing file, a path below a file, a symbolic link that leads nowhere, or a place this
    user may not write. Nothing is created here; ``error`` is the class raised (the caller's layer's)."""
    nearest = path
    while not os.path.isdir(nearest):
        if os.path.lexists(nearest):
            dangling = os.path.islink(nearest) and not os.path.exists(nearest)
            what = "a symbolic link that leads nowhere (or loops)" if dangling else "a file, not a folder"
            if nearest == path:
                raise error(f"{key} {path} is {what}; set {key} to a folder, new or existing")
            raise error(f"{key} {path} cannot be created because {nearest} is {what}; set {key} to a path below a folder")
        if nearest.parent == nearest:
            break
        nearest = nearest.parent
    if os.path.isdir(nearest) and not os.access(nearest, os.W_OK | os.X_OK):
        raise error(
            f"{key} {path}: this user may not write in {nearest}; set {key} to a folder you can write to"
        )


def dump_config(config: Config) -> str:
    """The resolved config as YAML (only keys that differ from the defaults, then all the rest)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
