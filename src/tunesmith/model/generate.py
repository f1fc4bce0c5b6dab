"""Streamed generation with an explicit KV-cache loop: prompt via the chat template, stop at its stop tokens.

A hand-written loop instead of `model.generate` + a streamer thread: sampling takes a private seeded
generator (reproducible replies without touching the global RNG), stopping uses exactly the template's stop
ids, and there is no thread to leak when the caller stops reading.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tunesmith.data.templates import get_template
from tunesmith.model.detokenize import IncrementalDecoder


class CancelFlag(Protocol):
    """Anything with ``is_set()`` (a threading.Event): checked before every token."""

    def is_set(self) -> bool: ...


@dataclass
class GenerationStats:
    """Filled in by generate_stream as it runs (the API server reports usage and finish_reason from it)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    # "stop": a stop token; "length": max_new_tokens reached; "cancelled": `cancel` was set; None: still running
    # or the caller stopped reading (a stop string matched by the caller, for example).
    finish_reason: str | None = None


def get_chat_template(template: Any, tokenizer: Any) -> Any:
    """A Template from a Template object, a template name, or None (`auto`: the tokenizer's own template)."""
    if hasattr(template, "encode_prompt"):
        return template
    return get_template(template or "auto", tokenizer)


def generate_stream(
    model: Any,
    tokenizer: Any,
    template: Any,
    messages: list[dict],
    *,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    prompt_ids: list[int] | None = None,
    stats: GenerationStats | None = None,
    cancel: CancelFlag | None = None,
) -> Iterator[str]:
    """Yield the reply to `messages` piece by piece; temperature 0 is greedy, otherwise top-p sampling.

    ``prompt_ids`` skips templating (the caller already encoded `messages`); ``stats`` receives token counts and
    the finish reason; ``cancel`` stops generation before the next token once set (from another thread).

    Pieces are whole characters (IncrementalDecoder): the first bytes of a character the reply ends before
    completing (max_new_tokens, a cancel) are never yielded, and the joined pieces are the decoded reply.
    """
    chat_template = get_chat_template(template, tokenizer)
    prompt = prompt_ids if prompt_ids is not None else chat_template.encode_prompt(tokenizer, messages, system)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens, stats.completion_tokens, stats.finish_reason = len(prompt), 0, None
    stops = set(chat_template.stop_token_ids(tokenizer))
    decoder = IncrementalDecoder(tokenizer)
    tokens = _token_loop(model, prompt, max_new_tokens, Sampler(model, temperature, top_p, seed), cancel, stats)
    was_training = model.training
    model.eval()
    try:
        for next_id in tokens:
            if next_id in stops:
                stats.finish_reason = "stop"
                break
            stats.completion_tokens += 1
            piece = decoder.add(next_id)
            if piece:
                yield piece
    finally:
        tokens.close()
        model.train(was_training)


class Sampler:
    """Picks the next token: greedy at temperature 0, else top-p sampling from a private seeded generator
    (one per request, so requests batched together never share random state)."""

    def __init__(self, model: Any, temperature: float, top_p: float, seed: int | None) -> None:
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator(device=next(model.parameters()).device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        return next_token(logits, self.temperature, self.top_p, self.generator)



def _token_loop(
    model: Any,
    prompt: list[int],
    max_new_tokens: int,
    sample: Sampler,
    cancel: CancelFlag | None,
    stats: GenerationStats,
) -> Iterator[int]:
    """The KV-cache loop: yields each sampled token id; sets stats.finish_reason to "length" or "cancelled"
    when it ends by itself (the caller sets "stop" when it stops reading at a stop token)."""
    cache_kw, extra = forward_options(model)
    device = next(model.parameters()).device
    input_ids, past = torch.tensor([prompt], device=device), None
    for _ in range(max_new_tokens):
        if cancel is not None and cancel.is_set():
            stats.finish_reason = "cancelled"
            return
        with torch.inference_mode():
            out = model(input_ids=input_ids, use_cache=True, **{cache_kw: past}, **extra)
        past = out.get(cache_kw)
        next_id = sample(out.logits[0, -1].float())
        yield next_id
        input_ids = torch.tensor([[next_id]], device=device)
    stats.finish_reason = "length"


def generate_reply(
    model: Any,
    tokenizer: Any,
    template: Any,
    messages: list[dict],
    *,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> str:
    """The whole reply at once (see generate_stream)."""
    return "".join(
        generate_stream(
            model,
            tokenizer,
            template,
            messages,
            system=system,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
    )


def forward_options(model: Any) -> tuple[str, dict[str, Any]]:
    """(the forward keyword of the KV cache, extra keywords that keep only the last position's logits)."""
    params = _forward_parameters(model)
    # transformers >= 5.2x names the KV cache `cache` (and deprecates `past_key_values`); older ones do not.
    cache_kw = "cache" if "cache" in params else "past_key_values"
    # Only the last position's logits are needed; skipping the rest saves prompt_len × vocab floats.
    return cache_kw, ({"logits_to_keep": 1} if "logits_to_keep" in params else {})


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))



def _forward_parameters(model: Any) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return set(inspect.signature(base.forward).parameters)
    except (TypeError, ValueError):
        return set()
