"""KTO (``stage: kto``): unpaired feedback, each reply tagged desirable or undesirable (Ethayarajh et al., 2024;
TRL's and LLaMA-Factory's definitions).

A micro-batch of B examples is 2B rows: prompt + completion, then prompt + another example's completion (the
mismatched pairs of :mod:`tunesmith.data.feedback`). With r = log π(y|x) − log π_ref(y|x) per example and the KL
estimate z = max(0, mean over the mismatched rows of the same log-ratio) (detached, as in TRL), the loss is
``kto_chosen_weight · (1 − σ(β(r − z)))`` for a desirable example and ``kto_rejected_weight · (1 − σ(β(z − r)))``
for an undesirable one, a mean over the examples of a step.

z is the mean over every mismatched row of the step, on every rank (:meth:`KTOObjective.prepare_window`, a forward
of those rows without gradient before the step's losses): TRL averages per-device-batch estimates over the
processes, which is the same for one batch, and this way a step's loss does not depend on how it is split into
micro-batches and ranks, so a run resumes exactly on another world size. Validation takes z over the whole
validation set. The reference: :mod:`.reference`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from tunesmith.data.feedback import FeedbackCollator, TaggedBatch
from tunesmith.data.loader import IGNORE_INDEX, Batch, Collator
from tunesmith.train.distributed import Collectives
from tunesmith.train.objectives.base import LossParts, ModelCall
from tunesmith.train.objectives.head import LMHead
from tunesmith.train.objectives.reference import (
    PrecomputedReference,
    Reference,
    policy_logps,
    supports_logits_to_keep,
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
                 ftx: float = 0.0, reference: Reference | None = None, precompute_reference: bool = False,
                 head: LMHead | None = None) -> None:
        self.beta, self.chosen_weight, self.rejected_weight, self.ftx = beta, chosen_weight, rejected_weight, ftx
        self.reference = reference or Reference()
        self.precompute_reference = precompute_reference
        self.kl = 0.0  # the KL estimate of the current step (prepare_window)
        self.trim = False  # whether the model can skip the prompt's logits (see target_inputs)
        self.head = head or LMHead(target_only=False)

    def collator(self, pad_token_id: int) -> Collator:
        return FeedbackCollator(pad_token_id)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        self.trim = supports_logits_to_keep(model)
        self.reference.attach(model)
        return self.head.install(model)

    def units(self, batch: TaggedBatch) -> int:  # type: ignore[override]
        main = batch.labels[: batch.labels.size(0) // 2, 1:]
        return int(((main != IGNORE_INDEX).sum(dim=1) > 0).sum())  # a masked filler counts 0

    def tokens(self, batch: TaggedBatch) -> int:  # type: ignore[override]
        return int(batch.attention_mask[: batch.attention_mask.size(0) // 2].sum())

    def prepare_window(self, model: ModelCall, window: Sequence[Batch], comm: Collectives) -> None:
        """The KL estimate z of the step: the mean log-ratio over every mismatched row of ``window`` on all
        ranks (no gradient)."""
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in window:
                kl_rows = half_rows(batch.to(model.device), second=True)
                ratios, counts = self._log_ratios(model, kl_rows)
                valid = counts > 0
                total += float(ratios[valid].sum())
                count += int(valid.sum())
        total, count = comm.all_reduce_sum([total, count])
        self.kl = max(total / count, 0.0) if count else 0.0

    def _log_ratios(self, model: ModelCall, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: policy minus reference summed log-prob of its targets, and how many targets it has."""
        reference = self.reference.logps(model, batch, self.head, self.trim)
        logps, counts = policy_logps(self.head, model, batch, self.trim)
        return logps - reference, counts

    def loss(self, model: ModelCall, batch: TaggedBatch) -> LossParts:  # type: ignore[override]
        main = half_rows(batch, second=False)
        reference = self.reference.logps(model, main, self.head, self.trim)
        logps, counts = policy_logps(self.head, model, main, self.trim)
        ratios = logps - reference
        valid = counts > 0
        kl = torch.tensor(self.kl, device=logps.device)
        assert batch.desirable is not None
        desirable = batch.desirable & valid
        undesirable = ~batch.desirable & valid
        losses = torch.where(
            batch.desirable,
            self.chosen_weight * (1 - torch.sigmoid(self.beta * (ratios - kl))),
            self.rejected_weight * (1 - torch.sigmoid(self.beta * (kl - ratios))),
        )
        if self.ftx > 0:  # the SFT term on desirable replies: their mean token NLL
            losses = losses - self.ftx * torch.where(batch.desirable, logps / counts.clamp(min=1), 0.0)
        rewards = self.beta * ratios.detach()
        metrics = {
            "rewards/chosen": float(rewards[desirable].sum()),
            "rewards/rejected": float(rewards[undesirable].sum()),
            "logps/chosen": float(logps.detach()[desirable].sum()),
            "logps/rejected": float(logps.detach()[undesirable].sum()),
            "kl": float(kl) * int(valid.sum()),
            "count/chosen": float(desirable.sum()),
            "count/rejected": float(undesirable.sum()),
        }
        return LossParts((losses * valid.to(losses.dtype)).sum(), metrics)

    def eval_metrics(self, loss: float, metrics: dict[str, float]) -> dict[str, float]:
        return {"eval_loss": loss, **{f"eval_{name}": value for name, value in metrics.items()}}


def half_rows(batch: Batch, second: bool) -> Batch:
    """The first B rows of a 2B-row feedback batch (prompt + completion) or the second (prompt + mismatched
    completion), with their precomputed reference log-probs."""
    half = batch.input_ids.size(0) // 2
    rows = slice(half, None) if second else slice(None, half)
    reference = None if batch.reference_logps is None else batch.reference_logps[rows]
    return Batch(batch.input_ids[rows], batch.labels[rows], batch.attention_mask[rows], None, reference)
