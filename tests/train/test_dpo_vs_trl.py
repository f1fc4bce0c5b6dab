"""Our DPO losses equal TRL's DPOTrainer (the reference implementation users compare with) on the same batch and
the same weights: the loss and every gradient within 1e-5 in float32."""

from __future__ import annotations

import copy

import pytest
from preference_helpers import PlainCall, max_grad_diff, policy_and_reference, trl_args, trl_step

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
    return policy_and_reference(tiny_model_dir)


def _trl_loss_and_grads(weights, tokenizer, loss_type: str, tmp_path):
    config = trl.DPOConfig(**trl_args(output_dir=str(tmp_path), beta=0.1, loss_type=[loss_type],
                                      per_device_train_batch_size=len(ROWS)))
    return trl_step(trl.DPOTrainer, config, weights, ROWS, tokenizer)


def _our_loss_and_grads(weights, inputs, loss_type: str):
    policy, reference = (copy.deepcopy(m) for m in weights)
    objective = DPOObjective(loss_type, beta=0.1)
    objective.trim = True  # as in training: logits only from the first position that predicts a reply token
    objective.reference.frozen = reference.eval().requires_grad_(False)  # TRL's ref_model
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
    batch = Batch(inputs["input_ids"], labels, inputs["attention_mask"])

    policy.train()
    parts = objective.loss(PlainCall(policy), batch)
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
    worst = max_grad_diff(our_grads, trl_grads)
    assert worst < 1e-5, worst
