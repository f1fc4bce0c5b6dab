"""Starting a multi-process job the way LLaMA-Factory does: ``tunesmith train`` re-runs itself under torchrun.

The launcher settings come from flags or, as in LLaMA-Factory, from environment variables::

    flag                 env               default
    --nproc-per-node     NPROC_PER_NODE    the number of visible CUDA GPUs (1 without)
    --nnodes             NNODES            1
    --node-rank          NODE_RANK         0
    --master-addr        MASTER_ADDR       127.0.0.1
    --master-port        MASTER_PORT       a free port (single node), 29500 (several nodes)
    --max-restarts       MAX_RESTARTS      0: restart the job up to N times when a rank fails
                         FORCE_TORCHRUN=1  launch even for one process

A process that torchrun (or anything following its convention: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) started is never re-launched: it joins the job (``tunesmith.launch.distributed``).

If any rank fails, torchrun stops the others and prints a summary naming the failed rank, its exit code or signal
and (for Python errors) its traceback; ``tunesmith train`` then exits with torchrun's non-zero code. With
``max_restarts`` N > 0 torchrun instead restarts every rank (up to N times); the restarted workers find the newest
complete checkpoint in ``output_dir`` and resume from it, as a re-run of the same command would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tunesmith.errors import ConfigError
from tunesmith.launch.distributed import free_port, launched_by_torchrun

TRUE_VALUES = ("1", "true", "yes", "y", "on")


@dataclass(frozen=True)
class LaunchSpec:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    force: bool = False
    max_restarts: int = 0

    @property
    def needs_launch(self) -> bool:
        return self.force or self.nproc_per_node > 1 or self.nnodes > 1


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable torch/CUDA simply means no GPUs
        return 0


def _int(name: str, value: str | int | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None


def launch_spec(
    nproc_per_node: int | None = None,
    nnodes: int | None = None,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    env: Mapping[str, str] | None = None,
    count_gpus: bool = True,
    max_restarts: int | None = None,
) -> LaunchSpec:
    """Flags first, then the LLaMA-Factory environment variables, then defaults (``count_gpus``: default to one
    process per visible GPU; off when the config pins a device such as ``cpu``)."""
    env = os.environ if env is None else env
    default_nproc = max(_visible_gpus(), 1) if count_gpus else 1
    nproc = nproc_per_node or _int("NPROC_PER_NODE", env.get("NPROC_PER_NODE")) or default_nproc
    nodes = nnodes or _int("NNODES", env.get("NNODES")) or 1
    rank = node_rank if node_rank is not None else (_int("NODE_RANK", env.get("NODE_RANK")) or 0)
    port = master_port or _int("MASTER_PORT", env.get("MASTER_PORT"))
    spec = LaunchSpec(
        nproc_per_node=nproc,
        nnodes=nodes,
        node_rank=rank,
        master_addr=master_addr or env.get("MASTER_ADDR") or "127.0.0.1",
        master_port=port,
        force=env.get("FORCE_TORCHRUN", "").strip().lower() in TRUE_VALUES,
        max_restarts=max_restarts if max_restarts is not None else (_int("MAX_RESTARTS", env.get("MAX_RESTARTS")) or 0),
    )
    if spec.max_restarts < 0:
        raise ConfigError(f"max_restarts must be 0 or more, got {spec.max_restarts}")
    if spec.nproc_per_node < 1 or spec.nnodes < 1 or not 0 <= spec.node_rank < spec.nnodes:
        raise ConfigError(
            f"invalid launch: nproc_per_node={spec.nproc_per_node}, nnodes={spec.nnodes}, "
            f"node_rank={spec.node_rank} (node_rank must be in 0..nnodes-1)"
        )
    return spec


def should_launch(spec: LaunchSpec, env: Mapping[str, str] | None = None) -> bool:
    """Launch torchrun unless this process already is one of its workers."""
    return spec.needs_launch and not launched_by_torchrun(env)


def master_port(spec: LaunchSpec) -> int:
    return spec.master_port or (free_port() if spec.nnodes == 1 else 29500)


def torchrun_command(spec: LaunchSpec, worker_args: Sequence[str], port: int) -> list[str]:
    """``python -m torch.distributed.run ... -m tunesmith.cli <worker_args>``. With ``max_restarts`` 0 (the
    default) the whole job stops when one rank fails; with N it is restarted up to N times."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={spec.nnodes}",
        f"--node-rank={spec.node_rank}",
        f"--nproc-per-node={spec.nproc_per_node}",
        f"--master-addr={spec.master_addr}",
        f"--master-port={port}",
        f"--max-restarts={spec.max_restarts}",
        "-m",
        "tunesmith.cli",
        *worker_args,
    ]


def run_torchrun(spec: LaunchSpec, worker_args: Sequence[str]) -> int:
    """Run the job and return its exit code; torchrun's own output (the failure summary included) passes through."""
    port = master_port(spec)
    cmd = torchrun_command(spec, worker_args, port)
    print(
        f"[tunesmith] launching {spec.nproc_per_node} process(es) on node {spec.node_rank} of {spec.nnodes} "
        f"(master {spec.master_addr}:{port}): {' '.join(cmd)}",
        file=sys.stderr,
        flush=True,
    )
    proc = subprocess.Popen(cmd)
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached torchrun too (same process group); let it stop its workers
        code = proc.wait()
    if code != 0:
        print(
            f"tunesmith: error: distributed training failed (torchrun exit code {code}); the summary above names "
            "the rank that failed first and its error",
            file=sys.stderr,
        )
    return code
