"""Two real `tunesmith train` processes started exactly as a scheduler starts them train one job together:
Kubeflow PyTorchJob pods (training-operator v1.7+: PET_* variables, and before: MASTER_ADDR/MASTER_PORT/RANK/
WORLD_SIZE only), Slurm tasks (SLURM_* only, one task per node), LLaMA-Factory's multi-node recipe (NNODES,
NODE_RANK) and its elastic c10d rendezvous (RDZV_ID). Each pair forms a 2-rank DDP job on 127.0.0.1 (gloo, CPU)
and must log the same losses as one process with the same global batch, within the tolerance of
tests/train/test_distributed.py (2e-5: float32 summation order; a skipped, repeated or mis-scaled sample moves
them by >= 1e-2), and finish cleanly: no node prints a traceback, a stack trace or a warning (the process holding
the rendezvous store leaves last, see tunesmith.launch.rendezvous). Two tests widen the shutdown races
to seconds (slow_agent/sitecustomize.py) so that the ordering is what they see, not luck."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cluster_helpers import (
    assert_clean_finish,
    clean_env,
    logged_losses,
    port_is_free,
    run_together,
    start_train,
    write_config,
)

from tunesmith.config import load_config
from tunesmith.launch.cluster_env import slurm_master_port
from tunesmith.runenv import free_port
from tunesmith.train import train

pytestmark = pytest.mark.slow
LOSS_TOL = 2e-5
SLOW_AGENT = Path(__file__).with_name("slow_agent")  # a sitecustomize.py that delays parts of the shutdown


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model_dir):
    """The config, and the losses of one process with the same global batch (2 ranks × 2 = 4)."""
    root = tmp_path_factory.mktemp("cluster")
    config = write_config(root, tiny_model_dir)
    reference = root / "one"
    train(load_config(config, [f"output_dir={reference}", "per_device_train_batch_size=4"]))
    return root, config, logged_losses(reference)


def _check_one_job(errs: list[str], out: Path, reference: dict[int, float]) -> str:
    both = "\n".join(errs)
    assert "engine ddp on 2 rank(s): global batch 4" in both, both[-4000:]
    assert_clean_finish(errs)
    assert both.count("training finished") == 1  # one job, rank 0 reports
    got = logged_losses(out)
    assert list(got) == [1, 2, 3, 4]
    assert max(abs(reference[s] - got[s]) for s in reference) < LOSS_TOL, (reference, got)
    return both


def test_pytorchjob_master_and_worker_pods(job):
    """training-operator v1.7+, Master ×1 + Worker ×1, nprocPerNode "1": each pod runs `tunesmith train CONFIG`,
    which starts torchrun with the pod's node rank."""
    root, config, reference = job
    out, port = root / "pytorchjob", str(free_port())
    pods = []
    for rank in (0, 1):  # the master pod is RANK 0, worker-0 is RANK 1 (envvar.go: rank = index + 1)
        env = clean_env(
            PYTHONUNBUFFERED="0",
            MASTER_ADDR="localhost",
            MASTER_PORT=port,
            WORLD_SIZE="2",
            RANK=str(rank),
            PET_NPROC_PER_NODE="1",
            PET_NODE_RANK=str(rank),
            PET_NNODES="2",
        )
        pods.append(start_train(config, env, root, f"output_dir={out}"))
    errs = run_together(pods)
    assert [p.returncode for p in pods] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    _check_one_job(errs, out, reference)
    assert "--node-rank=1" in errs[1] and "from the PyTorchJob's variables" in errs[1]


def test_pytorchjob_pods_of_an_older_operator_are_workers_themselves(job):
    """Before v1.7 a pod gets only MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK: it is one rank (no torchrun)."""
    root, config, reference = job
    out, port = root / "pytorchjob-old", str(free_port())
    pods = [
        start_train(
            config,
            clean_env(MASTER_ADDR="localhost", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank)),
            root,
            f"output_dir={out}",
        )
        for rank in (0, 1)
    ]
    errs = run_together(pods)
    assert [p.returncode for p in pods] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    both = _check_one_job(errs, out, reference)
    assert "launching" not in both


def test_slurm_tasks_one_per_node(job):
    """`srun --ntasks-per-node=1 tunesmith train CONFIG` on 2 nodes, with only Slurm's variables: the master is
    the first host of the compressed node list, the rendezvous id the job id."""
    root, config, reference = job
    out = root / "slurm"
    job_id = next(j for j in range(7000, 27000, 97) if port_is_free(slurm_master_port(str(j))))
    tasks = []
    for node in (0, 1):
        env = clean_env(
            SLURM_JOB_ID=str(job_id),
            SLURM_JOBID=str(job_id),
            SLURM_NNODES="2",
            SLURM_JOB_NUM_NODES="2",
            SLURM_NODEID=str(node),
            SLURM_PROCID=str(node),
            SLURM_LOCALID="0",
            SLURM_NTASKS="2",
            SLURM_NTASKS_PER_NODE="1",
            SLURM_STEP_ID="0",
            SLURM_JOB_NODELIST="localhost,127.0.0.[1-1]",
            SLURM_NODELIST="localhost,127.0.0.[1-1]",
            SLURMD_NODENAME=f"node{node}",
        )
        tasks.append(start_train(config, env, root, f"output_dir={out}"))
    errs = run_together(tasks)
    assert [t.returncode for t in tasks] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    both = _check_one_job(errs, out, reference)
    endpoint = f"--rdzv-endpoint=localhost:{slurm_master_port(str(job_id))}"
    assert both.count(endpoint) == 2 and both.count(f"--rdzv-id={job_id}") == 2
    assert "from Slurm's variables" in both


def test_two_invocations_meet_in_a_c10d_rendezvous(job):
    """LLaMA-Factory's elastic launch: RDZV_ID with NNODES=2, MASTER_ADDR:MASTER_PORT as the endpoint."""
    root, config, reference = job
    out, port = root / "c10d", str(free_port())
    env = clean_env(
        RDZV_ID="tunesmith-test", NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
    )
    nodes = [start_train(config, env, root, f"output_dir={out}") for _ in (0, 1)]
    errs = run_together(nodes)
    assert [n.returncode for n in nodes] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    both = _check_one_job(errs, out, reference)
    assert both.count(f"--rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:{port} --rdzv-id=tunesmith-test") == 2


def test_two_invocations_with_nnodes_2_and_node_ranks(job):
    """LLaMA-Factory's multi-node recipe: FORCE_TORCHRUN=1 NNODES=2 NODE_RANK=0/1 MASTER_ADDR MASTER_PORT, one
    process per "node"; torchrun's static rendezvous, whose store node 0's agent holds."""
    root, config, reference = job
    out, port = root / "nnodes", str(free_port())
    nodes = [
        start_train(
            config,
            clean_env(
                FORCE_TORCHRUN="1",
                NNODES="2",
                NODE_RANK=str(rank),
                NPROC_PER_NODE="1",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
            root,
            f"output_dir={out}",
        )
        for rank in (0, 1)
    ]
    errs = run_together(nodes)
    assert [n.returncode for n in nodes] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    _check_one_job(errs, out, reference)
    assert "training finished" in errs[0] and "--node-rank=1" in errs[1]  # rank 0 is on node 0


def _slowed(**delays: str) -> dict[str, str]:
    """Variables that load slow_agent/sitecustomize.py with these delays (seconds)."""
    path = os.pathsep.join(p for p in (str(SLOW_AGENT), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, **{f"TUNESMITH_TEST_DELAY_{k.upper()}_S": v for k, v in delays.items()}}


def test_the_c10d_store_outlives_an_agent_that_closes_the_rendezvous_late(job):
    """The Slurm script's layout (RDZV_CONF is_host=1 on node 0, 0 elsewhere), with node 1's agent closing the
    rendezvous 3 s after node 0's. torchrun's agent on node 0 used to hold the store and leave first: node 1 then
    printed "recvVector failed" and a C++ stack trace, then "failed to shutdown the rendezvous". Node 0's
    `tunesmith train` now holds the store and waits for node 1 to leave."""
    root, config, reference = job
    out, port = root / "c10d-slow-close", str(free_port())
    env = {"RDZV_ID": "slow-close", "NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": port}  # fmt: skip
    nodes = [
        start_train(config, clean_env(**env, RDZV_CONF="is_host=1"), root, f"output_dir={out}"),
        start_train(
            config, clean_env(**env, RDZV_CONF="is_host=0", **_slowed(close="3")), root, f"output_dir={out}"
        ),
    ]
    errs = run_together(nodes)
    assert [n.returncode for n in nodes] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    _check_one_job(errs, out, reference)
    assert errs[1].count("--rdzv-conf=is_host=0") == 1 and errs[0].count("--rdzv-conf=is_host=0") == 1


def test_node_0_arrives_last_at_the_exit_barrier_of_a_static_rendezvous(job):
    """NNODES + NODE_RANK: node 0's agent holds the store and leaves right after the exit barrier. Node 1's worker
    exits 3 s after node 0's, and an agent that arrives last at the barrier waits 3 s between waking the others and
    its own wait on the store. Node 1 used to arrive last and find the store gone ("Error waiting on exit barrier",
    a traceback); node 0's worker now waits for node 1's agent to arrive, so node 0 is last."""
    root, config, reference = job
    out, port = root / "static-slow-exit", str(free_port())
    env = {"FORCE_TORCHRUN": "1", "NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": port}  # fmt: skip
    slow = _slowed(worker_exit="3", last_wait="3")
    nodes = [
        start_train(config, clean_env(**env, NODE_RANK="0"), root, f"output_dir={out}"),
        start_train(config, clean_env(**env, NODE_RANK="1", **slow), root, f"output_dir={out}"),
    ]
    errs = run_together(nodes)
    assert [n.returncode for n in nodes] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    _check_one_job(errs, out, reference)


def test_the_deepspeed_launcher_starts_the_same_command(job):
    """`deepspeed` runs `python -u -m tunesmith.cli --local_rank=N train CONFIG` per rank with RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_ADDR and MASTER_PORT set: the argument is absorbed and the ranks join as workers."""
    import base64
    import json
    import subprocess
    import sys

    root, config, reference = job
    out = root / "deepspeed-launcher"
    hosts = base64.urlsafe_b64encode(json.dumps({"localhost": [0, 1]}).encode()).decode()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.launcher.launch",
            f"--world_info={hosts}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            "--module",
            "tunesmith.cli",
            "train",
            config,
            f"output_dir={out}",
        ],
        cwd=root,
        env=clean_env(DS_ACCELERATOR="cpu"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "--local_rank=1" in result.stdout + result.stderr  # the launcher did add it
    _check_one_job([result.stdout + result.stderr], out, reference)
