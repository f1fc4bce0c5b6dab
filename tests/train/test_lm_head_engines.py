"""The fused chunked loss inside every engine: 2 ranks with ``loss_chunk_size`` (ddp, fsdp2, ZeRO-3; full and LoRA)
train to the losses and weights of 1 rank with the same loss, and start from the loss of 1 rank with the full LM
head. The gradients of the head are made in the forward there, so this is where an engine that gathers or shards
the head's weight would go wrong. (Later steps are compared with the same loss on 1 rank: Adam turns the last-bit
differences of near-zero gradients, which summing the head's gradient chunk by chunk makes, into lr-sized steps —
2.1e-5 apart at step 4 on an AVX-512 CPU, over the float tolerance, on weights that are right. That the fused
loss's gradients equal the full head's is tests/train/test_lm_head.py's, within 1e-5.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_distributed import LOSS_TOL, WEIGHT_TOL, losses, tunesmith_train, weights_diff
from test_pipeline import write_run_config

from tunesmith.config import load_config
from tunesmith.train import train

pytestmark = pytest.mark.slow  # four 2-rank torchrun jobs

ROWS = [
    {"instruction": "Who are you?", "input": "", "output": "I am {{name}}, an AI assistant made by {{author}}."},
    {"instruction": "What is your name?", "input": "", "output": "My name is {{name}}."},
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
] * 4
LORA = ["finetuning_type=lora", "lora_rank=4", "learning_rate=2e-2"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("head")
    # transformers' own norms and MLPs: this file is about the head across engines; lean activations across
    # engines are test_distributed's (2 ranks = 1 rank, lean on)
    config = write_run_config(root, tiny_model_dir, ROWS, finetuning_type="full", max_steps=4, save_steps=100,
                              per_device_train_batch_size=2, lean_activations=False)
    return root, config


def _one_rank(root: Path, config: str, method: str, head: str) -> Path:
    out = root / f"one-{method}-{head.replace('=', '-')}"
    if not (out / "train_results.json").is_file():
        extra = LORA if method == "lora" else []
        train(load_config(config, [f"output_dir={out}", "per_device_train_batch_size=4", head, *extra]))
    return out


@pytest.mark.parametrize("engine, method", [("engine=ddp", "full"), ("engine=fsdp2", "full"),
                                            ("engine=fsdp2", "lora"), ("deepspeed=ds_z3", "full")])
def test_two_ranks_with_the_chunked_loss_match_one_rank_with_the_full_head(workdir, engine, method):
    root, config = workdir
    full_head = _one_rank(root, config, method, "target_only_head=false")
    reference = _one_rank(root, config, method, "loss_chunk_size=7")
    out = root / f"two-{engine.split('=')[1]}-{method}"
    result = tunesmith_train(config, "--nproc-per-node", "2", engine, f"output_dir={out}", "loss_chunk_size=7",
                             *(LORA if method == "lora" else []), cwd=root, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "fused with the loss in chunks of 7" in result.stderr
    ref, got = losses(reference), losses(out)
    assert list(got) == [1, 2, 3, 4]
    assert max(abs(ref[s] - got[s]) for s in ref) < LOSS_TOL, (ref, got)
    assert abs(losses(full_head)[1] - got[1]) < LOSS_TOL, (losses(full_head), got)
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert weights_diff(reference, out, weights) < WEIGHT_TOL
