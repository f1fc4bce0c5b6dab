"""OFT and PiSSA trained end to end (``train(cfg)``): they learn, an interrupted run ends as the uninterrupted one,
and what they save exports: the OFT adapter merges into its base, the converted PiSSA adapter applies to the
unmodified base exactly as the trained (PiSSA-form) checkpoint does on its rebuilt residual base.

The run helpers here are shared with the other test_lf_* training tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_checkpoint import Crash, crash_at
from test_pipeline import write_run_config

from tunesmith.config import load_config
from tunesmith.export.merge import export_model
from tunesmith.model.adapt import apply_finetuning, load_adapter
from tunesmith.model.load import load_model
from tunesmith.train import train
from tunesmith.train.checkpoint import load_model_weights
from tunesmith.train.observe import read_log

RUN = dict(max_steps=5, save_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
           learning_rate=1e-2, cutoff_len=64)


def run(folder: Path, model_dir: Path, rows: list[dict], crash: int | None = None, **values) -> Path:
    """``train`` the identity rows with ``values`` in ``folder`` (crashing after step ``crash``); the run folder."""
    folder.mkdir(parents=True, exist_ok=True)
    config = load_config(write_run_config(folder, model_dir, rows, **{**RUN, **values}))
    if crash is None:
        train(config)
    else:
        with pytest.raises(Crash):
            train(config, callbacks=[crash_at(crash)])
    return folder / "run"


def logged(run_dir: Path, key: str = "loss") -> list[float]:
    return [entry[key] for entry in read_log(run_dir) if "loss" in entry]


def assert_resumes_exactly(tmp_path: Path, model_dir: Path, rows: list[dict], **values) -> Path:
    """An uninterrupted run and one that crashes after step 3 and is re-run (resuming from checkpoint-2) log the
    same losses (within 1e-5); returns the uninterrupted run's folder."""
    straight = run(tmp_path / "straight", model_dir, rows, **values)
    run(tmp_path / "resumed", model_dir, rows, crash=3, **values)
    resumed = run(tmp_path / "resumed", model_dir, rows, **values)
    steps = [entry["step"] for entry in read_log(resumed) if "loss" in entry]
    assert steps == [1, 2, 3, 4, 5]
    assert logged(resumed) == pytest.approx(logged(straight), abs=1e-5)
    return straight


def assert_learns(run_dir: Path, key: str = "loss") -> None:
    values = logged(run_dir, key)
    assert min(values[2:]) < values[0] - 0.05, values


@pytest.fixture(autouse=True)
def _no_data_cache(monkeypatch):
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(3, 390, (2, 13), generator=torch.Generator().manual_seed(5))


def test_oft_learns_resumes_exactly_and_its_adapter_exports_merged(tmp_path, tiny_model_dir, identity_rows):
    values = dict(finetuning_type="oft", oft_block_size=16)
    straight = assert_resumes_exactly(tmp_path, tiny_model_dir, identity_rows * 4, **values)
    assert_learns(straight)
    saved = json.loads((straight / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["oft_block_size"]) == ("OFT", 16)
    trained = _logits(load_adapter(load_model(tiny_model_dir), straight), IDS)
    out = export_model(str(tiny_model_dir), tmp_path / "merged", str(straight))
    assert torch.allclose(_logits(load_model(out), IDS), trained, atol=1e-4)
    assert (trained - _logits(load_model(tiny_model_dir), IDS)).abs().max() > 1e-3


def test_pissa_learns_resumes_exactly_and_its_converted_adapter_fits_the_unmodified_base(tmp_path, tiny_model_dir,
                                                                                        identity_rows):
    values = dict(finetuning_type="lora", lora_rank=4, pissa_init=True, pissa_iter=4, pissa_convert=True,
                  lora_dropout=0.2)
    straight = assert_resumes_exactly(tmp_path, tiny_model_dir, identity_rows * 4, **values)
    assert_learns(straight)
    # the last checkpoint keeps the PiSSA form, which fits the residual base rebuilt from the same seed ...
    checkpoint = straight / "checkpoint-5"
    assert json.loads((checkpoint / "adapter_config.json").read_text())["init_lora_weights"] == "pissa_niter_4"
    cfg = load_config(str(straight.parent / "run.yaml"))
    model = apply_finetuning(load_model(tiny_model_dir), cfg)
    load_model_weights(model, checkpoint)
    trained = _logits(model.eval(), IDS)
    # ... the final adapter is plain LoRA of twice the rank for the base as it is on disk
    final = json.loads((straight / "adapter_config.json").read_text())
    assert (final["init_lora_weights"], final["r"], final["lora_alpha"]) == (True, 8, 16)
    assert torch.allclose(_logits(load_adapter(load_model(tiny_model_dir), straight), IDS), trained, atol=1e-4)
    out = export_model(str(tiny_model_dir), tmp_path / "merged", str(straight))
    assert torch.allclose(_logits(load_model(out), IDS), trained, atol=1e-4)


def test_qoft_trains_oft_adapters_on_a_4bit_base_and_resumes_exactly(tmp_path, tiny_model_dir, identity_rows):
    """LLaMA-Factory's qoft examples: OFT adapters over a bitsandbytes 4-bit base."""
    import bitsandbytes as bnb

    values = dict(finetuning_type="oft", oft_block_size=16, quantization_bit=4)
    straight = assert_resumes_exactly(tmp_path, tiny_model_dir, identity_rows * 4, **values)
    assert_learns(straight)
    (tmp_path / "probe").mkdir()
    cfg = load_config(write_run_config(tmp_path / "probe", tiny_model_dir, identity_rows, **{**RUN, **values}))
    from tunesmith.model.load import quantization_from_config

    model = apply_finetuning(load_model(tiny_model_dir, quantization=quantization_from_config(cfg)), cfg)
    adapted = [m for m in model.modules() if hasattr(m, "oft_R") and isinstance(m.base_layer, bnb.nn.Linear4bit)]
    assert adapted, "the OFT adapters wrap no 4-bit layer"
