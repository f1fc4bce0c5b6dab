"""Pipeline parallel (``pipeline_parallel_size``; see :mod:`tunesmith.train.pipeline_parallel`): how the model is cut
and a window padded, the stages against the whole model, whole runs against one rank, resume on another layout, and
the configurations refused before launch.

Tolerances as in test_sequence_parallel.py: losses within 2e-5, weights within 1e-4. Measured (tiny Llama, 4
layers, lr 1e-2, torch 2.13, gloo), PP2 on 2 ranks vs 1 rank: 6 steps of 2 micro-batches (1F1B): losses ≤ 2.4e-7,
weights ≤ 8.6e-6; packed rows, 3 micro-batches, activation checkpointing: losses 2.4e-7, weights equal; 1
micro-batch (GPipe) with the chunked loss: losses 9.5e-7, weights 5.1e-6; resumed PP2 → 1 rank at step 3: losses
2.4e-7, weights 6e-8 (PP2 → PP2: bit for bit); 1 rank → PP2: losses 1.2e-7, weights 1.2e-7. Not run here (4 processes): DP2×PP2 vs 1 rank, adam_epsilon 1e-6
as in the SP test: losses 4.2e-7, weights 6.6e-7.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bad_input_helpers import assert_refused, make_run
from pp_worker import build_llama
from pp_worker import train as train_in_process
from torchrun_helpers import logged as _losses
from torchrun_helpers import weights_diff as _weights_diff
from torchrun_helpers import worker_env

from tunesmith.data.loader import collate
from tunesmith.data.pack import PackedSample, block_causal
from tunesmith.errors import ConfigError
from tunesmith.runenv import free_port
from tunesmith.train import pipeline_parallel as pp
from tunesmith.train.mesh import Mesh

WORKER = Path(__file__).with_name("pp_worker.py")
LOSS_TOL = 2e-5
WEIGHT_TOL = 1e-4


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return build_llama(tmp_path_factory.mktemp("tiny-llama"), tiny_model_dir)


# ------------------------------------------------------------------------------------------- fast: the parts


def test_the_layers_are_shared_out_by_count_and_never_more_stages_than_layers():
    assert pp.stage_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert pp.stage_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    with pytest.raises(ConfigError, match="more stages than the model's 2 decoder layers"):
        pp.stage_layers(2, 3)


def _rows() -> list[PackedSample]:
    """A packed row of 3 samples and a plain one, of different widths."""
    gen = torch.Generator().manual_seed(0)
    return [PackedSample(torch.randint(3, 50, (12,), generator=gen).tolist(), [-100, *range(3, 14)], seq_lens=[5, 4, 3]),
            PackedSample(torch.randint(3, 50, (7,), generator=gen).tolist(), [-100] * 3 + list(range(3, 7)))]


def test_segment_ids_rebuild_the_mask_one_process_uses():
    packed = collate(_rows()[:1], pad_token_id=0)
    assert torch.equal(block_causal(pp.segment_ids(packed)), packed.model_inputs()["attention_mask"][:, 0] == 0)
    both = collate([_rows()[1], PackedSample([4] * 9, [5] * 9)], pad_token_id=0)  # the first row padded by 2
    allowed = block_causal(pp.segment_ids(both))
    real = both.attention_mask.bool()
    assert torch.equal(allowed[0][:7, :7], torch.ones(7, 7).tril().bool())  # real tokens: plain causal
    assert allowed[0, 7:, :].sum() == 2 and allowed[0, 8, 8] and not allowed[0, 8, 0]  # each pad: itself
    assert not allowed[0][real[0]][:, ~real[0]].any()  # no real token sees a pad


def test_a_window_is_padded_to_one_shape_without_targets_in_the_padding():
    window = [collate([row], pad_token_id=0) for row in _rows()]
    stacked = pp.window_inputs(window, pad_token_id=0)
    assert all(t.shape == (2, 12) for t in stacked.values())
    assert torch.equal(stacked["labels"][1, 7:], torch.full((5,), -100))  # padding carries no labels
    assert sum(int((b.labels[:, 1:] != -100).sum()) for b in window) == int((stacked["labels"][:, 1:] != -100).sum())
    assert torch.equal(stacked["position_ids"][0], torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]))
    assert torch.equal(stacked["segments"][1, 7:], torch.arange(7, 12))  # every pad its own segment


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_stages_in_a_row_compute_the_whole_models_logits(llama_dir, tiny_model_dir, family):
    from transformers import AutoModelForCausalLM

    model_dir = llama_dir if family == "llama" else tiny_model_dir  # 4 layers: 2 per stage; 2 layers: 1
    whole = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    batch = collate(_rows(), pad_token_id=0)
    want = whole(**batch.model_inputs()).logits
    inputs = pp.window_inputs([batch], pad_token_id=0)
    kwargs = {"position_ids": inputs["position_ids"], "segments": inputs["segments"]}
    hidden = inputs["input_ids"]
    stages = [AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa") for _ in range(2)]
    names = set()
    for rank, model in enumerate(stages):
        stage = pp.split_model(model, Mesh(rank, 2, pipeline_parallel=2))
        names |= set(stage.state_dict())
        assert all(p.device.type == "meta" for p in model.model.layers[-1 if rank == 0 else 0].parameters())  # freed
        hidden = stage(hidden, **kwargs)
    hidden = stage.lm_head(hidden)  # the loss runs the last stage's head
    assert names == set(whole.state_dict())  # the HF names, each on exactly one stage
    assert torch.allclose(hidden, want, atol=1e-5)  # pads too: each attends to itself in both


def test_a_head_tied_to_the_embeddings_is_refused_in_one_sentence():
    """SmolLM2 ties its head to the embeddings, which live on the first stage and the last."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, tie_word_embeddings=True)
    with pytest.raises(ConfigError, match="tie_word_embeddings") as refused:
        pp.split_model(LlamaForCausalLM(config), Mesh(0, 2, pipeline_parallel=2))
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "overrides, culprits",
    [
        (["pipeline_parallel_size=2"], ["pipeline_parallel_size: 2", "finetuning_type: full"]),  # lora
        (["--nproc-per-node", "3", "pipeline_parallel_size=2", "finetuning_type=full"],
         ["pipeline_parallel_size 2", "does not divide the world size 3"]),
        # the tiny Qwen2 has 2 layers: read from its config.json before launching
        (["--nproc-per-node", "3", "pipeline_parallel_size=3", "finetuning_type=full"],
         ["pipeline_parallel_size: 3", "2 decoder layers"]),
        (["pipeline_parallel_size=2", "finetuning_type=full", "val_size=0.2"],
         ["pipeline_parallel_size: 2", "val_size"]),
    ],
    ids=["lora", "world-3", "stages-over-layers", "validation"],
)
def test_what_pipeline_parallel_cannot_run_is_one_sentence_before_launch(tmp_path, tiny_model_dir, capsys,
                                                                          overrides, culprits):
    config = make_run(tmp_path, tiny_model_dir)
    assert_refused(["train", config, *overrides], capsys, *culprits)
    assert not (tmp_path / "run").exists()  # nothing started


# ------------------------------------------------------------------------------------------- slow: processes


# name → overrides; each trained on 2 stages (one torchrun launch for all) and on one rank (in this process)
RUNS = {
    "1f1b": "gradient_accumulation_steps=2 save_steps=3",
    "packed": "gradient_accumulation_steps=3 packing=true max_steps=3 gradient_checkpointing=true",
    "gpipe": "max_steps=3 loss_chunk_size=7",  # one micro-batch per window: fewer than the stages
}


@pytest.fixture(scope="module")
def one_rank(llama_dir, tmp_path_factory):
    """Runs on one rank in this process, each trained once per module: ``get(name, overrides)``."""
    from train_helpers import parse_value

    root = tmp_path_factory.mktemp("one")
    done: dict[str, Path] = {}

    def get(name: str, overrides: str) -> Path:
        if name not in done:
            pairs = dict(arg.split("=", 1) for arg in overrides.split())
            train_in_process(str(llama_dir), str(root / name), {k: parse_value(v) for k, v in pairs.items()})
            done[name] = root / name
        return done[name]

    return get


@pytest.fixture(scope="module")
def two_stages(llama_dir, one_rank, tmp_path_factory) -> dict[str, Path]:
    """Every PP2 run in one torchrun launch (a launch costs more than a run), the last one resuming the 1-rank
    run's checkpoint of step 3."""
    root = tmp_path_factory.mktemp("pp2")
    checkpoint = one_rank("1f1b", RUNS["1f1b"]) / "checkpoint-3"
    runs = [f"{root / name} pipeline_parallel_size=2 {overrides}" for name, overrides in RUNS.items()]
    runs.append(f"{root / 'from-one'} pipeline_parallel_size=2 {RUNS['1f1b']} resume_from_checkpoint={checkpoint}")
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}"]
    result = subprocess.run([sys.executable, *launcher, str(WORKER), str(llama_dir), *runs], capture_output=True,
                            text=True, env=worker_env(WORKER), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    (root / "stderr.txt").write_text(result.stderr, encoding="utf-8")
    return {name: root / name for name in [*RUNS, "from-one"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_two_pipeline_stages_equal_one_rank(two_stages, one_rank, name):
    """The same rows per step on one rank, or through 2 stages (1F1B; GPipe when a window has one micro-batch):
    plain and packed rows, activation checkpointing, the chunked loss on the last stage."""
    reference = one_rank(name, RUNS[name])
    out = two_stages[name]
    ref, got = _losses(reference), _losses(out)
    assert list(got) == list(ref) and len(got) >= 3
    assert max(abs(ref[s] - got[s]) for s in ref) < LOSS_TOL, (ref, got)
    assert _weights_diff(reference, out) < WEIGHT_TOL
    stderr = (out.parent / "stderr.txt").read_text()
    assert "2 ranks = 1 data-parallel × 2 pipeline-parallel" in stderr
    assert "rank 0 runs stage 0 of 2 (layers 0-1), schedule 1F1B" in stderr


@pytest.mark.slow
def test_a_pipeline_checkpoint_resumes_on_one_rank_and_a_one_rank_checkpoint_on_two_stages(two_stages, one_rank):
    """PP2 → 1 rank: the stages' dcp/ checkpoint of step 3 (HF names) continues on one process as PP2 went on; the
    checkpoint also holds the whole model as a plain HF folder. 1 rank → PP2: each stage takes its share of the
    HF weights and optimizer.pt and continues as the 1-rank run went on."""
    two = two_stages["1f1b"]
    checkpoint = two / "checkpoint-3"
    assert (checkpoint / "dcp").is_dir() and (checkpoint / "model.safetensors").is_file()
    out = one_rank("resumed", f"{RUNS['1f1b']} resume_from_checkpoint={checkpoint}")
    for want_dir, got_dir in ((two, out), (one_rank("1f1b", RUNS["1f1b"]), two_stages["from-one"])):
        want, got = _losses(want_dir), _losses(got_dir)
        assert list(got) == [4, 5, 6]
        assert max(abs(want[s] - got[s]) for s in got) < LOSS_TOL, (want, got)
        assert _weights_diff(want_dir, got_dir) < WEIGHT_TOL
