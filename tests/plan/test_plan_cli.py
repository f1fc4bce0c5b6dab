"""`tunesmith plan`, the dry-run report and the training preflight, as a user meets them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tunesmith.config import load_config
from tunesmith.launch.local import dry_run_report
from tunesmith.plan import plan_config, preflight
from tunesmith.plan.hardware import parse_gpus


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def qwen7b_yaml(tmp_path):
    path = tmp_path / "qwen7b.yaml"
    path.write_text("model_name_or_path: Qwen/Qwen-7B-Chat\nfinetuning_type: full\nbf16: true\n"
                    "deepspeed: ds_z2\ncutoff_len: 1024\nper_device_train_batch_size: 4\n", encoding="utf-8")
    return path


def test_plan_prints_breakdown_verdict_suggestion_and_throughput(qwen7b_yaml):
    result = run_cli("plan", str(qwen7b_yaml), "--gpus", "4x24GB")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for item in ("weights", "gradients", "optimizer states", "activations", "logits + loss",
                 "communication buffers", "peak", "verdict: does NOT fit", "cheapest change that fits",
                 "tokens/s", "what if"):
        assert item in out, (item, out)


def test_plan_json_and_overrides(qwen7b_yaml):
    result = run_cli("plan", str(qwen7b_yaml), "deepspeed=ds_z3_offload", "gradient_checkpointing=true",
                     "--gpus", "8x80GB", "--nodes", "2", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["fits"] is True and data["suggestion"] is None
    assert data["setup"]["world_size"] == 16 and data["setup"]["zero_stage"] == 3
    assert data["setup"]["gradient_checkpointing"] is True
    assert data["bytes_per_device"]["peak"] < 80 * 2**30 and data["tokens_per_s"] > 0


def test_unknown_model_without_config_json_is_one_clear_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_name_or_path: someone/mystery-13b\n", encoding="utf-8")
    result = run_cli("plan", str(cfg), "--gpus", "1x80GB")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model_name_or_path" in lines[0] and "someone/mystery-13b" in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_gpus_spec_is_one_clear_line(qwen7b_yaml):
    result = run_cli("plan", str(qwen7b_yaml), "--gpus", "lots")
    assert result.returncode == 2 and "--gpus" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(("text", "count", "gib"), [("4x24GB", 4, 24), ("8x64GB", 8, 64), ("1x80GB", 1, 80),
                                                    ("24GB", 1, 24), ("8xA100", 8, 80), ("2x910B", 2, 64)])
def test_gpu_specs(text, count, gib):
    spec = parse_gpus(text)
    assert spec.count == count and spec.memory_bytes == gib * 2**30 and spec.accelerator is not None


def _cfg(*overrides: str):
    return load_config(None, ["model_name_or_path=Qwen/Qwen2.5-1.5B-Instruct", "bf16=true", *overrides])


def test_suggestions_follow_the_order_of_cost():
    def seven_b(*overrides: str):
        return load_config(None, ["model_name_or_path=Qwen/Qwen1.5-7B-Chat", "bf16=true", "finetuning_type=lora",
                                  "cutoff_len=4096", *overrides])

    # activations dominate: checkpointing alone fixes it
    long = plan_config(seven_b("per_device_train_batch_size=1"), gpus="1x32GB")
    assert long.fits is False and long.suggestion == "gradient_checkpointing=true"
    assert long.suggestion_label == "gradient checkpointing" and "cheapest change that fits" in long.format()
    # 4 rows × 4096 tokens with the fused loss turned off: the 16K × 152K logits are the largest tensors; the
    # chunked loss (free, and the default) drops them
    big = plan_config(seven_b("per_device_train_batch_size=4", "gradient_accumulation_steps=2",
                              "gradient_checkpointing=true", "loss_chunk_size=0"), gpus="1x40GB")
    assert big.fits is False and big.suggestion == "loss_chunk_size=512"
    assert big.what_ifs[0].label.startswith("chunked loss")
    # already checkpointed and chunked: a smaller micro-batch with more accumulation keeps the global batch
    ckpt = plan_config(seven_b("per_device_train_batch_size=4", "gradient_accumulation_steps=2",
                               "gradient_checkpointing=true", "loss_chunk_size=4096"), gpus="1x36GB")
    assert ckpt.fits is False
    assert ckpt.suggestion == "per_device_train_batch_size=1 gradient_accumulation_steps=8"
    # model states dominate on 4 GPUs: shard them (ZeRO-2) before offloading or changing the method
    full = ["finetuning_type=full", "cutoff_len=512", "per_device_train_batch_size=1", "gradient_checkpointing=true"]
    states = plan_config(_cfg(*full), gpus="4x16GB")
    assert states.fits is False and states.suggestion == "engine=deepspeed deepspeed=ds_z2"
    assert [w.label.split(" ")[0] for w in states.what_ifs] == ["ZeRO-2", "ZeRO-3", "ZeRO-2", "ZeRO-3", "LoRA",
                                                                 "QLoRA"]
    # one small GPU: nothing to shard over, so offloading comes first
    small = plan_config(_cfg(*full), gpus="1x8GB")
    assert small.fits is False and small.suggestion == "engine=deepspeed deepspeed=ds_z2_offload"
    assert plan_config(_cfg(*full), gpus="1x6GB").suggestion == "engine=deepspeed deepspeed=ds_z3_offload"
    fitting = plan_config(_cfg("finetuning_type=lora", "cutoff_len=512"), gpus="1x80GB")
    assert fitting.fits is True and fitting.suggestion is None and "verdict: fits" in fitting.format()


def test_without_gpus_the_verdict_is_unknown_but_the_breakdown_is_there():
    report = plan_config(_cfg("finetuning_type=lora"))
    assert report.fits is None and report.peak > 0 and "unknown" in report.format()


def test_dry_run_report_names_engine_world_batch_command_and_plan(tmp_path):
    cfg = load_config(None, ["model_name_or_path=smollm2-135m-instruct", "device=cpu", "deepspeed=ds_z3",
                             "per_device_train_batch_size=2", "gradient_accumulation_steps=4", "cutoff_len=256",
                             f"output_dir={tmp_path}", "dataset=identity"])
    text = dry_run_report(cfg, 2, 1, config_path="my.yaml")
    assert "engine: deepspeed" in text and "world size: 2" in text
    assert "global batch: 16 = 2 per device × 4 accumulation × 2 rank(s)" in text
    assert "torch.distributed.run" in text and "--nproc-per-node=2" in text and "my.yaml" in text
    assert "deepspeed ZeRO-3" in text and "peak" in text


def test_preflight_warns_before_an_obvious_oom_and_is_silent_otherwise(tmp_path):
    import torch

    huge = load_config(None, ["model_name_or_path=internlm/internlm2-chat-20b", "finetuning_type=full",
                              "device=cpu"])
    warnings = preflight(huge, 1, torch.device("cpu"))
    assert len(warnings) == 1 and "out of memory" in warnings[0] and "GiB" in warnings[0]
    small = load_config(None, ["model_name_or_path=smollm2-135m-instruct", "finetuning_type=lora",
                               "cutoff_len=256", "per_device_train_batch_size=1", "device=cpu"])
    assert preflight(small, 1, torch.device("cpu")) == []
    unknown = load_config(None, ["model_name_or_path=nobody/nothing", "device=cpu"])
    assert preflight(unknown, 1, torch.device("cpu")) == []
    assert preflight(unknown, 1, "not-a-device") == []
