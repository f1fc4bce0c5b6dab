"""Preference tuning (``stage: dpo``) with ``pref_loss`` sigmoid / ipo / hinge / orpo / simpo.

A micro-batch holds B pairs as 2B rows, the chosen replies first, then the rejected ones (one forward for
both). The unit is a pair: a step's loss is the mean over its pairs on all ranks. The reference log-probs
(sigmoid, ipo, hinge) come from

the policy with its LoRA adapter switched off, or a frozen copy (:mod:`.reference`).

Logged like TRL and LLaMA-Factory: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (means over the pairs).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from tunesmith.data.loader import Batch
from tunesmith.train.objectives.base import LossParts, ModelCall
from tunesmith.train.objectives.head import LMHead
from tunesmith.train.objectives.pairwise import PairwiseBatches
from tunesmith.train.objectives.preference import AVERAGED, REFERENCE_FREE, preference_loss
from tunesmith.train.objectives.reference import (
    PrecomputedReference,
    Reference,
    policy_logps,
    sequence_logps,
    supports_logits_to_keep,
)

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


class DPOObjective(PrecomputedReference, PairwiseBatches):
    """``stage: dpo``; see the module docstring."""

    name: ClassVar[str] = "dpo"
    metric_names: ClassVar[tuple[str, ...]] = METRICS
    metric_denominators: ClassVar[dict[str, str]] = {}
    model_head: ClassVar[str] = "causal_lm"

    def __init__(self, loss_type: str = "sigmoid", beta: float = 0.1, ftx: float = 0.0, simpo_gamma: float = 0.5,
                 label_smoothing: float = 0.0, reference: Reference | None = None,
                 precompute_reference: bool = False, head: LMHead | None = None) -> None:
        self.loss_type, self.beta, self.ftx = loss_type, beta, ftx
        self.head = head or LMHead(target_only=False)
        self.simpo_gamma, self.label_smoothing = simpo_gamma, label_smoothing
        self.reference = reference or Reference()
        self.precompute_reference = precompute_reference
        self.trim = False  # whether the model can skip the prompt's logits (see target_inputs)

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        self.trim = supports_logits_to_keep(model)
        if self.needs_reference:
            self.reference.attach(model)
        return self.head.install(model)

    def loss(self, model: ModelCall, batch: Batch) -> LossParts:
        reference = self.reference.logps(model, batch, self.head, self.trim) if self.needs_reference else None
        logps, counts = policy_logps(self.head, model, batch, self.trim)
        lengths = counts.clamp(min=1)
        averaged = self.loss_type in AVERAGED
        if averaged:
            logps = logps / lengths
            reference = reference / lengths if reference is not None else None
        chosen, rejected = logps.chunk(2)
        valid = counts.chunk(2)[0] > 0
        # a masked filler pair has no targets (log-prob 0): give it a harmless value, then weight 0
        chosen, rejected = torch.where(valid, chosen, -1.0), torch.where(valid, rejected, -1.0)
        ref_chosen, ref_rejected = reference.chunk(2) if reference is not None else (None, None)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            self.loss_type, self.beta, chosen, rejected, ref_chosen, ref_rejected,
            label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma,
        )
        if self.ftx > 0:  # the SFT term: mean token NLL of the chosen reply
            chosen_mean = chosen if averaged else chosen / lengths.chunk(2)[0]
            losses = losses - self.ftx * chosen_mean
        weights = valid.to(losses.dtype)
        return LossParts((losses * weights).sum(), self._metrics(chosen, rejected, chosen_rewards,
                                                                  rejected_rewards, valid))

    @staticmethod
    def _metrics(chosen: torch.Tensor, rejected: torch.Tensor, chosen_rewards: torch.Tensor,
                 rejected_rewards: torch.Tensor, valid: torch.Tensor) -> dict[str, float]:
        def total(values: torch.Tensor) -> float:
            return float(values.detach().float()[valid].sum())

        return {
            "rewards/chosen": total(chosen_rewards),
            "rewards/rejected": total(rejected_rewards),
            "rewards/accuracies": total((chosen_rewards > rejected_rewards).float()),
            "rewards/margins": total(chosen_rewards - rejected_rewards),
            "logps/chosen": total(chosen),
            "logps/rejected": total(rejected),
        }

    def eval_metrics(self, loss: float, metrics: dict[str, float]) -> dict[str, float]:
        return {"eval_loss": loss, **{f"eval_{name}": value for name, value in metrics.items()}}


__all__ = ["DPOObjective", "sequence_logps"]
