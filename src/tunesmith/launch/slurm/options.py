"""What a user asks ``tunesmith launch slurm`` for: :class:`SlurmOptions`, and the command line that fills it."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_NAME = "config.yaml"  # the resolved config the job trains, next to the script
SCRIPT_NAME = "train.sbatch"
LOG_PATTERN = "slurm-%j.out"  # in output_dir; sbatch puts the job id in for %j


@dataclass(frozen=True)
class SlurmOptions:
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


def options_from_args(args: argparse.Namespace, output_dir: Path, workdir: Path) -> SlurmOptions:
    """The options ``launch slurm`` was given, for a run whose (absolute) ``output_dir`` the config names."""
    return SlurmOptions(
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


def add_launch_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``tunesmith launch slurm``."""
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
