"""The objective interface: what differs between training stages.

The loop knows stages only through :class:`Objective`, as it knows engines only through
:class:`~tunesmith.train.engines.Engine`. An objective owns

* how encoded examples become micro-batches (``collator``: collation and the masked filler a rank runs when
  it has no samples in a window);
* what a batch's loss is and what it is normalised by: ``loss`` returns the *sum* of the per-unit losses of a
  micro-batch, and ``units`` how many units (target tokens for SFT, pairs for a preference loss) a batch
  holds; the loop divides every micro-batch's sum by the units of the whole window on all ranks, so the
  gradient is that of one big batch however the units are spread over micro-batches and ranks;
* the metrics it logs (summed over units like the loss, reported as means);
* what it needs besides the policy (``prepare_model``: a value head, a reference) and how it reports
  evaluation (``eval_metrics``);
* statistics of a whole step taken before its losses (``prepare_window``: KTO's KL estimate over every
  micro-batch of the step on every rank, so the loss does not depend on how the step is split);
* what it computes once per sample before training (``precompute`` / ``store_precomputed``, when
  ``precomputes``: the reference log-probs of precompute_ref_log_probs); the loop spreads that over the ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from tunesmith.data.loader import Batch, Collator
from tunesmith.train.distributed import Collectives


class ModelCall(Protocol):
    """The model as an objective calls it: keyword inputs in, the HF output (with .logits) out, under the
    engine's autocast and without a KV cache."""

    device: torch.device  # where its inputs go

    def __call__(self, **inputs: Any) -> Any:
        """The policy, through the engine (its wrapper gathers what it shards)."""

    def other(self, module: torch.nn.Module, **inputs: Any) -> Any:
        """Another model (a frozen reference) under the same precision."""

__all__ = ["LossParts", "ModelCall", "Objective", "ObjectiveDefaults"]


@dataclass
class LossParts:
    """One micro-batch's loss summed over its units, and its metrics summed the same way (floats: they are
    only logged)."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Objective(Protocol):
    """One training stage's objective; see the module docstring."""

    name: ClassVar[str]
    # metrics besides the loss, in the order they are logged: each a mean over the units of a step, or, when
    # metric_denominators names another metric for it, its sum divided by that metric's sum (a mean over a subset)
    metric_names: ClassVar[tuple[str, ...]]
    metric_denominators: ClassVar[dict[str, str]]
    # the model it trains: "causal_lm" (the LM head), or "reward" (an HF …ForSequenceClassification, one output)
    model_head: ClassVar[str]
    # the form its rows take to the model (Batch.model_inputs): "mask", "varlen", "segments" or "segment_offsets";
    # set by the pipeline
    attention: str

    def collator(self, pad_token_id: int) -> Collator:
        """How samples become this objective's micro-batches."""

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to train, before the engine wraps it (the policy itself, or with a head it needs)."""

    def units(self, batch: Batch) -> int:
        """What the loss of ``batch`` is a sum over (target tokens, pairs, …); the normaliser of a window."""

    def tokens(self, batch: Batch) -> int:
        """The tokens of ``batch`` that count for throughput (tokens_per_s)."""

    def loss(self, model: ModelCall, batch: Batch) -> LossParts:
        """The summed loss (and metric sums) of one micro-batch already on the model's device."""

    def eval_metrics(self, loss: float, metrics: dict[str, float]) -> dict[str, float]:
        """What evaluation reports, from the mean loss and metric means over the validation set (always
        ``eval_loss`` first)."""

    def prepare_window(self, model: ModelCall, window: Sequence[Batch], comm: Collectives) -> None:
        """Before the losses of ``window`` (a step's micro-batches, or a whole validation set; CPU batches, for
        ``model.device``): what they share across micro-batches and ranks. Every rank calls it with as many
        batches (fillers included)."""

    @property
    def precomputes(self) -> bool:
        """Whether :meth:`precompute` has something to compute before the first step."""

    def precompute(self, model: ModelCall, batch: Batch) -> torch.Tensor:
        """Per sample of ``batch`` (on the model's device, no gradient), the values kept for training: a
        [samples, k] tensor."""

    def store_precomputed(self, samples: Sequence[Any], values: Sequence[Sequence[float]]) -> None:
        """Keep :meth:`precompute`'s values with their samples (the collator puts them in the batches)."""

    def speed_features(self) -> list[str]:
        """How this objective saves work, for the run's first lines (e.g. the LM head on target positions only)."""


def attention_inputs(flash_attn: str) -> str:
    """The form of the rows for the model's attention, as far as the config decides it: position ids only for
    flash-attention's variable-length kernels (fa2), else a mask. The pipeline upgrades "mask" to "segments" (or
    "segment_offsets", on CUDA) once the loaded model attends by segments
    (:func:`tunesmith.model.segment_attention.use_segment_attention`)."""
    return "varlen" if flash_attn == "fa2" else "mask"


class ObjectiveDefaults:
    """For objectives that share nothing across a step and compute nothing before training."""

    precomputes = False
    attention = "mask"  # see attention_inputs; the token-level objectives read it

    def prepare_window(self, model: ModelCall, window: Sequence[Batch], comm: Collectives) -> None:
        return None

    def precompute(self, model: ModelCall, batch: Batch) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} precomputes nothing")

    def store_precomputed(self, samples: Sequence[Any], values: Sequence[Sequence[float]]) -> None:
        raise NotImplementedError(f"{type(self).__name__} precomputes nothing")

    def speed_features(self) -> list[str]:
        return []

