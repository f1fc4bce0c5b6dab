"""The worker side of a distributed run: detect torchrun, join the process group, pick this rank's device.

torchrun (or any launcher following its convention) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; a process that sees them joins the job through ``env://``. A single process
that asks for ``engine: ddp`` / ``fsdp2`` gets a process group of one (useful to exercise those code paths and
checkpoint formats without a launcher).
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from tunesmith.config import Config
from tunesmith.data import PreparedData, prepare_datasets
from tunesmith.data.cache import cache_location
from tunesmith.errors import TunesmithError
from tunesmith.logging import get_logger
from tunesmith.runenv import launched_by_torchrun

log = get_logger("train")

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
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
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


def _indexed(device: torch.device) -> torch.device:
    return device if device.index is not None else torch.device(device.type, torch.cuda.current_device())


def init_distributed(device: torch.device, timeout_s: int | None = None) -> DistInfo:
    """Join the job's process group (no-op when already joined). Under torchrun: ``env://``; otherwise a group of
    one on a free local port. ``timeout_s`` bounds every collective, including the barrier the other ranks wait on
    while rank 0 prepares the model, so it must cover the slowest preparation (``ddp_timeout``)."""
    if dist_initialized():
        return dist_info()
    timeout = timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
    backend = backend_for(device)
    # NCCL binds this rank's GPU up front (otherwise every barrier warns that it guesses "the device under
    # current context"); gloo and hccl take the device from the tensors.
    bound = {"device_id": _indexed(device)} if device.type == "cuda" else {}
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if launched_by_torchrun() and restart > 0:
        info = dist_info()
        torch.distributed.init_process_group(
            backend,
            store=_restart_store(restart, info.rank, info.world_size, timeout),
            rank=info.rank,
            world_size=info.world_size,
            timeout=timeout,
            **bound,
        )
    elif launched_by_torchrun():
        torch.distributed.init_process_group(backend, timeout=timeout, **bound)
    else:
        # a group of one meets in an in-process store: no port to pick, none that another run could take first
        torch.distributed.init_process_group(
            backend, store=torch.distributed.HashStore(), rank=0, world_size=1, timeout=timeout, **bound
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


_left_a_group = False  # set once this process has left a process group of more than one rank


def shutdown_distributed() -> None:
    """Leave the job in step: a rank tearing gloo down while another still talks to it can abort the process."""
    global _left_a_group
    if dist_initialized():
        _left_a_group = _left_a_group or torch.distributed.get_world_size() > 1
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def end_process(code: int) -> int:
    """Return ``code``; a rank that has left a multi-rank job instead exits here, skipping interpreter teardown.

    Why: once DDP or FSDP2 has wrapped a model, torch keeps the gloo process group alive past
    ``destroy_process_group`` (its worker threads still run; measured with torch 2.13), so they are still running
    while Python finalises and C++ static objects are destroyed at exit. A CI run saw a rank die there with
    SIGABRT ("terminate called without an active exception") after a complete, saved run, which failed the
    job. Everything is written and closed by now, so the output is flushed and the process ends at once.
    """
    if not _left_a_group:
        return code
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    os._exit(code)


def barrier() -> None:
    if dist_initialized():
        torch.distributed.barrier()


@dataclass(frozen=True)
class Collectives:
    """The collectives the loop and the engines use, for this rank of a ``world_size`` job; with one rank each is
    a no-op that returns its input, so the same code runs with and without a process group."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # where the backend sends from (nccl: the GPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Sums over ranks, in float64 (so target counts stay exact)."""
        if self.world_size == 1:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def all_gather_object(self, value: Any) -> list[Any]:
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def join_process_group(device: torch.device, timeout_s: int | None = None) -> Collectives:
    """:func:`init_distributed`, as the :class:`Collectives` of this rank."""
    info = init_distributed(device, timeout_s)
    comm_device = torch.device("cpu") if device.type == "cpu" else device
    return Collectives(rank=info.rank, world_size=info.world_size, device=comm_device)


# ------------------------------------------------------------------------------ one rank first, the others wait

WAIT_POLL_S = 0.5
WAIT_LOG_S = 30.0
ERROR_ACK_S = 10.0  # how long a failed leader waits for its followers to read its error before it exits
# every rank calls main_process_first in the same order (never under a rank condition): same keys everywhere
_first_calls = itertools.count()


def _store() -> Any:
    return torch.distributed.distributed_c10d._get_default_store()


def _leaders(rank: int, local_rank: int, world_size: int) -> tuple[int, int]:
    """(this node's leader, how many ranks wait on this rank when it leads). The job's leader is rank 0; each
    other node's leader is its local rank 0, which waits for rank 0 first."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    if not 0 < local_world <= world_size or local_rank >= local_world:  # unknown layout: rank 0 leads alone
        return 0, (world_size - 1 if rank == 0 else 0)
    node_leader = rank - local_rank
    if rank == 0:
        return 0, (local_world - 1) + (world_size // local_world - 1)
    return node_leader, (local_world - 1 if rank == node_leader else 0)


def _wait_for(store: Any, key: str, leader: int, what: str, log_every_s: float, loud: bool) -> None:
    """Poll the store (no collective, so no process-group timeout) until ``leader`` marks ``key`` done or
    failed; log a line every ``log_every_s`` seconds from one waiting rank per leader."""
    start = last = time.monotonic()
    while True:
        try:
            if store.check([f"{key}/error"]):
                message = store.get(f"{key}/error").decode(errors="replace")
                store.add(f"{key}/ack", 1)
                raise TunesmithError(f"rank {leader} failed while {what}: {message}")
            if store.check([f"{key}/done"]):
                return
        except TunesmithError:
            raise
        except Exception as err:  # noqa: BLE001 - the store went away with the process hosting it
            raise TunesmithError(
                f"lost contact with rank {leader} while it was {what} ({err}); its log names the cause"
            ) from None
        now = time.monotonic()
        if loud and now - last >= log_every_s:
            last = now
            log.warning("waiting for rank %d to finish %s (%d s)", leader, what, now - start)
        time.sleep(WAIT_POLL_S)


def _signal_error(store: Any, key: str, err: BaseException, followers: int) -> None:
    """Tell the waiting ranks why this one failed, and give them a moment to read it (when this rank hosts the
    store, e.g. without torchrun, its exit would otherwise take the message with it)."""
    try:
        store.set(
            f"{key}/error",
            f"{type(err).__name__}: {err}" if not isinstance(err, TunesmithError) else str(err),
        )
        deadline = time.monotonic() + ERROR_ACK_S
        while followers and store.add(f"{key}/ack", 0) < followers and time.monotonic() < deadline:
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - the original error matters more than a failed report of it
        pass


@contextmanager
def main_process_first(
    what: str = "preparing", enabled: bool = True, log_every_s: float = WAIT_LOG_S
) -> Iterator[bool]:
    """Rank 0 runs the block first (preprocessing the data into the cache, converting a model into the cache),
    then each other node's local rank 0, then everyone else; the block's work is cached on disk, so the later
    ranks find it done (on a shared filesystem the whole job does it once; on node-local disks once per node).
    Yields whether this rank leads (runs before the others).

    The waiting ranks poll the rendezvous store instead of entering a barrier, so however long the leader takes,
    no collective times out (``ddp_timeout`` bounds collectives only); one of them logs
    ``waiting for rank 0 to finish <what> (N s)`` every ``log_every_s`` seconds. When the leader fails, its
    error goes to the store and the waiting ranks stop at once with ``rank 0 failed while <what>: <error>``
    (torchrun stops them too, at the leader's exit). With ``enabled`` False (e.g. the data cache is off) every
    rank runs the block at once: there is nothing to share.
    """
    if not (enabled and dist_initialized() and torch.distributed.get_world_size() > 1):
        yield True
        return
    info = dist_info()
    store = _store()
    key = f"tunesmith/first/{next(_first_calls)}"
    node_leader, followers = _leaders(info.rank, info.local_rank, info.world_size)
    leads = info.rank in (0, node_leader)
    if info.rank != 0:
        # a node leader waits for rank 0; the others for their node's leader (rank 0's node: rank 0)
        waits_on = 0 if leads else node_leader
        loud = info.rank == waits_on + 1 or (leads and info.rank == node_leader)
        try:
            _wait_for(store, f"{key}/{waits_on}", waits_on, what, log_every_s, loud)
        except BaseException as err:
            if leads:  # this node's ranks wait on us: pass the failure on
                _signal_error(store, f"{key}/{info.rank}", err, followers)
            raise
    elif followers:
        log.debug("rank 0 is %s; the other ranks wait for it (without a timeout), then read its result", what)
    try:
        yield leads
    except BaseException as err:
        if leads:
            _signal_error(store, f"{key}/{info.rank}", err, followers)
        raise
    if leads:
        store.set(f"{key}/{info.rank}/done", "1")


def data_cache_enabled(cfg: Config) -> bool:
    """Whether preprocessed samples are shared through a cache (``tokenized_path`` or the automatic one)."""
    if cfg.streaming:  # a stream is read while training and never cached
        return False
    return cache_location(cfg, "0" * 64) is not None


def prepare_datasets_once(cfg: Config, tokenizer: Any, log_every_s: float = WAIT_LOG_S) -> PreparedData:
    """``tunesmith.data.prepare_datasets`` run by rank 0 (then once per other node), the other ranks loading its
    cache afterwards; see :func:`main_process_first`. Without a cache every rank preprocesses, as before."""
    with main_process_first(
        "preprocessing the data", enabled=data_cache_enabled(cfg), log_every_s=log_every_s
    ) as leads:
        if not leads and cfg.overwrite_cache:
            cfg = cfg.model_copy(update={"overwrite_cache": False})  # rebuilt once by the leader, read here
        return prepare_datasets(cfg, tokenizer)
