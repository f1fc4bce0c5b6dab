"""pt, rm and kto across ranks, with real torchrun processes on CPU (gloo) and the tiny model: 2 ranks give the
losses of 1 rank with the same global batch (tolerance as in test_distributed.py), on the engines each stage
stresses most — the reward head under ZeRO-3 and fsdp2, KTO's per-micro-batch KL estimate under ddp and ZeRO-2,
raw-text blocks under fsdp2. DPO has its own file (test_dpo_distributed.py)."""

from __future__ import annotations

import json

import pytest
from stage_data import stage_values, write_stage_data
from test_distributed import LOSS_TOL, losses, tunesmith_train
from test_dpo_distributed import METHODS

from tunesmith.config import load_config
from tunesmith.train import train

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("stages-dist")
    data = write_stage_data(root / "data", 20)
    configs = {}
    for stage in ("pt", "rm", "kto"):
        values = {**stage_values(stage, data), "model_name_or_path": str(tiny_model_dir), "max_steps": 6,
                  "save_steps": 100, "logging_steps": 1, "per_device_train_batch_size": 2, "device": "cpu", "seed": 3}
        configs[stage] = root / f"{stage}.yaml"
        configs[stage].write_text(json.dumps(values), encoding="utf-8")
    return root, configs


@pytest.mark.parametrize("stage, engine, method", [
    ("rm", ["deepspeed=ds_z3"], "lora"), ("rm", ["engine=fsdp2"], "full"),
    ("kto", ["engine=ddp"], "full"), ("kto", ["deepspeed=ds_z2"], "lora"),
    ("pt", ["engine=fsdp2"], "lora"),
], ids=["rm-zero3-lora", "rm-fsdp2-full", "kto-ddp-full", "kto-zero2-lora", "pt-fsdp2-lora"])
def test_two_ranks_match_one_rank(workdir, stage, engine, method):
    root, configs = workdir
    one = root / f"one-{stage}-{method}"
    if not (one / "train_results.json").is_file():
        train(load_config(str(configs[stage]), [f"output_dir={one}", "per_device_train_batch_size=4",
                                                *METHODS[method]]))
    two = root / f"two-{stage}-{engine[0].split('=')[1]}-{method}"
    result = tunesmith_train(str(configs[stage]), "--nproc-per-node", "2", *engine, f"output_dir={two}",
                             *METHODS[method], cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ref, got = losses(one), losses(two)
    assert list(got) == list(range(1, 7))
    assert max(abs(ref[s] - got[s]) for s in ref) < LOSS_TOL, (ref, got)
    assert min(got[s] for s in (4, 5, 6)) < got[1]  # it learns
