"""Our KTO loss equals TRL's KTOTrainer on the same batch and weights (loss and every gradient within 1e-5 in
float32), the KL estimate from the same mismatched pairs included."""

from __future__ import annotations

import pytest
import torch
from preference_helpers import PlainCall, max_grad_diff, policy_and_reference, trl_args, trl_step

from tunesmith.data.feedback import TaggedBatch
from tunesmith.data.loader import IGNORE_INDEX
from tunesmith.train.distributed import Collectives
from tunesmith.train.objectives import KTOObjective

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

@pytest.fixture(scope="module")
def weights(tiny_model_dir):
    return policy_and_reference(tiny_model_dir)


ROWS = [
    {"prompt": f"Tell me about topic {i}.", "completion": f" Sure, topic {i} is nice{'!' * i}.", "label": i % 3 != 1}
    for i in range(5)
]


def _trl(weights, tokenizer, tmp_path):
    config = trl.KTOConfig(**trl_args(output_dir=str(tmp_path), beta=0.1, desirable_weight=1.0,
                                      undesirable_weight=1.5, per_device_train_batch_size=len(ROWS)))
    return trl_step(trl.KTOTrainer, config, weights, ROWS, tokenizer)


def _rows(ids: torch.Tensor, completion: torch.Tensor, mask: torch.Tensor, width: int, pad: int):
    grow = width - ids.size(1)
    labels = ids.masked_fill(completion == 0, IGNORE_INDEX)
    return (torch.nn.functional.pad(ids, (0, grow), value=pad),
            torch.nn.functional.pad(labels, (0, grow), value=IGNORE_INDEX),
            torch.nn.functional.pad(mask, (0, grow), value=0))


def _ours(weights, inputs, pad: int):
    import copy

    policy, reference = (copy.deepcopy(m) for m in weights)
    objective = KTOObjective(beta=0.1, chosen_weight=1.0, rejected_weight=1.5)
    objective.trim = True  # as in training: logits only from the first position that predicts a reply token
    objective.reference.frozen = reference.eval().requires_grad_(False)
    width = max(inputs["input_ids"].size(1), inputs["KL_input_ids"].size(1))
    main = _rows(inputs["input_ids"], inputs["completion_mask"], inputs["attention_mask"], width, pad)
    kl = _rows(inputs["KL_input_ids"], inputs["KL_completion_mask"], inputs["KL_attention_mask"], width, pad)
    batch = TaggedBatch(*(torch.cat(pair) for pair in zip(main, kl, strict=True)),
                        desirable=torch.as_tensor(inputs["label"], dtype=torch.bool))

    policy.train()
    call = PlainCall(policy)
    objective.prepare_window(call, [batch], Collectives())  # the KL estimate: this one batch, as TRL's
    parts = objective.loss(call, batch)
    loss = parts.loss / objective.units(batch)
    loss.backward()
    return float(loss), parts.metrics, {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}


def test_kto_loss_kl_and_gradients_equal_trl(weights, tiny_tokenizer, tmp_path):
    inputs, trl_loss, trl_grads = _trl(weights, tiny_tokenizer, tmp_path)
    assert "KL_input_ids" in inputs and 0 < sum(inputs["label"]) < len(ROWS)  # KL rows and both tags
    our_loss, metrics, our_grads = _ours(weights, inputs, tiny_tokenizer.pad_token_id)
    assert our_loss == pytest.approx(trl_loss, abs=1e-5)
    assert metrics["kl"] > 0  # the KL term is exercised, not clamped away
    worst = max_grad_diff(our_grads, trl_grads)
    assert worst < 1e-5, worst
