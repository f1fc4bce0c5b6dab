"""The bad-input contract, shared by tests/config, tests/data and tests/model.

Bad input gets one clear sentence (what, where, how to fix), a non-zero exit, no traceback, and nothing already
written is lost. :func:`assert_refused` runs ``tunesmith ARGV`` in-process (``tunesmith.cli.main``, the way the
console script runs it) and checks all of that; :func:`assert_refused_subprocess` does the same through a real
``python -m tunesmith.cli`` for the few cases that need a separate process. :func:`snapshot` records a folder
byte for byte, so a refused re-run can be shown to have left an earlier run's checkpoints alone.

Imported as ``bad_input_helpers`` (tests/ is on the path, as for ``file_helpers``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ERROR_PREFIX = "tunesmith: error"
# a sentence break: end punctuation, space, a capital letter (outside parentheses, quotes and brackets)
_SENTENCE_BREAK = re.compile(r"[.!?]\s+[A-Z]")
_BRACKETED = re.compile(r"\([^()]*\)|\[[^\[\]]*\]|'[^']*'|\"[^\"]*\"")


def one_sentence(message: str) -> bool:
    """Whether ``message`` is one line and one sentence: text quoted from elsewhere (a library's error in
    parentheses, a value in quotes) may hold full stops of its own; the message around it may not."""
    if "\n" in message.strip() or not message.strip():
        return False
    text = message
    while True:  # drop bracketed and quoted spans, innermost first
        shorter = _BRACKETED.sub("", text)
        if shorter == text:
            break
        text = shorter
    return _SENTENCE_BREAK.search(text) is None


def check_contract(code: object, out: str, err: str, culprits: tuple[str, ...], argv: list[str]) -> str:
    """Assert the contract on a finished run; return the message (without the ``tunesmith: error:`` prefix)."""
    shown = f"argv={argv}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
    assert code not in (0, None), f"bad input was accepted (exit {code})\n{shown}"
    assert "Traceback" not in out + err, f"a traceback instead of a sentence\n{shown}"
    lines = [line for line in err.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(lines) == 1, f"expected exactly one '{ERROR_PREFIX}' line\n{shown}"
    message = lines[0].split(":", 2)[2].strip() if lines[0].count(":") >= 2 else lines[0]
    assert one_sentence(message), f"the message is not one sentence: {message!r}"
    for culprit in culprits:
        assert str(culprit) in message, f"the message does not name {culprit!r}: {message!r}"
    return message


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[object, str, str]:
    """``tunesmith ARGV`` in this process: (exit code, stdout, stderr). An exception escaping main() is what a
    user would see as a traceback, so it fails the test with that traceback."""
    from tunesmith.cli import main

    capsys.readouterr()  # drop what earlier steps of the test printed
    try:
        code: object = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's usage errors exit 2 with a message and no traceback
        code = exit_.code
    except BaseException:  # noqa: BLE001 - exactly what the contract forbids: report it in full
        out, err = capsys.readouterr()
        pytest.fail(f"tunesmith {argv} raised instead of refusing:\n{traceback.format_exc()}\n{err[-2000:]}")
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(argv: list[str], capsys: pytest.CaptureFixture[str], *culprits: str | Path) -> str:
    """Run ``tunesmith ARGV`` in-process and assert the bad-input contract: a non-zero exit, no traceback, one
    ``tunesmith: error:`` line that is one sentence and names every culprit (a path, a key, a file:line).
    Returns the message."""
    code, out, err = run_cli([str(a) for a in argv], capsys)
    return check_contract(code, out, err, tuple(str(c) for c in culprits), [str(a) for a in argv])


def assert_refused_subprocess(
    argv: list[str], *culprits: str | Path, cwd: Path | None = None, timeout: int = 180
) -> str:
    """The same contract through ``python -m tunesmith.cli ARGV`` in a fresh process (what a shell user runs)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNESMITH_DATA_CACHE": "0", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        errors="replace",
        cwd=cwd,
        env=env,
        timeout=timeout,
    )
    return check_contract(proc.returncode, proc.stdout, proc.stderr, tuple(map(str, culprits)), list(map(str, argv)))


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (links and empty folders included) → its sha256: equal snapshots mean
    nothing was written, removed or changed there."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            found[rel] = f"link → {os.readlink(path)}"
        elif path.is_dir():
            found[rel] = "folder"
        else:
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def write_config(path: Path, **values: object) -> Path:
    """A YAML config file with ``values`` (JSON is YAML: every value keeps its type)."""
    path.write_text(json.dumps(values, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


GOOD_ROWS = [
    {"instruction": "Who are you?", "input": "", "output": "I am Ada, an AI assistant."},
    {"instruction": "What is your name?", "input": "", "output": "My name is Ada."},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Translate to French: good morning.", "input": "", "output": "Bonjour."},
]


def make_run(root: Path, model_dir: Path, **values: object) -> Path:
    """A complete, valid setup under ``root``: ``data/identity.json`` named in ``data/dataset_info.json``, and
    ``run.yaml`` that trains the model in ``model_dir`` with LoRA for 2 steps (a checkpoint each step) into
    ``root/run``, caching into ``root/cache``. ``values`` override its keys; a value of None drops the key."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    if not (data / "identity.json").exists():
        (data / "identity.json").write_text(json.dumps(GOOD_ROWS * 2), encoding="utf-8")
        (data / "dataset_info.json").write_text(json.dumps({"identity": {"file_name": "identity.json"}}))
    config = {
        "model_name_or_path": str(model_dir),
        "template": "chatml",
        "dataset": "identity",
        "dataset_dir": str(data),
        "cutoff_len": 64,
        "output_dir": str(root / "run"),
        "cache_dir": str(root / "cache"),
        "finetuning_type": "lora",
        "max_steps": 2,
        "save_steps": 1,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "device": "cpu",
        "seed": 1,
    }
    config.update(values)
    return write_config(root / "run.yaml", **{k: v for k, v in config.items() if v is not None})


_TRAINED: dict[str, Path] = {}


def trained_run(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """A folder made by :func:`make_run` whose run has trained (checkpoint-1, checkpoint-2 and the final adapter in
    ``run/``), built once per session; copy it with :func:`copy_run` before breaking anything."""
    key = str(model_dir)
    if key not in _TRAINED:
        import logging

        from tunesmith.cli import main

        root = tmp_path_factory.mktemp("trained-run")
        config = make_run(root, model_dir)
        # main() sets the package logger up (its own handler, no propagation); a module-scoped fixture runs before
        # conftest's per-test logger reset has saved the clean state, so restore it here or later caplogs go blind
        logger = logging.getLogger("tunesmith")
        saved = (list(logger.handlers), logger.propagate, logger.level)
        try:
            assert main(["train", str(config)]) == 0, "the reference run did not train"
        finally:
            logger.handlers[:], logger.propagate = saved[0], saved[1]
            logger.setLevel(saved[2])
        assert (root / "run" / "checkpoint-2").is_dir()
        _TRAINED[key] = root
    return _TRAINED[key]


def copy_run(source: Path, dest: Path, model_dir: Path, **values: object) -> Path:
    """A copy of a :func:`trained_run` folder at ``dest`` with its run.yaml pointing into the copy (``values``
    as in :func:`make_run`); returns the config path."""
    import shutil

    shutil.copytree(source, dest, symlinks=True)
    return make_run(dest, model_dir, **values)
