"""Supervised fine-tuning: causal-LM cross entropy on the target tokens (the assistant replies), every target
token of a step weighing the same."""

from __future__ import annotations

from typing import ClassVar

import torch

from tunesmith.data.loader import Batch, Collator, TokenCollator
from tunesmith.train.objectives.base import LossParts, ModelCall, ObjectiveDefaults
from tunesmith.train.objectives.head import LMHead, token_loss_sum

__all__ = ["SFTObjective", "token_loss_sum"]


class SFTObjective(ObjectiveDefaults):
    """``stage: sft``. ``attention``: the form the rows take to the model (segment ids, position ids only, or a
    mask: see :meth:`~tunesmith.data.loader.Batch.model_inputs`). ``head``: how the LM head runs (only on
    the target positions by default, optionally fused with the loss: :mod:`.head`)."""

    name: ClassVar[str] = "sft"
    metric_names: ClassVar[tuple[str, ...]] = ()
    metric_denominators: ClassVar[dict[str, str]] = {}
    model_head: ClassVar[str] = "causal_lm"

    def __init__(self, attention: str = "mask", head: LMHead | None = None) -> None:
        self.attention = attention
        self.head = head or LMHead(target_only=False)

    def collator(self, pad_token_id: int) -> Collator:
        return TokenCollator(pad_token_id)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.head.install(model)

    def speed_features(self) -> list[str]:
        return [self.head.describe()]

    def units(self, batch: Batch) -> int:
        return batch.num_targets

    def tokens(self, batch: Batch) -> int:
        return batch.num_targets

    def loss(self, model: ModelCall, batch: Batch) -> LossParts:
        return LossParts(self.head.loss_sum(model, batch.model_inputs(self.attention), batch.labels))

    def eval_metrics(self, loss: float, metrics: dict[str, float]) -> dict[str, float]:
        return {"eval_loss": loss}
