"""Continued pre-training on raw text: the SFT loss (causal-LM cross entropy, each target token weighing the
same) on samples whose every token is a target (:mod:`tunesmith.data.documents`); evaluation also reports the
perplexity, exp of the mean token loss."""

from __future__ import annotations

import math
from typing import ClassVar

from tunesmith.train.objectives.sft import SFTObjective


class PretrainObjective(SFTObjective):
    """``stage: pt``."""

    name: ClassVar[str] = "pt"

    def eval_metrics(self, loss: float, metrics: dict[str, float]) -> dict[str, float]:
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}  # exp(>709) overflows a float
