"""Running the multi-process test workers (sp_worker.py, tp_worker.py, pp_worker.py) under torchrun on CPU, and
reading what their runs wrote: shared by the sequence, tensor and pipeline parallel tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from tunesmith.runenv import free_port
from tunesmith.train.observe import read_log


def worker_env(worker: Path) -> dict[str, str]:
    """This environment without a parent torchrun's rank variables, offline, one thread per rank, and the worker's
    folder on the path (the workers import the test helpers)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(worker.parent), env.get("PYTHONPATH", "")]))
    return env


def run_worker(worker: Path, *args: str, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """``worker`` with ``args``, alone or under torchrun with ``nproc`` processes on a free port."""
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                                      f"--master-port={free_port()}"]
    return subprocess.run([sys.executable, *launcher, str(worker), *args], capture_output=True, text=True,
                          env=worker_env(worker), timeout=timeout)


def logged(out: Path, key: str = "loss") -> dict[int, float]:
    """step → ``key`` from a run's trainer_log.jsonl."""
    return {e["step"]: e[key] for e in read_log(out) if key in e}


def weights_diff(a: Path, b: Path, name: str = "model.safetensors") -> float:
    """The largest absolute difference between two runs' saved weights (the same tensors in both)."""
    wa, wb = load_file(a / name), load_file(b / name)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)
