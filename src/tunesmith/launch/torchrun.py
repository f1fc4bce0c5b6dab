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
                         RDZV_ID           an elastic c10d rendezvous under this id instead of node ranks
                         MIN_NNODES/MAX_NNODES  its node range (else NNODES; NNODES may be MIN:MAX itself)
                         RDZV_ENDPOINT     its host:port (default MASTER_ADDR:MASTER_PORT, port 29500)
                         RDZV_BACKEND      c10d (default), etcd, etcd-v2, static; RDZV_CONF: key=value,...

Inside a Kubeflow PyTorchJob pod or a Slurm task these come from the scheduler's own variables (``PET_*``,
``SLURM_*``; see :mod:`tunesmith.launch.cluster_env`), so the pod or task runs plain ``tunesmith train CONFIG``.
``NPROC_PER_NODE`` may also be ``auto`` (one process per visible GPU, one without; PyTorchJob's default) or
``gpu``.

A process that torchrun (or anything following its convention: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) started is never re-launched: it joins the job (``tunesmith.train.distributed``).

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
from tunesmith.launch.cluster_env import adopt_worker_env, cluster_source, launch_env
from tunesmith.launch.rendezvous import ordered_exit
from tunesmith.runenv import free_port, launched_by_torchrun

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
    min_nnodes: int | None = None  # elastic: nnodes is then the maximum
    rdzv_id: str | None = None  # set: an elastic rendezvous (c10d by default) instead of node ranks
    rdzv_backend: str = "c10d"
    rdzv_endpoint: str | None = None
    rdzv_conf: str | None = None
    source: str = ""  # who set the variables: pytorchjob-node, slurm-node, ... (see cluster_env)

    @property
    def needs_launch(self) -> bool:
        return self.force or self.nproc_per_node > 1 or self.nnodes > 1 or self.rdzv_id is not None

    @property
    def elastic(self) -> bool:
        return self.rdzv_id is not None

    @property
    def nnodes_arg(self) -> str:
        if self.min_nnodes is not None and self.min_nnodes != self.nnodes:
            return f"{self.min_nnodes}:{self.nnodes}"
        return str(self.nnodes)


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


def _nproc(value: str | None, count_gpus: bool) -> int | None:
    """An integer, or torchrun's ``auto`` / ``gpu`` (PyTorchJob's default ``nprocPerNode`` is ``auto``). Unlike
    torchrun, ``auto`` without a GPU means one process, not one per CPU core: training wants one rank per device."""
    if value is None or value.strip() == "":
        return None
    word = value.strip().lower()
    if word == "auto":
        return max(_visible_gpus(), 1) if count_gpus else 1
    if word == "gpu":
        gpus = _visible_gpus()
        if not gpus:
            raise ConfigError("NPROC_PER_NODE=gpu but no GPU is visible; set a number of processes instead")
        return gpus
    return _int("NPROC_PER_NODE", value)


def _nnodes(env: Mapping[str, str]) -> tuple[int | None, int | None]:
    """(min, max) nodes from ``MIN_NNODES`` / ``MAX_NNODES`` or ``NNODES`` (``N`` or ``MIN:MAX``)."""
    low, high = _int("MIN_NNODES", env.get("MIN_NNODES")), _int("MAX_NNODES", env.get("MAX_NNODES"))
    text = (env.get("NNODES") or "").strip()
    if ":" in text:
        a, b = text.split(":", 1)
        low, high = low or _int("NNODES", a), high or _int("NNODES", b)
    elif text:
        n = _int("NNODES", text)
        low, high = low or n, high or n
    if low is not None and high is None:
        high = low
    if high is not None and low is None:
        low = high
    return low, high


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
    if env is None:  # the real process: a scheduler may have started it as one rank (see cluster_env)
        adopt_worker_env(os.environ)
        env = os.environ
    source = cluster_source(env)
    env = launch_env(env)  # PyTorchJob's PET_* or Slurm's SLURM_* completed into the LLaMA-Factory names
    default_nproc = max(_visible_gpus(), 1) if count_gpus else 1
    nproc = nproc_per_node or _nproc(env.get("NPROC_PER_NODE"), count_gpus) or default_nproc
    low, high = (nnodes, nnodes) if nnodes else _nnodes(env)
    rank = node_rank if node_rank is not None else (_int("NODE_RANK", env.get("NODE_RANK")) or 0)
    port = master_port or _int("MASTER_PORT", env.get("MASTER_PORT"))
    rdzv_id = (env.get("RDZV_ID") or "").strip() or None
    spec = LaunchSpec(
        nproc_per_node=nproc,
        nnodes=high or 1,
        node_rank=rank,
        master_addr=master_addr or env.get("MASTER_ADDR") or "127.0.0.1",
        master_port=port,
        force=env.get("FORCE_TORCHRUN", "").strip().lower() in TRUE_VALUES,
        max_restarts=max_restarts
        if max_restarts is not None
        else (_int("MAX_RESTARTS", env.get("MAX_RESTARTS")) or 0),
        min_nnodes=low if rdzv_id else None,
        rdzv_id=rdzv_id,
        rdzv_backend=(env.get("RDZV_BACKEND") or "c10d").strip(),
        rdzv_endpoint=(env.get("RDZV_ENDPOINT") or "").strip() or None,
        rdzv_conf=(env.get("RDZV_CONF") or "").strip() or None,
        source=source,
    )
    if spec.max_restarts < 0:
        raise ConfigError(f"max_restarts must be 0 or more, got {spec.max_restarts}")
    if spec.min_nnodes is not None and not 1 <= spec.min_nnodes <= spec.nnodes:
        raise ConfigError(
            f"invalid elastic node range {spec.min_nnodes}:{spec.nnodes} (MIN_NNODES:MAX_NNODES or NNODES=MIN:MAX); "
            "the minimum must be between 1 and the maximum"
        )
    if spec.elastic:  # the rendezvous hands out node ranks: NODE_RANK is not needed
        if spec.nproc_per_node < 1:
            raise ConfigError(f"nproc_per_node must be 1 or more, got {spec.nproc_per_node}")
        return spec
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


def rdzv_endpoint(spec: LaunchSpec, port: int) -> str:
    return spec.rdzv_endpoint or f"{spec.master_addr}:{port}"


def torchrun_command(spec: LaunchSpec, worker_args: Sequence[str], port: int) -> list[str]:
    """``python -m torch.distributed.run ... -m tunesmith.cli <worker_args>``. With ``max_restarts`` 0 (the
    default) the whole job stops when one rank fails; with N it is restarted up to N times. With ``rdzv_id`` the
    nodes meet in an elastic rendezvous (as LLaMA-Factory does with ``RDZV_ID``) instead of by node rank."""
    if spec.elastic:
        where = [
            f"--rdzv-backend={spec.rdzv_backend}",
            f"--rdzv-endpoint={rdzv_endpoint(spec, port)}",
            f"--rdzv-id={spec.rdzv_id}",
            *([f"--rdzv-conf={spec.rdzv_conf}"] if spec.rdzv_conf else []),
        ]
    else:
        where = [
            f"--node-rank={spec.node_rank}",
            f"--master-addr={spec.master_addr}",
            f"--master-port={port}",
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={spec.nnodes_arg}",
        f"--nproc-per-node={spec.nproc_per_node}",
        *where,
        f"--max-restarts={spec.max_restarts}",
        "-m",
        "tunesmith.cli",
        *worker_args,
    ]


def run_torchrun(spec: LaunchSpec, worker_args: Sequence[str]) -> int:
    """Run the job and return its exit code; torchrun's own output (the failure summary included) passes through.
    The node hosting the rendezvous store leaves last (:mod:`tunesmith.launch.rendezvous`)."""
    port = master_port(spec)
    with ordered_exit(spec, rdzv_endpoint(spec, port)) as launch:
        cmd = torchrun_command(launch.spec, worker_args, port)
        _announce(spec, port, cmd)
        proc = subprocess.Popen(cmd, env=dict(launch.env))
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


def _announce(spec: LaunchSpec, port: int, cmd: Sequence[str]) -> None:
    where = (
        f"one of {spec.nnodes_arg} node(s), rendezvous {spec.rdzv_id!r} at {rdzv_endpoint(spec, port)}"
        if spec.elastic
        else f"node {spec.node_rank} of {spec.nnodes} (master {spec.master_addr}:{port})"
    )
    found = {"pytorchjob-node": ", from the PyTorchJob's variables", "slurm-node": ", from Slurm's variables"}
    print(
        f"[tunesmith] launching {spec.nproc_per_node} process(es) on {where}{found.get(spec.source, '')}: "
        f"{' '.join(cmd)}",
        file=sys.stderr,
        flush=True,
    )
    if spec.source == "slurm-node" and spec.nnodes > 1 and not os.environ.get("SLURM_STEP_ID"):
        print(  # sbatch's script runs on the first node only: nobody else would ever join the rendezvous
            f"[tunesmith] note: this is not an srun task, so the job waits for {spec.nnodes} nodes that only "
            "`srun --ntasks-per-node=1 tunesmith train CONFIG` in the batch script starts",
            file=sys.stderr,
            flush=True,
        )
