"""`tunesmith convert`: single/DDP and FSDP2 checkpoints (full and LoRA) become HF / PEFT folders that load
and give the checkpoint's own logits. (ZeRO checkpoints: tests/train/test_deepspeed.py, where those runs
live.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.export.convert import convert_checkpoint, trained_weights
from tunesmith.train import train

# PEFT still asks transformers for a renamed attribute when loading an adapter; nothing to act on
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
TOKENS = torch.tensor([[1, 5, 9, 42, 7, 30]])
LORA = ["finetuning_type=lora", "lora_rank=4", "learning_rate=2e-2"]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_model_dir) -> str:
    """Full fine-tuning of the tiny model on 8 rows, 3 steps, a checkpoint at step 3."""
    root = tmp_path_factory.mktemp("convert")
    rows = [
        {"instruction": "Who are you?", "input": "", "output": "I am Ada, made by Lab."},
        {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    ] * 4
    (root / "rows.json").write_text(json.dumps(rows), encoding="utf-8")
    values = {
        "model_name_or_path": str(tiny_model_dir),
        "template": "chatml",
        "dataset": str(root / "rows.json"),
        "cutoff_len": 64,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "max_steps": 3,
        "save_steps": 3,
        "device": "cpu",
        "finetuning_type": "full",
    }
    (root / "run.yaml").write_text(json.dumps(values), encoding="utf-8")  # JSON is YAML
    return str(root / "run.yaml")


def _single(config: str, name: str, *extra: str) -> Path:
    out = Path(config).parent / name
    if not (out / "train_results.json").is_file():
        train(load_config(config, [f"output_dir={out}", *extra]))
    return out / "checkpoint-3"


def _assert_same_model(converted: Path, checkpoint: Path, tiny_model_dir: Path, adapter: bool) -> None:
    if adapter:
        got = _logits(
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), converted)
        )
        want = _logits(
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), checkpoint)
        )
        assert not torch.equal(
            want, _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
        )  # it trained
    else:
        got = _logits(AutoModelForCausalLM.from_pretrained(converted))
        want = _logits(AutoModelForCausalLM.from_pretrained(checkpoint))
    assert torch.equal(got, want)
    assert (converted / "tokenizer.json").is_file() and (converted / "chat_template.jinja").is_file()
    for leftover in ("optimizer.pt", "scheduler.pt", "trainer_state.json", "dcp", "ds", "rng_state.pt"):
        assert not (converted / leftover).exists()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_convert_single_process_checkpoint(config, tiny_model_dir, tmp_path, method, capsys):
    checkpoint = _single(config, f"single-{method}", *(LORA if method == "lora" else []))
    assert trained_weights(checkpoint)[1].startswith("HF/PEFT weights")
    assert main(["convert", str(checkpoint), "--out", str(tmp_path / "out")]) == 0
    assert ("PEFT adapter" if method == "lora" else "HF model") in capsys.readouterr().out
    _assert_same_model(tmp_path / "out", checkpoint, tiny_model_dir, adapter=method == "lora")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_convert_fsdp2_checkpoint(config, tiny_model_dir, tmp_path, method):
    """engine: fsdp2 in one process (a process group of one) writes dcp/; convert reads it without a group."""
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunesmith.cli",
            "train",
            config,
            "engine=fsdp2",
            f"output_dir={out}",
            *(LORA if method == "lora" else []),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(config).parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = out / "checkpoint-3"
    assert trained_weights(checkpoint)[1].startswith("sharded checkpoint")
    convert_checkpoint(checkpoint, tmp_path / "out")
    _assert_same_model(tmp_path / "out", checkpoint, tiny_model_dir, adapter=method == "lora")


def test_convert_refuses_folders_without_a_model(tmp_path, config):
    with pytest.raises(TunesmithError, match="neither config.json"):
        convert_checkpoint(tmp_path, tmp_path / "out")
    checkpoint = _single(config, "single-full")
    with pytest.raises(TunesmithError, match="must be a new folder"):
        convert_checkpoint(checkpoint, checkpoint)
