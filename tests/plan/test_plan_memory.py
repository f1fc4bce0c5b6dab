"""The memory model against DeepSpeed's own estimators, guide 001's statement and the widely quoted 7B figures."""

from __future__ import annotations

import os

import pytest

from tunesmith.config import load_config
from tunesmith.plan import Setup, estimate, lookup_builtin, plan_config

GB = 1e9


@pytest.mark.parametrize("model", ["Qwen/Qwen-7B-Chat", "internlm/internlm2-chat-20b", "Qwen/Qwen2.5-1.5B-Instruct"])
def test_model_states_agree_with_deepspeeds_estimators(model):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    arch = lookup_builtin(model)
    p = arch.total_params
    for gpus in (2, 4, 8):
        for offload in (False, True):
            ours = estimate(Setup(arch=arch, method="full", engine="deepspeed", zero_stage=2, precision="bf16",
                                  offload_optimizer=offload, world_size=gpus, ranks_per_node=gpus))
            cpu, gpu = estimate_zero2_model_states_mem_needs(p, gpus, 1, cpu_offload=offload)
            assert ours.model_states == pytest.approx(gpu, rel=0.01)
            assert ours.host_per_node * 1.5 == pytest.approx(cpu, rel=0.01)  # 1.5: DeepSpeed's buffer factor
        for opt, par in ((False, False), (True, False), (True, True)):
            ours = estimate(Setup(arch=arch, method="full", engine="deepspeed", zero_stage=3, precision="bf16",
                                  offload_optimizer=opt, offload_param=par, world_size=gpus, ranks_per_node=gpus))
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                p, arch.largest_module_params, gpus, 1, cpu_offload=opt, cpu_offload_params=par, zero_init=False)
            assert ours.model_states == pytest.approx(gpu, rel=0.01)
            assert ours.host_per_node * 1.5 == pytest.approx(cpu, rel=0.01)


def test_all_cold_estimators_print_the_same_gpu_figure_as_the_plan(capsys):
    """DeepSpeed's user-facing *_all_cold functions (which print a table) quote our per-GPU model states."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    arch = lookup_builtin("Qwen/Qwen-7B-Chat")
    capsys.readouterr()
    estimate_zero2_model_states_mem_needs_all_cold(arch.total_params, num_gpus_per_node=4)
    estimate_zero3_model_states_mem_needs_all_cold(arch.total_params, arch.largest_module_params, num_gpus_per_node=4)
    printed = capsys.readouterr().out
    for stage, opt in ((2, False), (2, True), (3, False), (3, True)):
        ours = estimate(Setup(arch=arch, method="full", engine="deepspeed", zero_stage=stage, precision="bf16",
                              offload_optimizer=opt, world_size=4, ranks_per_node=4))
        assert f"{ours.model_states / 2**30:.2f}GB" in printed, (stage, opt, printed)


def _guide001(shared_dir, deepspeed: str):
    seed = shared_dir / "seeds" / "ds_config_seed001.json"
    ds = str(seed) if deepspeed == "seed" else deepspeed
    cfg = load_config(None, ["model_name_or_path=Qwen/Qwen-7B-Chat", "finetuning_type=full", "fp16=true",
                             f"deepspeed={ds}", "cutoff_len=128", "per_device_train_batch_size=1"])
    return plan_config(cfg, gpus="4x24GB")


def test_guide001_qwen7b_full_fits_4x24gb_only_with_zero2_cpu_optimizer_offload(shared_dir):
    with_offload = _guide001(shared_dir, "seed")  # the guide's own ds_config: ZeRO-2 + offload
    assert with_offload.fits is True
    assert with_offload.setup.zero_stage == 2 and with_offload.setup.offload_optimizer
    assert any("offload_param only applies to ZeRO-3" in n for n in with_offload.to_dict()["notes"])
    zero2 = _guide001(shared_dir, "ds_z2")
    zero3 = _guide001(shared_dir, "ds_z3")
    assert zero2.fits is False and zero3.fits is False
    assert zero2.suggestion == "engine=deepspeed deepspeed=ds_z2_offload"  # the guide's choice, found by the plan
    # the host must hold the offloaded fp32 master weights and Adam moments: 16 bytes per parameter
    assert with_offload.breakdown.host_per_node >= 16 * 7.7e9


@pytest.mark.parametrize(
    ("label", "changes", "quoted_gb"),
    [
        ("full AMP", {"method": "full"}, 120),
        ("LoRA 16-bit", {"method": "lora"}, 16),
        ("QLoRA 8-bit", {"method": "lora", "quant_bits": 8}, 10),
        ("QLoRA 4-bit", {"method": "lora", "quant_bits": 4}, 6),
    ],
)
def test_widely_quoted_7b_figures_within_20_percent(label, changes, quoted_gb):
    """LLaMA-Factory's hardware table for a 7B (LLaMA-2-7B) model, under its defaults: one GPU, batch 1,
    512 tokens, gradient checkpointing on, bf16."""
    arch = lookup_builtin("meta-llama/Llama-2-7b-hf")
    s = Setup(arch=arch, precision="bf16", micro_batch=1, seq_len=512, grad_ckpt=True, **changes)
    peak_gb = estimate(s).peak / GB
    assert peak_gb == pytest.approx(quoted_gb, rel=0.20), label


def test_sharding_checkpointing_and_quantization_each_lower_the_peak():
    arch = lookup_builtin("Qwen/Qwen2.5-1.5B-Instruct")
    base = Setup(arch=arch, method="full", engine="ddp", precision="bf16", micro_batch=4, seq_len=2048,
                 world_size=4, ranks_per_node=4)
    peak = estimate(base).peak
    assert estimate(base.with_changes(grad_ckpt=True)).peak < peak
    assert estimate(base.with_changes(engine="fsdp2")).peak < peak
    z2 = estimate(base.with_changes(engine="deepspeed", zero_stage=2)).peak
    z3 = estimate(base.with_changes(engine="deepspeed", zero_stage=3, reduce_bucket=1536**2)).peak
    assert z3 < z2 < peak
    lora = estimate(base.with_changes(method="lora")).peak
    assert estimate(base.with_changes(method="lora", quant_bits=4)).peak < lora < peak
    # activations scale with micro-batch × sequence length; the logits with the vocabulary
    small = estimate(base.with_changes(micro_batch=1, seq_len=512))
    big = estimate(base)
    assert big.activations == pytest.approx(16 * small.activations)
    assert big.logits == pytest.approx(16 * small.logits) and big.logits > 4 * 2048 * 151936 * 16


def test_4bit_weights_carry_their_quantization_constants():
    arch = lookup_builtin("meta-llama/Llama-2-7b-hf")
    double = estimate(Setup(arch=arch, method="lora", quant_bits=4, precision="bf16"))
    single = estimate(Setup(arch=arch, method="lora", quant_bits=4, double_quant=False, precision="bf16"))
    q = arch.quantizable_params
    assert single.quant_constants == pytest.approx(q * 4 / 64)  # one fp32 absmax per 64 weights
    assert double.quant_constants == pytest.approx(q / 64 + q * 4 / (64 * 256))  # 8-bit absmax + fp32 per 256
    assert single.weights - double.weights == pytest.approx(single.quant_constants - double.quant_constants)


@pytest.mark.parametrize("stage, finetuning_type, pref_loss, rows, copy", [
    ("sft", "full", "sigmoid", 1, False), ("dpo", "lora", "sigmoid", 2, False), ("dpo", "full", "sigmoid", 2, True),
    ("dpo", "full", "simpo", 2, False), ("kto", "freeze", "sigmoid", 2, True), ("rm", "full", "sigmoid", 2, False),
])
def test_preference_stages_plan_two_rows_per_example_and_the_reference_copy_they_keep(
    stage, finetuning_type, pref_loss, rows, copy
):
    from tunesmith.config import Config
    from tunesmith.plan.planner import setup_from_config

    arch = lookup_builtin("Qwen/Qwen2.5-1.5B-Instruct")
    cfg = Config(model_name_or_path="x", stage=stage, finetuning_type=finetuning_type, pref_loss=pref_loss)
    setup = setup_from_config(cfg, arch, 1, 1, "cuda")
    assert (setup.rows_per_example, setup.reference_copy) == (rows, copy)
    alone = estimate(setup.with_changes(rows_per_example=1, reference_copy=False))
    planned = estimate(setup)
    assert planned.activations == pytest.approx(rows * alone.activations)
    assert planned.weights - alone.weights == pytest.approx(4.0 * arch.total_params if copy else 0.0)


def test_a_cpu_bf16_plan_counts_the_probabilities_its_gemm_attention_keeps():
    from tunesmith.model.gemm_attention import MAX_LENGTH
    from tunesmith.plan.memory import CPU_GEMM_ATTENTION_MAX_LENGTH, per_layer_activation_bytes

    assert CPU_GEMM_ATTENTION_MAX_LENGTH == MAX_LENGTH
    arch = lookup_builtin("smollm2-135m-instruct")
    cpu = Setup(arch=arch, method="lora", device="cpu", micro_batch=4)
    heads, layers = arch.num_heads, arch.num_layers
    for seq_len, kept in ((256, 256), (2048, MAX_LENGTH)):  # a row's worth of probabilities, up to the bound
        fp32, bf16 = (estimate(cpu.with_changes(seq_len=seq_len, precision=p)).activations for p in ("fp32", "bf16"))
        gpu = estimate(cpu.with_changes(seq_len=seq_len, precision="bf16", device="cuda")).activations
        assert bf16 - gpu == 2 * heads * kept * 4 * seq_len * layers
        assert fp32 > gpu  # float32 activations, no probabilities
    deepspeed = cpu.with_changes(engine="deepspeed", zero_stage=2)  # casts the module: no autocast, no GEMM path
    assert per_layer_activation_bytes(deepspeed.with_changes(precision="bf16")) == per_layer_activation_bytes(
        deepspeed.with_changes(precision="bf16", device="cuda"))
