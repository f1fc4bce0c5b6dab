"""Helpers for the launch tests (a uniquely named module): a tiny training config, a clean environment, two
`tunesmith train` processes started the way a scheduler starts them, and what a clean finish never prints."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROWS = [
    {"instruction": "Who are you?", "input": "", "output": "I am Ada, an AI assistant made by Lab."},
    {"instruction": "What is your name?", "input": "", "output": "My name is Ada."},
    {
        "instruction": "What is the capital of France?",
        "input": "",
        "output": "The capital of France is Paris.",
    },
    {"instruction": "Translate to French: good morning.", "input": "", "output": "Bonjour."},
] * 4
# everything a scheduler or launcher sets that would change how a process joins a job
SCHEDULER_PREFIXES = ("SLURM_", "PET_", "TORCHELASTIC_")
SCHEDULER_NAMES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NNODES",
    "NODE_RANK",
    "NPROC_PER_NODE",
    "FORCE_TORCHRUN",
    "RDZV_ID",
    "RDZV_BACKEND",
    "RDZV_ENDPOINT",
    "MIN_NNODES",
    "MAX_NNODES",
    "MAX_RESTARTS",
    "GROUP_RANK",
)


def write_config(root: Path, model_dir: Path, **extra) -> str:
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "identity.json").write_text(json.dumps(ROWS), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"identity": {"file_name": "identity.json"}}))
    values = {
        "model_name_or_path": str(model_dir),
        "template": "chatml",
        "dataset": "identity",
        "dataset_dir": str(data),
        "cutoff_len": 64,
        "output_dir": str(root / "run"),
        "finetuning_type": "full",
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "max_steps": 4,
        "save_steps": 100,
        "device": "cpu",
        "seed": 3,
        "cache_dir": str(root / "cache"),
        **extra,
    }
    path = root / "train.yaml"
    path.write_text(json.dumps(values), encoding="utf-8")  # JSON is YAML
    return str(path)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any scheduler's variables, plus ``extra`` (exactly what the scheduler sets)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in SCHEDULER_NAMES and not k.startswith(SCHEDULER_PREFIXES)
    }
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_train(config: str, env: dict[str, str], cwd: Path, *args: str) -> subprocess.Popen:
    """`tunesmith train CONFIG ARGS` as a node of a job; its stdout and stderr go into one pipe."""
    return subprocess.Popen(
        [sys.executable, "-m", "tunesmith.cli", "train", config, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_together(procs: list[subprocess.Popen], timeout: float = 120) -> list[str]:
    """Wait for every process; kill the rest when one hangs. Returns their output (stdout and stderr)."""
    try:
        return [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def logged_losses(run_dir: Path) -> dict[int, float]:
    from tunesmith.train.observe import read_log

    return {e["step"]: e["loss"] for e in read_log(run_dir) if "loss" in e}


# What a job that succeeded never prints, on any node: a Python traceback, a C++ stack trace (c10d's "Exception
# raised from ... frame #N"), a store connection lost ("recvVector failed"), a rendezvous left badly ("failed to
# shutdown the rendezvous", "Error waiting on exit barrier"), a log line of torch's C++ or Python loggers at
# warning level or above ("[W1202 16:15:50.034 socket.cpp:207] ...", "W1202 16:16:21.182000 13737 ..."), a Python
# warning ("FutureWarning: ...") or a logged WARNING.
UNCLEAN = re.compile(
    r"Traceback|Exception raised from|frame #\d+: |recvVector|failed to shutdown|exit barrier|"
    r"(?<!\w)\[?[WEF]\d{4} \d\d:\d\d:\d\d|\w+Warning: |\bWARNING\b"
)


def unclean_lines(output: str) -> list[str]:
    """The lines of a node's output that a clean, successful finish never prints."""
    return [line for line in output.splitlines() if UNCLEAN.search(line)]


def assert_clean_finish(outputs: list[str]) -> None:
    """Every node's output is free of tracebacks, stack traces and warnings."""
    for node, output in enumerate(outputs):
        found = unclean_lines(output)
        assert not found, f"node {node} printed:\n" + "\n".join(found[:20]) + "\n--- its output:\n" + output[-6000:]
