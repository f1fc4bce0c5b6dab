"""Talking to Slurm: write the job's files, ``sbatch`` the script, then the job's state (squeue, sacct or
scontrol), its log and ``scancel`` (:class:`SlurmJobs`, the back-end of ``tunesmith jobs``).

A small JSON-lines registry (``~/.cache/tunesmith/slurm_jobs.jsonl``, or ``TUNESMITH_SLURM_REGISTRY``)
remembers where each submitted job's log is, for ``jobs logs`` after slurmctld has forgotten the job (sacct keeps
no log path).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.launch.backend import LogRequest
from tunesmith.launch.slurm.check import CheckedSlurm
from tunesmith.logging import get_logger

log = get_logger("launch")

REGISTRY_ENV = "TUNESMITH_SLURM_REGISTRY"
FINISHED = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
    "REVOKED",
    "SPECIAL_EXIT",
}
_JOB_ID = re.compile(r"^\d+(_\d+)?$")


def write_job_files(job: CheckedSlurm, script: str, config_text: str) -> Path:
    """Write `output_dir/slurm/config.yaml` (what the job trains) and `train.sbatch`; return the script."""
    job.script_path.parent.mkdir(parents=True, exist_ok=True)
    job.config_path.parent.mkdir(parents=True, exist_ok=True)
    job.config_path.write_text(config_text, encoding="utf-8")
    job.script_path.write_text(script, encoding="utf-8")
    job.script_path.chmod(0o755)
    return job.script_path


def require_tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise TunesmithError(
            f"`{name}` is not on PATH: run this on a Slurm login node (or install the Slurm client tools), "
            "or use --dry-run to only print the script"
        )
    return found


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise TunesmithError(
            f"`{' '.join(cmd)}` did not answer within {timeout:.0f} s; is slurmctld up?"
        ) from None


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "no output"


def submit(script_path: str | Path) -> str:
    """``sbatch`` the script and return the job id."""
    proc = _run([require_tool("sbatch"), "--parsable", str(script_path)])
    if proc.returncode != 0:
        reason = _first_line(proc.stderr or proc.stdout).removeprefix("sbatch: error: ")
        raise TunesmithError(
            f"sbatch refused {script_path}: {reason}; fix the option it names and launch again"
        )
    job_id = proc.stdout.strip().split(";")[0]  # "123" or "123;cluster"
    if not _JOB_ID.match(job_id):
        raise TunesmithError(f"sbatch printed no job id for {script_path} (got {proc.stdout.strip()!r})")
    _remember(job_id, script_path)
    return job_id


# ------------------------------------------------------------------------------------------------ registry


def _registry() -> Path:
    default = Path.home() / ".cache" / "tunesmith" / "slurm_jobs.jsonl"
    return Path(os.environ.get(REGISTRY_ENV) or default)


def _remember(job_id: str, script_path: str | Path) -> None:
    """Where a job's log is, for ``jobs logs`` after Slurm has forgotten the job (sacct keeps no log path)."""
    log_path = None
    for line in Path(script_path).read_text(encoding="utf-8").splitlines():
        if line.startswith("#SBATCH --output="):
            log_path = shlex.split(line.split("=", 1)[1])[0].replace("%j", job_id)
    entry = {"job_id": job_id, "script": str(script_path), "log": log_path, "submitted": time.time()}
    try:
        path = _registry()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
    except OSError as err:  # a read-only home must not fail a submitted job
        log.warning("could not record job %s in %s: %s", job_id, _registry(), err)


def _remembered(job_id: str) -> dict[str, Any] | None:
    path = _registry()
    if not path.is_file():
        return None
    found = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("job_id") == job_id:
            found = entry
    return found


# ------------------------------------------------------------------------------------------------- follow


def _check_job_id(job_id: str) -> str:
    job_id = str(job_id).strip()
    if not _JOB_ID.match(job_id):
        raise TunesmithError(f"{job_id!r} is not a Slurm job id; pass the number sbatch printed, e.g. 1234")
    return job_id


def _scontrol_job(job_id: str) -> dict[str, str] | None:
    """``scontrol show job -o`` as a dict (None when slurmctld no longer holds the job: MinJobAge)."""
    if not shutil.which("scontrol"):
        return None
    proc = _run(["scontrol", "show", "job", "-o", job_id])
    if proc.returncode != 0 or "JobId=" not in proc.stdout:
        return None
    fields: dict[str, str] = {}
    for word in proc.stdout.split():
        if "=" in word:
            key, value = word.split("=", 1)
            fields.setdefault(key, value)
    return fields


def _rows(proc: subprocess.CompletedProcess[str]) -> list[list[str]]:
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.count("|") == 3]
    return rows if proc.returncode == 0 else []


def _from_squeue(job_id: str) -> dict[str, Any] | None:
    rows = _rows(_run([require_tool("squeue"), "-h", "-j", job_id, "-o", "%T|%M|%N|%r"]))
    if not rows or rows[0][0] in FINISHED or rows[0][0] == "COMPLETING":
        return None
    state, elapsed, nodes, reason = rows[0]
    return {
        "state": state,
        "elapsed": elapsed,
        "nodes": nodes or None,
        "source": "squeue",
        "reason": None if reason in ("None", "") else reason,
    }


def _from_sacct(job_id: str) -> dict[str, Any] | None:
    if not shutil.which("sacct"):  # "accounting storage is disabled" without slurmdbd: exit 1, no rows
        return None
    rows = _rows(_run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode,NodeList,Elapsed"]))
    if not rows:
        return None
    state, exit_code, nodes, elapsed = rows[0]
    return {  # "CANCELLED by 0" -> CANCELLED
        "state": state.split()[0],
        "exit_code": exit_code,
        "nodes": nodes or None,
        "elapsed": elapsed,
        "source": "sacct",
    }


def _from_scontrol(job_id: str) -> dict[str, Any] | None:
    fields = _scontrol_job(job_id)
    if not fields:
        return None
    reason = fields.get("Reason")
    return {
        "state": fields.get("JobState"),
        "exit_code": fields.get("ExitCode"),
        "nodes": fields.get("NodeList"),
        "elapsed": fields.get("RunTime"),
        "source": "scontrol",
        "reason": None if reason == "None" else reason,
    }


def job_status(job_id: str) -> dict[str, Any]:
    """State, exit code, nodes and elapsed time: from squeue while the job is queued or running, then from
    sacct (accounting), then from ``scontrol show job`` (without accounting, slurmctld keeps a finished job
    for MinJobAge seconds, 300 by default)."""
    job_id = _check_job_id(job_id)
    info: dict[str, Any] = dict.fromkeys(("state", "exit_code", "nodes", "elapsed", "reason", "source"))
    for source in (_from_squeue, _from_sacct, _from_scontrol):
        found = source(job_id)
        if found is not None:
            return {"job_id": job_id, **info, **found}
    raise TunesmithError(
        f"Slurm knows no job {job_id}: it is not queued, sacct has no record of it and slurmctld has "
        "forgotten it; check the id with `squeue --me` or `sacct`"
    )


def job_log_path(job_id: str) -> Path | None:
    job_id = _check_job_id(job_id)
    fields = _scontrol_job(job_id)
    if fields and fields.get("StdOut"):
        return Path(fields["StdOut"])
    entry = _remembered(job_id)
    return Path(entry["log"]) if entry and entry.get("log") else None


def job_logs(job_id: str) -> str:
    """The job's output file (its stdout and stderr: the script sends both there)."""
    path = job_log_path(job_id)
    if path is None:
        raise TunesmithError(
            f"no log known for Slurm job {job_id}: it was not submitted by `tunesmith launch slurm` here and "
            "slurmctld has forgotten it; look for slurm-<jobid>.out in the run folder"
        )
    if not path.is_file():
        raise TunesmithError(
            f"the log of job {job_id} is not there yet ({path}); the job may still be pending"
        )
    return path.read_text(encoding="utf-8", errors="replace")


def cancel_job(job_id: str) -> None:
    job_id = _check_job_id(job_id)
    proc = _run([require_tool("scancel"), job_id])
    if proc.returncode != 0:
        raise TunesmithError(f"scancel {job_id} failed: {_first_line(proc.stderr or proc.stdout)}")


class SlurmJobs:
    """``tunesmith jobs`` for Slurm job ids (a :class:`tunesmith.launch.backend.JobBackend`)."""

    def list_jobs(self) -> str:
        raise TunesmithError("jobs list covers Kubernetes PyTorchJobs only; for Slurm use `squeue --me`")

    def status(self, name: str) -> str:
        info = job_status(name)
        return "\n".join([f"Slurm job {name}:", *(f"  {key}: {value}" for key, value in info.items())])

    def logs(self, name: str, request: LogRequest) -> Iterator[str]:
        yield job_logs(name)  # one file for the whole job: replica, index, tail and follow do not apply

    def delete(self, name: str) -> str:
        cancel_job(name)
        return f"cancelled Slurm job {name}"
