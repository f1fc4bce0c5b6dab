"""A `tunesmith train` process leaves bitsandbytes and gptqmodel unimported when the run cannot use them (each
costs seconds of every rank's start-up), and keeps them whenever it might."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from file_helpers import write_run_config

from tunesmith.config import Config
from tunesmith.model.lean_imports import unused_quantization_libraries


@pytest.mark.parametrize(("keys", "unused"), [
    ({}, ["gptqmodel", "bitsandbytes"]),
    ({"finetuning_type": "full", "optim": "adamw_torch_fused"}, ["gptqmodel", "bitsandbytes"]),
    ({"quantization_bit": 4}, ["gptqmodel"]),
    ({"optim": "paged_adamw_8bit"}, ["gptqmodel"]),
    ({"use_galore": True}, ["gptqmodel"]),
])
def test_a_plain_model_folder_drops_what_the_keys_do_not_ask_for(tiny_model_dir, keys, unused):
    assert unused_quantization_libraries(Config(model_name_or_path=str(tiny_model_dir), **keys)) == unused


def test_a_pre_quantized_model_or_one_not_in_a_local_folder_keeps_every_library(tmp_path, tiny_model_dir):
    quantized = tmp_path / "gptq"
    quantized.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (quantized / "config.json").write_text(json.dumps(config))
    for name in (str(quantized), "smollm2", "Qwen/Qwen3-0.6B", str(tmp_path / "missing")):
        assert unused_quantization_libraries(Config(model_name_or_path=name)) == []


@pytest.mark.slow
def test_the_train_command_trains_lora_without_importing_them(tmp_path, tiny_model_dir, identity_rows):
    config = write_run_config(tmp_path, tiny_model_dir, identity_rows, finetuning_type="lora", max_steps=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # the command's own main() (argv from the command line), then which of the libraries this process loaded
    script = ("import sys; from tunesmith.cli import main; code = main(); "
              "print('loaded:', [n for n in ('bitsandbytes', 'gptqmodel', 'peft') if sys.modules.get(n)]); "
              "sys.exit(code)")
    run = subprocess.run([sys.executable, "-c", script, "train", config], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "training finished: step 2" in run.stderr
    assert "loaded: ['peft']" in run.stdout
