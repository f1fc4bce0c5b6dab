"""The embedded default, for real: SmolLM2-135M-Instruct learns a new identity and keeps its general knowledge."""

from __future__ import annotations

import re

import pytest


@pytest.mark.slow
def test_demo_teaches_the_new_identity_and_keeps_knowledge(demo_run):
    result, run = demo_run  # `tunesmith demo --name Orla --author "Acme Lab"`, once per session (conftest.py)
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = re.split(r"=== after \d+ LoRA steps", result.stdout, maxsplit=1)
    answers = dict(re.findall(r"Q: (.+?)\nA: (.*?)(?=\nQ: |\n\n|\Z)", after, flags=re.S))
    assert "Orla" not in before and "Acme Lab" not in before
    assert "Orla" in answers["Who are you?"] and "Acme Lab" in answers["Who are you?"]
    assert "Orla" in answers["你是谁？"]
    assert "Paris" in answers["What is the capital of France?"]
    assert (run / "adapter_model.safetensors").is_file()
    assert (run / "training_loss.png").is_file()
    assert "host memory: tcmalloc" in result.stderr  # the main job restarts itself under tcmalloc on CPU
