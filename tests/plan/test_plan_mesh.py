"""The plan on a parallel mesh: sequence, tensor and pipeline parallel and the chunked loss, per device, and guide
002's MindFormers layouts for Qwen1.5-7B on 32 GB cards."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunesmith.config import load_config
from tunesmith.plan import Setup, estimate, lookup_builtin, plan_config
from tunesmith.plan.arch import shard_view
from tunesmith.plan.hardware import GIB, DeviceSpec
from tunesmith.plan.planner import candidate_changes, mesh_allowed
from tunesmith.plan.report import fits

QWEN15 = lookup_builtin("Qwen/Qwen1.5-7B")


def npu_32gb(count: int) -> DeviceSpec:
    return DeviceSpec(count=count, memory_bytes=32 * GIB, kind="npu", text=f"{count}x32GB npu")


def _guide002_lora(*overrides: str):
    # run_qwen1_5_7b_lora.yaml: LoRA r 64 on every linear, seq_length 2048, recompute; in bf16, which tensor
    # parallel's fsdp2 mesh needs (910B; the guide's 910A has float16 only)
    return load_config(None, ["model_name_or_path=Qwen/Qwen1.5-7B", "finetuning_type=lora", "lora_rank=64",
                              "lora_target=all", "cutoff_len=2048", "bf16=true", "gradient_checkpointing=true",
                              "per_device_train_batch_size=1", "device=npu", *overrides])


def test_guide_002_lora_dp4_tp2_fits_8_cards_of_32gb():
    report = plan_config(_guide002_lora("tensor_parallel_size=2"), devices=npu_32gb(8))
    assert report.fits is True and report.setup.mesh == {"dp": 4, "sp": 1, "tp": 2, "pp": 1}
    assert "mesh: dp 4 × sp 1 × tp 2 × pp 1" in report.format()
    whole = plan_config(_guide002_lora("engine=fsdp2"), devices=npu_32gb(8))
    # fsdp2 shards the base over 8 ranks either way (1/4 of each tensor-parallel half); what tensor parallel
    # halves is what fsdp2 gathers for the running layers, the activations inside the blocks and the logits
    b, b8 = report.breakdown, whole.breakdown
    assert b.weights == pytest.approx(b8.weights, rel=0.01)
    assert b.gathered == pytest.approx(b8.gathered / 2, rel=0.01)
    # (the chunked loss's logits are split over the vocabulary; the hidden states' gradient beside them is not)
    hidden_grad = 2048 * report.setup.arch.hidden_size * 4
    assert b.logits - hidden_grad == pytest.approx((b8.logits - hidden_grad) / 2, rel=0.01)
    assert b.activations < b8.activations and report.peak < whole.peak
    assert report.breakdown.trainable == whole.breakdown.trainable  # the report counts the whole model's


def _guide002_full(**mesh: int) -> Setup:
    # run_qwen1_5_7b_finetune.yaml: full, seq_length 4096, float16, 16 micro-batches per step on 16 NPUs (the
    # config refuses pipeline × tensor parallel until both run together, so the layout is planned as a Setup)
    return Setup(arch=QWEN15, method="full", engine="ddp", precision="fp16", device="npu", seq_len=4096,
                 micro_batch=1, accumulation=16, grad_ckpt=True, world_size=16, ranks_per_node=8, **mesh)


def test_guide_002_full_dp2_tp4_pp2_fits_16_cards_of_32gb():
    layout = _guide002_full(tp=4, pp=2)
    assert layout.mesh == {"dp": 2, "sp": 1, "tp": 4, "pp": 2}
    assert fits(layout, npu_32gb(8)) is True
    b = estimate(layout)
    # each rank trains 1/8 of the weights: float32 masters, gradients and AdamW moments, 16 bytes a parameter
    share = shard_view(QWEN15, tp=4, pp=2, stage=0).total_params
    assert b.weights + b.gradients + b.optimizer == pytest.approx(16 * share, rel=1e-4)
    assert 0.12 < share / QWEN15.total_params < 0.14
    assert any("pipeline" in note for note in b.notes)
    # the same 16 cards without the mesh: every rank holds the whole model's states
    assert fits(_guide002_full(), npu_32gb(8)) is False
    assert fits(_guide002_full(tp=4), npu_32gb(8)) is False  # dp4 × tp4 on ddp: 1/4 of the states is too much


def test_tensor_parallel_splits_heads_mlp_and_vocabulary_but_not_the_norms():
    view = shard_view(QWEN15, tp=4)
    assert (view.num_heads, view.num_kv_heads, view.intermediate_size) == (8, 8, 2752)
    assert view.vocab_size == QWEN15.vocab_size // 4 and view.hidden_size == QWEN15.hidden_size
    norms = (2 * QWEN15.num_layers + 1) * QWEN15.hidden_size
    assert 4 * (view.total_params - norms) == pytest.approx(QWEN15.total_params - norms, rel=1e-9)


def test_pipeline_stages_hold_the_embedding_first_and_the_head_last():
    first, last = (shard_view(QWEN15, pp=2, stage=s) for s in (0, 1))
    assert first.num_layers + last.num_layers == QWEN15.num_layers
    assert first.total_params + last.total_params == QWEN15.total_params
    assert first.holds_embedding and not first.holds_head and last.holds_head and not last.holds_embedding
    # the first stage keeps up to pp micro-batches' activations in flight (1F1B), the last computes the loss
    one = Setup(arch=QWEN15, method="full", engine="ddp", seq_len=1024, accumulation=8, world_size=2, pp=2,
                precision="bf16")
    per_stage = [estimate(one.with_changes(arch=view, world_size=1)) for view in (first, last)]
    assert per_stage[0].logits == 0 and per_stage[1].logits > 0
    assert per_stage[0].activations == pytest.approx(2 * per_stage[1].activations, rel=1e-9)


def test_sequence_parallel_divides_activations_and_logits():
    arch = lookup_builtin("Qwen/Qwen2.5-1.5B-Instruct")
    one = Setup(arch=arch, method="lora", precision="bf16", engine="ddp", seq_len=8192, world_size=4)
    two = one.with_changes(sp=2)
    b1, b2 = estimate(one), estimate(two)
    assert b2.logits == pytest.approx(b1.logits / 2)
    # besides half the activations: the full rows' q, k, v and output of this rank's 6 query and 1 key/value heads,
    # received and reordered, in bf16; no T×T mask (the attention runs sample by sample)
    whole_rows = 8192 * arch.head_dim * (2 * arch.num_heads + 2 * arch.num_kv_heads) / 2 * 2 * 2 * arch.num_layers
    assert b2.activations - whole_rows == pytest.approx(b1.activations / 2)
    assert b2.weights == b1.weights  # ddp: every rank holds the whole model


def test_chunked_loss_keeps_chunk_by_vocab_logits():
    arch = lookup_builtin("Qwen/Qwen2.5-1.5B-Instruct")
    whole = estimate(Setup(arch=arch, seq_len=16384, precision="bf16"))
    chunked = estimate(Setup(arch=arch, seq_len=16384, precision="bf16", loss_chunk=4096))
    assert chunked.logits < 0.26 * whole.logits and chunked.activations == whole.activations


def test_lean_activations_spare_a_hidden_vector_per_norm_and_silu_gate_per_layer_and_their_outputs_too():
    arch = lookup_builtin("Qwen/Qwen2.5-1.5B-Instruct")
    plain = estimate(Setup(arch=arch, method="full", seq_len=4096))
    lean = estimate(Setup(arch=arch, method="full", seq_len=4096, lean_activations=True))
    # the lean modules' own savings, and their outputs (two norms', the MLP's product) kept as recipes
    per_layer = 2 * (2 * arch.hidden_size + arch.intermediate_size)
    assert plain.activations - lean.activations == pytest.approx(arch.num_layers * 4096 * 4 * per_layer)
    # a checkpointed layer's recompute runs outside the train step's forward: no recipes there
    checkpointed = estimate(Setup(arch=arch, method="full", seq_len=4096, lean_activations=True, grad_ckpt=True))
    plain_ckpt = estimate(Setup(arch=arch, method="full", seq_len=4096, grad_ckpt=True))
    spared = 4096 * 4 * (2 * arch.hidden_size + arch.intermediate_size)
    assert plain_ckpt.activations - checkpointed.activations == pytest.approx(spared)
    # under bf16 autocast the norms hand their projections the bf16 copy, also kept as a recipe: gone as well
    mixed = {"arch": arch, "method": "full", "seq_len": 4096, "precision": "bf16"}
    plain, lean = estimate(Setup(**mixed)), estimate(Setup(**mixed, lean_activations=True))
    # (the float32 normalized values, the norms' bf16 outputs, silu(gate) and the product in bf16)
    per_layer = 2 * 4 * arch.hidden_size + 2 * 2 * arch.hidden_size + 2 * 2 * arch.intermediate_size
    assert plain.activations - lean.activations == pytest.approx(arch.num_layers * 4096 * per_layer)


def run_plan(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "tunesmith.cli", "plan", *args], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_seq_len_32768_shows_where_sequence_parallel_becomes_necessary(tmp_path):
    config = tmp_path / "long.yaml"
    config.write_text("model_name_or_path: Qwen/Qwen1.5-7B\nfinetuning_type: lora\nbf16: true\n"
                      "gradient_checkpointing: true\nloss_chunk_size: 4096\nper_device_train_batch_size: 1\n"
                      "lean_activations: false\n", encoding="utf-8")
    short = run_plan(str(config), "--seq-len", "8192", "--gpus", "4x40GB")
    assert "verdict: fits" in short and "× 8192 tokens" in short
    long = run_plan(str(config), "--seq-len", "32768", "--gpus", "4x40GB")
    assert "verdict: does NOT fit" in long
    assert "cheapest change that fits: sequence parallel 4" in long and "(sequence_parallel_size=4)" in long
    # what it proposes is a config tunesmith accepts, and it fits
    fixed = load_config(config, ["cutoff_len=32768", "sequence_parallel_size=4"])
    assert plan_config(fixed, gpus="4x40GB").fits is True


def test_proposed_layouts_are_configs_the_schema_accepts():
    cfg = load_config(None, ["model_name_or_path=Qwen/Qwen1.5-7B", "finetuning_type=full", "bf16=true",
                             "gradient_checkpointing=true", "cutoff_len=32768", "deepspeed=ds_z2"])
    report = plan_config(cfg, gpus="8x80GB")
    assert report.what_ifs
    for what_if in report.what_ifs:
        load_config(None, ["model_name_or_path=Qwen/Qwen1.5-7B", "finetuning_type=full", "bf16=true",
                           "gradient_checkpointing=true", "cutoff_len=32768", "deepspeed=ds_z2",
                           *what_if.overrides])


def test_the_planner_proposes_no_split_the_heads_do_not_allow():
    smol = lookup_builtin("smollm2-135m-instruct")  # 9 query heads, 3 key/value heads
    s = Setup(arch=smol, method="full", engine="ddp", world_size=4, seq_len=65536, precision="bf16")
    assert not mesh_allowed(s.with_changes(sp=2)) and not mesh_allowed(s.with_changes(tp=3))
    assert mesh_allowed(s.with_changes(pp=2)) and not mesh_allowed(s.with_changes(pp=2, tp=2))
    labels = [c.label for c in candidate_changes(s, DeviceSpec(count=4, memory_bytes=8 * GIB))]
    assert not any(label.startswith(("sequence parallel", "tensor parallel")) for label in labels)


def test_a_mesh_the_planned_ranks_cannot_hold_is_noted():
    cfg = load_config(None, ["model_name_or_path=Qwen/Qwen1.5-7B", "tensor_parallel_size=4", "bf16=true"])
    report = plan_config(cfg, gpus="2x80GB")
    assert any("does not divide the 2 rank(s)" in note for note in report.to_dict()["notes"])
    assert not any("does not divide" in n for n in plan_config(cfg, gpus="8x80GB").to_dict()["notes"])
