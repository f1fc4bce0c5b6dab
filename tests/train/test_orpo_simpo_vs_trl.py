"""Our reference-free preference losses against TRL's trainers on the same batch and weights, in float32:
SimPO equals CPOTrainer(loss_type="simpo", cpo_alpha=0) — loss and every gradient within 1e-5 — and ORPO equals
ORPOTrainer once the one documented difference is accounted for: our SFT term is LLaMA-Factory's (the chosen
reply's mean token NLL, per pair) where TRL's is the cross-entropy over the whole chosen sequence, prompt included.
The odds-ratio term, the part that makes ORPO ORPO, must agree to 1e-5 in value and gradient."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from preference_helpers import PlainCall, max_grad_diff, policy_and_reference, trl_args

from tunesmith.data.loader import IGNORE_INDEX, Batch
from tunesmith.train.objectives import DPOObjective

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
cpo = pytest.importorskip("trl.experimental.cpo")
orpo = pytest.importorskip("trl.experimental.orpo")

ROWS = [
    {"prompt": f"Tell me about topic {i}.", "chosen": f" Sure, topic {i} is a nice one{'!' * i}.", "rejected": " No."}
    for i in range(4)
]
BETA = 0.1


@pytest.fixture(scope="module")
def weights(tiny_model_dir):
    return policy_and_reference(tiny_model_dir)


def _trl(trainer_class, config, weights, tokenizer):
    """TRL's loss, metrics and gradients on one batch of all ROWS, from a copy of the policy."""
    policy = copy.deepcopy(weights[0])
    trainer = trainer_class(model=policy, args=config, train_dataset=datasets.Dataset.from_list(ROWS),
                            processing_class=tokenizer)
    inputs = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, inputs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return inputs, float(loss.detach()), metrics, grads


def _pad(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return F.pad(tensor, (0, width - tensor.size(1)), value=value)


def _our_batch(inputs, pad_id: int) -> Batch:
    """TRL's chosen and rejected rows as one of our pairwise batches: chosen rows first, then rejected."""
    width = max(inputs["chosen_input_ids"].size(1), inputs["rejected_input_ids"].size(1))
    rows = {key: torch.cat([_pad(inputs[f"{side}_{key}"], width, fill) for side in ("chosen", "rejected")])
            for key, fill in (("input_ids", pad_id), ("labels", IGNORE_INDEX), ("attention_mask", 0))}
    return Batch(rows["input_ids"], rows["labels"], rows["attention_mask"])


def _ours(weights, batch: Batch, objective: DPOObjective, extra=None):
    policy = copy.deepcopy(weights[0]).train()
    loss = objective.loss(PlainCall(policy), batch).loss / objective.units(batch)
    if extra is not None:
        loss = loss + extra(policy)
    loss.backward()
    return float(loss), {name: p.grad for name, p in policy.named_parameters() if p.grad is not None}


def test_simpo_loss_and_gradients_equal_trl_cpo_with_no_nll_term(weights, tiny_tokenizer, tmp_path):
    config = cpo.CPOConfig(**trl_args(output_dir=str(tmp_path), beta=BETA, loss_type="simpo", simpo_gamma=0.5,
                                      cpo_alpha=0.0, per_device_train_batch_size=len(ROWS)))
    inputs, trl_loss, _, trl_grads = _trl(cpo.CPOTrainer, config, weights, tiny_tokenizer)
    batch = _our_batch(inputs, tiny_tokenizer.pad_token_id)
    our_loss, our_grads = _ours(weights, batch, DPOObjective("simpo", beta=BETA, simpo_gamma=0.5))
    assert our_loss == pytest.approx(trl_loss, abs=1e-5)
    assert trl_loss > 0.05
    worst = max_grad_diff(our_grads, trl_grads)
    assert worst < 1e-5, worst


def _sft_terms_trl_minus_ours(inputs):
    """TRL's ORPO NLL (whole chosen sequence, token mean over the batch) minus ours (the chosen reply's mean
    token NLL, averaged over pairs): adding it to our loss gives TRL's."""

    def difference(policy: torch.nn.Module) -> torch.Tensor:
        ids, mask, labels = inputs["chosen_input_ids"], inputs["chosen_attention_mask"], inputs["chosen_labels"]
        logits = policy(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        whole = F.cross_entropy(logits.flatten(0, 1), ids.masked_fill(mask == 0, IGNORE_INDEX)[:, 1:].flatten())
        targets = labels[:, 1:]
        token_logps = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        reply = targets != IGNORE_INDEX
        reply_nll = -((token_logps * reply).sum(-1) / reply.sum(-1)).mean()
        return whole - reply_nll

    return difference


def test_orpo_odds_ratio_term_equals_trl_and_only_the_sft_term_differs(weights, tiny_tokenizer, tmp_path):
    config = orpo.ORPOConfig(**trl_args(output_dir=str(tmp_path), beta=BETA,
                                        per_device_train_batch_size=len(ROWS)))
    inputs, trl_loss, metrics, trl_grads = _trl(orpo.ORPOTrainer, config, weights, tiny_tokenizer)
    batch = _our_batch(inputs, tiny_tokenizer.pad_token_id)
    plain_loss, _ = _ours(weights, batch, DPOObjective("orpo", beta=BETA))
    assert abs(plain_loss - trl_loss) > 1e-3  # the SFT terms really differ on this batch ...
    our_loss, our_grads = _ours(weights, batch, DPOObjective("orpo", beta=BETA), _sft_terms_trl_minus_ours(inputs))
    assert our_loss == pytest.approx(trl_loss, abs=1e-5)  # ... and nothing else does
    assert float(metrics["log_odds_ratio"]) < -0.05  # not a trivial point
    worst = max_grad_diff(our_grads, trl_grads)
    assert worst < 1e-5, worst
