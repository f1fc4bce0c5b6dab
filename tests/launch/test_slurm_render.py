"""The sbatch script `tunesmith launch slurm` writes: its directives, what it exports on each node (run
through bash with stand-ins for scontrol and srun that print what they were given), dry run, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.launch.slurm import SlurmOptions as SlurmSpec
from tunesmith.launch.slurm import render_sbatch
from tunesmith.launch.slurm.submit import job_status, submit


def spec(**kw) -> SlurmSpec:
    base = {
        "config_path": Path("/runs/a/slurm/config.yaml"),
        "output_dir": Path("/runs/a"),
        "workdir": Path("/w"),
    }
    return SlurmSpec(**{**base, **kw})


def directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_gpu_job_directives():
    script = render_sbatch(
        spec(
            nodes=4,
            gpus_per_node=8,
            partition="gpu",
            time="1-12:00:00",
            mem="200G",
            job_name="sft",
            sbatch_args=("--account=proj", "--qos=high"),
        )
    )
    assert directives(script) == [
        "--job-name=sft",
        "--nodes=4",
        "--ntasks-per-node=1",
        "--cpus-per-task=8",
        "--gres=gpu:8",
        "--partition=gpu",
        "--time=1-12:00:00",
        "--mem=200G",
        "--chdir=/w",
        "--output=/runs/a/slurm-%j.out",
        "--error=/runs/a/slurm-%j.out",
        "--account=proj",
        "--qos=high",
    ]
    assert "export NPROC_PER_NODE=8" in script
    assert 'export RDZV_ID="$SLURM_JOB_ID"' in script
    assert f"{sys.executable} -m tunesmith.cli train /runs/a/slurm/config.yaml" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid bash


def test_cpu_job_has_no_gres_and_defaults_to_one_process():
    script = render_sbatch(spec())
    assert not [d for d in directives(script) if d.startswith(("--gres", "--partition", "--time", "--mem"))]
    assert "export NPROC_PER_NODE=1" in script and "--cpus-per-task=1" in directives(script)
    assert "RDZV_ID=" not in script  # one node: no rendezvous across hosts
    script = render_sbatch(spec(nproc_per_node=2, cpus_per_task=6))
    assert "export NPROC_PER_NODE=2" in script and "--cpus-per-task=6" in directives(script)


def _fake_tools(folder: Path) -> None:
    """scontrol answers like a cluster of gpu01 and gpu02 (then many more hosts) at NodeAddr 10.0.0.1 and .2; srun
    runs its command once per node with SLURM_NODEID and SLURMD_NODENAME set, as Slurm would; "python" prints what
    it sees."""
    folder.mkdir()
    (folder / "scontrol").write_text(
        "#!/bin/bash\n"
        # a big allocation's host list: a reader that stops after the first line must not fail the script
        'if [ "$2" = hostnames ]; then printf "gpu01\\ngpu02\\n"; seq -f "cpu%06g" 1 200000; exit; fi\n'
        'echo "NodeName=$3 Arch=x86_64 NodeAddr=10.0.0.${3#gpu0} NodeHostName=$3 Version=22.05"\n'
    )
    (folder / "srun").write_text(
        "#!/bin/bash\n"
        'opts=(); while [ "${1#--}" != "$1" ]; do opts+=("$1"); shift; done\n'  # srun's own options
        'echo "srun ${opts[*]}" >> "$OUT"\n'
        'for n in 0 1; do SLURM_NODEID=$n SLURMD_NODENAME=gpu0$((n + 1)) "$@"; done\n'
    )
    (folder / "python").write_text(
        "#!/bin/bash\n"
        'echo "node $NODE_RANK: $MASTER_ADDR:$MASTER_PORT nnodes=$NNODES nproc=$NPROC_PER_NODE rdzv=$RDZV_ID '
        'conf=$RDZV_CONF local=$PET_LOCAL_ADDR args=$*" >> "$OUT"\n'
    )
    for tool in folder.iterdir():
        tool.chmod(0o755)


def test_script_exports_what_each_node_needs(tmp_path):
    _fake_tools(tmp_path / "bin")
    script = render_sbatch(spec(nodes=2, gpus_per_node=4, python=str(tmp_path / "bin" / "python")))
    out = tmp_path / "out.txt"
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "OUT": str(out),
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[01-02]",
        "SLURM_NNODES": "2",
        "SLURM_CPUS_PER_TASK": "4",
        "RDZV_CONF": "timeout=900",
    }
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    port = 15000 + 123456 % 15000
    assert lines[0].startswith("srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=4 --kill-on-bad-exit=1")
    args = "args=-m tunesmith.cli train /runs/a/slurm/config.yaml"
    assert lines[1:] == [
        f"node 0: 10.0.0.1:{port} nnodes=2 nproc=4 rdzv=123456 conf=timeout=900,is_host=1 local=10.0.0.1 "
        + args,
        f"node 1: 10.0.0.1:{port} nnodes=2 nproc=4 rdzv=123456 conf=timeout=900,is_host=0 local=10.0.0.2 "
        + args,
    ]
    assert "job 123456 on gpu[01-02]: 2 node(s) x 4 process(es), first host 10.0.0.1:" in proc.stdout


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"nodes": 0}, "--nodes must be 1 or more"),
        ({"gpus_per_node": -1}, "--gpus-per-node must be 0"),
        ({"time": "2h"}, "--time '2h' is not a Slurm time limit"),
        ({"time": "1:2:3:4"}, "is not a Slurm time limit"),
        ({"mem": "lots"}, "--mem 'lots' is not a Slurm memory size"),
        ({"job_name": "a b"}, "--job-name"),
        ({"sbatch_args": ("account=x",)}, "must be one sbatch option"),
    ],
)
def test_bad_input_is_one_sentence(kw, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")) as err:
        render_sbatch(spec(**kw))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("time", ["30", "30:00", "2:00:00", "1-0", "1-12:00", "7-00:00:00", "UNLIMITED"])
def test_slurm_time_forms_are_accepted(time):
    assert f"--time={time}" in directives(render_sbatch(spec(time=time)))


# ---------------------------------------------------------------------------------------------- the CLI


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _config(folder: Path) -> Path:
    (folder / "data.json").write_text(json.dumps([{"instruction": "hi", "output": "hello"}]))
    path = folder / "cfg.yaml"
    path.write_text(
        "model_name_or_path: some/model\ndataset: data.json\noutput_dir: runs/x\n", encoding="utf-8"
    )
    return path


def test_dry_run_prints_the_script_and_writes_nothing(tmp_path):
    _config(tmp_path)
    proc = _cli(
        "launch",
        "slurm",
        "cfg.yaml",
        "learning_rate=3e-4",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--partition",
        "a100",
        "--time",
        "4:00:00",
        "--sbatch-arg=--account=proj",
        "--dry-run",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    found = directives(proc.stdout)
    run = (tmp_path / "runs" / "x").resolve()
    assert "--nodes=2" in found and "--gres=gpu:4" in found and "--partition=a100" in found
    assert "--time=4:00:00" in found and "--account=proj" in found and "--job-name=tunesmith-x" in found
    assert f"--output={run}/slurm-%j.out" in found and f"--chdir={tmp_path.resolve()}" in found
    assert f"train {run}/slurm/config.yaml" in proc.stdout
    assert not (tmp_path / "runs").exists()


def test_bad_launch_flags_fail_in_one_line(tmp_path):
    _config(tmp_path)
    proc = _cli("launch", "slurm", "cfg.yaml", "--nodes", "0", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == ["tunesmith: error: --nodes must be 1 or more, got 0"]


def test_config_errors_are_caught_before_submitting(tmp_path):
    _config(tmp_path)
    proc = _cli("launch", "slurm", "cfg.yaml", "learning_rat=1", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and "learning_rate" in proc.stderr  # the closest valid key
    assert not (tmp_path / "runs").exists()


def test_no_sbatch_on_path_says_so_and_writes_nothing(tmp_path):
    _config(tmp_path)
    env = {**os.environ, "PATH": str(tmp_path / "empty")}
    proc = _cli("launch", "slurm", "cfg.yaml", cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "`sbatch` is not on PATH" in proc.stderr and "--dry-run" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_job_functions_reject_a_bad_job_id_and_a_missing_slurm(tmp_path, monkeypatch):
    with pytest.raises(TunesmithError, match="is not a Slurm job id"):
        job_status("12; rm -rf /")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TunesmithError, match="`squeue` is not on PATH"):
        job_status("12")
    with pytest.raises(TunesmithError, match="`sbatch` is not on PATH"):
        submit(tmp_path / "x.sbatch")
