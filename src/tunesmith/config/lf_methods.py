"""Config keys of LLaMA-Factory's extra fine-tuning methods (OFT, PiSSA, LLaMA Pro, NEFTune, the DFT / EAFT /
ASFT losses, Mixture-of-Depths): a section of its own, part of :class:`~tunesmith.config.schema.Config`."""

from __future__ import annotations

from tunesmith.config.section import Section


class LFMethodArgs(Section):
    pass
