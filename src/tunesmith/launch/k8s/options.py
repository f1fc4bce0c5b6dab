"""What a user asks ``tunesmith launch k8s`` for: :class:`K8sOptions`, and the command line that fills it (and the
cluster arguments ``tunesmith jobs`` shares)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from tunesmith import __version__

GPU = "nvidia.com/gpu"
ASCEND = "huawei.com/Ascend910"
ACCELERATORS = (GPU, ASCEND, "none")
RESTART_POLICIES = ("OnFailure", "Never", "Always", "ExitCode")
# Where the pods find the resolved config: the ConfigMap's one file, mounted read-only.
CONFIG_MOUNT = "/config"
CONFIG_FILE = "train.yaml"
# The images docker/Dockerfile (CUDA) and docker/Dockerfile.cpu build, as the release pushes them (README
# "Container images"): the tag is the package version, so a job runs the tunesmith that rendered it.
IMAGE_REPOSITORY = "ghcr.io/tunesmith/tunesmith"


def default_image(accelerator: str) -> str | None:
    """The published image for ``--accelerator``: the CUDA one for GPUs, the CPU one for `none`. None for
    Ascend: there is no published CANN image, so ``--image`` stays required there (the check says so)."""
    if accelerator == GPU:
        return f"{IMAGE_REPOSITORY}:{__version__}"
    if accelerator == "none":
        return f"{IMAGE_REPOSITORY}:{__version__}-cpu"
    return None


@dataclass(frozen=True)
class K8sOptions:
    """The options of ``tunesmith launch k8s`` as given (the CLI fills this; tests build it directly)."""

    image: str | None
    nnodes: int | None = None
    nproc_per_node: int = 1
    accelerator: str = GPU
    namespace: str | None = None
    name: str | None = None
    pvc: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    elastic: str | None = None
    max_restarts: int = 3
    restart_policy: str = "OnFailure"
    cpu: str | None = None
    memory: str | None = None
    shm_size: str | None = None
    workdir: str | None = None
    node_selector: list[str] = field(default_factory=list)
    image_pull_secret: list[str] = field(default_factory=list)


def options_from_args(args: argparse.Namespace) -> K8sOptions:
    return K8sOptions(
        image=args.image if args.image is not None else default_image(args.accelerator),
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


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
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


def add_launch_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``tunesmith launch k8s``."""
    p.add_argument("config", help="YAML config file (LLaMA-Factory keys)")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. learning_rate=5e-4"
    )
    p.add_argument(
        "--image",
        help=f"container image with tunesmith installed (default: {IMAGE_REPOSITORY}:{__version__} for GPUs, "
        f"its -cpu tag with --accelerator none; required for {ASCEND})",
    )
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
    add_cluster_arguments(p)
