"""Plain helpers for tests, importable as ``from file_helpers import ...``.

Kept out of conftest.py on purpose: several folders have a conftest.py, and pytest may bind the module name
``conftest`` to any of them, so ``from conftest import ...`` is fragile.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return path
