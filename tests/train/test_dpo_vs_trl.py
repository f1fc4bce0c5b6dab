"""Our DPO losses equal TRL's DPOTrainer (the reference implementation users compare with) on the same batch and
the same weights: the loss and every gradient within 1e-5 in float32."""

from __future__ import annotations

import copy

import pytest
import torch

from tunesmith.data.loader import IGNORE_INDEX, Batch
from tunesmith.train.objectives import DPOObjective

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

ROWS = [
    {"prompt": f"Tell me about topic {i}.", "chosen": f" Sure, topic {i} is a nice one{'!' * i}.", "rejected": " No."}
    for i in range(4)
]


@pytest.fixture(scope="module")
def weights(tiny_model_dir):
    """A policy a little away from its reference, so that the margins (and the losses) are not trivial."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return policy, reference


def _trl_loss_and_grads(weights, tokenizer, loss_type: str, tmp_path):
    policy, reference = (copy.deepcopy(m) for m in weights)
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=0.1, loss_type=[loss_type], report_to="none", use_cpu=True,
                         per_device_train_batch_size=len(ROWS), max_length=None, bf16=False, fp16=False)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args,
                             train_dataset=datasets.Dataset.from_list(ROWS), processing_class=tokenizer)
    inputs = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return inputs, float(loss), grads


def _our_loss_and_grads(weights, inputs, loss_type: str):
    policy, reference = (copy.deepcopy(m) for m in weights)
    objective = DPOObjective(loss_type, beta=0.1)
    objective.frozen = reference.eval().requires_grad_(False)  # TRL's ref_model
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
    batch = Batch(inputs["input_ids"], labels, inputs["attention_mask"])

    class Call:
        def __call__(self, **kw):
            return policy(**kw, use_cache=False)

        def other(self, module, **kw):
            return module(**kw, use_cache=False)

    policy.train()
    parts = objective.loss(Call(), batch)
    loss = parts.loss / objective.units(batch)
    loss.backward()
    return float(loss), {name: p.grad for name, p in policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_loss_and_gradients_equal_trl(weights, tiny_tokenizer, tmp_path, loss_type):
    inputs, trl_loss, trl_grads = _trl_loss_and_grads(weights, tiny_tokenizer, loss_type, tmp_path)
    assert inputs["completion_mask"].sum(dim=1).unique().numel() > 1  # replies of different lengths
    our_loss, our_grads = _our_loss_and_grads(weights, inputs, loss_type)
    assert our_loss == pytest.approx(trl_loss, abs=1e-5)
    assert trl_loss > 0.05  # not a trivial point
    assert our_grads.keys() == trl_grads.keys()
    worst = max(float((our_grads[n] - trl_grads[n]).abs().max()) for n in trl_grads)
    assert worst < 1e-5, worst
