"""The scheduler's own variables become the launch: Kubeflow PyTorchJob pods (training-operator v1: PET_* since
v1.7, elastic PET_RDZV_*, only MASTER_*/RANK/WORLD_SIZE before), Slurm tasks (SLURM_*, the compressed node list),
and the `--local_rank=N` that the deepspeed launcher adds to the arguments. Explicit LLaMA-Factory variables and
flags win over what is derived."""

from __future__ import annotations

import pytest

from tunesmith.errors import ConfigError
from tunesmith.launch.cluster_env import (
    adopt_worker_env,
    cluster_source,
    expand_nodelist,
    slurm_master_port,
    strip_launcher_args,
)
from tunesmith.launch.torchrun import launch_spec, should_launch, torchrun_command

# exactly what training-operator v1.7+ puts into the pods of a PyTorchJob with Master ×1, Worker ×2,
# nprocPerNode "4" (pkg/controller.v1/pytorch/envvar.go: WORLD_SIZE = replicas × nprocPerNode, RANK = index + 1)
OPERATOR = {
    "PYTHONUNBUFFERED": "0",
    "MASTER_PORT": "23456",
    "MASTER_ADDR": "train-master-0",
    "WORLD_SIZE": "12",
    "PET_NPROC_PER_NODE": "4",
    "PET_NNODES": "3",
}
WORKER_1 = {**OPERATOR, "RANK": "2", "PET_NODE_RANK": "2"}


def test_nodelist_expands_like_scontrol_show_hostnames():
    assert expand_nodelist("node[01-03,07],gpu5") == ["node01", "node02", "node03", "node07", "gpu5"]
    assert expand_nodelist("gpu5") == ["gpu5"]
    assert expand_nodelist("rack[1-2]-n[9-10]") == ["rack1-n9", "rack1-n10", "rack2-n9", "rack2-n10"]
    assert expand_nodelist("a[008-010]")[0] == "a008"
    for bad in ("node[01-03", "node[3-1]", "node[a-b]", ""):
        with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
            expand_nodelist(bad)


def test_a_pytorchjob_pod_with_nproc_per_node_runs_torchrun_as_its_node():
    spec = launch_spec(env=WORKER_1, count_gpus=False)
    assert should_launch(spec, WORKER_1) and spec.source == "pytorchjob-node"
    cmd = torchrun_command(spec, ["train", "/config/train.yaml"], port=spec.master_port)
    assert cmd[3:8] == [
        "--nnodes=3",
        "--nproc-per-node=4",
        "--node-rank=2",
        "--master-addr=train-master-0",
        "--master-port=23456",
    ]
    # the master pod is node 0; nprocPerNode "auto" (the operator's default) is one process per GPU, 1 without
    master = launch_spec(
        env={**OPERATOR, "RANK": "0", "PET_NODE_RANK": "0", "PET_NPROC_PER_NODE": "auto"}, count_gpus=False
    )
    assert (master.node_rank, master.nproc_per_node, master.nnodes) == (0, 1, 3)
    # flags and explicit LLaMA-Factory variables win
    assert launch_spec(nproc_per_node=2, env={**WORKER_1, "NNODES": "5"}, count_gpus=False).nnodes == 5
    assert launch_spec(nproc_per_node=2, env=WORKER_1, count_gpus=False).nproc_per_node == 2


def test_an_elastic_pytorchjob_pod_joins_the_c10d_rendezvous():
    env = {
        "PET_RDZV_ENDPOINT": "train-worker-0:23456",
        "PET_RDZV_BACKEND": "c10d",
        "PET_NNODES": "1:3",
        "PET_NPROC_PER_NODE": "2",
        "PET_RDZV_ID": "job-7",
        "PET_MAX_RESTARTS": "3",
        "PET_RDZV_CONF": "join_timeout=900",
    }
    spec = launch_spec(env=env, count_gpus=False)
    cmd = torchrun_command(spec, ["train", "c.yaml"], port=1)
    assert cmd[3:10] == [
        "--nnodes=1:3",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=train-worker-0:23456",
        "--rdzv-id=job-7",
        "--rdzv-conf=join_timeout=900",
        "--max-restarts=3",
    ]
    assert not any(word.startswith("--node-rank") for word in cmd)


def test_a_pod_of_an_older_operator_is_one_worker():
    env = {"MASTER_ADDR": "train-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "3", "RANK": "1"}
    assert cluster_source(env) == "pytorchjob-worker"
    assert adopt_worker_env(env) == "pytorchjob-worker" and env["LOCAL_RANK"] == "0"
    assert cluster_source(env) == "worker" and not should_launch(launch_spec(env=env, count_gpus=False), env)
    # but the LLaMA-Factory variables mean "launch": NNODES with MASTER_* and a stray RANK is a node
    assert (
        cluster_source({**env, "NNODES": "2"}) == "worker"
    )  # LOCAL_RANK now set: torchrun's convention wins
    assert (
        cluster_source(
            {"MASTER_ADDR": "h", "MASTER_PORT": "1", "WORLD_SIZE": "2", "RANK": "0", "NNODES": "2"}
        )
        == ""
    )


SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NNODES": "3",
    "SLURM_JOB_NUM_NODES": "3",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NODELIST": "node[01-03]",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
    "SLURM_NTASKS": "3",
    "SLURM_STEP_ID": "0",
}


def test_a_slurm_task_per_node_derives_the_launch_from_slurm_alone():
    spec = launch_spec(env={**SLURM, "SLURM_GPUS_ON_NODE": "8"}, count_gpus=False)
    assert spec.source == "slurm-node" and should_launch(spec, SLURM)
    assert (spec.nnodes, spec.nproc_per_node, spec.rdzv_id, spec.master_addr) == (3, 8, "4242", "node01")
    assert spec.master_port == slurm_master_port("4242") == 19242
    cmd = torchrun_command(spec, ["train", "c.yaml"], port=spec.master_port)
    assert "--rdzv-endpoint=node01:19242" in cmd and "--rdzv-id=4242" in cmd
    # the sbatch script's exports (MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE, RDZV_ID) win
    exported = {
        **SLURM,
        "MASTER_ADDR": "10.0.0.9",
        "MASTER_PORT": "29400",
        "NPROC_PER_NODE": "2",
        "RDZV_ID": "x",
    }
    spec = launch_spec(env=exported, count_gpus=False)
    assert (spec.master_addr, spec.master_port, spec.nproc_per_node, spec.rdzv_id) == (
        "10.0.0.9",
        29400,
        2,
        "x",
    )
    # one node: no rendezvous across hosts, a free local port
    one = launch_spec(
        env={
            **SLURM,
            "SLURM_NNODES": "1",
            "SLURM_JOB_NUM_NODES": "1",
            "SLURM_NTASKS": "1",
            "SLURM_NODEID": "0",
            "SLURM_GPUS_ON_NODE": "2",
        },
        count_gpus=False,
    )
    assert (one.nnodes, one.nproc_per_node, one.rdzv_id) == (1, 2, None)
    assert slurm_master_port("99_3") == 15000 + 993 % 15000  # array job ids


def test_several_slurm_tasks_per_node_are_workers_themselves():
    env = {
        **SLURM,
        "SLURM_NTASKS": "6",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
    }
    assert adopt_worker_env(env) == "slurm-worker"
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == (
        "3",
        "1",
        "6",
        "2",
    )
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("node01", "19242")
    assert not should_launch(launch_spec(env=env, count_gpus=False), env)
    batch = {**SLURM, "SLURM_NTASKS": "6"}
    del batch["SLURM_STEP_ID"]  # the batch script itself is never a rank
    assert cluster_source(batch) == "slurm-node"


def test_the_deepspeed_launchers_local_rank_argument_is_absorbed():
    env: dict[str, str] = {}
    argv = ["--local_rank=1", "train", "c.yaml", "lr=1"]
    assert strip_launcher_args(argv, env) == ["train", "c.yaml", "lr=1"] and env["LOCAL_RANK"] == "1"
    env = {"LOCAL_RANK": "0"}
    assert strip_launcher_args(["train", "--local-rank", "3", "c.yaml"], env) == ["train", "c.yaml"]
    assert env["LOCAL_RANK"] == "0"  # the launcher's variable wins


def test_bad_values_name_the_variable():
    with pytest.raises(ConfigError, match="NPROC_PER_NODE"):
        launch_spec(env={"NPROC_PER_NODE": "four"}, count_gpus=False)
    with pytest.raises(ConfigError, match="elastic node range 3:2"):
        launch_spec(env={"RDZV_ID": "j", "MIN_NNODES": "3", "MAX_NNODES": "2"}, count_gpus=False)
