"""The speed features of a run: the LM head on target positions only (the default) trains to the same losses as
the full head, the fused chunked loss too; LoRA keeps its frozen base in bf16 where the CPU multiplies bf16 in
hardware; and the run's first lines say which features are on."""

from __future__ import annotations

import logging

import pytest
import torch
from stage_data import stage_values, write_stage_data
from test_pipeline import write_run_config
from train_helpers import make_cfg
from transformers import AutoModelForCausalLM

from tunesmith.config import load_config
from tunesmith.config.schema import Config, MethodArgs
from tunesmith.model import gemm_attention
from tunesmith.train import precision, train
from tunesmith.train.objectives.head import lm_head
from tunesmith.train.observe import read_log


@pytest.fixture(scope="module")
def stage_data(tmp_path_factory):
    return write_stage_data(tmp_path_factory.mktemp("stage-data"))


def _config(folder, tiny_model_dir, rows, **keys) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    return write_run_config(folder, tiny_model_dir, rows, **keys)


def _losses(config: str, caplog) -> tuple[list[float], str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tunesmith"):
        train(load_config(config))
    out = load_config(config).output_dir
    return [e["loss"] for e in read_log(out) if "loss" in e], caplog.text


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_target_only_and_chunked_heads_train_to_the_full_heads_losses(tmp_path, tiny_model_dir, identity_rows,
                                                                          caplog, method):
    common = dict(finetuning_type=method, max_steps=4, packing=True, cutoff_len=96)
    runs = {}
    arms = {"full": dict(target_only_head=False), "targets": dict(loss_chunk_size=0), "chunked": dict(loss_chunk_size=16)}
    for name, keys in arms.items():
        config = _config(tmp_path / name, tiny_model_dir, identity_rows * 3, **common, **keys)
        runs[name] = _losses(config, caplog)
    assert runs["targets"][0] == pytest.approx(runs["full"][0], abs=1e-5)
    assert runs["chunked"][0] == pytest.approx(runs["full"][0], abs=1e-5)
    speed_line = "speed: float32; packing without cross-attention; attention sample by sample (no T×T mask); "
    assert speed_line in runs["full"][1]
    assert "LM head on every position; activation" in runs["full"][1]
    assert "LM head on target positions only; activation" in runs["targets"][1]
    assert "fused with the loss in chunks of 16" in runs["chunked"][1]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_attention_sample_by_sample_trains_to_the_masked_attentions_losses(tmp_path, tiny_model_dir, identity_rows,
                                                                         caplog, method):
    common = dict(finetuning_type=method, max_steps=4, packing=True, cutoff_len=96)
    masked = _losses(_config(tmp_path / "sdpa", tiny_model_dir, identity_rows * 3, flash_attn="sdpa", **common),
                     caplog)
    ours = _losses(_config(tmp_path / "auto", tiny_model_dir, identity_rows * 3, **common), caplog)
    assert "attention with masks" in masked[1] and "attention sample by sample (no T×T mask)" in ours[1]
    assert ours[0] == pytest.approx(masked[0], abs=1e-5) and len(ours[0]) == 4


def test_fused_lora_layers_train_to_pefts_losses_and_the_speed_line_says_so(tmp_path, tiny_model_dir,
                                                                            identity_rows, caplog):
    common = dict(finetuning_type="lora", max_steps=4, packing=True, cutoff_len=96, learning_rate=1e-2)
    peft = _losses(_config(tmp_path / "peft", tiny_model_dir, identity_rows * 3, fused_lora=False, **common), caplog)
    fused = _losses(_config(tmp_path / "fused", tiny_model_dir, identity_rows * 3, **common), caplog)
    assert "LoRA fused into the base projection's GEMM" in fused[1]
    assert "LoRA fused" not in peft[1]
    assert fused[0] == pytest.approx(peft[0], abs=1e-5) and len(fused[0]) == 4 and fused[0][-1] < fused[0][0]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_lean_activations_train_to_the_same_losses_and_the_speed_line_says_so(tmp_path, tiny_model_dir,
                                                                              identity_rows, caplog, method):
    common = dict(finetuning_type=method, max_steps=4, packing=True, cutoff_len=96, learning_rate=1e-2)
    plain = _losses(_config(tmp_path / "plain", tiny_model_dir, identity_rows * 3, lean_activations=False, **common),
                    caplog)
    lean = _losses(_config(tmp_path / "lean", tiny_model_dir, identity_rows * 3, **common), caplog)
    assert ("5 RMSNorms and 2 SwiGLU MLPs keep only their inputs for backward, and the layers that read their "
            "outputs recompute them") in lean[1]
    assert "keep only their inputs" not in plain[1]
    assert lean[0] == pytest.approx(plain[0], abs=1e-5) and len(lean[0]) == 4 and lean[0][-1] < lean[0][0]


def test_the_fused_chunked_loss_is_the_default_head_and_target_only_head_false_turns_it_off():
    assert lm_head(Config()).chunk_size == 512 and lm_head(Config()).target_only
    assert lm_head(Config(loss_chunk_size=0)).chunk_size == 0 and lm_head(Config(loss_chunk_size=0)).target_only
    for full in (Config(target_only_head=False), Config(target_only_head=False, loss_chunk_size=16)):
        head = lm_head(full)  # LLaMA-Factory's full head (bench/gpu_speed.py's LF arm): the fused loss is gathered
        assert head.chunk_size == 0 and not head.target_only


def test_enable_liger_kernel_without_a_gpu_uses_the_chunked_loss_and_says_so(tiny_model_dir, caplog):
    cfg = Config(enable_liger_kernel=True)
    assert cfg.resolved_chunk_size() == 512
    assert Config(enable_liger_kernel=True, loss_chunk_size=0).resolved_chunk_size() == 512
    assert Config(enable_liger_kernel=True, loss_chunk_size=1024).resolved_chunk_size() == 1024
    head = lm_head(cfg)
    with caplog.at_level(logging.INFO, logger="tunesmith"):
        head.install(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert head.mode == "chunked" and head.switch is not None and head.switch.liger is None
    assert "enable_liger_kernel: no CUDA device; tunesmith's chunked loss does the same in plain torch" in caplog.text


@pytest.mark.parametrize("fast", [True, False])
def test_lora_keeps_its_frozen_base_in_bf16_only_where_the_cpu_has_bf16_in_hardware(monkeypatch, fast):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast)
    cpu = torch.device("cpu")
    lora = MethodArgs(finetuning_type="lora")
    assert precision.frozen_base_dtype(lora, "bf16", cpu) == (torch.bfloat16 if fast else torch.float32)
    assert precision.frozen_base_dtype(lora, "fp32", cpu) == torch.float32
    assert precision.frozen_base_dtype(MethodArgs(finetuning_type="full"), "bf16", cpu) == torch.float32


def test_cpu_bf16_detection_reads_the_cpu_flags():
    flags = open("/proc/cpuinfo").read().split()
    precision.cpu_has_fast_bf16.cache_clear()
    assert precision.cpu_has_fast_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_lora_with_a_bf16_base_trains_close_to_float32(tmp_path, tiny_model_dir, identity_rows, caplog, monkeypatch):
    """bf16 keeps about 3 significant digits: over 12 steps the losses stay within 2 % of the float32 run's."""
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    common = dict(finetuning_type="lora", max_steps=12, learning_rate=2e-2)
    fp32, _ = _losses(_config(tmp_path / "fp32", tiny_model_dir, identity_rows * 4, **common), caplog)
    bf16, text = _losses(_config(tmp_path / "bf16", tiny_model_dir, identity_rows * 4, bf16=True, **common),
                         caplog)
    assert "speed: bf16 autocast (frozen weights stored in bf16)" in text
    assert bf16[-1] < bf16[0] - 0.3
    assert bf16 == pytest.approx(fp32, rel=2e-2)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_packed_bf16_runs_attend_short_samples_as_gemms_train_close_to_float32_and_say_so(
        tmp_path, tiny_model_dir, identity_rows, caplog, monkeypatch, method):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(gemm_attention, "cpu_has_fast_bf16", lambda: True)
    calls = []
    real = gemm_attention.causal_gemm_attention
    monkeypatch.setattr(gemm_attention, "causal_gemm_attention", lambda *a: calls.append(a[0].dtype) or real(*a))
    common = dict(finetuning_type=method, max_steps=12, packing=True, cutoff_len=96,
                  learning_rate=2e-2 if method == "lora" else 1e-3)
    fp32, fp32_text = _losses(_config(tmp_path / "fp32", tiny_model_dir, identity_rows * 4, **common), caplog)
    assert not calls and "GEMMs" not in fp32_text
    bf16, text = _losses(_config(tmp_path / "bf16", tiny_model_dir, identity_rows * 4, bf16=True, **common),
                         caplog)
    assert "attention sample by sample (no T×T mask), samples of up to 512 tokens as GEMMs;" in text
    assert calls and set(calls) == {torch.bfloat16}
    assert bf16[-1] < bf16[0] - 0.3
    assert bf16 == pytest.approx(fp32, rel=2e-2)


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("stage", ["pt", "dpo", "kto"])
def test_every_causal_lm_stage_trains_to_the_same_losses_with_the_target_only_head(tmp_path, tiny_model_dir,
                                                                                   stage_data, monkeypatch, caplog,
                                                                                   stage, method):
    """dpo and kto: the policy's and the reference's log-probs (a LoRA policy with its adapter off, or a frozen
    copy) from the target positions only; their metrics too."""
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")
    lora = dict(finetuning_type="lora", lora_rank=4, learning_rate=1e-2)
    values = dict(max_steps=4, per_device_train_batch_size=4, **stage_values(stage, stage_data),
                  **(lora if method == "lora" else dict(finetuning_type="full", learning_rate=1e-3)))
    logs = {}
    for head in (False, True):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tunesmith"):
            train(make_cfg(tmp_path / str(head), tiny_model_dir, target_only_head=head, **values))
        logs[head] = [e for e in read_log(tmp_path / str(head)) if "loss" in e]
        assert ("LM head on target positions only" if head else "LM head on every position") in caplog.text
    assert len(logs[True]) == 4
    for full, targets in zip(logs[False], logs[True], strict=True):
        assert targets["loss"] == pytest.approx(full["loss"], abs=2e-5)  # as 2 ranks = 1 rank
        for name, value in full.items():  # the metrics: sums of log-probs (~160), float32 bits after 3 updates
            if isinstance(value, float) and name not in ("elapsed", "tokens_per_s", "lr", "grad_norm"):
                assert targets[name] == pytest.approx(value, rel=1e-5, abs=1e-5), (full["step"], name)
