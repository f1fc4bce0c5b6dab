"""``tunesmith launch slurm CONFIG``: the argparse wiring of the Slurm back-end."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tunesmith.launch.slurm.check import check, with_mesh
from tunesmith.launch.slurm.options import add_launch_arguments, options_from_args
from tunesmith.launch.slurm.render import render
from tunesmith.launch.slurm.submit import require_tool, submit, write_job_files


def _cmd_launch_slurm(args: argparse.Namespace) -> int:
    from tunesmith.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    cfg.require("model_name_or_path", "dataset", "output_dir")
    workdir = Path.cwd().resolve()
    job = check(options_from_args(args, (workdir / str(cfg.output_dir)).resolve(), workdir))
    job = with_mesh(job, cfg)  # the mesh divides the world before anything is written or submitted
    script = render(job)
    if args.dry_run:
        print(script, end="")
        return 0
    require_tool("sbatch")  # fail before writing anything when this is not a Slurm machine
    path = write_job_files(job, script, dump_config(cfg))
    job_id = submit(path)
    print(f"submitted Slurm job {job_id}: {job.nodes} node(s) x {job.procs} process(es), {job.mesh}; script {path}")
    print(f"log: {str(job.log_path).replace('%j', job_id)}; state: tunesmith jobs status {job_id}")
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
    add_launch_arguments(p)
    p.set_defaults(func=_cmd_launch_slurm)
    return p
