"""Checking :class:`SlurmOptions`: one clear sentence per mistake, before anything is written or submitted, and
the :class:`CheckedSlurm` job that is all the script is rendered from."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tunesmith.errors import ConfigError
from tunesmith.launch.slurm.options import LOG_PATTERN, SCRIPT_NAME, SlurmOptions

if TYPE_CHECKING:
    from tunesmith.config.schema import Config

# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (and the words for no limit)
_TIME = re.compile(r"^(\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|infinite|unlimited|UNLIMITED|INFINITE)$")
_MEM = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
_JOB_NAME = re.compile(r"^[\w.+-]+$")


@dataclass(frozen=True)
class CheckedSlurm:
    """A valid job: what it asks Slurm for, where its files go, and the command each node runs."""

    job_name: str
    nodes: int
    procs: int  # training processes per node
    cpus_per_task: int
    gpus_per_node: int  # 0: a CPU job
    partition: str | None
    time: str | None
    mem: str | None
    sbatch_args: tuple[str, ...]  # the user's extra sbatch options, each one checked
    workdir: Path
    output_dir: Path
    config_path: Path
    script_path: Path
    log_path: Path  # with sbatch's %j for the job id
    train_command: tuple[str, ...]  # what each node's task runs
    mesh: str = ""  # "mesh: dp 4 × sp 1 × tp 2 × pp 1 (8 ranks)": :func:`with_mesh` checks it against the job

    @property
    def rendezvous(self) -> bool:
        """Several nodes meet in a c10d rendezvous; one node needs none across hosts."""
        return self.nodes > 1


def _check_numbers(opts: SlurmOptions) -> None:
    if opts.nodes < 1:
        raise ConfigError(f"--nodes must be 1 or more, got {opts.nodes}")
    if opts.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node must be 0 (a CPU job) or more, got {opts.gpus_per_node}")
    if opts.nproc_per_node is not None and opts.nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node must be 1 or more, got {opts.nproc_per_node}")
    if opts.cpus_per_task is not None and opts.cpus_per_task < 1:
        raise ConfigError(f"--cpus-per-task must be 1 or more, got {opts.cpus_per_task}")


def _check_words(opts: SlurmOptions) -> None:
    if opts.time is not None and not _TIME.match(opts.time):
        raise ConfigError(
            f"--time {opts.time!r} is not a Slurm time limit; "
            "use MINUTES, HH:MM:SS or DAYS-HH:MM:SS (e.g. 2:00:00)"
        )
    if opts.mem is not None and not _MEM.match(opts.mem):
        raise ConfigError(
            f"--mem {opts.mem!r} is not a Slurm memory size; use a number with K, M, G or T (e.g. 64G)"
        )
    if not _JOB_NAME.match(opts.job_name):
        raise ConfigError(f"--job-name {opts.job_name!r} may only use letters, digits and . _ + -")
    for arg in opts.sbatch_args:
        if not arg.startswith("-") or "\n" in arg:
            raise ConfigError(
                f"--sbatch-arg {arg!r} must be one sbatch option such as --account=proj or --qos=high"
            )


def check(opts: SlurmOptions) -> CheckedSlurm:
    """Every option checked (one-sentence refusals), then the job they describe."""
    _check_numbers(opts)
    _check_words(opts)
    procs = opts.nproc_per_node or opts.gpus_per_node or 1
    verbose = ("-v",) if opts.verbose else ()
    return CheckedSlurm(
        job_name=opts.job_name,
        nodes=opts.nodes,
        procs=procs,
        cpus_per_task=opts.cpus_per_task or procs,
        gpus_per_node=opts.gpus_per_node,
        partition=opts.partition or None,
        time=opts.time,
        mem=opts.mem,
        sbatch_args=tuple(opts.sbatch_args),
        workdir=opts.workdir,
        output_dir=opts.output_dir,
        config_path=opts.config_path,
        script_path=opts.output_dir / "slurm" / SCRIPT_NAME,
        log_path=opts.output_dir / LOG_PATTERN,
        train_command=(opts.python, "-m", "tunesmith.cli", *verbose, "train", str(opts.config_path)),
    )


def with_mesh(job: CheckedSlurm, cfg: Config) -> CheckedSlurm:
    """``job`` with the mesh of its world (--nodes × processes per node), refused in one sentence naming the keys
    when sequence × tensor × pipeline parallel does not divide it, before anything is written or submitted."""
    from tunesmith.plan.mesh import check_mesh, mesh_line

    procs = "--nproc-per-node" if job.gpus_per_node == 0 or job.procs != job.gpus_per_node else "--gpus-per-node"
    sizes = check_mesh(cfg, job.nodes * job.procs, f"--nodes {job.nodes} × {procs} {job.procs}")
    return replace(job, mesh=mesh_line(sizes))
