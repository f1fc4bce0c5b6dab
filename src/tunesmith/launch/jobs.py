"""``tunesmith jobs list | status | logs | delete``: follow jobs submitted by ``tunesmith launch``.

Two backends: Kubernetes PyTorchJobs (``k8s_client.py``) and Slurm jobs (``slurm.py``). ``--backend``
picks one; without it a purely numeric NAME is a Slurm job id and anything else a PyTorchJob name.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.launch.k8s import add_cluster_args

BACKENDS = ("k8s", "slurm")


def _backend(args: argparse.Namespace) -> str:
    if args.backend:
        return args.backend
    return "slurm" if getattr(args, "name", "").isdigit() else "k8s"


def _slurm() -> Any:
    try:
        from tunesmith.launch import slurm
    except ImportError as err:
        raise TunesmithError(
            f"Slurm support is not available in this install ({err}); use --backend k8s"
        ) from None
    return slurm


def _cluster(args: argparse.Namespace) -> Any:
    from tunesmith.launch.k8s_client import connect

    return connect(args.kubeconfig, args.context, args.namespace)


def _cmd_list(args: argparse.Namespace) -> int:
    if args.backend == "slurm":
        raise TunesmithError("jobs list covers Kubernetes PyTorchJobs only; for Slurm use `squeue --me`")
    from tunesmith.launch.k8s_client import job_state, list_jobs

    cluster = _cluster(args)
    items = list_jobs(cluster)
    if not items:
        print(f"no PyTorchJobs in namespace {cluster.namespace}")
        return 0
    rows = [("NAME", "STATE", "REPLICAS", "CREATED")]
    for job in items:
        specs = (job.get("spec") or {}).get("pytorchReplicaSpecs") or {}
        replicas = "+".join(f"{rs.get('replicas', 1)} {role.lower()}" for role, rs in specs.items())
        meta = job.get("metadata") or {}
        rows.append((meta.get("name", "?"), job_state(job), replicas, meta.get("creationTimestamp", "")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    if _backend(args) == "slurm":
        info = _slurm().job_status(args.name)
        print(f"Slurm job {args.name}:")
        for key, value in info.items():
            print(f"  {key}: {value}")
        return 0
    from tunesmith.launch.k8s_client import describe

    print(describe(_cluster(args), args.name))
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    if args.index < 0:
        raise TunesmithError(f"--index {args.index} is not allowed; replica indexes start at 0")
    if _backend(args) == "slurm":
        print(_slurm().job_logs(args.name), end="")
        return 0
    from tunesmith.launch.k8s_client import pod_logs

    for chunk in pod_logs(_cluster(args), args.name, args.replica, args.index, args.tail, args.follow):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    if _backend(args) == "slurm":
        _slurm().cancel_job(args.name)
        print(f"cancelled Slurm job {args.name}")
        return 0
    from tunesmith.launch.k8s_client import delete

    cluster = _cluster(args)
    deleted = delete(cluster, args.name)
    print(f"deleted {' and '.join(deleted)} from namespace {cluster.namespace}")
    return 0


def add_jobs_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "jobs", help="list, follow, read the logs of, or delete jobs started by `tunesmith launch`"
    )
    jobs_sub = p.add_subparsers(dest="jobs_command", metavar="SUBCOMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--backend",
        choices=BACKENDS,
        help="k8s (PyTorchJobs) or slurm (default: slurm for a numeric NAME, else k8s)",
    )
    add_cluster_args(common)

    q = jobs_sub.add_parser("list", parents=[common], help="PyTorchJobs in the namespace with their state")
    q.set_defaults(func=_cmd_list, name="")
    q = jobs_sub.add_parser("status", parents=[common], help="conditions, replica statuses and pods of a job")
    q.add_argument("name", metavar="NAME", help="PyTorchJob name or Slurm job id")
    q.set_defaults(func=_cmd_status)
    q = jobs_sub.add_parser(
        "logs", parents=[common], help="the log of one pod of a job (default: the master)"
    )
    q.add_argument("name", metavar="NAME", help="PyTorchJob name or Slurm job id")
    q.add_argument(
        "--replica",
        choices=["master", "worker"],
        help="which replica type (default: master; worker for an elastic job)",
    )
    q.add_argument("--index", type=int, default=0, help="replica index (default 0)")
    q.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    q.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until the pod ends")
    q.set_defaults(func=_cmd_logs)
    q = jobs_sub.add_parser(
        "delete", parents=[common], help="delete a PyTorchJob and its ConfigMap (or scancel)"
    )
    q.add_argument("name", metavar="NAME", help="PyTorchJob name or Slurm job id")
    q.set_defaults(func=_cmd_delete)
