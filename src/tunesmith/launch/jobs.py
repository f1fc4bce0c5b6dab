"""``tunesmith jobs list | status | logs | delete``: follow jobs submitted by ``tunesmith launch``.

Each back-end answers through one interface (:class:`tunesmith.launch.backend.JobBackend`): Kubernetes
PyTorchJobs (:class:`tunesmith.launch.k8s.submit.K8sJobs`) and Slurm jobs
(:class:`tunesmith.launch.slurm.submit.SlurmJobs`). ``--backend`` picks one; without it a purely numeric NAME is a
Slurm job id and anything else a PyTorchJob name.
"""

from __future__ import annotations

import argparse
import sys

from tunesmith.errors import TunesmithError
from tunesmith.launch.backend import JobBackend, LogRequest
from tunesmith.launch.k8s.options import add_cluster_arguments

BACKENDS = ("k8s", "slurm")


def _backend(args: argparse.Namespace) -> str:
    if args.backend:
        return args.backend
    return "slurm" if getattr(args, "name", "").isdigit() else "k8s"


def backend_for(args: argparse.Namespace) -> JobBackend:
    """The back-end that owns the job ``args`` names (imported only when used)."""
    if _backend(args) == "slurm":
        from tunesmith.launch.slurm.submit import SlurmJobs

        return SlurmJobs()
    from tunesmith.launch.k8s.submit import K8sJobs

    return K8sJobs(args.kubeconfig, args.context, args.namespace)


def _cmd_list(args: argparse.Namespace) -> int:
    print(backend_for(args).list_jobs())
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    print(backend_for(args).status(args.name))
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    if args.index < 0:
        raise TunesmithError(f"--index {args.index} is not allowed; replica indexes start at 0")
    request = LogRequest(replica=args.replica, index=args.index, tail=args.tail, follow=args.follow)
    for chunk in backend_for(args).logs(args.name, request):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    print(backend_for(args).delete(args.name))
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
    add_cluster_arguments(common)

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
