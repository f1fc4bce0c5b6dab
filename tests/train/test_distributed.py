"""Distributed training with real torchrun processes on CPU (gloo) and the tiny model: DDP and FSDP2 match a
one-process run with the same global batch, checkpoints resume on other world sizes, a killed rank stops the job,
and two `tunesmith train` invocations form one two-node job.

Tolerances. A 2-rank step computes the same sum as a 1-rank step, but in another order: each rank sums its own
micro-batch (of a different padded width, so matmuls block differently), then gloo adds the two partial gradients.
In float32 that moves gradients by ~1e-7 relative and the logged losses by ~1e-6 (measured: 7e-7). Adam then
divides each update by √v, so for weights whose gradient is near zero the relative noise becomes an update
difference of up to a fraction of the learning rate (measured: 1.4e-5 after 8 steps at lr 1e-2). Hence losses must
agree within 2e-5 and weights within 1e-4 (1 % of one step's largest possible update), while a real bug (a skipped
or repeated sample, a wrong gradient scale, a lost optimizer state) moves them by ≥ 1e-2. Validation losses are
computed on those drifted weights, after the logged training losses, so they get 2e-4 (measured: 6e-5 after 8
steps); a sample scored twice or a masked filler scored would move them by ~1e-1. Loading a checkpoint is exact on
any world size (DCP reshards bit for bit), so loaded states are compared with equality.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from cluster_helpers import assert_clean_finish
from safetensors.torch import load_file
from test_pipeline import write_run_config

from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.runenv import free_port
from tunesmith.train import train
from tunesmith.train.observe import read_log

pytestmark = pytest.mark.slow

PROBE = Path(__file__).with_name("dist_probe_worker.py")
LOSS_TOL = 2e-5
WEIGHT_TOL = 1e-4
EVAL_TOL = 2e-4


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "FORCE_TORCHRUN")}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def tunesmith_train(config: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 180):
    return subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", "train", config, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env or _env(),
        timeout=timeout,
    )


def torchrun(nproc: int, script: Path, *args: str, cwd: Path, timeout: int = 180):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
         str(script), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(),
        timeout=timeout,
    )


def losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_log(run_dir) if "loss" in e}


def eval_losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["eval_loss"] for e in read_log(run_dir) if "eval_loss" in e}


def weights_diff(a: Path, b: Path, name: str = "model.safetensors") -> float:
    wa, wb = load_file(a / name), load_file(b / name)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir):
    """20 identity samples and a config: full fine-tuning, lr 1e-2, 8 steps crossing an epoch boundary."""
    rows = [
        {"instruction": "Who are you?", "input": "", "output": "I am {{name}}, an AI assistant made by {{author}}."},
        {"instruction": "What is your name?", "input": "", "output": "My name is {{name}}."},
        {"instruction": "你是谁？", "input": "", "output": "我是{{name}}，由{{author}}开发的人工智能助手。"},
        {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    ] * 5
    root = tmp_path_factory.mktemp("dist")
    config = write_run_config(
        root, tiny_model_dir, rows, finetuning_type="full", max_steps=8, save_steps=100, per_device_train_batch_size=2
    )
    return root, config


def _one_rank(root: Path, config: str, method: str) -> Path:
    """The reference: one process, 4 samples per step (trained once per method)."""
    out = root / f"one-{method}"
    if not (out / "train_results.json").is_file():
        train(load_config(config, [f"output_dir={out}", "per_device_train_batch_size=4", *METHODS[method], *EVAL]))
    return out


@pytest.fixture(scope="module")
def one_rank_run(workdir):
    return _one_rank(*workdir, "full")


METHODS = {"full": [], "lora": ["finetuning_type=lora", "lora_rank=4", "learning_rate=2e-2"]}
# 5 validation samples in batches of 2 on 2 ranks: the last round holds 1 sample, so rank 1 scores a masked copy
EVAL = ["val_size=5", "eval_steps=4", "per_device_eval_batch_size=2"]


@pytest.mark.parametrize("engine, method", [("ddp", "full"), ("fsdp2", "full"), ("fsdp2", "lora")])
def test_two_ranks_match_one_rank_with_the_same_global_batch(workdir, engine, method, tiny_model_dir):
    root, config = workdir
    reference = _one_rank(root, config, method)
    out = root / f"two-{engine}-{method}"
    result = tunesmith_train(
        config, "--nproc-per-node", "2", f"engine={engine}", f"output_dir={out}", *METHODS[method], *EVAL, cwd=root
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"engine {engine} on 2 rank(s): global batch 4 = 2 per device × 1 accumulation × 2 rank(s)" in result.stderr
    assert result.stderr.count("training finished") == 1  # only rank 0 prints
    assert "host memory: tcmalloc" in result.stderr  # torchrun's workers inherit the launcher's preload

    ref, got = losses(reference), losses(out)
    assert list(got) == list(range(1, 9))
    assert max(abs(ref[s] - got[s]) for s in ref) < LOSS_TOL, (ref, got)
    assert got[8] < got[1] - 0.2  # it learns
    ref_eval, got_eval = eval_losses(reference), eval_losses(out)
    assert list(got_eval) == [4, 8] and max(abs(ref_eval[s] - got_eval[s]) for s in ref_eval) < EVAL_TOL
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert weights_diff(reference, out, weights) < WEIGHT_TOL
    tokens = [e["tokens_per_s"] for e in read_log(out) if "loss" in e]
    assert all(t > 0 for t in tokens)
    if engine == "fsdp2":  # sharded state for resume, consolidated HF/PEFT weights for export
        assert (out / "checkpoint-8" / "dcp" / ".metadata").is_file()
        assert not (out / "checkpoint-8" / "optimizer.pt").exists()
        assert weights_diff(out, out / "checkpoint-8", weights) == 0.0
    if method == "lora":  # the adapter at the root loads with PEFT onto the base model
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_saved_on_two_ranks_resumes_on_one_and_three(workdir, tmp_path, engine):
    """Global batch 6 everywhere: 2 ranks × 3, then 1 rank × 3 × 2 accumulation, or 3 ranks × 2. The 20 samples
    make windows of 6, 6, 6, 2: checkpoint-3 sits at sample 18 of epoch 0, and step 4 holds 2 samples, so ranks
    without any run masked micro-batches. The resumed runs must continue the uninterrupted one."""
    root, config = workdir
    common = [f"engine={engine}", "max_steps=7", "save_steps=3", "lr_scheduler_type=cosine", "weight_decay=0.1"]
    ref = tmp_path / "two"
    two = tunesmith_train(
        config, "--nproc-per-node", "2", *common, "per_device_train_batch_size=3", f"output_dir={ref}", cwd=root
    )
    assert two.returncode == 0, two.stderr[-4000:]
    ckpt3 = ref / "checkpoint-3"
    saved = json.loads((ckpt3 / "trainer_state.json").read_text())
    assert (saved["epoch"], saved["sample_index"], saved["world_size"]) == (0, 18, 2)

    resume = [*common, f"resume_from_checkpoint={ckpt3}"]
    # one process (engine single reads the FSDP2 shards unsharded), in this process: probe, then train on
    from dist_probe_worker import probe

    one_cfg = load_config(
        config,
        [*resume, "engine=single" if engine == "fsdp2" else "engine=auto", f"output_dir={tmp_path / 'one'}",
         "per_device_train_batch_size=3", "gradient_accumulation_steps=2"],
    )
    probe(one_cfg, tmp_path / "one.pt")
    train(one_cfg)
    # three processes
    three = torchrun(
        3, PROBE, config, str(tmp_path / "three.pt"), *resume, f"output_dir={tmp_path / 'three'}",
        "per_device_train_batch_size=2", cwd=root,
    )
    assert three.returncode == 0, three.stderr[-4000:]
    assert "global batch 6 = 2 per device × 1 accumulation × 3 rank(s)" in three.stderr

    # the loaded state is the saved one, bit for bit, on either world size
    one_state, three_state = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "three.pt")
    saved_weights = load_file(ckpt3 / "model.safetensors")
    for loaded in (one_state, three_state):
        assert (loaded["epoch"], loaded["sample_index"]) == (0, 18)
        assert loaded["scheduler"]["last_epoch"] == 3
        assert loaded["model"].keys() == saved_weights.keys()
        assert all(torch.equal(loaded["model"][k], saved_weights[k]) for k in saved_weights)
    o1, o3 = one_state["optimizer"], three_state["optimizer"]
    assert o1["state"].keys() == o3["state"].keys() == saved_weights.keys()
    for name, moments in o1["state"].items():
        assert float(moments["step"]) == 3.0
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[key], o3["state"][name][key]), (name, key)
            assert moments[key].abs().sum() > 0

    # and the loss curve continues the uninterrupted run: steps 4..7, same data, same updates
    expected = losses(ref)
    for run in ("one", "three"):
        got = losses(tmp_path / run)
        assert list(got) == [4, 5, 6, 7]  # a fresh output_dir: its log starts after the checkpoint
        assert max(abs(expected[s] - got[s]) for s in range(4, 8)) < LOSS_TOL, (run, expected, got)
        assert weights_diff(ref, tmp_path / run) < WEIGHT_TOL, run


def _rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process | None:
    """The worker torchrun started for global rank ``rank`` (found by its environment)."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            env = child.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if env.get("RANK") == str(rank) and "LOCAL_RANK" in env:
            return child
    return None


def test_killing_one_rank_stops_the_job_and_names_the_rank(workdir, tmp_path):
    root, config = workdir
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunesmith.cli", "train", config, "--nproc-per-node", "2", "max_steps=100000",
         "save_steps=100000", f"output_dir={out}"],
        cwd=root,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while len(losses(out)) < 3:  # training is under way on both ranks
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        victim = _rank_process(proc, rank=1)
        assert victim is not None
        workers = psutil.Process(proc.pid).children(recursive=True)
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and elapsed < 60
    assert "rank      : 1 (local_rank: 1)" in err and "SIGKILL" in err  # torchrun's summary names the rank
    assert "tunesmith: error: distributed training failed" in err
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]  # no rank left behind


def test_with_max_restarts_a_killed_rank_restarts_the_job_which_resumes_and_finishes(workdir, tmp_path):
    """`--max-restarts 1`: after kill -9 of rank 1, torchrun restarts both ranks; they resume from the newest
    complete checkpoint (a partial one is cleaned up) and finish the run."""
    root, config = workdir
    out = tmp_path / "restarted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunesmith.cli", "train", config, "--nproc-per-node", "2", "--max-restarts", "1",
         "max_steps=40", "save_steps=10", f"output_dir={out}"],
        cwd=root,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint-10" / "checkpoint_complete").is_file():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.05)
        victim = _rank_process(proc, rank=1)
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-4000:]
    assert "--max-restarts=1" in err and "resuming from" in err and "training finished: step 40" in err
    assert [e["step"] for e in read_log(out) if "loss" in e] == list(range(1, 41))  # no step lost or repeated
    assert json.loads((out / "train_results.json").read_text())["global_step"] == 40


def test_two_invocations_with_nnodes_2_train_one_job(workdir, one_rank_run, tmp_path):
    """LLaMA-Factory's multi-node recipe on one machine: NNODES=2, NODE_RANK=0/1, one process per "node"."""
    root, config = workdir
    out = tmp_path / "two-nodes"
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "tunesmith.cli", "train", config, f"output_dir={out}", *EVAL],
            cwd=root,
            env=_env(FORCE_TORCHRUN="1", NNODES="2", NODE_RANK=str(rank), NPROC_PER_NODE="1",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        errs = [node.communicate(timeout=180)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    assert_clean_finish(errs)  # both nodes leave the job in order: no stack trace, no warning
    assert "engine ddp on 2 rank(s)" in errs[0] and "training finished" not in errs[1]  # rank 0 is on node 0
    ref, got = losses(one_rank_run), losses(out)
    assert max(abs(ref[s] - got[s]) for s in ref) < LOSS_TOL
    assert weights_diff(one_rank_run, out) < WEIGHT_TOL


@pytest.mark.slow
def test_a_single_process_checkpoint_is_refused_by_fsdp2(workdir, tmp_path):
    """README table: single/ddp → fsdp2 is refused (no dcp/), with the way out in the message."""
    root, config = workdir
    train(load_config(config, [f"output_dir={tmp_path / 'one'}", "max_steps=2", "save_steps=2"]))
    with pytest.raises(TunesmithError, match="no dcp/ folder.*resume with engine: ddp"):
        train(load_config(config, ["engine=fsdp2", f"resume_from_checkpoint={tmp_path / 'one' / 'checkpoint-2'}",
                                   f"output_dir={tmp_path / 'two'}", "max_steps=4"]))
