"""Helpers for comparing our preference objectives with TRL's trainers on the same batch and weights."""

from __future__ import annotations

import copy
from pathlib import Path

import torch


def policy_and_reference(model_dir: Path, seed: int = 0):
    """The tiny model as the reference, and a policy a little away from it, so margins (and losses) are not
    trivial."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return policy, reference


class PlainCall:
    """ModelCall on an unwrapped model (no engine): the policy, or another module, without a KV cache."""

    def __init__(self, policy: torch.nn.Module) -> None:
        self.policy = policy
        self.device = next(policy.parameters()).device

    def __call__(self, **inputs):
        return self.policy(**inputs, use_cache=False)

    def other(self, module: torch.nn.Module, **inputs):
        return module(**inputs, use_cache=False)


def max_grad_diff(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    assert ours.keys() == theirs.keys()
    return max(float((ours[name] - theirs[name]).abs().max()) for name in theirs)


def trl_step(trainer_class, config, weights, rows: list[dict], tokenizer):
    """TRL's loss on its first batch of ``rows`` (all in one batch), and the gradients it produces: the policy and
    reference of ``weights`` copied, so each comparison starts from the same weights."""
    import datasets

    policy, reference = (copy.deepcopy(model) for model in weights)
    trainer = trainer_class(model=policy, ref_model=reference, args=config,
                            train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    inputs = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return inputs, float(loss), grads


def trl_args(**values) -> dict:
    """Settings every TRL config of these comparisons shares: float32 on CPU, no logging integrations."""
    return dict(report_to="none", use_cpu=True, max_length=None, bf16=False, fp16=False, **values)
