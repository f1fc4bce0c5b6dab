"""Every optimizer a LLaMA-Factory config can choose — HF's `optim` names (torch, bitsandbytes) and LF's GaLore,
APOLLO (both also layerwise), BAdam, Adam-mini, Muon, LoRA+ and pure_bf16 — trains the tiny model (the loss goes
down), resumes exactly (an interrupted run re-run ends as the uninterrupted one), and is the library's own class
with the config's values; what an engine cannot run is refused in one sentence before anything loads."""

from __future__ import annotations

import json

import pytest
import torch
from test_checkpoint import Crash, crash_at
from train_helpers import make_cfg, tiny_model

from tunesmith.config import Config
from tunesmith.errors import ConfigError
from tunesmith.train import train
from tunesmith.train.engines import validate_engine_config
from tunesmith.train.observe import read_log
from tunesmith.train.optimizers import CombinedOptimizer, LayerwiseOptimizer, build_optimizer

FULL = dict(finetuning_type="full", learning_rate=1e-3)
OPTIMIZERS = {
    "adamw_torch_fused": dict(optim="adamw_torch_fused", **FULL),
    "sgd": dict(optim="sgd", finetuning_type="full", learning_rate=0.3),
    "adafactor": dict(optim="adafactor", finetuning_type="full", learning_rate=1e-2),
    "adamw_8bit": dict(optim="adamw_8bit", **FULL),
    "paged_adamw_32bit": dict(optim="paged_adamw_32bit", **FULL),
    "lion_8bit": dict(optim="lion_8bit", finetuning_type="full", learning_rate=3e-4),
    "galore": dict(use_galore=True, galore_rank=4, galore_update_interval=2, galore_target="all", **FULL),
    "galore_layerwise": dict(use_galore=True, galore_layerwise=True, galore_rank=4, galore_update_interval=2,
                             gradient_accumulation_steps=1, **FULL),
    "apollo": dict(use_apollo=True, apollo_rank=4, apollo_update_interval=2, apollo_scale=1.0, **FULL),
    "apollo_layerwise": dict(use_apollo=True, apollo_layerwise=True, apollo_rank=4, apollo_scale=1.0,
                             gradient_accumulation_steps=1, **FULL),
    "badam_layer": dict(use_badam=True, badam_switch_interval=2, **FULL),
    "badam_ratio": dict(use_badam=True, badam_mode="ratio", badam_update_ratio=0.5, **FULL),
    "adam_mini": dict(use_adam_mini=True, **FULL),
    "muon": dict(use_muon=True, finetuning_type="full", learning_rate=2e-2),
    "loraplus": dict(finetuning_type="lora", lora_rank=4, learning_rate=2e-3, loraplus_lr_ratio=16.0),
    "pure_bf16": dict(pure_bf16=True, finetuning_type="full", learning_rate=1e-3),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft-data")
    rows = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"{i} plus {i} is {2 * i}."}
            for i in range(16)]
    (folder / "sums.json").write_text(json.dumps(rows))
    (folder / "dataset_info.json").write_text(json.dumps({"sums": {"file_name": "sums.json"}}))
    return folder


def _cfg(folder, model_dir, data, **values):
    base = dict(dataset=["sums"], dataset_dir=str(data), template="qwen", cutoff_len=64, max_steps=6, save_steps=2,
                per_device_train_batch_size=2, gradient_accumulation_steps=2, lr_scheduler_type="cosine",
                warmup_steps=1)
    return make_cfg(folder, model_dir, **{**base, **values})


def _losses(folder) -> list[float]:
    return [entry["loss"] for entry in read_log(folder) if "loss" in entry]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_trains_and_resumes_exactly(tmp_path, tiny_model_dir, data, monkeypatch, name):
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")
    values = OPTIMIZERS[name]
    train(_cfg(tmp_path / "straight", tiny_model_dir, data, **values))
    straight = _losses(tmp_path / "straight")
    assert min(straight[3:]) < straight[0], straight  # it learns
    cfg = _cfg(tmp_path / "resumed", tiny_model_dir, data, **values)
    with pytest.raises(Crash):
        train(cfg, callbacks=[crash_at(3)])
    train(cfg)
    assert _losses(tmp_path / "resumed") == pytest.approx(straight, abs=1e-5)


def _optimizer(tmp_path, model_dir, **values):
    cfg = make_cfg(tmp_path, model_dir, **values)
    return build_optimizer(tiny_model(model_dir, cfg), cfg, cfg), cfg


def test_the_config_reaches_each_library(tmp_path, tiny_model_dir):
    import adam_mini
    import apollo_torch
    import badam
    import bitsandbytes as bnb
    import galore_torch

    opt, _ = _optimizer(tmp_path, tiny_model_dir, **OPTIMIZERS["galore"])
    assert type(opt) is galore_torch.GaLoreAdamW
    projected = [g for g in opt.param_groups if "rank" in g]
    assert projected and projected[0]["rank"] == 4 and projected[0]["update_proj_gap"] == 2
    assert all(p.ndim == 2 for g in projected for p in g["params"])
    opt, _ = _optimizer(tmp_path, tiny_model_dir, optim="adafactor", use_galore=True, **FULL)
    assert type(opt) is galore_torch.GaLoreAdafactor
    opt, _ = _optimizer(tmp_path, tiny_model_dir, **OPTIMIZERS["apollo_layerwise"])
    assert isinstance(opt, LayerwiseOptimizer) and type(opt.inner[0]) is apollo_torch.APOLLOAdamW
    opt, _ = _optimizer(tmp_path, tiny_model_dir, **OPTIMIZERS["badam_layer"])
    assert isinstance(opt, badam.BlockOptimizer) and opt.switch_block_every == 2
    opt, _ = _optimizer(tmp_path, tiny_model_dir, **OPTIMIZERS["adam_mini"])
    assert type(opt) is adam_mini.Adam_mini
    opt, _ = _optimizer(tmp_path, tiny_model_dir, **OPTIMIZERS["muon"])
    assert isinstance(opt, CombinedOptimizer)
    assert [type(part) for part in opt.parts] == [torch.optim.Muon, torch.optim.AdamW]
    opt, _ = _optimizer(tmp_path, tiny_model_dir, **OPTIMIZERS["lion_8bit"])
    assert type(opt) is bnb.optim.Lion8bit
    opt, cfg = _optimizer(tmp_path, tiny_model_dir, **OPTIMIZERS["loraplus"])
    rates = {group["lr"] for group in opt.param_groups}
    assert rates == {cfg.learning_rate, cfg.learning_rate * 16.0}
    fast = {id(p) for g in opt.param_groups if g["lr"] > cfg.learning_rate for p in g["params"]}
    model_params = dict(tiny_model(tiny_model_dir, cfg).named_parameters())
    assert len(fast) == sum("lora_B" in name or (p.ndim == 1 and p.requires_grad) for name, p in model_params.items())


def test_pure_bf16_loads_and_keeps_bfloat16_weights(tmp_path, tiny_model_dir, data, monkeypatch):
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")
    cfg = _cfg(tmp_path / "run", tiny_model_dir, data, max_steps=2, **OPTIMIZERS["pure_bf16"])
    train(cfg)
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "run" / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}


@pytest.mark.parametrize("values, engine, world, message", [
    (dict(use_galore=True, galore_layerwise=True, gradient_accumulation_steps=4), "single", 1,
     "galore_layerwise: true steps each parameter during backward, so it cannot accumulate gradients"),
    (dict(use_apollo=True, apollo_layerwise=True), "ddp", 2, "before the ranks have averaged its gradient"),
    (dict(use_muon=True), "deepspeed", 2, "is not DeepSpeed's"),
    (dict(use_galore=True), "fsdp2", 2, "which fsdp2 splits over the ranks"),
    (dict(optim="adamw_8bit"), "fsdp2", 2, "which fsdp2 splits over the ranks"),
    (dict(use_galore=True, use_badam=True), "single", 1, "use_galore and use_badam each choose the optimizer"),
    (dict(use_apollo=True, optim="sgd"), "single", 1, "use_apollo works with optim: adamw_torch, adamw_hf"),
])
def test_what_an_optimizer_cannot_do_is_refused_in_one_sentence(values, engine, world, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        cfg = Config(model_name_or_path="m", finetuning_type="full", engine=engine, **values)
        validate_engine_config(cfg, world)
        if "use_apollo" in values and "optim" in values:
            build_optimizer(torch.nn.Linear(2, 2), cfg, cfg)


def test_a_missing_optimizer_library_is_named_with_its_pip_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "galore_torch" else real(name, *a))
    cfg = Config(model_name_or_path="m", finetuning_type="full", use_galore=True)
    with pytest.raises(ConfigError, match="use_galore needs the galore-torch package; pip install galore-torch"):
        validate_engine_config(cfg, 1)
