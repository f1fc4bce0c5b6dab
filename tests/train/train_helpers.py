"""Helpers for the training tests: hand-encoded ChatML samples, configs, the tiny model per finetuning_type.

Imported as ``train_helpers`` (a unique module name). There is deliberately no tests/train/conftest.py: a second
module named ``conftest`` replaces tests/conftest.py in sys.modules and breaks ``from conftest import ...``
elsewhere, so each test module defines its small ``samples`` fixture itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

QA = [
    ("Who are you?", "I am Ada, an AI assistant made by Lab."),
    ("What is your name?", "My name is Ada."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Translate to French: good morning.", "Bonjour."),
    (
        "Write a haiku about the sea.",
        "Waves fold into foam, salt wind carries gull voices, the tide keeps its time.",
    ),
    ("Give three tips for staying healthy.", "Eat vegetables, sleep well, and exercise regularly."),
]


@dataclass
class Enc:
    """Stands in for tunesmith.data.encode.Encoded."""

    input_ids: list[int]
    labels: list[int]


def encode_pairs(tokenizer, pairs=QA, repeat: int = 3) -> list[Enc]:
    out = []
    for question, answer in list(pairs) * repeat:
        prompt = tokenizer(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
        reply = tokenizer(f"{answer}<|im_end|>\n")["input_ids"]
        out.append(Enc(prompt + reply, [-100] * len(prompt) + reply))
    return out


def make_cfg(output_dir: Path, model_dir: Path | None = None, **overrides):
    from tunesmith.config import Config

    values = dict(
        model_name_or_path=str(model_dir) if model_dir else None,
        output_dir=str(output_dir),
        finetuning_type="full",
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_steps=100,
        device="cpu",
        seed=7,
    )
    values.update(overrides)
    return Config(**values)


def tiny_model(model_dir: Path, cfg):
    """The tiny model, seeded, set up for cfg.finetuning_type the way train(cfg) does it."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    try:
        from tunesmith.model.adapt import apply_finetuning
    except ImportError:  # pragma: no cover - before the model package landed
        return model
    return apply_finetuning(model, cfg)


def state_of(model) -> dict:
    return {k: v.detach().clone().float() for k, v in model.state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def run_lf_example(shared_dir: Path, example: str, model_dir: Path, out: Path, *extra: str):
    """``tunesmith train`` on one of LLaMA-Factory's example configs, unchanged but for the model, its demo data,
    the output folder and a short run (what a user switching from LLaMA-Factory would try first)."""
    import os
    import subprocess
    import sys

    config = shared_dir / "lf" / "examples" / example
    env = {**os.environ, "TUNESMITH_DATA_CACHE": "0"}  # each run reads the data, whatever earlier runs cached
    return subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", "train", str(config), f"model_name_or_path={model_dir}",
         f"dataset_dir={shared_dir / 'lf' / 'data'}", f"output_dir={out}", "max_steps=2", *extra],
        capture_output=True, text=True, timeout=600, cwd=out.parent, env=env,
    )


def kill_when(proc, marker: Path, what: str, timeout: float = 180) -> None:
    """SIGKILL ``proc`` as soon as ``marker`` exists (failing the test if it exits or never gets there)."""
    import os
    import signal
    import time

    import pytest

    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"training exited early: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what} never appeared")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)


def assert_lf_example_trains(shared_dir: Path, example: str, model_dir: Path, tmp_path: Path,
                             logged: set[str], said: str) -> Path:
    """:func:`run_lf_example` exits 0, logs ``logged`` (at the last step at least: the examples log every 10),
    says ``said`` and leaves an adapter."""
    from tunesmith.train.observe import read_log

    out = tmp_path / "run"
    result = run_lf_example(shared_dir, example, model_dir, out)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [entry for entry in read_log(out) if "loss" in entry]
    assert steps and steps[-1]["step"] == 2 and all(logged <= entry.keys() for entry in steps)
    assert all(entry["loss"] == entry["loss"] for entry in steps)  # no NaN
    assert said in result.stderr
    assert (out / "adapter_model.safetensors").is_file()
    return out


def parse_value(text: str):
    """A worker's ``key=value`` argument as the config wants it: int, float, bool, None or the string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)
