"""Objectives: what a stage trains on is a small piece the loop calls through one interface (its batches, its
loss and what that is normalised by, its metrics), and SFT is the first of them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from train_helpers import encode_pairs, make_cfg, tiny_model

import tunesmith.train.loop as loop_module
from tunesmith.data.loader import IGNORE_INDEX, Batch, TokenCollator
from tunesmith.train import fit
from tunesmith.train.objectives import _OBJECTIVES, LossParts, SFTObjective, create_objective
from tunesmith.train.observe import read_log


@pytest.fixture(scope="module")
def samples(tiny_tokenizer):
    return encode_pairs(tiny_tokenizer)


class SampleMeanObjective(SFTObjective):
    """A stage the loop has never heard of: every *sample* weighs the same (its mean token loss), and it logs
    the mean number of targets per sample."""

    name = "sample_mean"
    metric_names = ("targets_per_sample",)

    def units(self, batch: Batch) -> int:
        return int(((batch.labels[:, 1:] != IGNORE_INDEX).sum(dim=1) > 0).sum())  # masked fillers count 0

    def loss(self, model, batch: Batch) -> LossParts:
        logits = model(**batch.model_inputs()).logits.float()
        shifted = F.pad(batch.labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        per_token = F.cross_entropy(logits.transpose(1, 2), shifted, ignore_index=IGNORE_INDEX, reduction="none")
        targets = (shifted != IGNORE_INDEX).sum(dim=1)
        per_sample = per_token.sum(dim=1) / targets.clamp(min=1)
        return LossParts(per_sample.sum(), {"targets_per_sample": float(targets.sum())})


def test_the_sft_objective_is_the_mean_cross_entropy_of_the_target_tokens(tiny_model_dir, tiny_tokenizer, samples):
    cfg = make_cfg(Path("unused"), tiny_model_dir)
    model = tiny_model(tiny_model_dir, cfg)
    objective = create_objective(cfg)
    batch = objective.collator(tiny_tokenizer.pad_token_id).collate(samples[:4])
    parts = objective.loss(lambda **inputs: model(**inputs, use_cache=False), batch)
    hf_mean = model(**batch.model_inputs(), labels=batch.labels).loss  # transformers' own causal-LM loss
    assert objective.units(batch) == sum(sum(1 for t in s.labels[1:] if t != IGNORE_INDEX) for s in samples[:4])
    assert float(parts.loss) / objective.units(batch) == pytest.approx(float(hf_mean), abs=1e-5)


def test_a_new_objective_trains_through_fit_with_its_own_normalisation_and_metrics(
    tmp_path, tiny_model_dir, tiny_tokenizer, samples
):
    """The loop divides by the objective's units of the whole window (here samples, over 2 accumulated
    micro-batches of unequal target counts) and logs the objective's metrics: step 1's logged loss is the mean
    over the window's samples of each sample's mean token loss, computed here by hand."""
    cfg = make_cfg(tmp_path / "run", tiny_model_dir, max_steps=2, per_device_train_batch_size=2,
                   gradient_accumulation_steps=2, max_grad_norm=0.0)
    model = tiny_model(tiny_model_dir, cfg)
    objective = SampleMeanObjective()
    first_window = [samples[i] for i in torch.randperm(len(samples), generator=torch.Generator().manual_seed(7))[:4]]
    with torch.no_grad():
        by_hand = []
        for sample in first_window:
            batch = TokenCollator(0).collate([sample])
            by_hand.append(float(objective.loss(lambda **i: model(**i, use_cache=False), batch).loss))
    fit(cfg, model, tiny_tokenizer, samples, objective=objective, resume_from=None)
    first = next(entry for entry in read_log(tmp_path / "run") if "loss" in entry)
    assert first["loss"] == pytest.approx(sum(by_hand) / 4, abs=1e-5)
    targets = [sum(1 for t in s.labels[1:] if t != IGNORE_INDEX) for s in first_window]
    assert first["targets_per_sample"] == pytest.approx(sum(targets) / 4)


def test_the_loop_names_no_stage():
    """Like engines, stages are known only to their registry: no stage name appears as a string in the loop."""
    source = Path(loop_module.__file__).read_text(encoding="utf-8")
    strings = {node.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Constant)}
    assert not strings & set(_OBJECTIVES), strings & set(_OBJECTIVES)
