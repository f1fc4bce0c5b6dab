"""``tunesmith launch k8s CONFIG``: the argparse wiring of the Kubernetes back-end. Heavy imports (kubernetes,
kubeflow) happen inside the handler."""

from __future__ import annotations

import argparse
from pathlib import Path

from tunesmith.launch.k8s.options import add_launch_arguments, options_from_args
from tunesmith.logging import get_logger

log = get_logger("launch.k8s")


def _cmd_launch_k8s(args: argparse.Namespace) -> int:
    from tunesmith.config import load_config
    from tunesmith.launch.k8s.check import check
    from tunesmith.launch.k8s.render import render
    from tunesmith.launch.k8s.submit import connect, require_cluster_packages, submit

    require_cluster_packages()
    cfg = load_config(args.config, args.overrides)
    checked = check(cfg, options_from_args(args), source=args.config)
    rendered = render(checked)
    log.info("%s", checked.mesh)
    for warning in rendered.warnings:
        log.warning("warning: %s", warning)
    text = rendered.to_yaml()
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        log.info("wrote the ConfigMap and PyTorchJob %s to %s", rendered.name, args.out)
    if args.dry_run:
        if not args.out:
            print(text, end="")
        return 0
    cluster = connect(args.kubeconfig, args.context, args.namespace)
    submit(cluster, rendered)
    print(
        f"submitted PyTorchJob {rendered.name} to namespace {cluster.namespace} ({cluster.host}), {checked.mesh}; "
        f"follow it "
        f"with `tunesmith jobs status {rendered.name}` and `tunesmith jobs logs {rendered.name}`"
    )
    return 0


def add_launch_parser(launch_sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``launch k8s`` under ``tunesmith launch``."""
    p = launch_sub.add_parser(
        "k8s",
        help="submit the config as a Kubeflow PyTorchJob (Master + Workers running `tunesmith train`)",
        description="Render the resolved config as a ConfigMap and a kubeflow.org/v1 PyTorchJob whose pods "
        "run `tunesmith train /config/train.yaml`, check both, and submit them (or print them with "
        "--dry-run). Paths in the config must be pod paths, on a --pvc mount.",
    )
    add_launch_arguments(p)
    p.set_defaults(func=_cmd_launch_k8s)
    return p
