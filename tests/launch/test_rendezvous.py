"""The ordered exit of a multi-node job (tunesmith.launch.rendezvous), in one process with real TCPStores: who
holds the c10d store and what torchrun is started with, the host waiting for every node to leave, and node 0's
worker of a static job waiting for the other agents at torchrun's exit barrier. The real two-node jobs are in
test_cluster_launch.py."""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist
from torch.distributed.elastic.agent.server.api import _TERMINAL_STATE_SYNC_ID
from torch.distributed.elastic.utils.store import _NUM_MEMBERS

from tunesmith.launch import rendezvous
from tunesmith.launch.rendezvous import (
    AGENT_STORE_HOST_ENV,
    conf_items,
    leave_after_other_agents,
    ordered_exit,
)
from tunesmith.launch.torchrun import launch_spec
from tunesmith.runenv import free_port


def _c10d(port: int, conf: str | None = None, job: str = "j1"):
    env = {"RDZV_ID": job, "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return launch_spec(env={**env, **({"RDZV_CONF": conf} if conf else {})}, count_gpus=False)


def _client(port: int, job: str = "j1") -> dist.Store:
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
    return dist.PrefixStore(f"tunesmith/nodes/{job}", store)


def test_rdzv_conf_items_keep_their_order():
    assert conf_items("join_timeout=900, is_host=1,read_timeout=30") == {
        "join_timeout": "900",
        "is_host": "1",
        "read_timeout": "30",
    }
    assert conf_items(None) == {} and conf_items("") == {}


def test_the_c10d_host_holds_the_store_and_starts_torchrun_as_a_client():
    port = free_port()
    spec = _c10d(port, "join_timeout=900,is_host=1")
    with ordered_exit(spec, f"127.0.0.1:{port}", env={}) as launch:
        assert launch.spec.rdzv_conf == "join_timeout=900,is_host=0"  # its torchrun connects like every node's
        assert AGENT_STORE_HOST_ENV not in launch.env
        members = _client(port)
        assert members.add("joined", 0) == 1  # this node counted itself in
    del members
    with pytest.raises(ConnectionRefusedError):  # nobody else came in: the host left at once, with its store
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_the_host_waits_until_every_node_that_came_in_has_left():
    port = free_port()
    left_at: list[float] = []
    with ordered_exit(_c10d(port), f"127.0.0.1:{port}", env={}) as launch:  # 127.0.0.1 is here: it hosts
        assert launch.spec.rdzv_conf == "is_host=0"
        other = _client(port)
        other.add("joined", 1)  # a second node's `tunesmith train` came in

        def leave_later() -> None:
            time.sleep(1.0)
            left_at.append(time.monotonic())
            other.add("left", 1)

        threading.Thread(target=leave_later, daemon=True).start()
    assert left_at and time.monotonic() >= left_at[0]  # the host left after the other node


def test_a_node_that_never_leaves_holds_the_host_only_so_long(monkeypatch, capsys):
    monkeypatch.setattr(rendezvous, "LEAVE_TIMEOUT_S", 0.5)
    port = free_port()
    start = time.monotonic()
    with ordered_exit(_c10d(port), f"127.0.0.1:{port}", env={}):
        _client(port).add("joined", 1)
    assert time.monotonic() - start < 5
    assert "1 of 2 node(s) had not left the rendezvous after 0 s" in capsys.readouterr().err


def test_the_second_node_on_a_machine_becomes_a_client():
    port = free_port()
    with ordered_exit(_c10d(port), f"127.0.0.1:{port}", env={}) as first:
        with ordered_exit(_c10d(port), f"127.0.0.1:{port}", env={}) as second:  # the port is taken: a client
            assert first.spec.rdzv_conf == second.spec.rdzv_conf == "is_host=0"
            assert _client(port).add("joined", 0) == 2
            assert _client(port).add("left", 0) == 0
        assert _client(port).add("left", 0) == 1  # the second node left; the first, the host, is still here


def test_told_to_host_on_a_taken_port_leaves_the_launch_to_torchrun():
    port = free_port()
    taken = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    spec = _c10d(port, "is_host=1")
    with ordered_exit(spec, f"127.0.0.1:{port}", env={}) as launch:
        assert launch.spec == spec  # unchanged: torchrun reports the taken port, as it always did
    del taken


def test_static_jobs_mark_node_0_only():
    env = {"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for rank, marked in (("0", True), ("1", False)):
        spec = launch_spec(env={**env, "NODE_RANK": rank}, count_gpus=False)
        with ordered_exit(spec, "127.0.0.1:29500", env={"A": "1"}) as launch:
            assert launch.spec == spec and launch.env.get("A") == "1"
            assert (launch.env.get(AGENT_STORE_HOST_ENV) == "1") is marked
    one = launch_spec(env={"NPROC_PER_NODE": "2"}, count_gpus=False)
    with ordered_exit(one, "127.0.0.1:1", env={}) as launch:
        assert AGENT_STORE_HOST_ENV not in launch.env  # one node: its agent is the only one


@pytest.fixture
def agent_store(monkeypatch):
    """A store like node 0's agent's in a static job, and the variables torchrun gives node 0's first worker."""
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    for key, value in {
        AGENT_STORE_HOST_ENV: "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "LOCAL_RANK": "0",
        "GROUP_RANK": "0",
        "GROUP_WORLD_SIZE": "3",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_RUN_ID": "none",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(rendezvous, "ARRIVAL_GRACE_S", 0.0)
    yield dist.PrefixStore("none", server)


def test_node_0s_worker_returns_once_the_other_agents_are_at_the_exit_barrier(agent_store):
    barrier = _TERMINAL_STATE_SYNC_ID + _NUM_MEMBERS  # the key torch's exit barrier counts agents on
    arrived: list[float] = []

    def two_agents_arrive() -> None:
        for _ in range(2):
            time.sleep(0.5)
            arrived.append(time.monotonic())
            agent_store.add(barrier, 1)

    threading.Thread(target=two_agents_arrive, daemon=True).start()
    leave_after_other_agents(timeout_s=10)
    assert len(arrived) == 2 and time.monotonic() >= arrived[1]
    assert agent_store.add(barrier, 0) == 2  # node 0's own agent has not arrived: it will be the last


def test_only_node_0s_first_worker_waits(agent_store, monkeypatch):
    start = time.monotonic()
    monkeypatch.setenv("LOCAL_RANK", "1")
    leave_after_other_agents(timeout_s=10)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv(AGENT_STORE_HOST_ENV)
    leave_after_other_agents(timeout_s=10)
    assert time.monotonic() - start < 2  # neither waited for agents that never arrive
    monkeypatch.setenv(AGENT_STORE_HOST_ENV, "1")
    leave_after_other_agents(timeout_s=0.5)  # bounded when they never do
    assert time.monotonic() - start < 5
