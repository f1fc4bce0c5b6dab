"""KTO (``stage: kto``): unpaired feedback, each reply tagged desirable or undesirable (Ethayarajh et al., 2024;
TRL's and LLaMA-Factory's definitions).

A micro-batch of B examples is 2B rows: prompt + completion, then prompt + another example's completion (the
mismatched pairs of :mod:`tunesmith.data.feedback`). With r = log π(y|x) − log π_ref(y|x) per example and the KL
estimate z = max(0, mean over the mismatched rows of the same log-ratio) (detached, as in TRL), the loss is
``kto_chosen_weight · (1 − σ(β(r − z)))`` for a desirable example and ``kto_rejected_weight · (1 − σ(β(z − r)))``
for an undesirable one, a mean over the examples of a step. The KL estimate is taken per micro-batch, as TRL takes
it per device batch. The reference: :mod:`.reference`.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from tunesmith.data.feedback import FeedbackCollator, TaggedBatch
from tunesmith.data.loader import IGNORE_INDEX, Collator
from tunesmith.train.objectives.base import LossParts, ModelCall
from tunesmith.train.objectives.reference import (
    PrecomputedReference,
    Reference,
    sequence_logps,
    supports_logits_to_keep,
    target_inputs,
)


class KTOObjective(PrecomputedReference):
    """``stage: kto``; see the module docstring."""

    name: ClassVar[str] = "kto"
    metric_names: ClassVar[tuple[str, ...]] = (
        "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl", "count/chosen",
        "count/rejected",
    )
    metric_denominators: ClassVar[dict[str, str]] = {
        "rewards/chosen": "count/chosen", "logps/chosen": "count/chosen",
        "rewards/rejected": "count/rejected", "logps/rejected": "count/rejected",
    }

    model_head: ClassVar[str] = "causal_lm"

    def __init__(self, beta: float = 0.1, chosen_weight: float = 1.0, rejected_weight: float = 1.0,
                 ftx: float = 0.0, reference: Reference | None = None, precompute_reference: bool = False) -> None:
        self.beta, self.chosen_weight, self.rejected_weight, self.ftx = beta, chosen_weight, rejected_weight, ftx
        self.reference = reference or Reference()
        self.precompute_reference = precompute_reference
        self.trim = False  # whether the model can skip the prompt's logits (see target_inputs)

    def collator(self, pad_token_id: int) -> Collator:
        return FeedbackCollator(pad_token_id)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        self.trim = supports_logits_to_keep(model)
        self.reference.attach(model)
        return model

    def units(self, batch: TaggedBatch) -> int:  # type: ignore[override]
        main = batch.labels[: batch.labels.size(0) // 2, 1:]
        return int(((main != IGNORE_INDEX).sum(dim=1) > 0).sum())  # a masked filler counts 0

    def tokens(self, batch: TaggedBatch) -> int:  # type: ignore[override]
        return int(batch.attention_mask[: batch.attention_mask.size(0) // 2].sum())

    def loss(self, model: ModelCall, batch: TaggedBatch) -> LossParts:  # type: ignore[override]
        inputs, labels = target_inputs(batch, self.trim)
        reference = self.reference.logps(model, batch, inputs, labels)
        logps, counts = sequence_logps(model(**inputs).logits, labels)
        half = logps.size(0) // 2
        ratios = logps[:half] - reference[:half]
        valid = counts[:half] > 0
        kl_valid = counts[half:] > 0
        kl_ratios = (logps[half:] - reference[half:]).detach()
        kl = kl_ratios[kl_valid].mean().clamp(min=0) if kl_valid.any() else torch.zeros((), device=logps.device)
        assert batch.desirable is not None
        desirable = batch.desirable & valid
        undesirable = ~batch.desirable & valid
        losses = torch.where(
            batch.desirable,
            self.chosen_weight * (1 - torch.sigmoid(self.beta * (ratios - kl))),
            self.rejected_weight * (1 - torch.sigmoid(self.beta * (kl - ratios))),
        )
        if self.ftx > 0:  # the SFT term on desirable replies: their mean token NLL
            losses = losses - self.ftx * torch.where(batch.desirable, logps[:half] / counts[:half].clamp(min=1), 0.0)
        rewards = self.beta * ratios.detach()
        metrics = {
            "rewards/chosen": float(rewards[desirable].sum()),
            "rewards/rejected": float(rewards[undesirable].sum()),
            "logps/chosen": float(logps[:half].detach()[desirable].sum()),
            "logps/rejected": float(logps[:half].detach()[undesirable].sum()),
            "kl": float(kl) * int(valid.sum()),
            "count/chosen": float(desirable.sum()),
            "count/rejected": float(undesirable.sum()),
        }
        return LossParts((losses * valid.to(losses.dtype)).sum(), metrics)

    def eval_metrics(self, loss: float, metrics: dict[str, float]) -> dict[str, float]:
        return {"eval_loss": loss, **{f"eval_{name}": value for name, value in metrics.items()}}
