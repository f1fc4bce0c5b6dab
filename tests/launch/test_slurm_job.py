"""`tunesmith launch slurm` against a real Slurm (slurmctld + two slurmd + munged, see slurm_helpers.py): the
job trains the tiny model; `tunesmith jobs status|logs|delete` follow it. Needs root and Debian's Slurm
packages (scripts/install-slurm.sh installs them; the tests skip, saying so, where that is impossible)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_helpers import assert_clean_finish
from slurm_helpers import slurm_cluster  # noqa: F401 - the module-scoped cluster fixture

pytestmark = pytest.mark.slow


def tunesmith(*args: str, cwd: Path, env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def run_dir(tmp_path: Path, tiny_model_dir: Path, slurm_cluster) -> tuple[Path, dict[str, str]]:  # noqa: F811
    """A folder with a small dataset and a LoRA config for the tiny model; the env reaching the cluster."""
    rows = [{"instruction": f"What is {i} plus {i}?", "output": f"It is {2 * i}."} for i in range(16)]
    (tmp_path / "data.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "cfg.yaml").write_text(
        f"model_name_or_path: {tiny_model_dir}\nfinetuning_type: lora\nlora_target: all\ntemplate: chatml\n"
        "dataset: data.json\ncutoff_len: 64\noutput_dir: run\nper_device_train_batch_size: 4\nmax_steps: 4\n"
        "save_steps: 2\nlogging_steps: 1\nlearning_rate: 1.0e-3\ndevice: cpu\n",
        encoding="utf-8",
    )
    env = {
        **slurm_cluster.env,
        "TUNESMITH_SLURM_REGISTRY": str(tmp_path / "slurm_jobs.jsonl"),
        "HF_HUB_OFFLINE": "1",
    }
    return tmp_path, env


def submitted_job_id(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"submitted Slurm job (\d+)", proc.stdout)
    assert match, proc.stdout
    return match.group(1)


def assert_trained(run: Path, steps: int) -> None:
    results = json.loads((run / "train_results.json").read_text())
    assert results["global_step"] == steps and results["final_loss"] > 0, results
    logged = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged if "loss" in e] == list(range(1, steps + 1))
    assert (run / f"checkpoint-{steps}" / "adapter_model.safetensors").is_file()
    assert (run / "adapter_model.safetensors").is_file()


def test_cpu_job_trains_the_tiny_model_and_jobs_follows_it(run_dir, slurm_cluster):  # noqa: F811
    cwd, env = run_dir
    proc = tunesmith(
        "launch",
        "slurm",
        "cfg.yaml",
        "--nodes",
        "1",
        "--nproc-per-node",
        "1",
        "--time",
        "10",
        cwd=cwd,
        env=env,
    )
    job_id = submitted_job_id(proc)
    assert slurm_cluster.wait_job(job_id, timeout=300) == "COMPLETED", (
        cwd / "run" / f"slurm-{job_id}.out"
    ).read_text()

    run = cwd / "run"
    assert_trained(run, steps=4)
    # the job trained the config that launch validated and wrote next to the script
    assert (run / "slurm" / "config.yaml").is_file() and (run / "slurm" / "train.sbatch").is_file()
    assert f"train {run / 'slurm' / 'config.yaml'}" in (run / "slurm" / "train.sbatch").read_text()

    status = tunesmith("jobs", "status", job_id, cwd=cwd, env=env)
    assert status.returncode == 0, status.stderr
    assert "state: COMPLETED" in status.stdout and "exit_code: 0:0" in status.stdout, status.stdout
    # no slurmdbd here (AccountingStorageType=accounting_storage/none): the finished job comes from scontrol
    assert "source: scontrol" in status.stdout, status.stdout

    logs = tunesmith("jobs", "logs", job_id, cwd=cwd, env=env)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout == (run / f"slurm-{job_id}.out").read_text()
    assert "training finished: step 4" in logs.stdout
    assert f"tunesmith: job {job_id} on n1: 1 node(s) x 1 process(es)" in logs.stdout
    assert_clean_finish([logs.stdout])


def test_two_node_job_trains_with_ddp_across_the_nodes(run_dir, slurm_cluster):  # noqa: F811
    """Two slurmd, each in its own network namespace when the machine allows it: one task per node, torchrun
    on each, a c10d rendezvous hosted on n1, DDP (gloo) over the link between them. The job's log (both nodes'
    output) holds no traceback, stack trace or warning: n1's `tunesmith train` holds the rendezvous store until
    n2 has left."""
    cwd, env = run_dir
    proc = tunesmith("launch", "slurm", "cfg.yaml", "--nodes", "2", cwd=cwd, env=env)
    job_id = submitted_job_id(proc)
    log_path = cwd / "run" / f"slurm-{job_id}.out"
    assert slurm_cluster.wait_job(job_id, timeout=400) == "COMPLETED", log_path.read_text()[-5000:]

    log = log_path.read_text()
    assert "n[1-2]: 2 node(s) x 1 process(es)" in log
    first_addr = slurm_cluster.node_addrs["n1"]
    assert f"first host {first_addr}:" in log  # n1's NodeAddr: 10.77.X.11 in namespaces, else 127.0.0.1
    launches = [line for line in log.splitlines() if line.startswith("[tunesmith] launching 1 process(es)")]
    assert len(launches) == 2, log  # one torchrun per node, both in the job's c10d rendezvous
    assert all(f" --rdzv-backend=c10d --rdzv-endpoint={first_addr}:" in line for line in launches), launches
    assert all(f" --rdzv-id={job_id} " in line for line in launches), launches
    assert_clean_finish([log])
    assert "engine ddp on 2 rank(s)" in log and "global batch 8" in log, log
    assert_trained(cwd / "run", steps=4)
    fields = slurm_cluster.run(["scontrol", "show", "job", "-o", job_id]).stdout
    assert "NodeList=n[1-2]" in fields and "NumNodes=2" in fields


def test_held_job_is_pending_then_cancelled(run_dir, slurm_cluster):  # noqa: F811
    cwd, env = run_dir
    proc = tunesmith("launch", "slurm", "cfg.yaml", "--sbatch-arg=--hold", cwd=cwd, env=env)
    job_id = submitted_job_id(proc)
    status = tunesmith("jobs", "status", job_id, cwd=cwd, env=env)
    assert status.returncode == 0, status.stderr
    assert "state: PENDING" in status.stdout and "source: squeue" in status.stdout, status.stdout
    assert "JobHeldUser" in status.stdout  # the reason squeue gives, so the user sees why it waits

    cancel = tunesmith("jobs", "delete", job_id, cwd=cwd, env=env)
    assert cancel.returncode == 0, cancel.stderr
    assert slurm_cluster.wait_job(job_id, timeout=30) == "CANCELLED"
    logs = tunesmith("jobs", "logs", job_id, cwd=cwd, env=env)
    assert logs.returncode == 2 and "not there yet" in logs.stderr  # it never ran, so it wrote no log

    unknown = tunesmith("jobs", "status", "987654", cwd=cwd, env=env)
    assert unknown.returncode == 2 and unknown.stderr.strip().splitlines() == [
        "tunesmith: error: Slurm knows no job 987654: it is not queued, sacct has no record of it and "
        "slurmctld has forgotten it; check the id with `squeue --me` or `sacct`"
    ], unknown.stderr


def test_sbatch_refusal_is_one_sentence(run_dir, slurm_cluster):  # noqa: F811
    """A partition the cluster does not have: sbatch's own reason, as one line, exit 2."""
    cwd, env = run_dir
    proc = tunesmith("launch", "slurm", "cfg.yaml", "--partition", "nosuch", cwd=cwd, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tunesmith: error:")]
    assert len(errors) == 1 and "sbatch refused" in errors[0], proc.stderr
    assert "invalid partition specified: nosuch" in errors[0].lower(), errors
    assert "Traceback" not in proc.stderr
    assert os.environ.get("SLURM_CONF") != env["SLURM_CONF"]  # the test cluster never leaks into this process
