"""A rank of a multi-rank job ends through ``end_process``: with its exit code and all its output, and without
interpreter teardown (torch keeps the gloo group's threads alive past ``destroy_process_group`` once DDP has
wrapped a model, which is what the worker below does)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tunesmith.runenv import free_port
from tunesmith.train.distributed import end_process

WORKER = textwrap.dedent(
    """
    import atexit, os, sys, torch
    from tunesmith.train.distributed import end_process, init_distributed, shutdown_distributed
    info = init_distributed(torch.device("cpu"))
    torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))  # leaves the group's threads running
    atexit.register(lambda: print("teardown ran", file=sys.stderr))
    shutdown_distributed()
    sys.stdout.write(f"rank {info.rank} done, no newline")  # still buffered when the process ends
    end_process(3 + info.rank)
    print("not reached")
    """
)


def test_a_single_process_gets_its_code_back():
    assert end_process(5) == 5


@pytest.mark.slow
def test_a_rank_that_left_a_two_rank_job_exits_with_its_code_and_flushed_output(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1")
    logs = tmp_path / "logs"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
         "--log-dir", str(logs), "--tee", "3", str(script)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode != 0  # torchrun reports the non-zero codes of its ranks
    out = result.stdout + result.stderr
    assert "rank 0 done, no newline" in out and "rank 1 done, no newline" in out
    assert "exitcode  : 3" in out or "exitcode  : 4" in out
    assert "not reached" not in out and "teardown ran" not in out
