"""Reading a JSON settings file (a model's config.json, an adapter_config.json, a ds_config.json) that a user may
have damaged: every way it can be unreadable is one sentence naming the file, raised as the caller's error class."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError


def read_json_object(path: Path, error: type[TunesmithError], fix: str, prefix: str = "") -> dict[str, Any]:
    """The JSON object in ``path`` (a UTF-8 BOM is fine). Unreadable, not UTF-8, not JSON, nested too deep or not
    an object: ``error(prefix + sentence + "; " + fix)``."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except OSError as err:
        raise error(f"{prefix}cannot read {path} ({err.strerror or err}); {fix}") from None
    except UnicodeDecodeError as err:
        byte = err.object[err.start : err.start + 1]
        raise error(f"{prefix}{path} is not UTF-8 text (byte {err.start}: {byte!r}); {fix}") from None
    except json.JSONDecodeError as err:
        raise error(f"{prefix}{path}:{err.lineno}: not valid JSON ({err.msg}); {fix}") from None
    except (ValueError, RecursionError) as err:  # nested too deep; integers beyond Python's digit limit
        raise error(f"{prefix}{path} cannot be read as JSON ({type(err).__name__}); {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{prefix}{path} holds a JSON {type(data).__name__}, not an object of settings; {fix}")
    return data
