"""Preference losses on sequence log-probabilities, per pair (LLaMA-Factory's and TRL's definitions).

``chosen`` / ``rejected``: the policy's log-probabilities of each reply given the prompt (summed over the reply's
tokens for sigmoid and hinge; averaged per token for ipo, orpo and simpo, as LLaMA-Factory does);
``ref_chosen`` / ``ref_rejected``: the same for the reference model (None for orpo and simpo, which need none).
Each returns (loss per pair, chosen reward, rejected reward); the rewards are detached and only logged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REFERENCE_FREE = frozenset({"orpo", "simpo"})
AVERAGED = frozenset({"ipo", "orpo", "simpo"})
LOSSES = ("sigmoid", "ipo", "hinge", "orpo", "simpo")

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def dpo_loss(
    loss_type: str,
    beta: float,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    label_smoothing: float = 0.0,
) -> Triple:
    """sigmoid (DPO, with conservative label smoothing), hinge (SLiC) and ipo, on the log-ratio margin."""
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"not a loss with a reference model: {loss_type}")
    return losses, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


def orpo_loss(beta: float, chosen: torch.Tensor, rejected: torch.Tensor) -> Triple:
    """ORPO: the chosen reply's NLL plus beta × the odds-ratio loss (average log-probs)."""
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    losses = -chosen + beta * -F.logsigmoid(log_odds)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def simpo_loss(beta: float, gamma: float, chosen: torch.Tensor, rejected: torch.Tensor) -> Triple:
    """SimPO: a margin of gamma on the length-normalised log-probs, no reference."""
    losses = -F.logsigmoid(beta * ((chosen - rejected) - gamma / beta))
    return losses, beta * chosen.detach(), beta * rejected.detach()


def preference_loss(
    loss_type: str,
    beta: float,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    *,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> Triple:
    """The loss of ``loss_type`` (one of :data:`LOSSES`)."""
    if loss_type == "orpo":
        return orpo_loss(beta, chosen, rejected)
    if loss_type == "simpo":
        return simpo_loss(beta, simpo_gamma, chosen, rejected)
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"{loss_type} needs the reference log-probs")
    return dpo_loss(loss_type, beta, chosen, rejected, ref_chosen, ref_rejected, label_smoothing)
