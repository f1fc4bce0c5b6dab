"""What an objective computes once per sample before the first step (``Objective.precomputes``), spread over the
ranks: rank r takes samples r, r + W, r + 2W, … in batches of per_device_eval_batch_size; every rank runs the
same number of forwards (the short ones repeat a batch), which sharded engines (fsdp2, ZeRO-3) need since each
forward gathers parameters from all ranks; then the values are gathered, so every rank stores them for every
sample, as it holds every sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from tunesmith.data.loader import Collator
from tunesmith.logging import get_logger
from tunesmith.train.engines import Engine
from tunesmith.train.objectives import Objective
from tunesmith.train.objectives.base import ModelCall

log = get_logger("train")


def precompute(engine: Engine, call: ModelCall, objective: Objective, samples: Sequence[Any],
               collator: Collator, batch_size: int) -> None:
    """Run ``objective.precompute`` over ``samples`` (train and validation together) and store the values."""
    if not objective.precomputes or not samples:
        return
    comm = engine.comm
    mine = list(range(comm.rank, len(samples), comm.world_size))
    rounds = math.ceil(math.ceil(len(samples) / comm.world_size) / batch_size)
    values: list[list[float]] = []
    engine.model.eval()
    with torch.no_grad():
        for index in range(rounds):
            chunk = mine[index * batch_size : (index + 1) * batch_size]
            batch = collator.collate([samples[i] for i in chunk or mine[:1] or [0]]).to(engine.device)
            computed = objective.precompute(call, batch).float().cpu().tolist()
            values += computed[: len(chunk)]  # a repeated batch (this rank had no samples left) keeps nothing
    engine.model.train()
    everyone = comm.all_gather_object((mine, values))
    ordered: list[Any] = [None] * len(samples)
    for indices, rank_values in everyone:
        for i, value in zip(indices, rank_values, strict=True):
            ordered[i] = value
    objective.store_precomputed(samples, ordered)
    log.info("precomputed the reference log-probs of %d examples (precompute_ref_log_probs)", len(samples))
