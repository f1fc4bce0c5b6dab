"""The `tunesmith` console script: help everywhere, version, env, and clean one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunesmith import __version__

SUBCOMMANDS = [
    "train", "export", "chat", "demo", "data", "data preview", "env", "plan", "recipes", "launch", "launch k8s",
    "launch slurm", "launch ranktable", "jobs",
]


def run_cli(*args: str, cwd=None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and __version__ in result.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_everywhere(command):
    result = run_cli(*command.split(), "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: tunesmith" in result.stdout


def test_env_lists_versions_and_a_device():
    result = run_cli("env")
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stdout and "cpu (" in result.stdout


def test_bad_config_is_one_sentence_without_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model_name_or_path: x\nlearnig_rate: 1\n", encoding="utf-8")
    result = run_cli("train", str(cfg))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("tunesmith: error:")]
    assert len(lines) == 1 and "bad.yaml:2" in lines[0] and "learning_rate" in lines[0]


def test_missing_required_key_names_it(tmp_path):
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("template: chatml\n", encoding="utf-8")
    result = run_cli("train", str(cfg))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model_name_or_path is required" in result.stderr


def test_data_preview_of_a_stream_shows_its_head(tmp_path, tiny_model_dir):
    rows = [f'{{"instruction": "question {i}", "input": "", "output": "answer {i}"}}' for i in range(40)]
    (tmp_path / "rows.jsonl").write_text("\n".join(rows), encoding="utf-8")
    cfg = tmp_path / "stream.yaml"
    cfg.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset: rows.jsonl\ndataset_dir: {tmp_path}\ntemplate: chatml\n"
        f"output_dir: {tmp_path / 'out'}\nstreaming: true\nmax_steps: 3\n",
        encoding="utf-8",
    )
    result = run_cli("data", "preview", str(cfg), "--show", "2")
    assert result.returncode == 0, result.stderr
    assert "streaming" in result.stdout and result.stdout.count("--- sample") == 2
    assert "answer" in result.stdout
