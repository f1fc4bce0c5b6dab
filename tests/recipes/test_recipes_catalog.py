"""The packaged recipes: each validates, carries its guide's hyper-parameters, fits the hardware it names, and its
launch line is a command tunesmith accepts."""

from __future__ import annotations

import json
import shlex

import pytest

from tunesmith.config import load_config
from tunesmith.config.schema import NOT_SUPPORTED_YET
from tunesmith.errors import ConfigError
from tunesmith.recipes import (
    Hardware,
    get_recipe,
    packaged_identity_dir,
    parse_hardware,
    plan_recipe,
    recipe_names,
)

NAMES = recipe_names()

# The seed setups the issue asks for, and the hub model each guide uses.
SEED_MODELS = {
    "qwen7b_full_zero2_pytorchjob": "Qwen/Qwen-7B",  # guide 000
    "qwen7b_chat_full_zero2_offload": "Qwen/Qwen-7B-Chat",  # guide 001
    "qwen1_5_7b_lora_ascend": "Qwen/Qwen1.5-7B",  # guide 002
    "qwen1_5_7b_full_ascend": "Qwen/Qwen1.5-7B",
    "internlm2_1_8b_qlora": "internlm/internlm2-chat-1_8b",  # guide 003
    "internlm2_20b_qlora_zero2": "internlm/internlm2-chat-20b",
    "qwen2_5_1_5b_lora_identity": "Qwen/Qwen2.5-1.5B-Instruct",  # guide 004
}
# The other stages, sized for the seed guides' models (and trained on the packaged identity pairs / feedback)
STAGE_VARIANTS = {
    "qwen2_5_1_5b_lora_dpo": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2_5_1_5b_lora_kto": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2_5_1_5b_lora_reward": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen7b_chat_lora_dpo": "Qwen/Qwen-7B-Chat",
}
# Guide 002's MindFormers layouts and guide 003's sequence-parallel key as tunesmith meshes: (model, mesh)
MESH_RECIPES = {
    "qwen1_5_7b_lora_tp2": ("Qwen/Qwen1.5-7B", {"dp": 4, "sp": 1, "tp": 2, "pp": 1}),
    "qwen1_5_7b_full_tp4": ("Qwen/Qwen1.5-7B", {"dp": 4, "sp": 1, "tp": 4, "pp": 1}),
    "internlm2_20b_qlora_sp2": ("internlm/internlm2-chat-20b", {"dp": 1, "sp": 2, "tp": 1, "pp": 1}),
}
CPU_RECIPES = ("smollm2_lora_identity_cpu", "smollm2_full_alpaca_cpu", "smollm2_qlora_alpaca_cpu",
               "smollm2_lora_dpo_identity_cpu", "smollm2_lora_pretrain_cpu")

# What each guide (or the config file it uses) states, as tunesmith values. A recipe edit that drifts from its
# guide fails here.
GUIDE_VALUES: dict[str, dict] = {
    # 000: DataLoader batch 4, GAS 8, lr 5e-5, wd 1e-2, clip 1.0, 3 epochs, max_length 512, fp16, ZeRO-2 offload
    "qwen7b_full_zero2_pytorchjob": dict(
        finetuning_type="full", per_device_train_batch_size=4, gradient_accumulation_steps=8, learning_rate=5e-5,
        weight_decay=0.01, max_grad_norm=1.0, num_train_epochs=3, cutoff_len=512, fp16=True, save_steps=1000,
        engine="deepspeed", deepspeed="ds_z2_offload",
    ),
    # 001: train.sh (batch 1, GAS 1, 3 epochs, lr 1e-4, logging 10, save 100), MAX_LENGTH 128, the system prompt
    "qwen7b_chat_full_zero2_offload": dict(
        finetuning_type="full", per_device_train_batch_size=1, gradient_accumulation_steps=1, num_train_epochs=3,
        learning_rate=1e-4, logging_steps=10, save_steps=100, cutoff_len=128, fp16=True, engine="deepspeed",
        default_system="现在你要扮演皇帝身边的女人--甄嬛.", lr_scheduler_type="linear",
    ),
    # 002 LoRA: run_qwen1_5_7b_lora.yaml (r1.0)
    "qwen1_5_7b_lora_ascend": dict(
        finetuning_type="lora", lora_rank=64, lora_alpha=16, lora_dropout=0.05, lora_target="all", cutoff_len=2048,
        num_train_epochs=5, learning_rate=8e-4, lr_scheduler_type="cosine", warmup_ratio=0.01, adam_beta2=0.95,
        adam_epsilon=1e-6, weight_decay=0.1, fp16=True, save_steps=10000, save_total_limit=3, seed=0, device="npu",
    ),
    # 002 full: run_qwen1_5_7b_finetune.yaml (r1.0), global batch 2 x dp 2 x 16 micro-batches = 64 on 16 devices
    "qwen1_5_7b_full_ascend": dict(
        finetuning_type="full", cutoff_len=4096, num_train_epochs=3, learning_rate=8e-4, lr_scheduler_type="cosine",
        warmup_ratio=0.01, adam_beta2=0.95, adam_epsilon=1e-6, weight_decay=0.1, fp16=True, save_steps=10000,
        save_total_limit=3, seed=0, device="npu",
    ),
    # 003 1.8B: XTuner internlm2_1_8b_qlora_alpaca_e3 + the guide's edits
    "internlm2_1_8b_qlora": dict(
        quantization_bit=4, quantization_type="nf4", double_quantization=True, lora_rank=64, lora_alpha=16,
        lora_dropout=0.1, lora_target="all", cutoff_len=1024, packing=True, per_device_train_batch_size=1,
        gradient_accumulation_steps=16, num_train_epochs=2, learning_rate=2e-4, warmup_ratio=0.03,
        lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0, fp16=True, save_total_limit=3,
        gradient_checkpointing=True, template="internlm2", trust_remote_code=True,
    ),
    # 003 20B: section 3's config (4096, packed, batch 4, accumulation 16, 50 epochs), --deepspeed deepspeed_zero2
    "internlm2_20b_qlora_zero2": dict(
        quantization_bit=4, quantization_type="nf4", double_quantization=True, lora_rank=64, lora_alpha=16,
        lora_dropout=0.1, cutoff_len=4096, packing=True, per_device_train_batch_size=4,
        gradient_accumulation_steps=16, num_train_epochs=50, learning_rate=2e-4, warmup_ratio=0.03, fp16=True,
        save_total_limit=3, engine="deepspeed", deepspeed="ds_z2",
    ),
    # 004: the guide's LLaMA-Factory config
    "qwen2_5_1_5b_lora_identity": dict(
        finetuning_type="lora", lora_target="all", dataset=["identity"], template="qwen", cutoff_len=1024,
        max_samples=1000, num_train_epochs=20.0, learning_rate=1e-4, lr_scheduler_type="cosine",
        resume_from_checkpoint=None, report_to=["tensorboard"], export_size=5, export_device="auto",
    ),
}


def _config(name: str, overrides: list[str] | None = None):
    return load_config(get_recipe(name).path, overrides)


def test_the_catalog_holds_every_seed_setup_and_the_cpu_recipes():
    assert set(SEED_MODELS) | set(STAGE_VARIANTS) | set(MESH_RECIPES) | set(CPU_RECIPES) == set(NAMES)
    assert {get_recipe(name).values.get("stage", "sft") for name in NAMES} == {"sft", "pt", "dpo", "kto", "rm"}
    guides = {get_recipe(name).guide_number for name in SEED_MODELS}
    assert guides == {"000", "001", "002", "003", "004"}


@pytest.mark.parametrize("name", NAMES)
def test_recipe_validates_with_no_unsupported_keys(name):
    recipe = get_recipe(name)
    assert not set(recipe.values) & NOT_SUPPORTED_YET
    cfg = load_config(recipe.path)  # the schema's validation: unknown keys, types, cross-key rules
    cfg.require("model_name_or_path", "dataset", "output_dir")  # what `tunesmith train` requires
    assert cfg.output_dir == f"runs/{name}" or cfg.output_dir.endswith(f"/runs/{name}")


@pytest.mark.parametrize("name", NAMES)
def test_recipe_header_names_guide_hardware_launch_and_what_to_edit(name):
    recipe = get_recipe(name)
    assert recipe.title and recipe.edit
    assert isinstance(recipe.hardware, Hardware)
    assert f"{name}.yaml" in recipe.launch and recipe.launch.startswith("tunesmith ")
    models = {**SEED_MODELS, **STAGE_VARIANTS, **{n: model for n, (model, _) in MESH_RECIPES.items()}}
    if name in models:
        assert recipe.values["model_name_or_path"] == models[name]
        assert "never downloads" in recipe.text.split("###")[0]  # said in the header comment
        assert "model_name_or_path" in recipe.edit
    else:
        assert recipe.hardware.device == "cpu"
        assert recipe.values["model_name_or_path"] == "smollm2-135m-instruct"


@pytest.mark.parametrize("name", sorted(GUIDE_VALUES))
def test_recipe_carries_its_guides_hyper_parameters(name):
    cfg = _config(name)
    for key, want in GUIDE_VALUES[name].items():
        assert getattr(cfg, key) == want, f"{name}: {key}"


def test_guide_002_global_batch_is_kept_on_16_ranks():
    recipe = get_recipe("qwen1_5_7b_full_ascend")
    cfg = _config(recipe.name)
    # MindFormers: batch_size 2 x data_parallel 2 x micro_batch_num 16 = 64 sequences per step
    assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * recipe.hardware.world_size == 64


@pytest.mark.parametrize("name", sorted(MESH_RECIPES))
def test_mesh_recipes_plan_the_guides_split_on_their_hardware(name):
    recipe = get_recipe(name)
    report = plan_recipe(recipe)
    mesh = MESH_RECIPES[name][1]
    assert report.setup.mesh == mesh and report.fits is True
    assert mesh["dp"] * mesh["sp"] * mesh["tp"] * mesh["pp"] == recipe.hardware.world_size
    if mesh["tp"] > 1:  # a tensor-parallel group stays inside one server
        assert mesh["tp"] <= recipe.hardware.count and recipe.guide_number == "002"
    else:
        assert recipe.guide_number == "003" and "sequence_parallel_size" in recipe.guide
    # without the split, the same config needs more memory per device
    plain = plan_recipe(recipe, ["tensor_parallel_size=1", "sequence_parallel_size=1"])
    assert plain.peak > report.peak


def test_mesh_recipes_keep_their_guides_global_batch():
    # guide 002 full: 64 sequences per step; guide 003: XTuner multiplies the accumulation by the SP size
    full = _config("qwen1_5_7b_full_tp4")
    assert full.per_device_train_batch_size * full.gradient_accumulation_steps * 4 == 64
    sp = _config("internlm2_20b_qlora_sp2")
    zero2 = _config("internlm2_20b_qlora_zero2")
    assert sp.gradient_accumulation_steps == zero2.gradient_accumulation_steps * sp.sequence_parallel_size
    lora = _config("qwen1_5_7b_lora_tp2")
    for key in GUIDE_VALUES["qwen1_5_7b_lora_ascend"]:
        if key not in ("fp16", "device"):  # tensor parallel's fsdp2 mesh trains in bf16
            assert getattr(lora, key) == GUIDE_VALUES["qwen1_5_7b_lora_ascend"][key], key
    assert lora.bf16 and lora.device == "npu"


def test_guide_001_deepspeed_config_is_the_guides_file(shared_dir):
    guide = json.loads((shared_dir / "seeds" / "ds_config_seed001.json").read_text())
    ours = get_recipe("qwen7b_chat_full_zero2_offload").values["deepspeed"]
    # Dropped on purpose (said in the recipe): offload_param (ignored below ZeRO-3), the all-off
    # activation_checkpointing section, min_lr (not a DeepSpeed key).
    guide["zero_optimization"].pop("offload_param")
    for key in ("activation_checkpointing", "min_lr"):
        guide.pop(key)
    assert ours == guide


@pytest.mark.parametrize("name", NAMES)
def test_recipe_fits_the_hardware_it_names(name):
    recipe = get_recipe(name)
    report = plan_recipe(recipe)
    assert report.setup.world_size == recipe.hardware.world_size
    assert report.fits is True, f"{name} does not fit {recipe.hardware}:\n{report.format()}"


def test_a_recipe_on_smaller_hardware_does_not_fit():
    # The plan is not vacuous: guide 001's full fine-tune needs the ZeRO-2 offload of 4 cards; 2 x 16 GB fail.
    from tunesmith.plan import plan_config

    report = plan_config(_config("qwen7b_chat_full_zero2_offload"), gpus="2x16GB")
    assert report.fits is False


@pytest.mark.parametrize("name", [n for n in NAMES if get_recipe(n).values.get("deepspeed")])
def test_recipe_deepspeed_config_resolves_without_contradictions(name):
    from tunesmith.config.deepspeed import RunValues, resolve_ds_config
    from tunesmith.plan.planner import resolve_arch

    recipe = get_recipe(name)
    cfg = _config(name)
    run = RunValues(
        micro_batch=cfg.per_device_train_batch_size, accumulation=cfg.gradient_accumulation_steps,
        world_size=recipe.hardware.world_size, max_grad_norm=cfg.max_grad_norm, learning_rate=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_steps, total_steps=1000,
        precision="bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "fp32",
        hidden_size=resolve_arch(cfg).hidden_size, on_cpu=False,
    )
    resolved = resolve_ds_config(cfg.deepspeed, run)
    assert resolved.warnings == []  # no ignored setting, no scheduler that disagrees with lr_scheduler_type
    assert resolved.for_deepspeed["fp16"]["enabled"] is cfg.fp16
    assert resolved.stage in (2, 3)


def _launch_argv(recipe) -> list[str]:
    words = shlex.split(recipe.launch)
    assert words[0] == "tunesmith"
    fill = {"$NODE_RANK": "0", "$RANK": "0", "$MASTER_ADDR": "10.0.0.1", "$MASTER_PORT": "29500"}
    return [str(recipe.path) if w == f"{recipe.name}.yaml" else fill.get(w, w) for w in words[1:]]


@pytest.mark.parametrize("name", NAMES)
def test_launch_line_is_a_tunesmith_command_for_the_named_hardware(name):
    from tunesmith.cli import build_parser

    recipe = get_recipe(name)
    args = build_parser().parse_args(_launch_argv(recipe))
    hw = recipe.hardware
    if args.command == "train":
        assert (args.nproc_per_node or 1) == hw.count
        assert (args.nnodes or 1) == hw.nodes
        assert args.config == str(recipe.path)
    else:
        assert (args.command, args.launch_command) == ("launch", "k8s")
        assert (args.nproc_per_node, args.nnodes or 1) == (hw.count, hw.nodes)


def test_packaged_identity_recipe_copy_points_at_the_packaged_data(tmp_path):
    from tunesmith.recipes import copy_recipe

    written = copy_recipe("qwen2_5_1_5b_lora_identity", tmp_path)
    cfg = load_config(written)
    assert cfg.dataset_dir == str(packaged_identity_dir())
    info = json.loads((packaged_identity_dir() / "dataset_info.json").read_text())
    assert "identity" in info and (packaged_identity_dir() / info["identity"]["file_name"]).is_file()
    assert cfg.placeholders == {"name": "北大人工智能助手", "author": "北京大学"}
    # everything else is the packaged text, comments included
    assert written.read_text().replace(f"dataset_dir: {packaged_identity_dir()}", "").count("\n") == (
        get_recipe("qwen2_5_1_5b_lora_identity").text.count("\n")
    )


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("4x24GB", Hardware("gpu", 4, 24.0, 1)),
        ("8x32GB npu, 2 nodes", Hardware("npu", 8, 32.0, 2)),
        ("2x40GB, 2 nodes", Hardware("gpu", 2, 40.0, 2)),
        ("cpu", Hardware("cpu", 1, None, 1)),
    ],
)
def test_parse_hardware(text, want):
    assert parse_hardware(text) == want
    assert str(want) == text


@pytest.mark.parametrize("text", ["4 GPUs", "x24GB", "4x24", "8x32GB tpu"])
def test_parse_hardware_refuses_other_shapes(text):
    with pytest.raises(ConfigError, match="COUNTxMEMGB"):
        parse_hardware(text)


def _render_k8s(capsys, argv: list[str]) -> dict:
    import yaml

    from tunesmith.cli import main

    assert main([*argv, "--dry-run"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    return next(d for d in docs if d and d.get("kind") == "PyTorchJob")


def test_pytorchjob_recipe_renders_the_job_its_hardware_names(capsys):
    # Guide 000's recipe launches through `tunesmith launch k8s`: its launch line renders a PyTorchJob with one
    # Master and nnodes-1 Workers of nproc-per-node GPUs each.
    recipe = get_recipe("qwen7b_full_zero2_pytorchjob")
    job = _render_k8s(capsys, _launch_argv(recipe))
    specs = job["spec"]["pytorchReplicaSpecs"]
    hw = recipe.hardware
    assert specs["Master"]["replicas"] + specs["Worker"]["replicas"] == hw.nodes
    limits = specs["Master"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == str(hw.count) and limits["memory"] == "256Gi"


@pytest.mark.parametrize("name", ["qwen1_5_7b_lora_ascend", "qwen1_5_7b_full_ascend", "qwen1_5_7b_lora_tp2",
                                  "qwen1_5_7b_full_tp4"])
def test_ascend_recipes_render_as_ascend_pytorchjobs(capsys, name):
    recipe = get_recipe(name)
    hw = recipe.hardware
    argv = ["launch", "k8s", str(recipe.path), "--image", "registry.local/tunesmith:latest", "--nproc-per-node",
            str(hw.count), "--nnodes", str(hw.nodes), "--accelerator", "huawei.com/Ascend910"]
    assert "--accelerator huawei.com/Ascend910" in " ".join(recipe.text.split())  # the header says how
    job = _render_k8s(capsys, argv)
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert master["resources"]["limits"]["huawei.com/Ascend910"] == str(hw.count)
