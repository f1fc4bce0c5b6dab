"""Reward modelling (``stage: rm``) on preference pairs: an HF ``…ForSequenceClassification`` with one output (the
backbone loaded from the causal LM, a new scalar ``score`` head; see :class:`tunesmith.model.load.RewardHead`)
reads a reward at each row's last real token, and the loss is ``−log σ(r_chosen − r_rejected)`` per pair, a mean
over the pairs of a step (TRL's and LLaMA-Factory's pairwise loss). Evaluation reports ``eval_accuracy``, the share
of held-out pairs whose chosen reply gets the higher reward. The saved folder is a standard
``AutoModelForSequenceClassification`` model (full / freeze) or a PEFT adapter whose saved modules include the head
(LoRA)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from tunesmith.data.loader import Batch
from tunesmith.data.pairs import pairs_with_targets
from tunesmith.train.objectives.base import LossParts, ModelCall, ObjectiveDefaults
from tunesmith.train.objectives.pairwise import PairwiseBatches


class RewardObjective(ObjectiveDefaults, PairwiseBatches):
    """``stage: rm``; see the module docstring."""

    name: ClassVar[str] = "rm"
    model_head: ClassVar[str] = "reward"
    metric_names: ClassVar[tuple[str, ...]] = (
        "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    )
    metric_denominators: ClassVar[dict[str, str]] = {}

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def loss(self, model: ModelCall, batch: Batch) -> LossParts:
        rewards = model(**batch.model_inputs()).logits.squeeze(-1).float()
        chosen, rejected = rewards.chunk(2)
        valid = pairs_with_targets(batch)
        losses = -F.logsigmoid(chosen - rejected)
        detached_chosen, detached_rejected = chosen.detach()[valid], rejected.detach()[valid]
        metrics = {
            "rewards/chosen": float(detached_chosen.sum()),
            "rewards/rejected": float(detached_rejected.sum()),
            "rewards/accuracies": float((detached_chosen > detached_rejected).float().sum()),
            "rewards/margins": float((detached_chosen - detached_rejected).sum()),
        }
        return LossParts((losses * valid.to(losses.dtype)).sum(), metrics)

    def eval_metrics(self, loss: float, metrics: dict[str, float]) -> dict[str, float]:
        return {"eval_loss": loss, "eval_accuracy": metrics["rewards/accuracies"],
                **{f"eval_{name}": value for name, value in metrics.items()}}
