"""The reference model of preference objectives: what the policy's log-ratios are measured against.

* A PEFT (LoRA / QLoRA / DoRA) policy is its own reference with the adapter switched off: no second copy of the
  weights, and the forward goes through the engine like any other (ddp, fsdp2 and ZeRO-3 gather what they shard).
* Otherwise (full / freeze) a frozen copy of the model as it was before training, taken before the engine wraps
  it; on resume it is again the starting weights, since it is taken before the checkpoint is loaded.
* With ``ref_model`` / ``ref_model_adapters``, the model the pipeline loads for it (``load``), frozen, whatever
  the method.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tunesmith.data.loader import IGNORE_INDEX, Batch
from tunesmith.train.checkpoint import is_peft_model
from tunesmith.train.objectives.base import ModelCall, ObjectiveDefaults
from tunesmith.train.objectives.head import LMHead, shifted_targets, target_mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its target tokens (float32) and how many there are."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).to(logits.device)
    if logits.dtype != torch.float32:
        logits = logits.float()
    per_token = -F.cross_entropy(logits.transpose(1, 2), shifted, ignore_index=IGNORE_INDEX, reduction="none")
    return per_token.sum(dim=1), (shifted != IGNORE_INDEX).sum(dim=1)


def supports_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the HF model (inside any PEFT wrapper) can compute only its last positions' logits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def target_inputs(batch: Batch, trim: bool) -> tuple[dict[str, Any], torch.Tensor]:
    """The model inputs and the labels the logits line up with. With ``trim``, the model computes logits only from
    the first position that predicts a target in any row (prompts are never targets here): the vocabulary
    projection and the log-softmax over the shared prompt prefix are skipped, in memory and in time."""
    inputs = batch.model_inputs()
    predicts = (batch.labels[:, 1:] != IGNORE_INDEX).any(dim=0)
    if not trim or not bool(predicts.any()):
        return inputs, batch.labels
    first = int(predicts.nonzero()[0])
    return {**inputs, "logits_to_keep": batch.labels.size(1) - first}, batch.labels[:, first:]


def policy_logps(head: LMHead, model: ModelCall, batch: Batch, trim: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``batch``: the policy's summed log-probability of its targets (float32) and how many there
    are. With a target-only ``head`` (:mod:`.head`) only the target positions reach the vocabulary projection;
    otherwise the logits start at the first position that predicts a target in any row (``trim``)."""
    if head.switch is None:
        inputs, labels = target_inputs(batch, trim)
        return sequence_logps(model(**inputs).logits, labels)
    mask = target_mask(batch.labels)
    logits = head.target_logits(model, batch.model_inputs(), batch.labels)
    per_token = -F.cross_entropy(logits, shifted_targets(batch.labels).to(logits.device), reduction="none")
    rows = mask.nonzero()[:, 0].to(per_token.device)
    sums = torch.zeros(mask.size(0), dtype=per_token.dtype, device=per_token.device).index_add(0, rows, per_token)
    return sums, mask.sum(dim=1).to(per_token.device)


class _FrozenCall:
    """A frozen reference model called as objectives call the policy (under the engine's precision)."""

    def __init__(self, model: ModelCall, frozen: torch.nn.Module) -> None:
        self.model, self.frozen, self.device = model, frozen, model.device

    def __call__(self, **inputs: Any) -> Any:
        return self.model.other(self.frozen, **inputs)

    def other(self, module: torch.nn.Module, **inputs: Any) -> Any:
        return self.model.other(module, **inputs)


class Reference:
    """The reference of one run; :meth:`attach` it to the policy before the engine wraps it."""

    def __init__(self, load: Callable[[], torch.nn.Module] | None = None) -> None:
        self.load = load  # ref_model / ref_model_adapters: the pipeline's loader of that model
        self.policy: torch.nn.Module | None = None  # a PEFT model: its adapter switched off is the reference
        self.frozen: torch.nn.Module | None = None  # otherwise a frozen copy of the initial weights
        self.frozen_head: LMHead | None = None  # how the frozen copy's head runs (as the policy's)

    def attach(self, model: torch.nn.Module) -> None:
        if self.load is not None:
            self.frozen = self.load().eval().requires_grad_(False)
        elif is_peft_model(model):
            self.policy = model
        else:
            self.frozen = copy.deepcopy(model).eval().requires_grad_(False)

    def logps(self, model: ModelCall, batch: Batch, head: LMHead, trim: bool) -> torch.Tensor:
        """The reference's summed log-probability of each row's targets (no gradient), its logits computed as
        :func:`policy_logps` computes the policy's. Precomputed values (``batch.reference_logps``) are used as
        they are."""
        if batch.reference_logps is not None:
            return batch.reference_logps
        with torch.no_grad():
            if self.policy is not None:
                with self.policy.disable_adapter():  # type: ignore[operator]
                    return policy_logps(head, model, batch, trim)[0]
            assert self.frozen is not None, "attach the reference to the policy first"
            device = batch.input_ids.device
            if next(self.frozen.parameters()).device != device:
                self.frozen.to(device)
            if self.frozen_head is None:  # the same head as the policy's: the same numbers at step 0
                self.frozen_head = LMHead(head.target_only)
                self.frozen_head.install(self.frozen, announce=False)
            return policy_logps(self.frozen_head, _FrozenCall(model, self.frozen), batch, trim)[0]


class PrecomputedReference(ObjectiveDefaults):
    """precompute_ref_log_probs for objectives with a :class:`Reference` on two-row samples (a pair, or an example
    and its mismatched completion): the reference log-probs of every sample, computed once before the first step
    with the initial reference, go with the samples into every batch; afterwards a frozen copy is dropped (the
    memory of a second model is the point) and no step runs the reference forward."""

    reference: Reference
    head: LMHead
    trim: bool
    precompute_reference: bool = False

    @property
    def needs_reference(self) -> bool:
        return True

    def speed_features(self) -> list[str]:
        return [self.head.describe()]

    @property
    def precomputes(self) -> bool:
        return self.precompute_reference and self.needs_reference

    def precompute(self, model: ModelCall, batch: Batch) -> torch.Tensor:
        return torch.stack(self.reference.logps(model, batch, self.head, self.trim).chunk(2), dim=1)

    def store_precomputed(self, samples: Sequence[Any], values: Sequence[Sequence[float]]) -> None:
        for sample, (first, second) in zip(samples, values, strict=True):
            sample.reference = (float(first), float(second))
        self.reference.frozen = None
