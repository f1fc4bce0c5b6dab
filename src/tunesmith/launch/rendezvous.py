"""Leaving a multi-node job in order: whoever hosts the rendezvous store leaves last.

torchrun's agents, one per node, meet through a TCPStore that one process hosts. When a job has succeeded each
agent waits for the others in an exit barrier on that store, and with the c10d rendezvous it then closes the
rendezvous on it (and sends keep-alive heartbeats until it does). The agent that hosts the store leaves as soon as
it is through, and its store goes with it: an agent a moment behind then fails its next store call, and a job that
succeeded ends with ``TCPStore recvVector failed ... Connection was likely closed`` and a C++ stack trace, ``has
failed to shutdown the rendezvous``, or ``Error waiting on exit barrier`` and a Python traceback on that node.

- **c10d** (``RDZV_ID``: Slurm jobs, elastic PyTorchJobs, LLaMA-Factory's elastic launch). The ``tunesmith
  train`` process of the node that would host the store (``is_host`` in ``RDZV_CONF``, else the node whose name or
  address is the endpoint's, as torchrun decides) hosts it itself, and starts its torchrun with ``is_host=0`` like
  every other node. Each node's ``tunesmith train`` counts itself in on the store before it starts torchrun and out
  after torchrun has exited; the host's waits, bounded, until every node that came in has gone, then exits and
  takes the store with it. No agent ever outlives the store it talks to.
- **static** (``NNODES`` with ``NODE_RANK``: PyTorchJob master and workers, LLaMA-Factory's multi-node recipe).
  Node 0's agent hosts the store itself (its static rendezvous binds the port; nothing else can) and leaves right
  after the exit barrier. The only calls the others make after arriving there are the barrier's own (add, then
  wait), so node 0's agent must arrive last: ``tunesmith train`` marks node 0's torchrun
  (:data:`AGENT_STORE_HOST_ENV`), and there the worker with local rank 0 ends by waiting, bounded, until every
  other node's agent has arrived at the exit barrier (:func:`leave_after_other_agents`). Node 0's agent can only
  arrive after that worker has exited and it has noticed (its monitor interval), so the others have long been
  waiting in the barrier when it wakes them and leaves.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from tunesmith.logging import get_logger

if TYPE_CHECKING:
    from tunesmith.launch.torchrun import LaunchSpec

log = get_logger("launch")

LEAVE_TIMEOUT_S = 60.0  # how long the store's host waits for the other nodes to leave (a failed job: no longer)
ARRIVAL_GRACE_S = 1.0  # after the last other agent arrived at the exit barrier: time for its wait call to land
POLL_S = 0.05
C10D_DEFAULT_PORT = 29400  # torchrun's, for an endpoint without a port
READ_TIMEOUT_S = 60  # torchrun's c10d default (rdzv-conf read_timeout): how long a node waits for the store
AGENT_STORE_HOST_ENV = "TUNESMITH_AGENT_STORE_HOST"  # set for node 0's torchrun in a static multi-node job
_TRUE = ("1", "true", "t", "yes", "y")
_FALSE = ("0", "false", "f", "no", "n")


@dataclass(frozen=True)
class Launch:
    """What torchrun is started with: the launch (its rendezvous conf may say ``is_host=0`` now) and its env."""

    spec: LaunchSpec
    env: Mapping[str, str]


def conf_items(conf: str | None) -> dict[str, str]:
    """``key=value,key=value`` (torchrun's ``--rdzv-conf``) as an ordered dict."""
    items: dict[str, str] = {}
    for part in (conf or "").split(","):
        key, _, value = part.partition("=")
        if key.strip():
            items[key.strip()] = value.strip()
    return items


def _explicit_host(conf: Mapping[str, str]) -> bool | None:
    value = conf.get("is_host", "").lower()
    return True if value in _TRUE else False if value in _FALSE else None


def _endpoint_is_here(host: str) -> bool:
    """torchrun's own test (its hostname or one of its addresses is the endpoint's host)."""
    try:
        from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname
    except ImportError:  # another torch: then torchrun decides alone, as it always did
        return False
    return bool(_matches_machine_hostname(host))


def _tcp_store(host: str, port: int, hosting: bool, timeout_s: float) -> Any:
    import torch.distributed as dist

    return dist.TCPStore(
        host, port, is_master=hosting, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
    )


@dataclass
class _Membership:
    """This node's `tunesmith train` on the rendezvous store: counted in, counted out."""

    store: Any  # torch.distributed.PrefixStore
    hosting: bool

    def leave(self) -> None:
        try:
            self.store.add("left", 1)
            if self.hosting:
                self._wait_for_the_others()
        except Exception as err:  # noqa: BLE001 - the host is gone (a failed job): nothing left to tell
            log.debug("could not report leaving the rendezvous: %s", err)

    def _wait_for_the_others(self) -> None:
        deadline = time.monotonic() + LEAVE_TIMEOUT_S
        while (left := self.store.add("left", 0)) < (joined := self.store.add("joined", 0)):
            if time.monotonic() > deadline:
                print(
                    f"[tunesmith] note: {joined - left} of {joined} node(s) had not left the rendezvous after "
                    f"{LEAVE_TIMEOUT_S:.0f} s; closing its store",
                    file=sys.stderr,
                    flush=True,
                )
                return
            time.sleep(POLL_S)


def _join(spec: LaunchSpec, endpoint: str) -> _Membership | None:
    """Host the c10d store here when this node would, else connect to it; count this node in. None: leave the
    launch as it was (the store cannot be reached or hosted here; torchrun reports that itself)."""
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    conf = conf_items(spec.rdzv_conf)
    try:
        host, port = parse_rendezvous_endpoint(endpoint, default_port=C10D_DEFAULT_PORT)
        timeout = float(conf.get("read_timeout") or READ_TIMEOUT_S)
    except ValueError:  # torchrun names what is wrong with them
        return None
    explicit = _explicit_host(conf)
    if explicit is None:  # as torchrun decides: host when the endpoint is this machine and the port is free
        candidates = [True, False] if _endpoint_is_here(host) else [False]
    else:  # told to host: a taken port stays torchrun's error to report, as before
        candidates = [explicit]
    for hosting in candidates:
        try:
            store = _tcp_store(host, port, hosting, timeout)
        except (RuntimeError, ValueError, TimeoutError) as err:  # DistNetworkError, DistStoreError
            log.debug("rendezvous store at %s:%d (%s): %s", host, port, "host" if hosting else "client", err)
            continue
        members = dist.PrefixStore(f"tunesmith/nodes/{spec.rdzv_id}", store)
        members.add("joined", 1)
        log.debug("%s the rendezvous store at %s:%d", "hosting" if hosting else "joined", host, port)
        return _Membership(members, hosting)
    return None


@contextmanager
def ordered_exit(spec: LaunchSpec, endpoint: str, env: Mapping[str, str] | None = None) -> Iterator[Launch]:
    """Around running torchrun for ``spec``: what to start it with, and the ordered leave afterwards."""
    env = dict(os.environ if env is None else env)
    if spec.elastic and spec.rdzv_backend == "c10d":
        member = _join(spec, endpoint)
        if member is None:
            yield Launch(spec, env)
            return
        conf = {**conf_items(spec.rdzv_conf), "is_host": "0"}  # the store is ours; every agent is a client
        try:
            yield Launch(replace(spec, rdzv_conf=",".join(f"{k}={v}" for k, v in conf.items())), env)
        finally:
            member.leave()
        return
    if not spec.elastic and spec.nnodes > 1 and spec.node_rank == 0:
        env[AGENT_STORE_HOST_ENV] = "1"
    yield Launch(spec, env)


def leave_after_other_agents(timeout_s: float = LEAVE_TIMEOUT_S) -> None:
    """Worker side of a static multi-node job: on node 0, local rank 0 returns once every other node's agent has
    arrived at torchrun's exit barrier (bounded), so that node 0's agent, which hosts the store, arrives last."""
    env = os.environ
    if env.get(AGENT_STORE_HOST_ENV) != "1" or env.get("LOCAL_RANK", "0") != "0":
        return
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or env.get("GROUP_RANK", "0") != "0":
        return
    others = int(env.get("GROUP_WORLD_SIZE", "1") or 1) - 1
    if others < 1:
        return
    try:  # the agents' barrier counter, named by the installed torch itself
        import torch.distributed as dist
        from torch.distributed.elastic.agent.server.api import _TERMINAL_STATE_SYNC_ID
        from torch.distributed.elastic.utils.store import _NUM_MEMBERS

        raw = _tcp_store(env["MASTER_ADDR"], int(env["MASTER_PORT"]), False, timeout_s)
        store = dist.PrefixStore(env.get("TORCHELASTIC_RUN_ID", "none"), raw)
        key = _TERMINAL_STATE_SYNC_ID + _NUM_MEMBERS
        deadline = time.monotonic() + timeout_s
        while store.add(key, 0) < others:
            if time.monotonic() > deadline:
                log.debug("%d other node(s) did not reach the exit barrier within %.0f s", others, timeout_s)
                return
            time.sleep(POLL_S)
    except Exception as err:  # noqa: BLE001 - ordering the exit is a courtesy; never fail a finished job on it
        log.debug("could not wait for the other nodes' agents: %s", err)
        return
    time.sleep(ARRIVAL_GRACE_S)
