"""``tunesmith launch {k8s,slurm,ranktable}`` and ``tunesmith jobs ...``: registered by cli.py via
:func:`add_parsers`. Only argparse work happens here; each handler imports what it needs."""

from __future__ import annotations

import argparse

from tunesmith.launch import ranktable
from tunesmith.launch.jobs import add_jobs_parser
from tunesmith.launch.k8s import commands as k8s
from tunesmith.launch.slurm import commands as slurm


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="run training on a cluster: a Kubeflow PyTorchJob (k8s), a Slurm job, or an Ascend rank table",
    )
    launch_sub = p.add_subparsers(dest="launch_command", metavar="TARGET", required=True)
    for target in (k8s, slurm, ranktable):
        target.add_launch_parser(launch_sub)
    add_jobs_parser(sub)
