"""The DeepSpeed config: presets, "auto" filled from the tunesmith config, contradictions refused, what
tunesmith adds or turns off, and the `deepspeed` / `engine` keys. No DeepSpeed import: plain dict work."""

from __future__ import annotations

import json

import pytest

from tunesmith.config import load_config
from tunesmith.config.deepspeed import PRESETS, RunValues, read_ds_config, resolve_ds_config
from tunesmith.errors import ConfigError

RUN = RunValues(
    micro_batch=2,
    accumulation=3,
    world_size=2,
    max_grad_norm=1.0,
    learning_rate=1e-4,
    betas=(0.9, 0.95),
    eps=1e-8,
    weight_decay=0.1,
    lr_scheduler_type="linear",
    warmup_steps=5,
    total_steps=100,
    precision="fp32",
    hidden_size=64,
    on_cpu=True,
)


def test_guide_001_config_is_filled_from_the_tunesmith_config(shared_dir):
    resolved = resolve_ds_config(str(shared_dir / "seeds" / "ds_config_seed001.json"), RUN)
    full = resolved.full
    assert (full["train_micro_batch_size_per_gpu"], full["gradient_accumulation_steps"]) == (2, 3)
    assert full["train_batch_size"] == 2 * 3 * 2 and full["gradient_clipping"] == 1.0
    assert full["optimizer"]["params"] == {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    assert full["scheduler"]["params"] == {
        "last_batch_iteration": -1,
        "total_num_steps": 100,
        "warmup_min_lr": 0.0,
        "warmup_max_lr": 1e-4,
        "warmup_num_steps": 5,
    }
    assert full["fp16"]["enabled"] is False and full["bf16"] == {"enabled": False}
    assert "auto" not in json.dumps(full)
    # DeepSpeed gets no scheduler (tunesmith's drives the lr), CPU Adam (offload) rather than torch's
    assert "scheduler" not in resolved.for_deepspeed and "torch_adam" not in full["optimizer"]["params"]
    assert resolved.stage == 2 and resolved.offload_optimizer
    assert any("offload_param only applies to ZeRO stage 3" in w for w in resolved.warnings)
    assert any(
        "WarmupDecayLR is not passed to DeepSpeed" in n for n in resolved.notes
    )  # linear ≙ WarmupDecayLR


def test_presets_resolve_and_explicit_contradictions_are_refused(tmp_path):
    for name in PRESETS:
        resolved = resolve_ds_config(name, RUN)
        assert "auto" not in json.dumps(resolved.for_deepspeed), name
        assert resolved.source == f"preset {name}"
    z3 = resolve_ds_config("ds_z3", RUN).for_deepspeed["zero_optimization"]
    assert (z3["reduce_bucket_size"], z3["stage3_param_persistence_threshold"]) == (64 * 64, 640)
    assert resolve_ds_config("ds_z2", RUN).for_deepspeed["optimizer"]["params"]["torch_adam"] is True  # CPU
    assert (
        "torch_adam"
        not in resolve_ds_config("ds_z2", RunValues(**{**RUN.__dict__, "on_cpu": False})).full["optimizer"][
            "params"
        ]
    )

    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 4,
                "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}},
                "zero_optimization": {"stage": 1},
            }
        )
    )
    with pytest.raises(ConfigError) as err:
        resolve_ds_config(str(path), RUN)
    assert "train_micro_batch_size_per_gpu=4 but per_device_train_batch_size gives 2" in str(err.value)
    assert "optimizer.params.lr=0.0003 but learning_rate gives 0.0001" in str(err.value)


def test_missing_sections_get_tunesmith_values_and_unsupported_settings_are_refused():
    resolved = resolve_ds_config({"zero_optimization": {"stage": 3, "round_robin_gradients": True}}, RUN)
    cfg = resolved.for_deepspeed
    assert cfg["gradient_clipping"] == 1.0 and cfg["train_batch_size"] == 12
    assert cfg["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "torch_adam": True},
    }
    assert cfg["bf16"] == {"enabled": False} and cfg["fp16"] == {"enabled": False}
    assert cfg["zero_optimization"]["round_robin_gradients"] is False
    assert any("round_robin_gradients turned off" in n for n in resolved.notes)
    bf16 = resolve_ds_config("ds_z2", RunValues(**{**RUN.__dict__, "precision": "bf16"})).for_deepspeed
    assert bf16["bf16"] == {"enabled": True} and bf16["fp16"]["enabled"] is False

    for bad, message in (
        ({"optimizer": {"type": "Lamb"}}, "optimizer type 'Lamb' is not supported"),
        (
            {"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}},
            "needs ZeRO stage 1, 2 or 3",
        ),
        (
            {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
            "device=nvme is not supported",
        ),
        ({"zero_optimization": {"stage": 5}}, "must be 0, 1, 2 or 3"),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 50}}}, "warmup_num_steps=50"),
    ):
        with pytest.raises(ConfigError, match=message):
            resolve_ds_config(bad, RUN)
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        read_ds_config("ds_z9")
    with pytest.raises(ConfigError, match="has no hidden_size"):
        resolve_ds_config("ds_z3", RunValues(**{**RUN.__dict__, "hidden_size": None}))
    cosine = resolve_ds_config(
        {"scheduler": {"type": "WarmupDecayLR"}}, RunValues(**{**RUN.__dict__, "lr_scheduler_type": "cosine"})
    )
    assert any("set lr_scheduler_type to choose" in w for w in cosine.warnings)


def test_deepspeed_key_selects_the_engine():
    assert load_config(None, ["deepspeed=ds_z3"]).engine == "deepspeed"
    cfg = load_config(None, ["engine=deepspeed"])
    assert cfg.deepspeed == "ds_z2"  # the default preset
    assert load_config(None, ["deepspeed={zero_optimization: {stage: 1}}"]).deepspeed == {
        "zero_optimization": {"stage": 1}
    }
    with pytest.raises(ConfigError, match="deepspeed is set but engine is fsdp2"):
        load_config(None, ["deepspeed=ds_z2", "engine=fsdp2"])
