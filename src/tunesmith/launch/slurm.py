"""``tunesmith launch slurm``: one sbatch script per run, and the job's state, log and cancellation.

The script asks for N nodes with one Slurm task per node; each task runs ``tunesmith train`` once, and that
command starts torchrun with ``NPROC_PER_NODE`` processes on its node. All nodes meet in a c10d rendezvous on
the first host of the allocation, so nobody has to know the node list before the job starts::

    #SBATCH --nodes=N --ntasks-per-node=1 [--gres=gpu:G] ...
    MASTER_ADDR = first host of $SLURM_JOB_NODELIST    MASTER_PORT = 15000 + job id % 15000
    NNODES = $SLURM_NNODES    NPROC_PER_NODE = G    RDZV_ID = $SLURM_JOB_ID (several nodes)
    per task: NODE_RANK = $SLURM_NODEID, RDZV_CONF is_host (node 0), PET_LOCAL_ADDR = the node's NodeAddr
    srun --ntasks-per-node=1 python -m tunesmith.cli train RUN/slurm/config.yaml

The job trains the resolved config written next to the script (what ``launch`` validated, overrides included),
from the folder ``launch`` ran in (relative paths in the config keep their meaning), with the interpreter that
ran ``launch`` (the compute nodes must see it: a shared filesystem, as usual on Slurm). Its output goes to
``output_dir/slurm-<jobid>.out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.logging import get_logger

log = get_logger("launch")

SCRIPT_NAME = "train.sbatch"
CONFIG_NAME = "config.yaml"
LOG_PATTERN = "slurm-%j.out"
# Below Linux's ephemeral range (32768+), above Slurm's own 6817/6818; the job id spreads concurrent jobs that
# share a first node over 15000 ports.
PORT_BASE, PORT_SPAN = 15000, 15000
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
# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (and the words for no limit)
_TIME = re.compile(r"^(\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|infinite|unlimited|UNLIMITED|INFINITE)$")
_MEM = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
_JOB_ID = re.compile(r"^\d+(_\d+)?$")


@dataclass(frozen=True)
class SlurmSpec:
    """What the job asks Slurm for and how each node launches (``gpus_per_node`` 0: a CPU job)."""

    config_path: Path  # the resolved config the job trains (absolute)
    output_dir: Path  # the run folder (absolute): the job's log goes there
    workdir: Path  # where the job runs (relative paths in the config are relative to it)
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: int | None = None  # default: gpus_per_node, or 1 on CPU
    job_name: str = "tunesmith"
    partition: str | None = None
    time: str | None = None
    mem: str | None = None
    cpus_per_task: int | None = None  # default: one per process
    sbatch_args: tuple[str, ...] = ()
    python: str = field(default_factory=lambda: sys.executable)
    verbose: bool = False

    @property
    def procs(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1

    @property
    def log_path(self) -> Path:
        return self.output_dir / LOG_PATTERN


def check_spec(spec: SlurmSpec) -> None:
    """One clear sentence per mistake, before anything is written or submitted."""
    if spec.nodes < 1:
        raise ConfigError(f"--nodes must be 1 or more, got {spec.nodes}")
    if spec.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node must be 0 (a CPU job) or more, got {spec.gpus_per_node}")
    if spec.nproc_per_node is not None and spec.nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node must be 1 or more, got {spec.nproc_per_node}")
    if spec.cpus_per_task is not None and spec.cpus_per_task < 1:
        raise ConfigError(f"--cpus-per-task must be 1 or more, got {spec.cpus_per_task}")
    if spec.time is not None and not _TIME.match(spec.time):
        raise ConfigError(
            f"--time {spec.time!r} is not a Slurm time limit; "
            "use MINUTES, HH:MM:SS or DAYS-HH:MM:SS (e.g. 2:00:00)"
        )
    if spec.mem is not None and not _MEM.match(spec.mem):
        raise ConfigError(
            f"--mem {spec.mem!r} is not a Slurm memory size; use a number with K, M, G or T (e.g. 64G)"
        )
    if not re.match(r"^[\w.+-]+$", spec.job_name):
        raise ConfigError(f"--job-name {spec.job_name!r} may only use letters, digits and . _ + -")
    for arg in spec.sbatch_args:
        if not arg.startswith("-") or "\n" in arg:
            raise ConfigError(
                f"--sbatch-arg {arg!r} must be one sbatch option such as --account=proj or --qos=high"
            )


def render_sbatch(spec: SlurmSpec) -> str:
    """The sbatch script for ``spec`` (checked first)."""
    check_spec(spec)
    q = shlex.quote
    directives = [
        f"--job-name={spec.job_name}",
        f"--nodes={spec.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={spec.cpus_per_task or spec.procs}",
    ]
    if spec.gpus_per_node > 0:
        directives.append(f"--gres=gpu:{spec.gpus_per_node}")
    if spec.partition:
        directives.append(f"--partition={spec.partition}")
    if spec.time:
        directives.append(f"--time={spec.time}")
    if spec.mem:
        directives.append(f"--mem={spec.mem}")
    directives += [
        f"--chdir={q(str(spec.workdir))}",
        f"--output={q(str(spec.log_path))}",
        f"--error={q(str(spec.log_path))}",  # one file: a traceback lands next to the progress it interrupts
        *spec.sbatch_args,
    ]
    verbose = ["-v"] if spec.verbose else []
    train = [spec.python, "-m", "tunesmith.cli", *verbose, "train", str(spec.config_path)]
    script_path = spec.output_dir / "slurm" / SCRIPT_NAME
    lines = [
        "#!/bin/bash",
        f"# Written by `tunesmith launch slurm`; submit again with: sbatch {q(str(script_path))}",
        *(f"#SBATCH {d}" for d in directives),
        "set -euo pipefail",
        "",
        "# Where Slurm reaches a node: its NodeAddr (the node name itself on most clusters).",
        "node_addr() {",
        '    local info; info=$(scontrol show node "$1" -o 2>/dev/null) || true',
        '    case "$info" in',
        '        *" NodeAddr="*) info=${info#* NodeAddr=}; echo "${info%% *}" ;;',
        '        *) echo "$1" ;;',
        "    esac",
        "}",
        "export -f node_addr",
        "# The first host of the allocation hosts the rendezvous. (Not `| head -n1`: under pipefail, scontrol",
        "# writing more hosts after head has left dies of SIGPIPE and fails the job.)",
        'hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        "first_node=${hosts%%$'\\n'*}",
        'MASTER_ADDR=$(node_addr "$first_node")',
        "export MASTER_ADDR",
        f"export MASTER_PORT=$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN} ))",
        'export NNODES="$SLURM_NNODES"',
        f"export NPROC_PER_NODE={spec.procs}",
    ]
    if spec.nodes > 1:  # one node needs no rendezvous across hosts (torchrun, if any, runs standalone)
        lines.append(
            'export RDZV_ID="$SLURM_JOB_ID"  # torchrun --rdzv-backend=c10d at MASTER_ADDR:MASTER_PORT'
        )
    lines += [
        "export PYTHONUNBUFFERED=1",
        'echo "tunesmith: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST: $NNODES node(s) x $NPROC_PER_NODE'
        + ' process(es), first host $MASTER_ADDR:$MASTER_PORT"',
        "",
        "# One task per node; each starts torchrun for its node's processes. NODE_RANK: the node's index.",
        "# is_host makes node 0's torchrun host the c10d store, and PET_LOCAL_ADDR (torchrun's --local-addr)",
        "# is where the other nodes reach this one, also where MASTER_ADDR is not what the hostname resolves",
        "# to (a second network). Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch.",
        'srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" \\',
        "    --kill-on-bad-exit=1 bash -c '",
        '    export NODE_RANK="$SLURM_NODEID"',
        '    if [ -n "${RDZV_ID:-}" ]; then',
        '        export RDZV_CONF="${RDZV_CONF:+$RDZV_CONF,}is_host=$(( SLURM_NODEID == 0 ))"',
        '        export PET_LOCAL_ADDR="$(node_addr "$SLURMD_NODENAME")"',
        "    fi",
        '    exec "$@"\' tunesmith \\',
        "    " + " ".join(q(word) for word in train),
        "",
    ]
    return "\n".join(lines)


def write_job_files(spec: SlurmSpec, script: str, config_text: str) -> Path:
    """Write `output_dir/slurm/config.yaml` (what the job trains) and `train.sbatch`; return the script."""
    folder = spec.output_dir / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    spec.config_path.parent.mkdir(parents=True, exist_ok=True)
    spec.config_path.write_text(config_text, encoding="utf-8")
    path = folder / SCRIPT_NAME
    path.write_text(script, encoding="utf-8")
    path.chmod(0o755)
    return path


def _tool(name: str) -> str:
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
    proc = _run([_tool("sbatch"), "--parsable", str(script_path)])
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


def job_status(job_id: str) -> dict[str, Any]:
    """State, exit code, nodes and elapsed time: from squeue while the job is queued or running, then from
    sacct (accounting), then from ``scontrol show job`` (without accounting, slurmctld keeps a finished job
    for MinJobAge seconds, 300 by default)."""
    job_id = _check_job_id(job_id)
    info: dict[str, Any] = dict.fromkeys(("state", "exit_code", "nodes", "elapsed", "reason", "source"))
    info = {"job_id": job_id, **info}
    proc = _run([_tool("squeue"), "-h", "-j", job_id, "-o", "%T|%M|%N|%r"])
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.count("|") == 3]
    if proc.returncode == 0 and rows and rows[0][0] not in FINISHED and rows[0][0] != "COMPLETING":
        state, elapsed, nodes, reason = rows[0]
        info.update(
            state=state,
            elapsed=elapsed,
            nodes=nodes or None,
            source="squeue",
            reason=None if reason in ("None", "") else reason,
        )
        return info
    if shutil.which("sacct"):  # "accounting storage is disabled" without slurmdbd: exit 1, no rows
        proc = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode,NodeList,Elapsed"])
        rows = [line.split("|") for line in proc.stdout.splitlines() if line.count("|") == 3]
        if proc.returncode == 0 and rows:
            state, exit_code, nodes, elapsed = rows[0]
            info.update(
                state=state.split()[0],
                exit_code=exit_code,
                nodes=nodes or None,
                elapsed=elapsed,
                source="sacct",
            )  # "CANCELLED by 0" -> CANCELLED
            return info
    fields = _scontrol_job(job_id)
    if fields:
        reason = fields.get("Reason")
        info.update(
            state=fields.get("JobState"),
            exit_code=fields.get("ExitCode"),
            nodes=fields.get("NodeList"),
            elapsed=fields.get("RunTime"),
            source="scontrol",
            reason=None if reason == "None" else reason,
        )
        return info
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
    proc = _run([_tool("scancel"), job_id])
    if proc.returncode != 0:
        raise TunesmithError(f"scancel {job_id} failed: {_first_line(proc.stderr or proc.stdout)}")


def _cmd_launch_slurm(args: argparse.Namespace) -> int:
    from tunesmith.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    cfg.require("model_name_or_path", "dataset", "output_dir")
    workdir = Path.cwd().resolve()
    output_dir = (workdir / str(cfg.output_dir)).resolve()
    spec = SlurmSpec(
        config_path=output_dir / "slurm" / CONFIG_NAME,
        output_dir=output_dir,
        workdir=workdir,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        nproc_per_node=args.nproc_per_node,
        job_name=args.job_name or f"tunesmith-{output_dir.name}",
        partition=args.partition,
        time=args.time,
        mem=args.mem,
        cpus_per_task=args.cpus_per_task,
        sbatch_args=tuple(args.sbatch_arg or ()),
        verbose=bool(getattr(args, "verbose", False)),
    )
    script = render_sbatch(spec)
    if args.dry_run:
        print(script, end="")
        return 0
    _tool("sbatch")  # fail before writing anything when this is not a Slurm machine
    path = write_job_files(spec, script, dump_config(cfg))
    job_id = submit(path)
    print(f"submitted Slurm job {job_id}: {spec.nodes} node(s) x {spec.procs} process(es); script {path}")
    print(f"log: {str(spec.log_path).replace('%j', job_id)}; state: tunesmith jobs status {job_id}")
    return 0


def add_launch_parser(launch_subparsers: Any) -> argparse.ArgumentParser:
    """Register ``launch slurm`` under ``tunesmith launch``."""
    p = launch_subparsers.add_parser(
        "slurm",
        help="write an sbatch script (one task per node, torchrun with c10d rendezvous) and submit it",
        description="Validate CONFIG, write it and an sbatch script into output_dir/slurm/, and submit the "
        "script with sbatch. Each node runs `tunesmith train` once; the nodes meet at the first host of the "
        "allocation.",
    )
    p.add_argument("config", metavar="CONFIG", help="the training YAML config")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. max_steps=100"
    )
    p.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes to allocate (default 1)")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=0,
        metavar="G",
        help="GPUs per node, asked for as --gres=gpu:G; 0 (default) is a CPU job",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        metavar="P",
        help="training processes per node (default: G, or 1 for a CPU job)",
    )
    p.add_argument("--partition", metavar="P", help="Slurm partition (default: the cluster's default)")
    p.add_argument("--time", metavar="T", help="time limit: MINUTES, HH:MM:SS or DAYS-HH:MM:SS")
    p.add_argument("--mem", metavar="SIZE", help="memory per node, e.g. 64G (default: the cluster's default)")
    p.add_argument(
        "--cpus-per-task", type=int, metavar="C", help="CPUs per node's task (default: one per process)"
    )
    p.add_argument("--job-name", metavar="NAME", help="job name (default: tunesmith-<output_dir name>)")
    p.add_argument(
        "--sbatch-arg",
        action="append",
        metavar="OPT",
        help="one more sbatch option, e.g. --sbatch-arg=--account=proj (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    p.set_defaults(func=_cmd_launch_slurm)
    return p
