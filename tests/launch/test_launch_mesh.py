"""The launches print the mesh (dp × sp × tp × pp) and refuse one that does not tile the world size, or that the
model's heads cannot split, before anything is rendered, written or submitted."""

from __future__ import annotations

import os
import stat

import pytest
import yaml

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.errors import ConfigError
from tunesmith.launch.local import dry_run_report
from tunesmith.plan.mesh import check_mesh, mesh_line


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model_name_or_path: /models/qwen\ndataset: identity\ndataset_dir: /data/d\n"
                    "output_dir: /data/runs/mesh\n", encoding="utf-8")
    return path


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_mesh_line_names_every_dimension_and_the_ranks():
    cfg = load_config(None, ["model_name_or_path=/m", "tensor_parallel_size=2"])
    assert mesh_line(check_mesh(cfg, 8)) == "mesh: dp 4 × sp 1 × tp 2 × pp 1 (8 ranks)"
    with pytest.raises(ConfigError, match=r"tensor_parallel_size 2 = 2 does not divide the world size 3.*\(here\)"):
        check_mesh(cfg, 3, "here")


def test_k8s_dry_run_prints_the_mesh_in_the_configmap(config, capsys):
    argv = ["launch", "k8s", str(config), "--image", "img:1", "--nnodes", "2", "--nproc-per-node", "4",
            "tensor_parallel_size=2", "--dry-run"]
    assert main(argv) == 0
    config_map, _job = yaml.safe_load_all(capsys.readouterr().out)
    text = config_map["data"]["train.yaml"]
    assert "# mesh: dp 4 × sp 1 × tp 2 × pp 1 (8 ranks)" in text.splitlines()[:3]
    assert yaml.safe_load(text)["tensor_parallel_size"] == 2


@pytest.mark.parametrize(
    ("flags", "override", "named"),
    [
        (["--nnodes", "2", "--nproc-per-node", "2"], "sequence_parallel_size=3", "--nnodes 2 × --nproc-per-node 2"),
        (["--elastic", "1:2", "--nproc-per-node", "2"], "sequence_parallel_size=4", "within --elastic 1:2"),
    ],
)
def test_k8s_refuses_a_mesh_that_does_not_divide_the_world_and_renders_nothing(config, capsys, flags, override,
                                                                               named):
    assert main(["launch", "k8s", str(config), "--image", "img:1", *flags, override, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no ConfigMap, no job
    line = captured.err.strip().splitlines()[-1]
    assert "sequence_parallel_size" in line and "does not divide the world size" in line and named in line


def test_k8s_refuses_a_split_the_heads_do_not_allow(config, capsys):
    # SmolLM2-135M: 9 query and 3 key/value heads (the built-in table knows them; nothing is downloaded)
    argv = ["launch", "k8s", str(config), "--image", "img:1", "--nproc-per-node", "2",
            "model_name_or_path=smollm2-135m-instruct", "sequence_parallel_size=2", "--dry-run"]
    assert main(argv) == 2
    line = last_error(capsys)
    assert "sequence_parallel_size: 2" in line and "9 query heads" in line and "sizes that work: 3 or 9" in line


def _slurm_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text("model_name_or_path: some/model\ndataset: data.json\noutput_dir: runs/x\n",
                                       encoding="utf-8")


def test_slurm_dry_run_prints_the_mesh_under_the_scripts_header(tmp_path, monkeypatch, capsys):
    _slurm_config(tmp_path, monkeypatch)
    argv = ["launch", "slurm", "cfg.yaml", "--nodes", "2", "--gpus-per-node", "8", "pipeline_parallel_size=2",
            "finetuning_type=full", "engine=ddp", "--dry-run"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "#!/bin/bash" and lines[2] == "# mesh: dp 8 × sp 1 × tp 1 × pp 2 (16 ranks)"
    assert lines[3].startswith("#SBATCH --job-name=")  # sbatch still reads every directive
    assert not (tmp_path / "runs").exists()


def test_slurm_refuses_a_bad_mesh_before_writing_or_submitting(tmp_path, monkeypatch, capsys):
    _slurm_config(tmp_path, monkeypatch)
    marker = tmp_path / "submitted"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f"#!/bin/sh\ntouch {marker}\necho 'Submitted batch job 1'\n", encoding="utf-8")
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    argv = ["launch", "slurm", "cfg.yaml", "--nodes", "3", "--gpus-per-node", "2", "tensor_parallel_size=4"]
    assert main(argv) == 2
    line = last_error(capsys)
    assert "tensor_parallel_size 4" in line and "world size 6" in line and "--nodes 3 × --gpus-per-node 2" in line
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_train_dry_run_prints_the_mesh_and_the_data_parallel_batch(tmp_path):
    cfg = load_config(None, ["model_name_or_path=smollm2-135m-instruct", "device=cpu", "tensor_parallel_size=3",
                             "per_device_train_batch_size=2", "gradient_accumulation_steps=4", "cutoff_len=256",
                             f"output_dir={tmp_path}", "dataset=identity"])
    text = dry_run_report(cfg, 6, 1, config_path="my.yaml")
    assert "mesh: dp 2 × sp 1 × tp 3 × pp 1 (6 ranks)" in text
    assert "global batch: 16 = 2 per device × 4 accumulation × 2 data-parallel rank(s)" in text
    assert "tp 3" in text.split("per device")[0]  # the plan's setup names the mesh too


def test_train_dry_run_refuses_a_mesh_that_does_not_divide_the_world(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"model_name_or_path: smollm2-135m-instruct\ndevice: cpu\ndataset: identity\n"
                      f"output_dir: {tmp_path / 'run'}\nsequence_parallel_size: 3\n", encoding="utf-8")
    assert main(["train", str(config), "--nproc-per-node", "4", "--dry-run"]) == 2
    line = last_error(capsys)
    assert "sequence_parallel_size 3" in line and "world size 4" in line and "1 node(s) × 4 process(es)" in line
    assert not (tmp_path / "run").exists()
