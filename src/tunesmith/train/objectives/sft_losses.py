"""LLaMA-Factory's weighted SFT losses, chosen by ``use_dft_loss`` / ``use_eaft_loss`` / ``use_asft_loss`` with
``stage: sft``; each weighs every target token's cross entropy (NLL) by a factor computed without gradient:

* DFT (Dynamic Fine-Tuning): by the model's probability of the target token, p = exp(-NLL);
* EAFT (Entropy-Adaptive Fine-Tuning): by (H / 3)^eaft_alpha, H the entropy of the model's next-token
  distribution renormalised over its 20 most likely tokens (3 ≈ ln 20, its largest value), as LLaMA-Factory
  approximates it;
* ASFT (Anchored SFT): the DFT term plus asft_alpha × KL(reference ‖ policy) of the next-token distributions, the
  reference being the initial model (:class:`~.reference.Reference`: the policy with its LoRA adapter off, else a
  frozen copy taken before training, also on resume).

Normalised like :class:`~.sft.SFTObjective`: ``loss`` is the sum over the micro-batch's target tokens and the loop
divides by the window's target count, so a step's loss is LLaMA-Factory's per-token mean over the step. The plain
NLL (``nll``) and ASFT's KL term (``kl``) are logged beside it, as means per target token.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from tunesmith.config import Config
from tunesmith.data.loader import IGNORE_INDEX, Batch
from tunesmith.train.objectives.base import LossParts, ModelCall, Objective, attention_inputs
from tunesmith.train.objectives.head import LMHead, lm_head, shifted_labels, shifted_targets
from tunesmith.train.objectives.reference import Reference
from tunesmith.train.objectives.sft import SFTObjective

EAFT_TOP_K = 20
EAFT_ENTROPY_SCALE = 3.0  # LLaMA-Factory's normaliser: about ln 20, the entropy of 20 equally likely tokens


def target_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 logits of the positions that predict a target (position t predicts labels[t + 1]) and those
    targets: [n, vocab] and [n]."""
    shifted = shifted_labels(labels, logits.size(1)).to(logits.device)
    mask = shifted != IGNORE_INDEX
    return logits[mask].float(), shifted[mask]


def dft_weights(nll: torch.Tensor) -> torch.Tensor:
    """DFT: the probability of each target token, without gradient."""
    return torch.exp(-nll.detach())


def eaft_weights(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """EAFT: (top-k entropy / 3)^alpha per position, without gradient."""
    with torch.no_grad():
        top = torch.topk(logits.detach(), k=min(EAFT_TOP_K, logits.size(-1)), dim=-1).values
        log_probs = top - torch.logsumexp(top, dim=-1, keepdim=True)
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
        return torch.pow(entropy / EAFT_ENTROPY_SCALE, alpha)


def kl_to_policy(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ policy) per position: sum over the vocabulary of q (log q - log p)."""
    return F.kl_div(F.log_softmax(logits, dim=-1), F.log_softmax(reference_logits, dim=-1), reduction="none",
                    log_target=True).sum(dim=-1)


class WeightedSFTObjective(SFTObjective):
    """``stage: sft`` with a per-token weight (:meth:`weights`) on the cross entropy."""

    metric_names: ClassVar[tuple[str, ...]] = ("nll",)

    def weights(self, logits: torch.Tensor, nll: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model: ModelCall, batch: Batch) -> LossParts:
        logits = self.head.target_logits(model, batch.model_inputs(self.attention), batch.labels)
        targets = shifted_targets(batch.labels).to(logits.device)
        nll = F.cross_entropy(logits, targets, reduction="none")
        loss = (nll * self.weights(logits, nll)).sum()
        return LossParts(loss, {"nll": float(nll.detach().sum())})

    def eval_metrics(self, loss: float, metrics: dict[str, float]) -> dict[str, float]:
        return {"eval_loss": loss, **{f"eval_{name}": value for name, value in metrics.items()}}


class DFTObjective(WeightedSFTObjective):
    """``use_dft_loss``: see the module docstring."""

    def weights(self, logits: torch.Tensor, nll: torch.Tensor) -> torch.Tensor:
        return dft_weights(nll)


class EAFTObjective(WeightedSFTObjective):
    """``use_eaft_loss``: see the module docstring."""

    def __init__(self, alpha: float = 1.0, attention: str = "mask", head: LMHead | None = None) -> None:
        super().__init__(attention=attention, head=head)
        self.alpha = alpha

    def weights(self, logits: torch.Tensor, nll: torch.Tensor) -> torch.Tensor:
        return eaft_weights(logits, self.alpha)


class ASFTObjective(WeightedSFTObjective):
    """``use_asft_loss``: see the module docstring."""

    metric_names: ClassVar[tuple[str, ...]] = ("nll", "kl")

    def __init__(self, alpha: float = 0.1, reference: Reference | None = None, attention: str = "mask",
                 head: LMHead | None = None) -> None:
        super().__init__(attention=attention, head=head)
        self.alpha = alpha
        self.reference = reference or Reference()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        self.reference.attach(model)  # a frozen copy is taken before the head is switched (:mod:`.head`)
        return self.head.install(model)

    def weights(self, logits: torch.Tensor, nll: torch.Tensor) -> torch.Tensor:
        return dft_weights(nll)

    def loss(self, model: ModelCall, batch: Batch) -> LossParts:
        inputs = batch.model_inputs(self.attention)
        reference, _ = target_logits(self.reference_logits(model, batch, inputs), batch.labels)
        logits = self.head.target_logits(model, inputs, batch.labels)
        targets = shifted_targets(batch.labels).to(logits.device)
        nll = F.cross_entropy(logits, targets, reduction="none")
        kl = kl_to_policy(reference, logits)
        loss = (nll * self.weights(logits, nll)).sum() + self.alpha * kl.sum()
        return LossParts(loss, {"nll": float(nll.detach().sum()), "kl": float(kl.detach().sum())})

    def reference_logits(self, model: ModelCall, batch: Batch, inputs: dict[str, Any]) -> torch.Tensor:
        """The reference model's logits for ``inputs`` (no gradient)."""
        with torch.no_grad():
            if self.reference.policy is not None:
                with self.reference.policy.disable_adapter():  # type: ignore[operator]
                    return model(**inputs).logits
            frozen = self.reference.frozen
            assert frozen is not None, "attach the reference to the policy first"
            if next(frozen.parameters()).device != batch.input_ids.device:
                frozen.to(batch.input_ids.device)
            return model.other(frozen, **inputs).logits


def sft_objective(cfg: Config, reference: Reference) -> Objective:
    """``stage: sft``: plain cross entropy, or the weighted loss its keys choose."""
    attention = attention_inputs(cfg.flash_attn)
    if cfg.use_dft_loss:  # the weighted losses need the targets' logits: the head is gathered, never fused
        return DFTObjective(attention=attention, head=LMHead(cfg.target_only_head))
    if cfg.use_eaft_loss:
        return EAFTObjective(cfg.eaft_alpha, attention=attention, head=LMHead(cfg.target_only_head))
    if cfg.use_asft_loss:
        return ASFTObjective(cfg.asft_alpha, reference, attention=attention, head=LMHead(cfg.target_only_head))
    return SFTObjective(attention=attention, head=lm_head(cfg))


__all__ = ["ASFTObjective", "DFTObjective", "EAFTObjective", "WeightedSFTObjective", "sft_objective"]
