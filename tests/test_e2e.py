"""The user's path through the real console script: train → re-run resumes → export → chat, on the tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import write_json


def tunesmith(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    exe = shutil.which("tunesmith") or ""
    cmd = [exe, *args] if exe else [sys.executable, "-m", "tunesmith.cli", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def test_train_resume_export_chat_through_the_cli(tmp_path, tiny_model_dir, identity_rows):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_json(data_dir / "identity.json", identity_rows * 4)
    (data_dir / "dataset_info.json").write_text(json.dumps({"identity": {"file_name": "identity.json"}}))
    (tmp_path / "my.yaml").write_text(
        f"model_name_or_path: {tiny_model_dir}\n"
        "finetuning_type: lora\nlora_target: all\ntemplate: chatml\ndataset: identity\n"
        "placeholders: {name: Ada, author: Lab}\ncutoff_len: 128\noutput_dir: run\n"
        "per_device_train_batch_size: 4\nmax_steps: 6\nsave_steps: 3\nlogging_steps: 1\nlearning_rate: 1.0e-3\n",
        encoding="utf-8",
    )
    first = tunesmith("train", "my.yaml", "max_steps=3", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoint-3").is_dir()

    # The same command with a larger budget continues from checkpoint-3 instead of starting over.
    second = tunesmith("train", "my.yaml", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "checkpoint-3" in second.stderr  # the resume is announced
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "trainer_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # steps 1..6 logged once each

    export = tunesmith("export", "my.yaml", "adapter_name_or_path=run", "export_dir=merged", cwd=tmp_path)
    assert export.returncode == 0, export.stderr[-3000:]
    assert list((tmp_path / "merged").glob("*.safetensors"))

    chat = tunesmith("chat", "merged", "--prompt", "Who are you?", "--max-new-tokens", "8", cwd=tmp_path)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert chat.stdout.strip(), "chat --prompt printed no answer"
