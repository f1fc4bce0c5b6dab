"""Training objectives, one module per stage, chosen by ``stage`` (see :mod:`.base` for the interface).

Adding a stage: a module here with a class implementing :class:`Objective`, and a line in ``_OBJECTIVES``. A stage
may have variants its keys choose: ``sft``'s DFT / EAFT / ASFT losses (:mod:`.sft_losses`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tunesmith.config import Config
from tunesmith.train.objectives.base import LossParts, ModelCall, Objective, attention_inputs
from tunesmith.train.objectives.dpo import DPOObjective
from tunesmith.train.objectives.head import LMHead, lm_head
from tunesmith.train.objectives.kto import KTOObjective
from tunesmith.train.objectives.pt import PretrainObjective
from tunesmith.train.objectives.reference import Reference
from tunesmith.train.objectives.rm import RewardObjective
from tunesmith.train.objectives.sft import SFTObjective, token_loss_sum
from tunesmith.train.objectives.sft_losses import ASFTObjective, DFTObjective, EAFTObjective, sft_objective

__all__ = [
    "ASFTObjective",
    "DFTObjective",
    "EAFTObjective",
    "LossParts",
    "DPOObjective",
    "KTOObjective",
    "ModelCall",
    "Objective",
    "PretrainObjective",
    "RewardObjective",
    "SFTObjective",
    "create_objective",
    "token_loss_sum",
]

Loader = Callable[[], torch.nn.Module]

_OBJECTIVES: dict[str, Callable[[Config, Reference], Objective]] = {
    # the head runs on target positions only (target_only_head); fused with the loss (loss_chunk_size) where the
    # loss is a plain sum of token cross entropies: sft and pt
    "sft": sft_objective,  # cross entropy, or the DFT / EAFT / ASFT loss its keys choose
    "pt": lambda cfg, _: PretrainObjective(attention=attention_inputs(cfg.flash_attn), head=lm_head(cfg)),
    "dpo": lambda cfg, reference: DPOObjective(cfg.pref_loss, cfg.pref_beta, cfg.pref_ftx, cfg.simpo_gamma,
                                               cfg.dpo_label_smoothing, reference, cfg.precompute_ref_log_probs,
                                               LMHead(cfg.target_only_head)),
    "rm": lambda cfg, _: RewardObjective(),
    "kto": lambda cfg, reference: KTOObjective(cfg.pref_beta, cfg.kto_chosen_weight, cfg.kto_rejected_weight,
                                               cfg.pref_ftx, reference, cfg.precompute_ref_log_probs,
                                               LMHead(cfg.target_only_head)),
}


def create_objective(cfg: Config, load_reference: Loader | None = None) -> Objective:
    """The objective of ``cfg.stage``; ``load_reference`` loads ref_model / ref_model_adapters when they are set
    (otherwise the reference is the policy itself, see :mod:`.reference`)."""
    wanted = cfg.ref_model or cfg.ref_model_adapters
    return _OBJECTIVES[cfg.stage](cfg, Reference(load_reference if wanted else None))
