"""The user's path through the real console script: train → re-run resumes → export → chat, on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from file_helpers import write_json


def tunesmith(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    # The console script installed beside this interpreter (a venv's bin/), as a user would run it.
    exe = Path(sys.executable).parent / "tunesmith"
    cmd = [str(exe), *args] if exe.is_file() else [sys.executable, "-m", "tunesmith.cli", *args]
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


def test_malformed_row_through_the_cli_is_one_sentence_and_keeps_the_run(tmp_path, tiny_model_dir):
    """A bad row fails before training with file and line, exit 2, no traceback; earlier checkpoints survive."""
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(8)) + "\n")
    base = [f"model_name_or_path={tiny_model_dir}", "template=chatml", "output_dir=run", "max_steps=2",
            "save_steps=2", "per_device_train_batch_size=4", "logging_steps=1"]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("finetuning_type: lora\n", encoding="utf-8")
    first = tunesmith("train", str(cfg), *base, f"dataset={good}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert checkpoint.is_dir()

    bad = tmp_path / "bad.jsonl"
    lines = good.read_text().splitlines()
    lines[4] = '{"instruction": "q4", "output": '  # line 5: truncated JSON
    bad.write_text("\n".join(lines) + "\n")
    second = tunesmith("train", str(cfg), *base, "max_steps=4", f"dataset={bad}", cwd=tmp_path)
    assert second.returncode == 2
    assert "Traceback" not in second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("tunesmith: error:")]
    assert len(errors) == 1 and "bad.jsonl" in errors[0] and "line 5" in errors[0], second.stderr[-2000:]
    assert checkpoint.is_dir() and (checkpoint / "adapter_model.safetensors").is_file()
