"""One running batch of sequences sharing a KV cache: rows join after their prefill and leave when done.

The batch keeps one transformers DynamicCache whose rows are the sequences, left-padded to a common length, and
a 2-D attention mask (1 = a real token, 0 = padding). New prompts are prefilled together (left-padded, explicit
position_ids counting real tokens only), then their cache rows are merged in: whichever side is shorter gets zero
padding on the left, masked out. A row that leaves is dropped with an index select, and columns that have become
padding for every remaining row are trimmed, so a long-gone long prompt does not slow every later step.

The opening every chat prompt shares (the template's system prompt and user header: 30 of SmolLM2's ~40 prompt
tokens) is prefilled once; new rows start from a copy of its KV cache and prefill only the rest.

Padding never changes a row's result in exact arithmetic: padded keys are masked, and every row's rotary
positions are its own (position_ids), not its column in the cache. In fp32 the greedy tokens equal the
single-request loop's (tests/serve/test_batching.py checks it with prompts of different lengths joining at
different steps).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from tunesmith.errors import TunesmithError
from tunesmith.model.generate import forward_options


class DecodeBatch:
    """The rows of one model (one adapter) decoding together; ``rows`` are the caller's objects, in cache order."""

    def __init__(self, model: Any, pad_id: int = 0, prefix: list[int] | None = None) -> None:
        self.model = model
        self.pad_id = pad_id
        self.prefix = list(prefix or [])  # token ids most prompts start with (the chat template's opening)
        self._prefix_cache: Any = None
        self.device = next(model.parameters()).device
        self.cache_kw, self.extra = forward_options(model)
        self.rows: list[Any] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [rows, cache length] of 0/1

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, prompts: list[list[int]], rows: list[Any]) -> torch.Tensor:
        """Prefill ``prompts`` together and add them as ``rows``; returns their next-token logits [n, vocab].

        Prompts that all start with ``prefix`` reuse its KV cache (computed once): only the rest is prefilled,
        left-padded after the prefix ([prefix][padding][rest]; the padding is masked, positions skip it)."""
        shared = len(self.prefix) if self._prefix_fits(prompts) else 0
        rests = [prompt[shared:] for prompt in prompts]
        width = max(len(rest) for rest in rests)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for i, rest in enumerate(rests):
            ids[i, width - len(rest) :] = torch.tensor(rest)
            mask[i, shared + width - len(rest) :] = 1
        mask = mask.to(self.device)
        cache = self._prefix_copy(len(prompts)) if shared else None
        logits, cache = self._forward(ids.to(self.device), mask, cache)
        self._merge(cache, mask)
        self.rows.extend(rows)
        return logits

    def _prefix_fits(self, prompts: list[list[int]]) -> bool:
        size = len(self.prefix)
        if not size or not all(len(p) > size and p[:size] == self.prefix for p in prompts):
            return False
        if self._prefix_cache is None:
            mask = torch.ones((1, size), dtype=torch.long, device=self.device)
            _, cache = self._forward(torch.tensor([self.prefix], device=self.device), mask, None)
            try:
                self._layers(cache)
            except TunesmithError:  # a cache kind we cannot copy rows of: prefill whole prompts instead
                self.prefix = []
                return False
            self._prefix_cache = cache
        return True

    def _prefix_copy(self, rows: int) -> Any:
        """A new cache holding the prefix's keys and values once per row."""
        cache = copy.copy(self._prefix_cache)
        cache.layers = []
        for layer in self._prefix_cache.layers:
            row_layer = copy.copy(layer)
            row_layer.keys, row_layer.values = layer.keys.repeat(rows, 1, 1, 1), layer.values.repeat(rows, 1, 1, 1)
            cache.layers.append(row_layer)
        return cache

    def step(self, next_ids: list[int]) -> torch.Tensor:
        """Feed each row its last sampled token; returns the next-token logits [rows, vocab]."""
        assert self.mask is not None and len(next_ids) == len(self.rows)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        ids = torch.tensor(next_ids, dtype=torch.long, device=self.device).unsqueeze(1)
        logits, self.cache = self._forward(ids, self.mask, self.cache)
        return logits

    def keep(self, keep: list[bool]) -> None:
        """Drop the rows whose flag is False (finished, cancelled, failed)."""
        if all(keep):
            return
        self.rows = [row for row, k in zip(self.rows, keep, strict=True) if k]
        if not self.rows:
            self.cache = self.mask = None
            return
        assert self.mask is not None
        index = torch.tensor([i for i, k in enumerate(keep) if k], device=self.device)
        self.mask = self.mask.index_select(0, index)
        # columns that are padding in every remaining row: drop them from the left
        start = int(self.mask.any(dim=0).long().argmax())
        self.mask = self.mask[:, start:]
        for layer in self._layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        # the position of a token is the number of real tokens before it in its own row (padding is 0, unused)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **{self.cache_kw: cache}, **self.extra)
        return out.logits[:, -1].float(), out.get(self.cache_kw)

    def _merge(self, cache: Any, mask: torch.Tensor) -> None:
        if self.cache is None:  # a batch of one works with any cache; merging checks the kind
            self.cache, self.mask = cache, mask
            return
        assert self.mask is not None
        pairs = list(zip(self._layers(self.cache), self._layers(cache), strict=True))  # checked before any change
        old, new = self.mask.shape[1], mask.shape[1]
        width = max(old, new)
        self.mask = torch.cat([_pad_left(self.mask, width - old, 1), _pad_left(mask, width - new, 1)], dim=0)
        for mine, theirs in pairs:
            mine.keys = torch.cat([_pad_left(mine.keys, width - old, 2), _pad_left(theirs.keys, width - new, 2)])
            mine.values = torch.cat(
                [_pad_left(mine.values, width - old, 2), _pad_left(theirs.values, width - new, 2)]
            )

    @staticmethod
    def _layers(cache: Any) -> list[Any]:
        from transformers.cache_utils import DynamicLayer

        layers = list(getattr(cache, "layers", None) or [])
        if not layers or any(type(layer) is not DynamicLayer or layer.keys is None for layer in layers):
            kinds = sorted({type(layer).__name__ for layer in layers}) or [type(cache).__name__]
            raise TunesmithError(
                f"this model's KV cache ({', '.join(kinds)}) cannot be batched by tunesmith serve; "
                "run it with --max-batch-size 1"
            )
        return layers


def _pad_left(tensor: torch.Tensor, count: int, dim: int) -> torch.Tensor:
    if count == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = count
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
