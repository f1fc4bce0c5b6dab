"""``tunesmith launch {k8s,slurm,ranktable}`` and ``tunesmith jobs ...``: registered by cli.py via
:func:`add_parsers`. Only argparse work happens here; each handler imports what it needs."""

from __future__ import annotations

import argparse
import importlib
import importlib.util

from tunesmith.launch.jobs import add_jobs_parser
from tunesmith.launch.k8s import add_launch_parser as add_k8s_parser

# Launch targets written in their own modules; each defines add_launch_parser(launch_subparsers).
OPTIONAL_TARGETS = ("tunesmith.launch.slurm", "tunesmith.launch.ranktable")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="run training on a cluster: a Kubeflow PyTorchJob (k8s), a Slurm job, or an Ascend rank table",
    )
    launch_sub = p.add_subparsers(dest="launch_command", metavar="TARGET", required=True)
    add_k8s_parser(launch_sub)
    for module in OPTIONAL_TARGETS:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).add_launch_parser(launch_sub)
    add_jobs_parser(sub)
