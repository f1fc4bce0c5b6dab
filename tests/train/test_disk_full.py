"""A disk that fills up while a checkpoint is written: one sentence naming the path, the space needed and the
intact checkpoint, exit 2, no traceback, the partial folder removed; the re-run after freeing space resumes.

The run's output_dir sits on a small tmpfs of its own (mounting needs root: elsewhere the test skips, saying
so). A step callback fills the disk right after checkpoint-2 is written, leaving less room than a checkpoint
takes, so checkpoint-4 runs out of space half-way.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_pipeline import write_run_config

import tunesmith.train
from tunesmith.cli import main as cli_main


def _mount_tmpfs(where: Path, size_mb: int) -> str | None:
    """Mount a tmpfs at ``where``; the reason it cannot be done, or None."""
    if os.geteuid() != 0:
        return "mounting a small tmpfs needs root"
    if shutil.which("mount") is None:
        return "no mount command"
    where.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else f"cannot mount a tmpfs here ({done.stderr.strip()})"


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    reason = _mount_tmpfs(disk, size_mb=48)
    if reason:
        pytest.skip(reason)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _fill_after_first_checkpoint(ballast: Path, run_dir: Path, state) -> None:
    """After step 2 (checkpoint-2 is complete by then): leave half a checkpoint's size free."""
    if state.global_step != 2:
        return
    checkpoint = sum(f.stat().st_size for f in (run_dir / "checkpoint-2").rglob("*") if f.is_file())
    keep = checkpoint // 2
    with ballast.open("wb") as fh:
        fh.write(b"\0" * max(0, shutil.disk_usage(ballast.parent).free - keep))


def test_a_full_disk_during_a_save_is_one_sentence_and_the_rerun_resumes(
    tmp_path, small_disk, tiny_model_dir, identity_rows, monkeypatch, capsys
):
    run_dir = small_disk / "run"
    config = write_run_config(tmp_path, tiny_model_dir, identity_rows * 4, finetuning_type="full", max_steps=6,
                              save_steps=2, per_device_train_batch_size=2, output_dir=str(run_dir))
    ballast = small_disk / "ballast.bin"
    filler = functools.partial(_fill_after_first_checkpoint, ballast, run_dir)
    monkeypatch.setattr(tunesmith.train, "train", functools.partial(tunesmith.train.train, callbacks=[filler]))

    assert cli_main(["train", config]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("tunesmith: error")]
    assert "Traceback" not in err and len(errors) == 1, err
    message = errors[0]
    assert str(run_dir) in message and "checkpoint-4" in message and "no space left" in message
    assert "checkpoint-2, is intact" in message and " MB" in message
    assert not (run_dir / ".tmp-checkpoint-4").exists() and not (run_dir / "checkpoint-4").exists()
    intact = _tree_digest(run_dir / "checkpoint-2")
    assert (run_dir / "checkpoint-2" / "checkpoint_complete").is_file()

    # free the space: the same command resumes from checkpoint-2 and finishes
    ballast.unlink()
    monkeypatch.undo()
    assert _tree_digest(run_dir / "checkpoint-2") == intact  # nothing happened to it in between
    assert cli_main(["train", config]) == 0
    err = capsys.readouterr().err
    assert f"resuming from {run_dir / 'checkpoint-2'}" in err, err
    assert (run_dir / "checkpoint-6" / "checkpoint_complete").is_file()
    assert (run_dir / "model.safetensors").is_file()
