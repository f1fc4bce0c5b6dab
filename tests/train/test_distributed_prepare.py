"""Preprocessing happens once: rank 0 encodes the data into the cache while the other ranks wait on the store
(no collective, so no ddp_timeout), then read the cache; a failure on rank 0 stops the others at once with rank
0's error; without a cache every rank preprocesses itself. Real processes (torchrun, and plain env:// workers as
in a PyTorchJob pod of an older operator, where rank 0 hosts the store), gloo on CPU, the tiny model's tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_helpers import clean_env, write_config

from tunesmith.runenv import free_port
from tunesmith.train.distributed import _leaders

WORKER = Path(__file__).with_name("prepare_once_worker.py")
DELAY_S = 8  # rank 0's extra preprocessing time: well past the workers' 3 s collective timeout


def _torchrun(config: str, out: Path, delay: float, mode: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=2",
            f"--master-port={free_port()}",
            str(WORKER),
            config,
            str(out),
            str(delay),
            mode,
        ],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=180,
    )


def _results(out: Path, ranks: int = 2) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


@pytest.mark.slow
def test_rank_0_preprocesses_while_the_others_wait_past_the_collective_timeout(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    result = _torchrun(config, tmp_path, DELAY_S, "ok")
    assert result.returncode == 0, result.stderr[-4000:]
    zero, one = _results(tmp_path)
    assert (zero["preprocessed"], one["preprocessed"]) == (1, 0)  # rank 1 read rank 0's cache
    assert zero["train"] == one["train"] > 0 and zero["first_ids"] == one["first_ids"]
    assert one["waited_s"] >= DELAY_S - 1  # it really waited that long, longer than the 3 s timeout
    assert zero["gathered"] == one["gathered"]  # and the collective afterwards worked
    assert "waiting for rank 0 to finish preprocessing the data (" in result.stderr
    assert list((tmp_path / "cache" / "datasets").iterdir())  # the cache rank 1 read


@pytest.mark.slow
def test_without_the_cache_every_rank_preprocesses(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    result = _torchrun(config, tmp_path, 0, "ok", TUNESMITH_DATA_CACHE="0")
    assert result.returncode == 0, result.stderr[-4000:]
    zero, one = _results(tmp_path)
    assert (zero["preprocessed"], one["preprocessed"]) == (1, 1)
    assert zero["first_ids"] == one["first_ids"]
    assert not (tmp_path / "cache" / "datasets").exists()


@pytest.mark.slow
def test_a_failure_on_rank_0_stops_the_waiting_rank_with_its_error(tmp_path, tiny_model_dir):
    """Two plain env:// workers (rank 0 hosts the store and exits on its error): rank 1 must still report it."""
    config = write_config(tmp_path, tiny_model_dir)
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), config, str(tmp_path), "2", "fail"],
            env=clean_env(
                RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        errs = [procs[0].communicate(timeout=120)[1]]
        failed_at = time.monotonic()
        errs.append(procs[1].communicate(timeout=60)[1])
        stopped_after = time.monotonic() - failed_at
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [p.returncode for p in procs] == [2, 2], errs
    assert "identity.json row 3 has no 'output' (test)" in errs[0]
    assert (
        "tunesmith: error (rank 1): rank 0 failed while preprocessing the data: identity.json row 3 has no "
        "'output' (test)" in errs[1]
    )
    assert stopped_after < 10


def test_who_leads_and_who_waits(monkeypatch):
    """Rank 0 leads the job; on other nodes local rank 0 leads (after rank 0); the rest follow their node."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 2 nodes × 4 ranks
    assert _leaders(0, 0, 8) == (0, 3 + 1)  # rank 0's node-mates and node 1's leader wait on rank 0
    assert _leaders(3, 3, 8) == (0, 0)
    assert _leaders(4, 0, 8) == (4, 3)
    assert _leaders(6, 2, 8) == (4, 0)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # unknown layout (e.g. plain env:// workers): rank 0 leads alone
    assert _leaders(0, 0, 8) == (0, 7) and _leaders(5, 0, 8) == (0, 0)


@pytest.mark.slow
@pytest.mark.parametrize("disks, expected", [("shared", [1, 0, 0, 0]), ("local", [1, 0, 1, 0])])
def test_on_two_nodes_the_job_or_each_node_preprocesses_once(tmp_path, tiny_model_dir, disks, expected):
    """2 nodes × 2 ranks. On a shared filesystem only rank 0 preprocesses; with a cache folder per node
    (node-local disks) node 1's local rank 0 waits for rank 0, misses the cache and preprocesses for its node.
    Ranks 1 and 3 read their node's cache."""
    config = write_config(tmp_path, tiny_model_dir, cache_dir=None)
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node-rank={node}",
                "--nproc-per-node=2",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                str(WORKER),
                config,
                str(tmp_path),
                "2",
                "ok",
                "120",
            ],
            env=clean_env(TUNESMITH_CACHE=str(tmp_path / ("disk0" if disks == "shared" else f"disk{node}"))),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    try:
        errs = [node.communicate(timeout=180)[1] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    assert [n.returncode for n in nodes] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    results = _results(tmp_path, ranks=4)
    assert [r["preprocessed"] for r in results] == expected
    assert len({tuple(r["first_ids"]) for r in results}) == 1
    assert (tmp_path / "disk1").exists() == (disks == "local")
