"""Launching: LLaMA-Factory's env variables and the CLI flags map onto one torchrun command; a process torchrun
started is never launched again; the engine choice follows the process count."""

from __future__ import annotations

import sys

import pytest

from tunesmith.cli import main
from tunesmith.config import Config
from tunesmith.errors import ConfigError
from tunesmith.launch.torchrun import launch_spec, should_launch, torchrun_command

TORCHRUN_WORKER = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}


def test_env_variables_as_in_llamafactory():
    env = {
        "FORCE_TORCHRUN": "1",
        "NNODES": "2",
        "NODE_RANK": "1",
        "MASTER_ADDR": "10.0.0.5",
        "MASTER_PORT": "29555",
    }
    spec = launch_spec(env=env, count_gpus=False)
    assert (spec.nnodes, spec.node_rank, spec.nproc_per_node) == (2, 1, 1)
    assert (spec.master_addr, spec.master_port, spec.force) == ("10.0.0.5", 29555, True)
    assert should_launch(spec, env)
    cmd = torchrun_command(spec, ["train", "cfg.yaml", "lr=1"], port=29555)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert {
        "--nnodes=2",
        "--node-rank=1",
        "--nproc-per-node=1",
        "--master-addr=10.0.0.5",
        "--master-port=29555",
    } <= set(cmd)
    assert cmd[-5:] == ["-m", "tunesmith.cli", "train", "cfg.yaml", "lr=1"]


def test_flags_override_env_and_single_process_needs_no_launch():
    env = {"NPROC_PER_NODE": "4", "MASTER_PORT": "1234"}
    spec = launch_spec(nproc_per_node=2, master_port=999, env=env, count_gpus=False)
    assert (spec.nproc_per_node, spec.master_port) == (2, 999)
    assert not should_launch(launch_spec(env={}, count_gpus=False), {})
    assert launch_spec(env={"NPROC_PER_NODE": "3"}, count_gpus=False).needs_launch
    # torchrun's own workers carry RANK/WORLD_SIZE/LOCAL_RANK: they train, they do not launch again
    assert not should_launch(launch_spec(env={**env, **TORCHRUN_WORKER}, count_gpus=False), TORCHRUN_WORKER)
    with pytest.raises(ConfigError, match="node_rank"):
        launch_spec(nnodes=2, node_rank=2, env={}, count_gpus=False)


def test_engine_follows_the_process_count(monkeypatch):
    from tunesmith.train.engines import validate_engine_config

    assert validate_engine_config(Config()).name == "single"
    assert validate_engine_config(Config(engine="fsdp2")).name == "fsdp2"
    assert validate_engine_config(Config(deepspeed="ds_z3")).name == "deepspeed"
    for key, value in TORCHRUN_WORKER.items():
        monkeypatch.setenv(key, value)
    assert validate_engine_config(Config()).name == "ddp"
    with pytest.raises(ConfigError, match="engine: single"):
        validate_engine_config(Config(engine="single"))
    with pytest.raises(ConfigError, match="fp16 with engine: fsdp2"):
        validate_engine_config(Config(engine="fsdp2", fp16=True))


def test_overrides_may_follow_launch_flags(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: out\n")
    assert main(["train", str(cfg), "--nproc-per-node", "1", "learning_rat=1"]) == 2
    assert "learning_rate" in capsys.readouterr().err  # the override after the flag reached the config
    with pytest.raises(SystemExit):
        main(["train", str(cfg), "--nproc-per-node", "1", "--bogus"])


def test_max_restarts_from_flag_or_env():
    spec = launch_spec(nproc_per_node=2, env={"MAX_RESTARTS": "3"}, count_gpus=False)
    assert spec.max_restarts == 3
    assert "--max-restarts=3" in torchrun_command(spec, ["train", "c.yaml"], port=1)
    assert (
        launch_spec(
            nproc_per_node=2, max_restarts=1, env={"MAX_RESTARTS": "3"}, count_gpus=False
        ).max_restarts
        == 1
    )
    assert "--max-restarts=0" in torchrun_command(launch_spec(env={}, count_gpus=False), ["train"], port=1)
    with pytest.raises(ConfigError, match="max_restarts"):
        launch_spec(max_restarts=-1, env={}, count_gpus=False)


def test_rdzv_id_gives_an_elastic_c10d_launch_as_in_llamafactory():
    env = {
        "RDZV_ID": "job1",
        "NNODES": "2",
        "MASTER_ADDR": "10.0.0.5",
        "MASTER_PORT": "29555",
        "NPROC_PER_NODE": "2",
        "MAX_RESTARTS": "2",
    }
    spec = launch_spec(env=env, count_gpus=False)
    assert spec.elastic and should_launch(spec, env)
    cmd = torchrun_command(spec, ["train", "c.yaml"], port=29555)
    assert cmd[3:9] == [
        "--nnodes=2",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.0.0.5:29555",
        "--rdzv-id=job1",
        "--max-restarts=2",
    ]
    ranged = launch_spec(env={**env, "MIN_NNODES": "1", "MAX_NNODES": "4"}, count_gpus=False)
    assert "--nnodes=1:4" in torchrun_command(ranged, ["train"], port=1)
    assert "--nnodes=2:3" in torchrun_command(
        launch_spec(env={**env, "NNODES": "2:3"}, count_gpus=False), [], port=1
    )
    custom = launch_spec(
        env={**env, "RDZV_BACKEND": "etcd-v2", "RDZV_ENDPOINT": "etcd:2379"}, count_gpus=False
    )
    assert {"--rdzv-backend=etcd-v2", "--rdzv-endpoint=etcd:2379"} <= set(
        torchrun_command(custom, [], port=1)
    )
    # NODE_RANK is the rendezvous' business: any value is accepted
    assert launch_spec(env={**env, "NODE_RANK": "7"}, count_gpus=False).elastic
