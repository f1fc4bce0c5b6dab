"""Training objectives, one module per stage, chosen by ``stage`` (see :mod:`.base` for the interface).

Adding a stage: a module here with a class implementing :class:`Objective`, and a line in ``_OBJECTIVES``.
"""

from __future__ import annotations

from collections.abc import Callable

from tunesmith.config import Config
from tunesmith.train.objectives.base import LossParts, ModelCall, Objective
from tunesmith.train.objectives.dpo import DPOObjective
from tunesmith.train.objectives.kto import KTOObjective
from tunesmith.train.objectives.pt import PretrainObjective
from tunesmith.train.objectives.rm import RewardObjective
from tunesmith.train.objectives.sft import SFTObjective, token_loss_sum

__all__ = [
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

_OBJECTIVES: dict[str, Callable[[Config], Objective]] = {
    "sft": lambda cfg: SFTObjective(varlen=cfg.flash_attn == "fa2"),
    "pt": lambda cfg: PretrainObjective(varlen=cfg.flash_attn == "fa2"),
    "dpo": lambda cfg: DPOObjective(cfg.pref_loss, cfg.pref_beta, cfg.pref_ftx, cfg.simpo_gamma,
                                    cfg.dpo_label_smoothing),
    "rm": lambda cfg: RewardObjective(),
    "kto": lambda cfg: KTOObjective(cfg.pref_beta, cfg.kto_chosen_weight, cfg.kto_rejected_weight, cfg.pref_ftx),
}


def create_objective(cfg: Config) -> Objective:
    """The objective of ``cfg.stage``."""
    return _OBJECTIVES[cfg.stage](cfg)
