"""``tunesmith launch k8s CONFIG``: render the config as a Kubeflow PyTorchJob (+ ConfigMap) and submit it.

Rendering and validation live in ``k8s_render.py``, the API calls in ``k8s_client.py``; this module is the
command line. Heavy imports (kubernetes, kubeflow) happen inside the handler.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tunesmith.logging import get_logger

log = get_logger("launch.k8s")


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """--kubeconfig / --context / --namespace: shared by `launch k8s` and `jobs`."""
    p.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, then the in-cluster service account)",
    )
    p.add_argument("--context", help="kubeconfig context (default: the current one)")
    p.add_argument(
        "--namespace", "-n", metavar="NS", help="namespace (default: the context's namespace, else `default`)"
    )


def _cmd_launch_k8s(args: argparse.Namespace) -> int:
    from tunesmith.config import load_config
    from tunesmith.launch.k8s_client import connect, require_cluster_packages, submit
    from tunesmith.launch.k8s_render import K8sOptions, render

    require_cluster_packages()
    cfg = load_config(args.config, args.overrides)
    opts = K8sOptions(
        image=args.image,
        nnodes=args.nnodes,
        nproc_per_node=args.nproc_per_node,
        accelerator=args.accelerator,
        namespace=args.namespace,
        name=args.name,
        pvc=args.pvc,
        env=args.env,
        elastic=args.elastic,
        max_restarts=args.max_restarts,
        restart_policy=args.restart_policy,
        cpu=args.cpu,
        memory=args.memory,
        shm_size=args.shm_size,
        workdir=args.workdir,
        node_selector=args.node_selector,
        image_pull_secret=args.image_pull_secret,
    )
    rendered = render(cfg, opts, source=args.config)
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
        f"submitted PyTorchJob {rendered.name} to namespace {cluster.namespace} ({cluster.host}); follow it "
        f"with `tunesmith jobs status {rendered.name}` and `tunesmith jobs logs {rendered.name}`"
    )
    return 0


def add_launch_parser(launch_sub: argparse._SubParsersAction) -> None:
    from tunesmith.launch.k8s_render import ACCELERATORS, GPU, RESTART_POLICIES

    p = launch_sub.add_parser(
        "k8s",
        help="submit the config as a Kubeflow PyTorchJob (Master + Workers running `tunesmith train`)",
        description="Render the resolved config as a ConfigMap and a kubeflow.org/v1 PyTorchJob whose pods "
        "run `tunesmith train /config/train.yaml`, check both, and submit them (or print them with "
        "--dry-run). Paths in the config must be pod paths, on a --pvc mount.",
    )
    p.add_argument("config", help="YAML config file (LLaMA-Factory keys)")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. learning_rate=5e-4"
    )
    p.add_argument("--image", help="container image with tunesmith installed (required)")
    p.add_argument(
        "--nnodes",
        type=int,
        metavar="N",
        help="pods (nodes): 1 Master + N-1 Workers (default 1; with --elastic: MAX)",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="G",
        help="training processes per pod, one per accelerator (default 1)",
    )
    p.add_argument(
        "--accelerator",
        default=GPU,
        metavar="RESOURCE",
        help=f"resource requested G times per pod: {', '.join(ACCELERATORS)} (default {GPU})",
    )
    p.add_argument("--name", help="job name (default: from run_name or output_dir)")
    p.add_argument(
        "--pvc",
        action="append",
        default=[],
        metavar="NAME:/mount[:ro]",
        help="mount a PersistentVolumeClaim (repeatable), e.g. models:/models:ro",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable in every pod (repeatable)",
    )
    p.add_argument(
        "--elastic",
        metavar="MIN:MAX",
        help="elastic training (torchrun c10d rendezvous): between MIN and MAX Worker pods",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        metavar="N",
        help="--elastic: restarts of the whole worker group before the job fails (default 3)",
    )
    p.add_argument(
        "--restart-policy",
        default="OnFailure",
        metavar="POLICY",
        help=f"pod restart policy: {', '.join(RESTART_POLICIES)} (default OnFailure)",
    )
    p.add_argument("--cpu", help="CPU request and limit per pod, e.g. 16")
    p.add_argument("--memory", help="memory request and limit per pod, e.g. 128Gi")
    p.add_argument(
        "--shm-size",
        metavar="SIZE",
        help="size limit of the /dev/shm memory volume, e.g. 16Gi "
        "(default: no limit beyond the pod's memory)",
    )
    p.add_argument(
        "--workdir",
        metavar="DIR",
        help="working directory in the pods (relative config paths resolve against it)",
    )
    p.add_argument(
        "--node-selector",
        action="append",
        default=[],
        metavar="LABEL=VALUE",
        help="schedule only on nodes with this label (repeatable)",
    )
    p.add_argument(
        "--image-pull-secret",
        action="append",
        default=[],
        metavar="SECRET",
        help="secret for pulling a private image (repeatable)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the ConfigMap + PyTorchJob YAML and submit nothing"
    )
    p.add_argument("--out", metavar="FILE", help="also write the YAML to FILE (kubectl apply -f FILE)")
    add_cluster_args(p)
    p.set_defaults(func=_cmd_launch_k8s)
