"""Supervised fine-tuning: causal-LM cross entropy on the target tokens (the assistant replies), every target
token of a step weighing the same."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from tunesmith.data.loader import IGNORE_INDEX, Batch, Collator, TokenCollator
from tunesmith.train.objectives.base import LossParts, ModelCall, ObjectiveDefaults


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross entropy summed over the target tokens (position t predicts labels[t + 1]), in float32.

    The labels are shifted, not the logits: slicing the (batch × seq × vocab) logits would copy the largest
    tensor of the step (and keep a second one alive for backward).
    """
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).to(logits.device)
    if logits.dtype != torch.float32:  # autocast: compute the softmax in float32
        logits = logits.float()
    return F.cross_entropy(
        logits.view(-1, logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


class SFTObjective(ObjectiveDefaults):
    """``stage: sft``. ``varlen`` (flash_attn: fa2): packed rows go to the model as position_ids without the
    4-D mask (see :meth:`~tunesmith.data.loader.Batch.model_inputs`)."""

    name: ClassVar[str] = "sft"
    metric_names: ClassVar[tuple[str, ...]] = ()
    metric_denominators: ClassVar[dict[str, str]] = {}
    model_head: ClassVar[str] = "causal_lm"

    def __init__(self, varlen: bool = False) -> None:
        self.varlen = varlen

    def collator(self, pad_token_id: int) -> Collator:
        return TokenCollator(pad_token_id)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def units(self, batch: Batch) -> int:
        return batch.num_targets

    def tokens(self, batch: Batch) -> int:
        return batch.num_targets

    def loss(self, model: ModelCall, batch: Batch) -> LossParts:
        logits = model(**batch.model_inputs(self.varlen)).logits
        return LossParts(token_loss_sum(logits, batch.labels))

    def eval_metrics(self, loss: float, metrics: dict[str, float]) -> dict[str, float]:
        return {"eval_loss": loss}
