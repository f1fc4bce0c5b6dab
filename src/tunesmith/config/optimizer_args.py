"""Config keys that choose and tune the optimizer: HF's ``optim`` names and LLaMA-Factory's GaLore, APOLLO, BAdam,
Adam-mini, Muon and LoRA+ keys; a section of :class:`~tunesmith.config.schema.Config`."""

from __future__ import annotations

from tunesmith.config.section import Section


class OptimizerArgs(Section):
    pass
