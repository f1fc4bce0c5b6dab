"""Sequence parallel (``sequence_parallel_size``, DeepSpeed-Ulysses style; see
:mod:`tunesmith.train.sequence_parallel`): how rows are split, the attention against plain SDPA, whole runs against
one rank, resume on another layout, and the configurations refused before launch.

Tolerances as in test_distributed.py: losses within 2e-5, weights within 1e-4, validation losses within 2e-4.
Measured (tiny Qwen2, 4 query and 2 key/value heads, lr 1e-2, 6 steps): SP2 on 2 ranks vs 1 rank, losses ≤ 8.3e-7,
validation losses ≤ 4.3e-7 and weights ≤ 1.2e-5 (full, ddp and fsdp2, packed and unpacked), LoRA with activation
checkpointing: losses 6e-7, adapter 5e-7; resumed SP2 → 1 rank: weights 1.9e-7. The attention alone (each sample
attending to itself, against SDPA with the full row's mask): logits and summed gradients within 1e-5. DP2×SP2 on 4 ranks: losses ≤ 1.6e-6, but weights 1.7e-4 apart with
AdamW's default epsilon 1e-8: the element that moves is one whose gradient is 4e-9, below epsilon, where Adam's
update g / (|g| + eps) turns 1e-9 of summation-order noise into 1e-4 (the same runs with SGD agree within 1.2e-7,
so the gradients are right); that test runs with adam_epsilon 1e-6 (measured: losses 6e-7, weights 2.4e-6). A real
bug (a target counted twice or lost at a slice boundary, a sample attending across its packed neighbour, a wrong
gradient scale) moves the losses by ≥ 1e-2.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from bad_input_helpers import assert_refused, make_run
from torchrun_helpers import logged as _losses
from torchrun_helpers import run_worker
from torchrun_helpers import weights_diff as _weights_diff

from tunesmith.config import Config
from tunesmith.data.loader import collate, count_targets
from tunesmith.data.pack import PackedSample
from tunesmith.errors import ConfigError
from tunesmith.train import sequence_parallel as sp
from tunesmith.train.objectives.head import shifted_targets, target_mask, token_loss_sum

WORKER = Path(__file__).with_name("sp_worker.py")
LOSS_TOL = 2e-5
WEIGHT_TOL = 1e-4


# ------------------------------------------------------------------------------------------- fast: the parts


VOCAB = 11


def _packed_rows() -> list[PackedSample]:
    """Two packed rows of different widths (the batch pads the shorter one), every token a target."""
    rows = []
    for lengths, seed in (([5, 7, 3], 0), ([6, 4], 1)):
        ids = torch.randint(3, VOCAB, (sum(lengths),), generator=torch.Generator().manual_seed(seed)).tolist()
        labels = [-100 if i in (0, 5) else t for i, t in enumerate(ids)]  # a few prompt tokens
        rows.append(PackedSample(ids, labels, seq_lens=lengths))
    return rows


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("packed", [True, False])
def test_the_slices_of_a_batch_make_up_its_rows_and_count_every_target_once(size, packed):
    rows = _packed_rows()
    if not packed:
        rows = [PackedSample(r.input_ids, r.labels) for r in rows]  # plain rows: no seq_lens
    full = collate(rows, pad_token_id=0)
    lengths = [sp.sample_lengths(r) for r in rows]
    slices = [sp.split_batch(full, lengths, sp.Mesh(rank, size, size), pad_token_id=0) for rank in range(size)]
    width = full.input_ids.size(1)
    padded = -(-width // size) * size
    assert all(s.input_ids.shape == (2, padded // size) for s in slices)
    assert all(s.labels.shape == (2, padded // size + 1) for s in slices)  # one label more than tokens
    ids = torch.cat([s.input_ids for s in slices], dim=1)
    assert torch.equal(ids[:, :width], full.input_ids) and (ids[:, width:] == 0).all()
    # each slice's targets are the full row's, shifted before the split: none lost at a boundary, none twice
    assert sum(count_targets(s.labels) for s in slices) == full.num_targets
    targets = torch.cat([s.labels[:, 1:] for s in slices], dim=1)[:, :width]
    assert torch.equal(targets[:, :-1], full.labels[:, 1:]) and (targets[:, -1] == -100).all()
    positions = torch.cat([s.position_ids for s in slices], dim=1)[:, :width]
    want = full.position_ids if packed else torch.arange(width).expand(2, width)
    assert torch.equal(positions, want)
    assert all(torch.equal(s.segments, slices[0].segments) for s in slices)  # every rank sees the full rows
    inputs = slices[-1].model_inputs()
    assert set(inputs) == {"input_ids", "position_ids", sp.SEGMENTS_KWARG}  # no mask from the slice


def test_the_loss_of_the_slices_sums_to_the_loss_of_the_rows():
    """The heads' shift reads a slice's extra label column: the slice's last position keeps its target."""
    full = collate(_packed_rows(), pad_token_id=0)
    lengths = [r.seq_lens for r in _packed_rows()]
    size = 3
    padded = -(-full.input_ids.size(1) // size) * size
    logits = torch.randn(2, padded, VOCAB, generator=torch.Generator().manual_seed(0))
    whole = token_loss_sum(logits, torch.nn.functional.pad(full.labels, (0, padded - full.labels.size(1)), value=-100))
    step = padded // size
    parts = []
    for rank in range(size):
        piece = sp.split_batch(full, lengths, sp.Mesh(rank, size, size), pad_token_id=0)
        local = logits[:, rank * step : (rank + 1) * step].contiguous()
        parts.append(token_loss_sum(local, piece.labels))
        gathered = local[target_mask(piece.labels, step)]
        assert gathered.size(0) == shifted_targets(piece.labels).numel()
    assert torch.allclose(sum(parts), whole)


def test_the_mesh_splits_samples_over_data_parallel_ranks_only():
    meshes = [sp.Mesh(rank, 4, 2) for rank in range(4)]
    assert [(m.dp_rank, m.sp_rank) for m in meshes] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert meshes[0].data_parallel == 2 and meshes[0].describe() == "4 ranks = 2 data-parallel × 2 sequence-parallel"


def test_head_counts_that_do_not_split_name_the_counts_and_the_sizes_that_work():
    """SmolLM2-135M: 9 query and 3 key/value heads. 3 and 9 work (9: the key/value heads are repeated)."""
    with pytest.raises(ConfigError) as refused:
        sp.check_heads(9, 3, 2)
    message = str(refused.value)
    assert "9 query and 3 key/value heads" in message and "sizes that work: 3 or 9" in message
    sp.check_heads(9, 3, 3)
    sp.check_heads(9, 3, 9)
    assert sp.head_counts({"num_attention_heads": 9, "num_key_value_heads": 3}) == (9, 3)
    assert sp.head_counts({"text_config": {"num_attention_heads": 8}}) == (8, 8)
    assert sp.head_counts({"hidden_size": 8}) is None


def test_without_the_full_rows_the_attention_is_plain_sdpa_so_one_rank_can_still_generate(tiny_model_dir):
    """Rank 0 answers evaluation_inputs alone, with a KV cache: no segment ids, no collective."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    installed = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    sp.install(installed, 2, group=None)  # the group is only used with segment ids
    assert installed.config._attn_implementation == sp.ATTENTION_NAME
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    with torch.no_grad():
        assert torch.equal(installed(input_ids=ids).logits, plain(input_ids=ids).logits)
        want = plain.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(installed.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), want)


def test_a_config_knows_the_key():
    assert Config().sequence_parallel_size == 1
    assert Config(sequence_parallel_size=4, stage="pt").sequence_parallel_size == 4
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        Config(sequence_parallel_size=0)


@pytest.mark.parametrize(
    "overrides, culprits",
    [
        (["sequence_parallel_size=2", "deepspeed=ds_z2"], ["sequence_parallel_size", "deepspeed"]),
        (["sequence_parallel_size=2", "stage=dpo"], ["sequence_parallel_size", "stage: dpo"]),
        (["sequence_parallel_size=2", "flash_attn=fa2"], ["sequence_parallel_size", "fa2"]),
        # one process: nothing to split the rows over
        (["sequence_parallel_size=2"], ["sequence_parallel_size: 2", "this job runs 1"]),
        # refused before torchrun starts a single process: 3 ranks do not tile into groups of 2
        (["--nproc-per-node", "3", "sequence_parallel_size=2"], ["sequence_parallel_size: 2", "this job runs 3"]),
        # the tiny model has 4 query and 2 key/value heads: read from its config.json before launching
        (["--nproc-per-node", "3", "sequence_parallel_size=3"],
         ["sequence_parallel_size: 3", "4 query and 2 key/value heads", "sizes that work: 2 or 4"]),
    ],
    ids=["deepspeed", "dpo", "fa2", "one-process", "world-3", "heads"],
)
def test_what_sequence_parallel_cannot_run_is_one_sentence_before_launch(tmp_path, tiny_model_dir, capsys,
                                                                          overrides, culprits):
    config = make_run(tmp_path, tiny_model_dir)
    assert_refused(["train", config, *overrides], capsys, *culprits)
    assert not (tmp_path / "run").exists()  # nothing started


# ------------------------------------------------------------------------------------------- slow: processes


def _worker(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    return run_worker(WORKER, *args, nproc=nproc)


@pytest.mark.slow
def test_ulysses_attention_equals_sdpa_on_the_full_row_and_keeps_packed_samples_apart(tiny_model_dir, tmp_path):
    """2 gloo processes: a packed row of 4 samples (one straddling the slices), the model with the all-to-all
    attention against the same weights with SDPA and the 4-D mask on the full row; 2 and 1 key/value heads."""
    result = _worker("attention", str(tiny_model_dir), str(tmp_path / "found.json"), nproc=2)
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads((tmp_path / "found.json").read_text())
    for kv in (2, 1):
        assert found[f"kv{kv}_logits"] < 1e-5, found
        assert found[f"kv{kv}_grads"] < 1e-5, found  # the ranks' gradients summed, as the engines do
        assert found[f"kv{kv}_targets"] == found["full_targets"]  # each target counted on exactly one rank
        assert found[f"kv{kv}_isolation"] == 0.0, found  # the unchanged samples' logits did not move at all
        assert found[f"kv{kv}_moved"] > 1e-2, found  # while the changed sample's did


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Worker runs by name, each trained once per module: ``get(name, nproc, *overrides)``."""
    root = tmp_path_factory.mktemp("sp-runs")
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


# LoRA also recomputes its activations in backward: the all-to-alls run again there, in the same order on every
# rank; and its loss is the chunked one (loss_chunk_size): each SP rank fuses the head with the loss on its slice
METHODS = {"full": [], "lora": ["finetuning_type=lora", "lora_rank=4", "learning_rate=2e-2",
                                "gradient_checkpointing=true", "loss_chunk_size=16"]}
EVAL_TOL = 2e-4  # validation losses come after the weights drifted (test_distributed.py)


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine, method, packing",
    [("ddp", "full", False), ("ddp", "full", True), ("ddp", "lora", True), ("fsdp2", "full", True)],
    ids=["ddp-full", "ddp-full-packed", "ddp-lora-packed", "fsdp2-full-packed"],
)
def test_two_ranks_with_sequence_parallel_2_equal_one_rank(runs, engine, method, packing):
    """The same 2 rows per step: on one rank, or split in halves over 2 ranks; the validation loss at steps 3
    and 6 too (checkpoints at step 3 for the resume test below)."""
    common = [f"packing={str(packing).lower()}", *METHODS[method], "save_steps=3", "val_samples=3", "eval_steps=3"]
    reference = runs(f"one-{method}-{packing}", 1, *common)
    out = runs(f"sp2-{engine}-{method}-{packing}", 2, *common, f"engine={engine}", "sequence_parallel_size=2")
    stderr = (out / "stderr.txt").read_text()
    assert f"engine {engine} on 2 ranks = 1 data-parallel × 2 sequence-parallel: global batch 2" in stderr
    assert "sequence parallel over 2 ranks" in stderr  # the speed line
    ref, got = _losses(reference), _losses(out)
    assert list(got) == list(range(1, 7))
    assert max(abs(ref[s] - got[s]) for s in ref) < LOSS_TOL, (ref, got)
    assert got[6] < got[1] - 0.2  # it learns
    ref_eval, got_eval = _losses(reference, "eval_loss"), _losses(out, "eval_loss")
    assert list(got_eval) == [3, 6] and max(abs(ref_eval[s] - got_eval[s]) for s in ref_eval) < EVAL_TOL
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert _weights_diff(reference, out, weights) < WEIGHT_TOL


@pytest.mark.slow
def test_four_ranks_as_two_data_parallel_times_two_sequence_parallel_equal_one_rank(runs):
    """DP2×SP2: each SP group trains its own 2 packed rows (the epoch's last step leaves the second group a masked
    filler); 1 rank trains all 4. adam_epsilon 1e-6: see the module docstring."""
    common = ["packing=true", "max_steps=4", "adam_epsilon=1e-6"]
    reference = runs("one-4", 1, *common, "per_device_train_batch_size=4")
    out = runs("dp2-sp2", 4, *common, "engine=ddp", "sequence_parallel_size=2")
    assert "4 ranks = 2 data-parallel × 2 sequence-parallel: global batch 4" in (out / "stderr.txt").read_text()
    ref, got = _losses(reference), _losses(out)
    assert list(got) == [1, 2, 3, 4] and max(abs(ref[s] - got[s]) for s in ref) < LOSS_TOL, (ref, got)
    assert _weights_diff(reference, out, "model.safetensors") < WEIGHT_TOL


@pytest.mark.slow
def test_a_sequence_parallel_checkpoint_resumes_on_one_rank(runs, tmp_path, tiny_model_dir):
    """SP2 → SP1: the checkpoint of step 3 (rank 0's HF weights and optimizer, world-size-free data position)
    continues on one process exactly as the SP2 run went on."""
    common = ["packing=true", "save_steps=3", "val_samples=3", "eval_steps=3"]
    two = runs("sp2-ddp-full-True", 2, *common, "engine=ddp", "sequence_parallel_size=2")
    out = tmp_path / "one"
    result = _worker("train", str(tiny_model_dir), str(out), *common,
                     f"resume_from_checkpoint={two / 'checkpoint-3'}")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming from" in result.stderr and "step 3 of 6" in result.stderr
    want, got = _losses(two), _losses(out)
    assert list(got) == [4, 5, 6]
    assert max(abs(want[s] - got[s]) for s in got) < LOSS_TOL, (want, got)
    assert _weights_diff(two, out, "model.safetensors") < WEIGHT_TOL


@pytest.mark.slow
@pytest.mark.skipif("torch_compile" not in Config.model_fields, reason="torch_compile is not a config key here")
def test_compiled_blocks_keep_the_sequence_parallel_attention_eager_and_exact(runs):
    """torch_compile compiles each decoder block; the all-to-all attention inside runs eagerly (traced, it changed
    the gradients), so the run still equals one eager rank."""
    common = ["packing=true", "save_steps=3", "val_samples=3", "eval_steps=3"]
    reference = runs("one-full-True", 1, *common)
    out = runs("sp2-compiled", 2, *common, "engine=ddp", "sequence_parallel_size=2", "torch_compile=true")
    assert "torch.compile of 2 decoder blocks" in (out / "stderr.txt").read_text()
    ref, got = _losses(reference), _losses(out)
    assert list(got) == list(range(1, 7)) and max(abs(ref[s] - got[s]) for s in ref) < LOSS_TOL, (ref, got)
    assert _weights_diff(reference, out, "model.safetensors") < WEIGHT_TOL
