"""NEFTune (``neftune_noise_alpha``): uniform noise on the input embeddings while training, as in HF's Trainer and
TRL: each value of the embedding output [batch, L, d] gets U(-m, m) added, m = alpha / sqrt(L × d), L the padded
length of the batch.

The noise is added only to forwards that train: the module in training mode *and* gradients enabled, so
evaluation, sample generation and the no-grad passes of a reference (the policy with its adapter off, KTO's KL
estimate) see clean embeddings. It is drawn from torch's global generator of the embeddings' device, the one
checkpoints save and restore (``rng_state.pt``), so an interrupted run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tunesmith.errors import ModelError
from tunesmith.logging import get_logger

logger = get_logger("model")

def noise_magnitude(alpha: float, length: int, hidden: int) -> float:
    """The half-width of NEFTune's uniform noise for a [batch, length, hidden] embedding output."""
    return alpha / math.sqrt(length * hidden)


def attach_neftune(model: nn.Module, alpha: float) -> Any:
    """Add NEFTune's noise to ``model``'s input embeddings (a forward hook); returns the hook handle."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        raise ModelError(
            f"neftune_noise_alpha needs the model's input embeddings, which {type(model).__name__} does not "
            "expose; remove neftune_noise_alpha"
        )

    def add_noise(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if not (module.training and torch.is_grad_enabled()):
            return output
        magnitude = noise_magnitude(alpha, output.size(1), output.size(2))
        return output + torch.empty_like(output).uniform_(-magnitude, magnitude)

    handle = embeddings.register_forward_hook(add_noise)
    logger.info("NEFTune: noise alpha %g on the input embeddings while training", alpha)
    return handle
