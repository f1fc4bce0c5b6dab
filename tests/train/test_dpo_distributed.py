"""stage: dpo across ranks and restarts, with real torchrun processes on CPU (gloo) and the tiny model: 2 ranks give
the losses of 1 rank with the same global batch on ddp, fsdp2 and DeepSpeed ZeRO-2 / ZeRO-3 (the LoRA reference,
the adapter switched off, runs through each engine's forward; precomputed once before training, it is spread over
the ranks and gathered), and a DPO run killed with SIGKILL and re-run ends
as an uninterrupted one. Tolerances as in test_distributed.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import LOSS_TOL, losses, tunesmith_train
from test_dpo import preference_rows
from test_resume_kill import SLOW_TRAIN
from train_helpers import kill_when

from tunesmith.config import load_config
from tunesmith.train import train

pytestmark = pytest.mark.slow

METHODS = {"lora": ["finetuning_type=lora", "lora_rank=4", "learning_rate=2e-2"],
           "full": ["finetuning_type=full", "learning_rate=1e-3"]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("dpo-dist")
    data = root / "data"
    data.mkdir()
    (data / "prefs.json").write_text(json.dumps(preference_rows(20)), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"prefs": {"file_name": "prefs.json", "ranking": True}}))
    config = root / "dpo.yaml"
    config.write_text(json.dumps({
        "model_name_or_path": str(tiny_model_dir), "stage": "dpo", "template": "chatml", "dataset": "prefs",
        "dataset_dir": str(data), "cutoff_len": 64, "max_steps": 6, "save_steps": 100, "logging_steps": 1,
        "per_device_train_batch_size": 2, "device": "cpu", "seed": 3,
    }), encoding="utf-8")
    return root, str(config)


def _one_rank(root: Path, config: str, method: str) -> Path:
    out = root / f"one-{method}"
    if not (out / "train_results.json").is_file():
        train(load_config(config, [f"output_dir={out}", "per_device_train_batch_size=4", *METHODS[method]]))
    return out


@pytest.mark.parametrize("engine, method", [
    (["engine=ddp"], "lora"), (["engine=ddp"], "full"), (["engine=fsdp2"], "lora"),
    (["deepspeed=ds_z2"], "lora"), (["deepspeed=ds_z3"], "lora"),
    (["engine=fsdp2", "precompute_ref_log_probs=true"], "lora"),
    (["engine=ddp", "precompute_ref_log_probs=true"], "full"),
], ids=["ddp-lora", "ddp-full", "fsdp2-lora", "zero2-lora", "zero3-lora", "fsdp2-lora-precomputed",
        "ddp-full-precomputed"])
def test_two_ranks_match_one_rank_for_dpo(workdir, engine, method):
    root, config = workdir
    reference = _one_rank(root, config, method)
    out = root / f"two-{'-'.join(arg.split('=')[1] for arg in engine)}-{method}"
    result = tunesmith_train(config, "--nproc-per-node", "2", *engine, f"output_dir={out}", *METHODS[method],
                             cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ref, got = losses(reference), losses(out)
    assert list(got) == list(range(1, 7))
    assert max(abs(ref[s] - got[s]) for s in ref) < LOSS_TOL, (ref, got)
    assert got[6] < got[1]  # it learns


def test_dpo_killed_with_sigkill_resumes_to_the_uninterrupted_result(workdir, tmp_path):
    """Full fine-tuning: the re-run's reference must again be the initial weights (not the checkpoint's)."""
    root, config = workdir
    overrides = [*METHODS["full"], "save_steps=3", "per_device_train_batch_size=2", "gradient_accumulation_steps=2"]
    killed = tmp_path / "killed"
    script = tmp_path / "slow_train.py"
    script.write_text(SLOW_TRAIN)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(script), config, f"output_dir={killed}", *overrides], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kill_when(proc, killed / "checkpoint-3" / "checkpoint_complete", "checkpoint-3")
    assert not (killed / "train_results.json").exists()
    rerun = subprocess.run([sys.executable, "-m", "tunesmith.train", config, f"output_dir={killed}", *overrides],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stderr
    straight = tmp_path / "straight"
    train(load_config(config, [f"output_dir={straight}", *overrides]))
    resumed, reference = losses(killed), losses(straight)
    assert list(resumed) == list(range(1, 7))
    assert max(abs(resumed[s] - reference[s]) for s in reference) < 1e-5, (resumed, reference)
