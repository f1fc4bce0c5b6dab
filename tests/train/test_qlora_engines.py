"""QLoRA on the distributed engines, with real torchrun processes on CPU (gloo): a 2-rank run with the same global
batch logs the losses of the one-process run and ends with the same adapter.

Which engines work with a quantized base (all measured with this test's worker, 2 ranks, CPU):
ddp (4 and 8 bit), fsdp2 (4 bit; 8 bit is refused up front: see ``FSDP2Engine.validate``), deepspeed ZeRO
0, 1, 2 and 3 (4 and 8 bit, fp32 and bf16). The parametrisation below keeps one run per mechanism: replicated
(ddp, ZeRO-1: sharded optimizer state), sharded parameters (fsdp2, ZeRO-3), and the 8-bit base.

Tolerances as in test_distributed.py (same reasons: another summation order across ranks): losses within 2e-5
(measured ≤ 1e-6), adapter weights within 1e-4 (measured 4.6e-5 for fsdp2); a lost gradient, a wrong loss scale or
an un-synchronised rank moves them by ≥ 1e-2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tunesmith.runenv import free_port
from tunesmith.train.observe import read_log

pytestmark = pytest.mark.slow
pytest.importorskip("bitsandbytes")

WORKER = Path(__file__).with_name("qlora_worker.py")
LOSS_TOL = 2e-5
WEIGHT_TOL = 1e-4


def _run(model_dir: Path, out: Path, *overrides: str, nproc: int = 1) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join([str(WORKER.parent), env.get("PYTHONPATH", "")]))
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                                      f"--master-port={free_port()}"]
    return subprocess.run(
        [sys.executable, *launcher, str(WORKER), str(model_dir), str(out), *overrides],
        capture_output=True, text=True, env=env, timeout=300,
    )


def _losses(out: Path) -> list[float]:
    return [e["loss"] for e in read_log(out) if "loss" in e]


@pytest.fixture(scope="module")
def one_rank(tiny_model_dir, tmp_path_factory):
    """The reference per quantization_bit: one process, 4 samples per step."""
    root = tmp_path_factory.mktemp("qlora-one")
    done = {}

    def get(bits: int) -> Path:
        if bits not in done:
            out = root / f"bits{bits}"
            result = _run(tiny_model_dir, out, f"quantization_bit={bits}", "per_device_train_batch_size=4")
            assert result.returncode == 0, result.stderr[-3000:]
            done[bits] = out
        return done[bits]

    return get


@pytest.mark.parametrize(
    "bits, engine",
    [(4, ["engine=ddp"]), (8, ["engine=ddp"]), (4, ["engine=fsdp2"]),
     (4, ["engine=deepspeed", "deepspeed=ds_z1"]), (4, ["engine=deepspeed", "deepspeed=ds_z3"])],
    ids=["ddp-4bit", "ddp-8bit", "fsdp2-4bit", "zero1-4bit", "zero3-4bit"],
)
def test_two_rank_qlora_matches_one_rank(tiny_model_dir, tmp_path, one_rank, bits, engine):
    reference = one_rank(bits)
    out = tmp_path / "two"
    result = _run(tiny_model_dir, out, f"quantization_bit={bits}", "per_device_train_batch_size=2", *engine, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 rank(s): global batch 4 = 2 per device × 1 accumulation × 2 rank(s)" in result.stderr
    ref, got = _losses(reference), _losses(out)
    assert len(got) == 6 and max(abs(a - b) for a, b in zip(ref, got, strict=True)) < LOSS_TOL, (ref, got)
    assert got[-1] < got[0] - 0.15  # it learns
    want, have = load_file(reference / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert want.keys() == have.keys() and max(float((want[k] - have[k]).abs().max()) for k in want) < WEIGHT_TOL
