"""Tensor parallel (``tensor_parallel_size``, Megatron-style plans on a dp × tp DeviceMesh with FSDP2; see
:mod:`tunesmith.train.tensor_parallel`): the vocab-parallel loss against the whole head's, whole runs against one
rank (full, LoRA with the chunked loss, 2-D DP2×TP2), resume on other layouts, and what is refused before launch.

Tolerances as in test_sequence_parallel.py: losses within 2e-5, weights within 1e-4, validation losses 2e-4.
Measured (tiny Qwen2: 4 query and 2 key/value heads, lr 1e-2, 6 steps): TP2 vs 1 rank, losses ≤ 2e-6 and
weights 1.2e-5 with adam_epsilon 1e-6; with AdamW's default 1e-8 the weights were 1.7e-4 apart for the reason the
SP module docstring gives (an element whose gradient is below epsilon turns summation-order noise into 1e-4), so
these runs use 1e-6. LoRA TP2 with loss_chunk_size 64: losses equal to the printed digits, adapters 2.5e-5.
The vocab-parallel loss on 2 and 3 ranks (uneven rows): loss equal, gradients ≤ 1.5e-6.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from bad_input_helpers import assert_refused, make_run
from torchrun_helpers import logged as _losses
from torchrun_helpers import run_worker
from torchrun_helpers import weights_diff as _weights_diff

from tunesmith.config import Config
from tunesmith.config.parallel import format_mesh, mesh_sizes
from tunesmith.errors import ConfigError
from tunesmith.train import tensor_parallel as tp
from tunesmith.train.mesh import Mesh

WORKER = Path(__file__).with_name("tp_worker.py")
LOSS_TOL = 2e-5
WEIGHT_TOL = 1e-4
EVAL_TOL = 2e-4


# ------------------------------------------------------------------------------------------- fast: the parts


def test_head_counts_that_do_not_split_name_the_counts_and_the_sizes_that_work():
    """SmolLM2-135M has 9 query and 3 key/value heads: tensor parallel 2 cannot split them, 3 can."""
    with pytest.raises(ConfigError) as refused:
        tp.check_sizes(9, 3, 2)
    assert "9 query and 3 key/value heads" in str(refused.value) and "sizes that work: 3" in str(refused.value)
    tp.check_sizes(9, 3, 3)
    tp.check_model({"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 400}, 2)
    with pytest.raises(ConfigError, match="vocab_size"):
        tp.check_model({"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 401}, 2)


def test_the_mesh_puts_the_tensor_parallel_ranks_of_a_replica_next_to_each_other():
    meshes = [Mesh(rank, 4, tensor_parallel=2) for rank in range(4)]
    assert [(m.dp_rank, m.tp_rank) for m in meshes] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert meshes[0].describe() == "4 ranks = 2 data-parallel × 2 tensor-parallel"
    sizes = mesh_sizes(8, Config(tensor_parallel_size=2, stage="pt"))
    assert format_mesh(sizes) == "dp 4 × sp 1 × tp 2 × pp 1"
    assert Config(tensor_parallel_size=2, stage="pt").resolved_engine(2) == "fsdp2"


@pytest.mark.parametrize(
    "overrides, culprits",
    [
        (["tensor_parallel_size=2", "deepspeed=ds_z2"], ["tensor_parallel_size", "deepspeed"]),
        (["tensor_parallel_size=2", "engine=ddp"], ["tensor_parallel_size: 2", "engine fsdp2"]),
        (["tensor_parallel_size=2", "stage=dpo"], ["tensor_parallel_size: 2", "stage: dpo"]),
        (["tensor_parallel_size=2", "sequence_parallel_size=2"], ["tensor_parallel_size", "sequence_parallel_size"]),
        (["--nproc-per-node", "3", "tensor_parallel_size=2"], ["tensor_parallel_size 2", "world size 3"]),
        # the tiny model has 4 query and 2 key/value heads: read from its config.json before launching
        (["--nproc-per-node", "4", "tensor_parallel_size=4"],
         ["tensor_parallel_size: 4", "4 query and 2 key/value heads", "sizes that work: 2"]),
    ],
    ids=["deepspeed", "ddp", "dpo", "with-sp", "world-3", "heads"],
)
def test_what_tensor_parallel_cannot_run_is_one_sentence_before_launch(tmp_path, tiny_model_dir, capsys,
                                                                        overrides, culprits):
    config = make_run(tmp_path, tiny_model_dir)
    assert_refused(["train", config, *overrides], capsys, *culprits)
    assert not (tmp_path / "run").exists()  # nothing started


# ------------------------------------------------------------------------------------------- slow: processes


def _worker(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    return run_worker(WORKER, *args, nproc=nproc)


def _assert_same_run(reference: Path, out: Path, weights: str = "model.safetensors", steps: int = 6) -> None:
    ref, got = _losses(reference), _losses(out)
    assert list(got) == list(range(1, steps + 1))
    assert max(abs(ref[s] - got[s]) for s in ref) < LOSS_TOL, (ref, got)
    assert got[steps] < got[1] - 0.2  # it learns
    assert _weights_diff(reference, out, weights) < WEIGHT_TOL


@pytest.mark.slow
def test_the_vocab_parallel_loss_equals_the_whole_heads_loss_and_gradients(tmp_path):
    """Each rank holds V/N rows of the head (3 ranks: uneven rows, 17/17/16); whole and in chunks of 5 targets."""
    result = _worker("vocab", str(tmp_path / "found.json"), nproc=3)
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads((tmp_path / "found.json").read_text())
    assert found["loss"] > 1.0
    for chunk in (23, 5):
        assert found[f"chunk{chunk}_loss"] < 1e-5 * found["loss"], found
        assert found[f"chunk{chunk}_hidden"] < 1e-5 and found[f"chunk{chunk}_weight"] < 1e-5, found


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Worker runs by name, each trained once per module: ``get(name, nproc, *overrides)``."""
    root = tmp_path_factory.mktemp("tp-runs")
    done: dict[str, Path] = {}

    def get(name: str, nproc: int, *overrides: str) -> Path:
        if name not in done:
            out = root / name
            result = _worker("train", str(tiny_model_dir), str(out), *overrides, nproc=nproc)
            assert result.returncode == 0, result.stderr[-4000:]
            (out / "stderr.txt").write_text(result.stderr, encoding="utf-8")
            done[name] = out
        return done[name]

    return get


# adam_epsilon 1e-6: see the module docstring; checkpoints at step 3 for the resume tests
FULL = ["adam_epsilon=1e-6", "save_steps=3", "val_samples=3", "eval_steps=3"]
LORA = ["adam_epsilon=1e-6", "finetuning_type=lora", "lora_rank=4", "learning_rate=2e-2", "packing=true",
        "loss_chunk_size=16"]


@pytest.mark.slow
def test_two_ranks_with_tensor_parallel_2_equal_one_rank_for_full_fine_tuning(runs):
    reference = runs("one-full", 1, *FULL)
    out = runs("tp2-full", 2, *FULL, "tensor_parallel_size=2")
    stderr = (out / "stderr.txt").read_text()
    assert "engine fsdp2 on 2 ranks = 1 data-parallel × 2 tensor-parallel: global batch 2" in stderr
    assert "tensor parallel over 2 ranks: 14 projections split" in stderr
    _assert_same_run(reference, out)
    ref_eval, got_eval = _losses(reference, "eval_loss"), _losses(out, "eval_loss")
    assert list(got_eval) == [3, 6] and max(abs(ref_eval[s] - got_eval[s]) for s in ref_eval) < EVAL_TOL


@pytest.mark.slow
def test_two_ranks_with_tensor_parallel_2_equal_one_rank_for_lora_with_the_chunked_loss(runs):
    """The adapters follow their base layers' split; packed rows; the loss vocab-parallel in chunks of 16."""
    reference = runs("one-lora", 1, *LORA)
    out = runs("tp2-lora", 2, *LORA, "tensor_parallel_size=2")
    _assert_same_run(reference, out, "adapter_model.safetensors")


# 4 packed rows per step: 1 rank with batch 4, or 2 data-parallel groups of 2 rows
FOUR = ["packing=true", "max_steps=4", "adam_epsilon=1e-6", "save_steps=2"]


@pytest.mark.slow
def test_four_ranks_as_two_data_parallel_times_two_tensor_parallel_equal_one_rank(runs):
    reference = runs("one-4", 1, *FOUR, "per_device_train_batch_size=4")
    out = runs("dp2-tp2", 4, *FOUR, "tensor_parallel_size=2")
    assert "4 ranks = 2 data-parallel × 2 tensor-parallel: global batch 4" in (out / "stderr.txt").read_text()
    _assert_same_run(reference, out, steps=4)


@pytest.mark.slow
def test_four_ranks_as_two_data_parallel_times_two_tensor_parallel_equal_one_rank_for_lora(runs):
    """LoRA on the 2-D mesh: the adapters split with their bases inside each TP group, FSDP2 shards them over dp."""
    lora = [*FOUR, "finetuning_type=lora", "lora_rank=4", "learning_rate=2e-2", "loss_chunk_size=16"]
    reference = runs("one-4-lora", 1, *lora, "per_device_train_batch_size=4")
    out = runs("dp2-tp2-lora", 4, *lora, "tensor_parallel_size=2")
    assert "4 ranks = 2 data-parallel × 2 tensor-parallel: global batch 4" in (out / "stderr.txt").read_text()
    _assert_same_run(reference, out, "adapter_model.safetensors", steps=4)


@pytest.mark.slow
def test_a_tensor_parallel_checkpoint_resumes_on_one_rank(runs, tmp_path, tiny_model_dir):
    """TP2 → 1 rank: the DCP checkpoint of step 3 reshards into one process's whole weights and optimizer state,
    which go on exactly as the TP2 run did."""
    two = runs("tp2-full", 2, *FULL, "tensor_parallel_size=2")
    out = tmp_path / "one"
    result = _worker("train", str(tiny_model_dir), str(out), *FULL, f"resume_from_checkpoint={two / 'checkpoint-3'}")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming from" in result.stderr and "step 3 of 6" in result.stderr
    want, got = _losses(two), _losses(out)
    assert list(got) == [4, 5, 6] and max(abs(want[s] - got[s]) for s in got) < LOSS_TOL, (want, got)
    assert _weights_diff(two, out, "model.safetensors") < WEIGHT_TOL


@pytest.mark.slow
def test_a_dp2_by_tp2_checkpoint_resumes_as_four_data_parallel_ranks(runs, tmp_path, tiny_model_dir):
    """DP2×TP2 → DP4 (fsdp2 without tensor parallel, 1 row per rank: the same 4 rows per step): the weights and
    optimizer state of step 2, resharded from the 2-D mesh onto 4 FSDP2 shards, go on as the DP2×TP2 run did."""
    two = runs("dp2-tp2", 4, *FOUR, "tensor_parallel_size=2")
    out = tmp_path / "dp4"
    result = _worker("train", str(tiny_model_dir), str(out), *FOUR, "engine=fsdp2", "per_device_train_batch_size=1",
                     f"resume_from_checkpoint={two / 'checkpoint-2'}", nproc=4)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming from" in result.stderr and "step 2 of 4" in result.stderr
    want, got = _losses(two), _losses(out)
    assert list(got) == [3, 4] and max(abs(want[s] - got[s]) for s in got) < LOSS_TOL, (want, got)
    assert _weights_diff(two, out, "model.safetensors") < WEIGHT_TOL


def test_remote_modelling_code_is_refused_because_no_split_would_reach_it(tmp_path, tiny_model_dir, capsys):
    """InternLM2's remote code picks its attention class itself: sequence or tensor parallel would be ignored
    silently, so a config.json mapping to remote code with trust_remote_code is refused before launch."""
    import shutil

    from tunesmith.train.sequence_parallel import check_native

    model = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    run = make_run(tmp_path, model)
    for key in ("tensor_parallel_size", "sequence_parallel_size"):
        assert_refused(["train", run, "--nproc-per-node", "2", f"{key}=2", "trust_remote_code=true"], capsys,
                       f"{key}: 2", "remote modelling code", "convert2llama")
    remote = type("InternLM2ForCausalLM", (), {"__module__": "transformers_modules.internlm2.modeling_internlm2"})
    with pytest.raises(ConfigError, match="InternLM2ForCausalLM runs its own remote modelling code"):
        check_native(remote, "tensor_parallel_size", 2)
