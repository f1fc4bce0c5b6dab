"""One small dataset per stage for the stage × method × engine tests: documents (pt), pairs (rm, dpo), tagged
feedback (kto); each written as a dataset_info.json entry named after the stage."""

from __future__ import annotations

import json
from pathlib import Path

from test_dpo import preference_rows

STAGES = ("pt", "rm", "dpo", "kto")


def write_stage_data(folder: Path, count: int = 24) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pairs = preference_rows(count)
    feedback = [{"instruction": row["instruction"], "input": "",
                 "output": row["chosen"] if i % 3 else row["rejected"], "kto_tag": bool(i % 3)}
                for i, row in enumerate(pairs)]
    documents = [{"text": f"{row['instruction']} {row['chosen']} " * (1 + i % 3)} for i, row in enumerate(pairs)]
    files = {"pt": documents, "rm": pairs, "dpo": pairs, "kto": feedback}
    info = {
        "pt": {"file_name": "pt.json", "columns": {"prompt": "text"}},
        "rm": {"file_name": "rm.json", "ranking": True},
        "dpo": {"file_name": "dpo.json", "ranking": True},
        "kto": {"file_name": "kto.json", "columns": {"prompt": "instruction", "query": "input",
                                                      "response": "output", "kto_tag": "kto_tag"}},
    }
    for stage, rows in files.items():
        (folder / f"{stage}.json").write_text(json.dumps(rows), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return folder


def stage_values(stage: str, data: Path) -> dict:
    """Config values that train ``stage`` on its dataset (template, cutoff)."""
    return dict(stage=stage, dataset=[stage], dataset_dir=str(data), template="qwen", cutoff_len=64)
