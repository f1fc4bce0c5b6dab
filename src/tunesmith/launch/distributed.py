"""The worker side of a distributed run: detect torchrun, join the process group, pick this rank's device.

torchrun (or any launcher following its convention) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; a process that sees them joins the job through ``env://``. A single process
that asks for ``engine: ddp`` / ``fsdp2`` gets a process group of one (useful to exercise those code paths and
checkpoint formats without a launcher).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from tunesmith.logging import get_logger

log = get_logger("launch")

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
DEFAULT_TIMEOUT_S = 1800  # HF TrainingArguments' ddp_timeout default


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job (all zeros and ones for a plain single process)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return all(key in env for key in TORCHRUN_ENV)


def dist_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def dist_info() -> DistInfo:
    """This process's rank and world: from the process group when there is one, else from torchrun's env."""
    if dist_initialized():
        return DistInfo(
            rank=torch.distributed.get_rank(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            world_size=torch.distributed.get_world_size(),
        )
    if launched_by_torchrun():
        return DistInfo(
            rank=int(os.environ["RANK"]),
            local_rank=int(os.environ["LOCAL_RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
    return DistInfo()


def backend_for(device: torch.device) -> str:
    """nccl on CUDA, hccl on Ascend NPU (torch_npu registers it), gloo on CPU."""
    if device.type == "cuda":
        return "nccl"
    if device.type == "npu":
        return "hccl"
    return "gloo"


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """One accelerator per process: ``cuda`` becomes ``cuda:LOCAL_RANK`` (CPU stays CPU)."""
    if device.type in ("cuda", "npu") and device.index is None:
        device = torch.device(device.type, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type == "npu":  # pragma: no cover - needs Ascend hardware
        torch.npu.set_device(device)  # type: ignore[attr-defined]
    return device


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_distributed(device: torch.device, timeout_s: int | None = None) -> DistInfo:
    """Join the job's process group (no-op when already joined). Under torchrun: ``env://``; otherwise a group of
    one on a free local port. ``timeout_s`` bounds every collective, including the barrier the other ranks wait on
    while rank 0 prepares the model, so it must cover the slowest preparation (``ddp_timeout``)."""
    if dist_initialized():
        return dist_info()
    timeout = timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
    backend = backend_for(device)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if launched_by_torchrun() and restart > 0:
        info = dist_info()
        torch.distributed.init_process_group(
            backend, store=_restart_store(restart, info.rank, info.world_size, timeout), rank=info.rank,
            world_size=info.world_size, timeout=timeout,
        )
    elif launched_by_torchrun():
        torch.distributed.init_process_group(backend, timeout=timeout)
    else:
        torch.distributed.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, timeout=timeout
        )
    info = dist_info()
    log.debug("joined process group: rank %d of %d (%s)", info.rank, info.world_size, backend)
    return info


def _restart_store(restart: int, rank: int, world_size: int, timeout: timedelta) -> torch.distributed.Store:
    """The rendezvous store of a job torchrun restarted (``--max-restarts``), under a prefix of its own.

    With torchrun's default (static) rendezvous the agent keeps one store across restarts and env:// adds no
    prefix per attempt, so the restarted ranks could read the dead ranks' gloo/nccl addresses and fail to connect
    (a race, seen on CPU about one restart in three). A per-attempt prefix, as torch's own code intends, avoids it.
    """
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # the agent hosts the store
        store = torch.distributed.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    else:
        store = torch.distributed.TCPStore(
            host, port, world_size, is_master=rank == 0, timeout=timeout, multi_tenant=True
        )
    return torch.distributed.PrefixStore(f"/tunesmith/attempt_{restart}", store)


def shutdown_distributed() -> None:
    """Leave the job in step: a rank tearing gloo down while another still talks to it can abort the process."""
    if dist_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if dist_initialized():
        torch.distributed.barrier()


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. converting a model into the shared cache), the others after it.

    The cache writes are atomic (temp folder + rename), so this is about doing the work once, not correctness.
    When rank 0 fails inside the block it skips the barrier and exits; torchrun then stops the waiting ranks.
    """
    info = dist_info()
    if dist_initialized() and not info.is_main:
        barrier()
    yield
    if dist_initialized() and info.is_main:
        barrier()
