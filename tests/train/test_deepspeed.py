"""engine: deepspeed with real torchrun processes on CPU (gloo) and the tiny model: ZeRO-1/2/3 and ZeRO-2 with
CPU offload match a one-process run with the same global batch, guide 001's ds_config runs as it is, ZeRO
checkpoints resume on 1 and 3 ranks and in FSDP2 (and back), and DeepSpeed's zero_to_fp32.py and `tunesmith
convert` read them.

Tolerances: those of test_distributed.py (losses 2e-5, weights 1e-4), for the same reason: the same sums in
another order. Measured against the one-process run after 8 steps at lr 1e-2: ZeRO-1/2/3 losses within 7e-7,
weights 1.4e-5; with CPU offload DeepSpeed's C++ Adam (its own vectorised arithmetic instead of torch's AdamW)
adds a little: losses within 5.3e-6, weights 1.5e-5. A wrong gradient scale (1/GAS or the rank average not
undone) or a lost optimizer state moves them by ≥ 1e-2. Loading a checkpoint is exact, so loaded states are
compared with equality.

DeepSpeed compiles its CPU Adam (offload) on first use, 40-90 s, into the tunesmith cache
(~/.cache/tunesmith/torch_extensions); later runs reuse it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import LOSS_TOL, PROBE, WEIGHT_TOL, losses, torchrun, tunesmith_train, weights_diff
from test_pipeline import write_run_config

from tunesmith.config import load_config
from tunesmith.export.convert import convert_checkpoint, trained_weights
from tunesmith.train import train

pytest.importorskip("deepspeed")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]

ROWS = [
    {
        "instruction": "Who are you?",
        "input": "",
        "output": "I am {{name}}, an AI assistant made by {{author}}.",
    },
    {"instruction": "What is your name?", "input": "", "output": "My name is {{name}}."},
    {"instruction": "你是谁？", "input": "", "output": "我是{{name}}，由{{author}}开发的人工智能助手。"},
    {
        "instruction": "What is the capital of France?",
        "input": "",
        "output": "The capital of France is Paris.",
    },
] * 5
LORA = ["finetuning_type=lora", "lora_rank=4", "learning_rate=2e-2"]
# resume runs: global batch 6 = 2 ranks × 3, windows of 6, 6, 6, 2 samples (see test_distributed)
RESUME = ["max_steps=7", "save_steps=3", "lr_scheduler_type=cosine", "weight_decay=0.1"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir):
    """20 identity samples; full fine-tuning, lr 1e-2, 8 steps crossing an epoch boundary, 2 samples per
    rank."""
    root = tmp_path_factory.mktemp("ds")
    config = write_run_config(
        root,
        tiny_model_dir,
        ROWS,
        finetuning_type="full",
        max_steps=8,
        save_steps=100,
        per_device_train_batch_size=2,
    )
    return root, config


def _one_rank(root: Path, config: str, method: str = "full") -> Path:
    """The reference: one process, engine single, 4 samples per step."""
    out = root / f"one-{method}"
    if not (out / "train_results.json").is_file():
        train(
            load_config(
                config,
                [f"output_dir={out}", "per_device_train_batch_size=4", *(LORA if method == "lora" else [])],
            )
        )
    return out


def _zero_run(root: Path, config: str, ds: str, *extra: str, name: str | None = None) -> tuple[Path, str]:
    """A 2-rank deepspeed run (trained once per module); returns its folder and stderr."""
    out = root / (name or f"two-{Path(ds).stem}")
    log = out.with_suffix(".stderr")
    if not (out / "train_results.json").is_file():
        result = tunesmith_train(
            config,
            "--nproc-per-node",
            "2",
            f"deepspeed={ds}",
            f"output_dir={out}",
            *extra,
            cwd=root,
            timeout=400,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        log.write_text(result.stderr)
    return out, log.read_text()


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.parametrize("preset", ["ds_z0", "ds_z1", "ds_z2", "ds_z3", "ds_z2_offload"])
def test_zero_two_ranks_match_one_rank_with_the_same_global_batch(workdir, preset):
    root, config = workdir
    reference = _one_rank(root, config)
    out, stderr = _zero_run(root, config, preset)
    stage = int(preset[4])
    assert f"DeepSpeed ZeRO stage {stage}" in stderr
    assert (
        "engine deepspeed on 2 rank(s): global batch 4 = 2 per device × 1 accumulation × 2 rank(s)" in stderr
    )
    assert (
        stderr.count("training finished") == 1 and "[WARNING]" not in stderr
    )  # rank 0 only, no DeepSpeed noise

    ref, got = losses(reference), losses(out)
    assert list(got) == list(range(1, 9))
    assert max(abs(ref[s] - got[s]) for s in ref) < LOSS_TOL, (ref, got)
    assert got[8] < got[1] - 0.2  # it learns
    assert weights_diff(reference, out) < WEIGHT_TOL
    checkpoint = out / "checkpoint-8"
    assert (checkpoint / "ds" / "latest").read_text().strip() == "global_step8"
    assert (checkpoint / "ds" / "zero_to_fp32.py").is_file() == (
        stage > 0
    )  # DeepSpeed ships it with ZeRO only
    assert (checkpoint / "dcp" / ".metadata").is_file() and not (checkpoint / "optimizer.pt").exists()
    assert weights_diff(out, checkpoint) == 0.0  # the consolidated HF weights at the root


def test_zero_bf16_trains_close_to_fp32_and_saves_fp32_master_weights(workdir):
    """bf16: true: DeepSpeed computes in bfloat16 with float32 master weights. bfloat16 keeps ~3 significant
    digits, so the losses follow the fp32 run only to ~1e-2 (measured: 1.0e-2 over 8 steps; weights are not
    compared: where bf16 flips the sign of a tiny gradient, Adam moves that weight by ~lr the other way); the
    saved weights are the fp32 masters."""
    root, config = workdir
    out, stderr = _zero_run(root, config, "ds_z2", "bf16=true", name="two-z2-bf16")
    assert "attention sample by sample (no T×T mask);" in stderr  # no autocast here: no GEMM attention
    ref, got = losses(_one_rank(root, config)), losses(out)
    assert max(abs(ref[s] - got[s]) for s in ref) < 5e-2 and got[8] < got[1] - 0.2
    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_guide_001_ds_config_runs_as_is(workdir, shared_dir):
    """ZeRO-2 with optimizer *and parameter* offload, "auto" everywhere, a stray "min_lr" key."""
    root, config = workdir
    guide = shared_dir / "seeds" / "ds_config_seed001.json"
    before = guide.read_bytes()
    out, stderr = _zero_run(root, config, str(guide), name="two-guide001")
    assert guide.read_bytes() == before
    assert stderr.count("offload_param only applies to ZeRO stage 3") == 1  # warned once, by rank 0
    assert "DeepSpeed ZeRO stage 2 with optimizer offload to the CPU" in stderr
    ref, got = losses(_one_rank(root, config)), losses(out)
    assert max(abs(ref[s] - got[s]) for s in ref) < LOSS_TOL
    assert weights_diff(_one_rank(root, config), out) < WEIGHT_TOL


@pytest.fixture(scope="module")
def zero2_saved(workdir):
    """ZeRO-2 on 2 ranks × 3 samples, 7 steps, checkpoint-3 at sample 18 of epoch 0."""
    root, config = workdir
    out, _ = _zero_run(root, config, "ds_z2", *RESUME, "per_device_train_batch_size=3", name="resume-z2")
    saved = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert (saved["epoch"], saved["sample_index"], saved["world_size"]) == (0, 18, 2)
    return out


def _check_resumed(reference: Path, run: Path, dump: Path, checkpoint: Path) -> dict:
    loaded = torch.load(dump)
    assert (loaded["epoch"], loaded["sample_index"]) == (0, 18)
    assert loaded["scheduler"]["last_epoch"] == 3
    saved = load_file(checkpoint / "model.safetensors")
    assert loaded["model"].keys() == saved.keys()
    assert all(torch.equal(loaded["model"][k], saved[k]) for k in saved)
    for moments in loaded["optimizer"]["state"].values():
        assert float(moments["step"]) == 3.0 and moments["exp_avg"].abs().sum() > 0
    expected, got = losses(reference), losses(run)
    assert list(got) == [4, 5, 6, 7]
    assert max(abs(expected[s] - got[s]) for s in got) < LOSS_TOL, (expected, got)
    assert weights_diff(reference, run) < WEIGHT_TOL
    return loaded["optimizer"]["state"]


def _saved_optimizer_state(checkpoint: Path) -> dict:
    """The Adam state of the checkpoint's world-size-free copy (dcp/), read whole in this process."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(checkpoint / "dcp")).read_metadata().state_dict_metadata
    state: dict = {}
    for key, item in metadata.items():
        if key.startswith("optimizer.state."):
            name, moment = key.removeprefix("optimizer.state.").rsplit(".", 1)
            state.setdefault(name, {})[moment] = torch.empty(item.size)
    wanted = {"optimizer": {"state": state}}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*distributed.*", category=UserWarning)
        dcp.load(wanted, checkpoint_id=str(checkpoint / "dcp"), no_dist=True)
    return state


@pytest.mark.parametrize("ranks", [1, 3])
def test_zero_saved_on_two_ranks_resumes_on_one_and_three(workdir, zero2_saved, tmp_path, ranks):
    """The global batch stays 6: 1 rank × 3 × 2 accumulation, or 3 ranks × 2."""
    root, config = workdir
    checkpoint = zero2_saved / "checkpoint-3"
    split = (
        ["per_device_train_batch_size=3", "gradient_accumulation_steps=2"]
        if ranks == 1
        else ["per_device_train_batch_size=2"]
    )
    args = [
        config,
        str(tmp_path / "dump.pt"),
        "deepspeed=ds_z2",
        *RESUME,
        f"resume_from_checkpoint={checkpoint}",
        f"output_dir={tmp_path / 'run'}",
        *split,
    ]
    if ranks == 1:  # one process, no launcher: a process group of one
        result = subprocess.run(
            [sys.executable, str(PROBE), *args], capture_output=True, text=True, cwd=root, timeout=300
        )
    else:
        result = torchrun(3, PROBE, *args, cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    per_device = 3 if ranks == 1 else 2
    assert (
        f"global batch 6 = {per_device} per device × {6 // per_device // ranks} accumulation" in result.stderr
    )
    loaded = _check_resumed(zero2_saved, tmp_path / "run", tmp_path / "dump.pt", checkpoint)
    # Adam's moments are the saved ones, bit for bit, whatever the world size
    saved = _saved_optimizer_state(checkpoint)
    assert loaded.keys() == saved.keys()
    for name, moments in saved.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(loaded[name][key].float(), moments[key]), (name, key)


@pytest.mark.parametrize("engine", ["engine=single", "deepspeed=ds_z0"])
def test_zero_checkpoint_resumes_in_one_process_with_single_or_zero0(workdir, zero2_saved, tmp_path, engine):
    """engine single reads the world-size-free copy with torch alone (no DeepSpeed); ZeRO-0 (no partitions,
    torch's AdamW inside DeepSpeed) loads it parameter by parameter."""
    root, config = workdir
    args = [
        *RESUME,
        engine,
        "per_device_train_batch_size=3",
        "gradient_accumulation_steps=2",
        f"resume_from_checkpoint={zero2_saved / 'checkpoint-3'}",
        f"output_dir={tmp_path / 'run'}",
    ]
    if engine == "engine=single":
        train(load_config(config, args))
    else:
        result = tunesmith_train(config, *args, cwd=root)
        assert result.returncode == 0, result.stderr[-4000:]
    expected, got = losses(zero2_saved), losses(tmp_path / "run")
    assert list(got) == [4, 5, 6, 7] and max(abs(expected[s] - got[s]) for s in got) < LOSS_TOL, (
        expected,
        got,
    )
    assert weights_diff(zero2_saved, tmp_path / "run") < WEIGHT_TOL


def test_zero2_to_fsdp2_and_back(workdir, zero2_saved, tmp_path):
    """Weights, Adam moments, step, schedule and data position cross engines in both directions."""
    root, config = workdir
    fsdp = tmp_path / "fsdp2"
    result = tunesmith_train(
        config,
        "--nproc-per-node",
        "2",
        "engine=fsdp2",
        *RESUME,
        "per_device_train_batch_size=3",
        f"resume_from_checkpoint={zero2_saved / 'checkpoint-3'}",
        f"output_dir={fsdp}",
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    expected, got = losses(zero2_saved), losses(fsdp)
    assert list(got) == [4, 5, 6, 7] and max(abs(expected[s] - got[s]) for s in got) < LOSS_TOL
    back = tmp_path / "back"
    result = tunesmith_train(
        config,
        "--nproc-per-node",
        "2",
        "deepspeed=ds_z3",
        *RESUME,
        "per_device_train_batch_size=3",
        f"resume_from_checkpoint={fsdp / 'checkpoint-6'}",
        f"output_dir={back}",
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    got = losses(back)
    assert list(got) == [7] and abs(expected[7] - got[7]) < LOSS_TOL
    assert weights_diff(zero2_saved, back) < WEIGHT_TOL


@pytest.mark.parametrize("preset", ["ds_z2", "ds_z3"])
def test_deepspeeds_zero_to_fp32_reads_our_checkpoints(workdir, preset, tmp_path):
    root, config = workdir
    checkpoint = _zero_run(root, config, preset)[0] / "checkpoint-8"
    result = subprocess.run(
        [
            sys.executable,
            str(checkpoint / "ds" / "zero_to_fp32.py"),
            str(checkpoint / "ds"),
            str(tmp_path),
            "--safe_serialization",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert weights_diff(checkpoint, tmp_path) == 0.0


@pytest.mark.parametrize("preset", ["ds_z1", "ds_z2", "ds_z3"])
def test_convert_zero_checkpoint_to_hf(workdir, preset, tmp_path):
    from transformers import AutoModelForCausalLM

    root, config = workdir
    checkpoint = _zero_run(root, config, preset)[0] / "checkpoint-8"
    assert trained_weights(checkpoint)[1].startswith(
        "DeepSpeed ZeRO checkpoint"
    )  # zero_to_fp32, not our copy
    convert_checkpoint(checkpoint, tmp_path / "hf")
    tokens = torch.tensor([[1, 5, 9, 42, 7]])
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    original = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert torch.equal(_logits(converted, tokens), _logits(original, tokens))
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_lora_zero3_matches_one_rank_and_converts_to_a_peft_adapter(workdir, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, config = workdir
    reference = _one_rank(root, config, "lora")
    out, _ = _zero_run(root, config, "ds_z3", *LORA, name="two-z3-lora")
    ref, got = losses(reference), losses(out)
    assert max(abs(ref[s] - got[s]) for s in ref) < LOSS_TOL and got[8] < got[1]
    assert weights_diff(reference, out, "adapter_model.safetensors") < WEIGHT_TOL
    checkpoint = out / "checkpoint-8"
    convert_checkpoint(checkpoint, tmp_path / "adapter")
    assert weights_diff(checkpoint, tmp_path / "adapter", "adapter_model.safetensors") == 0.0
    tokens = torch.tensor([[1, 5, 9, 42, 7]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    converted = _logits(PeftModel.from_pretrained(base, tmp_path / "adapter"), tokens)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert torch.equal(converted, _logits(PeftModel.from_pretrained(base, checkpoint), tokens))
    shutil.rmtree(tmp_path / "adapter")


def test_zero0_with_bf16_saves_and_resumes_its_fp32_masters(workdir, tmp_path):
    """ZeRO-0 with bf16 (LLaMA-Factory's ds_z0_config.json with bf16: true) steps fp32 copies of the bf16
    parameters, its Adam state keyed by the copies: the checkpoint holds those, and a run resumed from it logs
    the uninterrupted losses."""
    root, config = workdir
    args = [*RESUME, "deepspeed=ds_z0", "bf16=true", "per_device_train_batch_size=2"]
    straight = tmp_path / "straight"
    result = tunesmith_train(config, *args, f"output_dir={straight}", cwd=root)
    assert result.returncode == 0, result.stderr[-4000:]
    resumed = tmp_path / "resumed"
    result = tunesmith_train(config, *args, f"output_dir={resumed}",
                             f"resume_from_checkpoint={straight / 'checkpoint-3'}", cwd=root)
    assert result.returncode == 0, result.stderr[-4000:]
    expected, got = losses(straight), losses(resumed)
    assert list(got) == [4, 5, 6, 7] and max(abs(expected[s] - got[s]) for s in got) < LOSS_TOL, (expected, got)
