"""The DFT, EAFT and ASFT losses (stage: sft): each is LLaMA-Factory's per-token formula, summed over the target
tokens like SFT's cross entropy (the loop divides by the step's targets); the weights carry no gradient; ASFT's
reference is the initial model (LoRA's adapter off, or a frozen copy); and each learns and resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_lf_adapter_training import assert_resumes_exactly, logged
from train_helpers import encode_pairs, make_cfg, tiny_model

from tunesmith.data.loader import IGNORE_INDEX
from tunesmith.train.objectives import (
    ASFTObjective,
    DFTObjective,
    EAFTObjective,
    SFTObjective,
    create_objective,
)


@pytest.fixture(autouse=True)
def _no_data_cache(monkeypatch):
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")


@pytest.fixture(scope="module")
def batch(tiny_tokenizer):
    return SFTObjective().collator(tiny_tokenizer.pad_token_id).collate(encode_pairs(tiny_tokenizer)[:4])


class Call:
    """The model as objectives call it (the loop's EngineCall without an engine)."""

    device = torch.device("cpu")

    def __init__(self, model):
        self.model = model

    def __call__(self, **inputs):
        return self.model(**inputs, use_cache=False)

    def other(self, module, **inputs):
        return module(**inputs, use_cache=False)


def _per_token(model, batch):
    """By hand: for each target token, in order, its logits row and its target id."""
    logits = model(**batch.model_inputs(), use_cache=False).logits.float()
    rows, targets = [], []
    for b in range(batch.labels.size(0)):
        for t in range(batch.labels.size(1) - 1):
            if batch.labels[b, t + 1] != IGNORE_INDEX:
                rows.append(logits[b, t])
                targets.append(int(batch.labels[b, t + 1]))
    return torch.stack(rows), targets


def _top20_entropy(row: torch.Tensor) -> float:
    probs = sorted(torch.softmax(row.double(), dim=-1).tolist(), reverse=True)[:20]
    total = sum(probs)
    return -sum(p / total * math.log(p / total) for p in probs)


def test_the_sft_keys_choose_the_loss_and_its_alpha(tmp_path, tiny_model_dir):
    picks = {
        (): SFTObjective,
        (("use_dft_loss", True),): DFTObjective,
        (("use_eaft_loss", True), ("eaft_alpha", 0.5)): EAFTObjective,
        (("use_asft_loss", True), ("asft_alpha", 0.05)): ASFTObjective,
    }
    for values, kind in picks.items():
        objective = create_objective(make_cfg(tmp_path, tiny_model_dir, **dict(values)))
        assert type(objective) is kind
    assert create_objective(make_cfg(tmp_path, use_eaft_loss=True, eaft_alpha=0.5)).alpha == 0.5
    assert create_objective(make_cfg(tmp_path, use_asft_loss=True, asft_alpha=0.05)).alpha == 0.05


def test_dft_is_the_cross_entropy_weighted_by_the_detached_target_probability(tmp_path, tiny_model_dir, batch):
    cfg = make_cfg(tmp_path, tiny_model_dir, use_dft_loss=True)
    model, objective = tiny_model(tiny_model_dir, cfg), create_objective(cfg)
    parts = objective.loss(Call(model), batch)
    with torch.no_grad():
        rows, targets = _per_token(model, batch)
        nll = [float(-torch.log_softmax(row.double(), -1)[y]) for row, y in zip(rows, targets, strict=True)]
        expected = sum(n * math.exp(-n) for n in nll)
    assert objective.units(batch) == len(targets)
    assert float(parts.loss) == pytest.approx(expected, rel=1e-5)
    assert parts.metrics["nll"] == pytest.approx(sum(nll), rel=1e-5)
    # the weight is a constant: the gradient of NLL × sg(p) is that of -p
    parts.loss.backward()
    dft_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    rows, targets = _per_token(model, batch)
    probs = torch.stack([torch.softmax(row, -1)[y] for row, y in zip(rows, targets, strict=True)])
    (-probs.sum()).backward()
    assert torch.allclose(dft_grad, model.lm_head.weight.grad, atol=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_eaft_weights_the_cross_entropy_by_the_top_20_entropy_over_3_to_the_alpha(tmp_path, tiny_model_dir, batch,
                                                                                  alpha):
    cfg = make_cfg(tmp_path, tiny_model_dir, use_eaft_loss=True, eaft_alpha=alpha)
    model, objective = tiny_model(tiny_model_dir, cfg), create_objective(cfg)
    parts = objective.loss(Call(model), batch)
    with torch.no_grad():
        rows, targets = _per_token(model, batch)
        weights = [(_top20_entropy(row) / 3.0) ** alpha for row in rows]
        nll = [float(-torch.log_softmax(row.double(), -1)[y]) for row, y in zip(rows, targets, strict=True)]
    assert float(parts.loss) == pytest.approx(sum(w * n for w, n in zip(weights, nll, strict=True)), rel=1e-5)
    assert 0.5 < min(weights) and max(weights) <= (math.log(20) / 3) ** alpha + 1e-6
    # the weights carry no gradient
    parts.loss.backward()
    grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    rows, targets = _per_token(model, batch)
    nll_t = F.cross_entropy(rows, torch.tensor(targets), reduction="none")
    (nll_t * torch.tensor(weights, dtype=torch.float32)).sum().backward()
    assert torch.allclose(grad, model.lm_head.weight.grad, atol=1e-6)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_asft_adds_alpha_times_the_kl_from_the_initial_model(tmp_path, tiny_model_dir, batch, method):
    cfg = make_cfg(tmp_path, tiny_model_dir, finetuning_type=method, use_asft_loss=True, asft_alpha=0.3)
    model, objective = tiny_model(tiny_model_dir, cfg), create_objective(cfg)
    model = objective.prepare_model(model)
    start = objective.loss(Call(model), batch)
    dft = create_objective(make_cfg(tmp_path, tiny_model_dir, use_dft_loss=True)).loss(Call(model), batch)
    assert start.metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as its reference
    assert float(start.loss) == pytest.approx(float(dft.loss), rel=1e-6)
    with torch.no_grad():
        initial_rows, _ = _per_token(model, batch)
        for name, param in model.named_parameters():  # the policy moves away from where it started
            if param.requires_grad and ("lora_B" in name or method == "full"):
                param.add_(0.05 * torch.randn_like(param))
    moved = objective.loss(Call(model), batch)
    with torch.no_grad():
        rows, targets = _per_token(model, batch)
        kl = F.kl_div(F.log_softmax(rows, -1), F.log_softmax(initial_rows, -1), log_target=True,
                      reduction="sum")
        nll = F.cross_entropy(rows, torch.tensor(targets), reduction="none")
        expected = float((nll * torch.exp(-nll)).sum() + 0.3 * kl)
    assert moved.metrics["kl"] == pytest.approx(float(kl), rel=1e-4) and float(kl) > 1e-3
    assert float(moved.loss) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("values", [dict(use_dft_loss=True), dict(use_eaft_loss=True, eaft_alpha=0.5),
                                    dict(use_asft_loss=True, asft_alpha=0.5)], ids=["dft", "eaft", "asft"])
def test_each_loss_learns_and_resumes_exactly(tmp_path, tiny_model_dir, identity_rows, values):
    straight = assert_resumes_exactly(tmp_path, tiny_model_dir, identity_rows * 4, finetuning_type="full",
                                      learning_rate=1e-3, **values)
    nll = logged(straight, "nll")
    assert min(nll[2:]) < nll[0] - 0.1, nll  # the cross entropy of the targets falls
    if "use_asft_loss" in values:
        # the frozen reference is a copy taken before a checkpoint is loaded: the resumed run anchors to the
        # initial weights too, its KL terms agree step by step
        kl = logged(straight, "kl")
        assert kl[0] == pytest.approx(0.0, abs=1e-6) and max(kl[1:]) > 0
        assert logged(tmp_path / "resumed" / "run", "kl") == pytest.approx(kl, abs=1e-7)

