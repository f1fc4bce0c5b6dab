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


def write_run_config(tmp_path, tiny_model_dir, rows, **extra) -> str:
    """A run config (JSON, which is YAML) training the tiny model on ``rows`` of an identity dataset."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    write_json(data_dir / "identity.json", rows)
    (data_dir / "dataset_info.json").write_text(json.dumps({"identity": {"file_name": "identity.json"}}))
    values = {
        "model_name_or_path": str(tiny_model_dir),
        "template": "chatml",
        "dataset": "identity",
        "dataset_dir": str(data_dir),
        "placeholders": {"name": "Ada", "author": "Lab"},
        "cutoff_len": 128,
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_steps": 5,
        "device": "cpu",
        "seed": 3,
        **extra,
    }
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(values), encoding="utf-8")  # JSON is YAML
    return str(path)
