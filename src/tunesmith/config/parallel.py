"""Config keys that split one model's work over several ranks beyond data parallel: sequence parallel so far (tensor
and pipeline parallel belong here too); a section of :class:`~tunesmith.config.schema.Config`."""

from __future__ import annotations

from pydantic import Field

from tunesmith.config.section import Section


class ParallelArgs(Section):
    sequence_parallel_size: int = Field(
        1,
        ge=1,
        description="Sequence parallel, DeepSpeed-Ulysses style (XTuner's and LLaMA-Factory's key): each group of "
        "this many ranks trains the same rows, each rank holding 1/N of every (packed) row's tokens, and attention "
        "exchanges heads by all-to-all so each rank attends over the whole row for 1/N of the heads: activation "
        "memory per rank falls by about 1/N. The ranks form data parallel × N (the world size must be a multiple "
        "of N), N must divide the model's query heads; stage sft or pt, engine ddp or fsdp2. 1: off.",
    )
