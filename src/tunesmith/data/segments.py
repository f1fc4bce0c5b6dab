"""Rendered text pieces of a conversation → token ids per piece, equal to tokenizing the whole text at once.

Every template renders a conversation as alternating prompt / response strings. Tokenizing each string on its
own can give different ids than tokenizing the joined text (BPE merges across the seam: ``"\\n" + "\\nHi"``
becomes one ``"\\n\\n"`` token), and then training ids would not equal ``apply_chat_template``. So the joined
text is tokenized once (batched, in the fast tokenizer's Rust code) and cut at the token boundaries that fall
on the piece seams, found from the character offsets. Only when a token straddles a seam — no cut of the
joined ids can then separate prompt from reply — is each piece tokenized alone, which is what generation sees
for the prompt anyway.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

from tunesmith.logging import get_logger

logger = get_logger("data")


@dataclass
class Rendered:
    """The text of one conversation: ``prompts[i] + responses[i]`` for each exchange, in order."""

    prompts: list[str]
    responses: list[str]
    head_chars: int = 0  # leading chars of prompts[0] that are prefix + system (kept when turns are dropped)
    tail_chars: list[int] = field(
        default_factory=list
    )  # trailing chars of each prompt to keep when shortened

    def pieces(self) -> list[str]:
        return [text for pair in zip(self.prompts, self.responses, strict=True) for text in pair]

    def prompt_pieces(self) -> list[str]:
        """The pieces of a rendering whose last prompt has no reply yet (a generation prompt)."""
        out: list[str] = []
        for i, prompt in enumerate(self.prompts):
            out += [prompt, *self.responses[i : i + 1]]
        return out


@dataclass
class EncodedTurns:
    """Token ids of a rendered conversation; ``head_len`` / ``tail_lens`` count tokens (see Rendered)."""

    pairs: list[tuple[list[int], list[int]]]
    head_len: int = 0
    tail_lens: list[int] = field(default_factory=list)


def _cuts(offsets: list[tuple[int, int]], seams: list[int]) -> list[int] | None:
    """Token index at each character seam, or None when a token spans a seam (the reference rule)."""
    starts = [start for start, _ in offsets]
    cuts = []
    for seam in seams:
        idx = bisect_left(starts, seam)
        if idx > 0 and offsets[idx - 1][1] > seam:
            return None
        cuts.append(idx)
    return cuts


def _quick_cuts(enc: Any, seams: list[int]) -> list[int] | None:
    """:func:`_cuts` without materialising every token's offsets (millions of Python tuples on a big dataset):
    asks the encoding which token holds each seam's character. Returns None whenever that shortcut is not
    conclusive (no token at the seam, multi-byte characters split across tokens, empty-width tokens); the
    caller then applies the reference rule, so the result is always the reference rule's."""
    cuts = []
    for seam in seams:
        token = enc.char_to_token(seam)
        if token is None or enc.token_to_chars(token)[0] != seam:
            return None
        if token > 0:
            before_start, before_end = enc.token_to_chars(token - 1)
            if before_end > seam or before_start >= seam:
                return None
        cuts.append(token)
    return cuts


def _encode_texts(tokenizer: Any, texts: list[str]) -> list[Any]:
    """Encodings with ``.ids`` and ``.offsets`` from the fast tokenizer; specials in the text are recognised."""
    return tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)


def _count_tokens(tokenizer: Any, text: str, cache: dict[str, int]) -> int:
    if not text:
        return 0
    if text not in cache:
        # the backend directly where there is one: the same ids without the HF call's per-call overhead
        backend = (
            getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        )
        if backend is not None:
            cache[text] = len(backend.encode(text, add_special_tokens=False).ids)
        else:
            cache[text] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return cache[text]


def encode_rendered(tokenizer: Any, rendered: list[Rendered], quick: bool = True) -> list[EncodedTurns]:
    """Tokenize many rendered conversations in one batch (see the module docstring for the guarantee).

    ``quick=False`` finds every seam from the full offsets (the reference rule; tests compare the two)."""
    fast = getattr(tokenizer, "is_fast", False) and hasattr(tokenizer, "backend_tokenizer")
    all_pieces = [r.pieces() for r in rendered]
    encodings = _encode_texts(tokenizer, ["".join(p) for p in all_pieces]) if fast else [None] * len(rendered)
    token_counts: dict[str, int] = {}
    straddled = 0
    out = []
    for r, pieces, enc in zip(rendered, all_pieces, encodings, strict=True):
        seams, pos = [], 0
        for piece in pieces[:-1]:
            pos += len(piece)
            seams.append(pos)
        cuts = None
        if enc is not None:
            cuts = _quick_cuts(enc, seams) if quick else None
            cuts = cuts if cuts is not None else _cuts(enc.offsets, seams)
        if cuts is not None:
            ids = enc.ids
            bounds = [0, *cuts, len(ids)]
            chunks = [ids[bounds[i] : bounds[i + 1]] for i in range(len(pieces))]
        else:
            straddled += enc is not None  # a fast tokenizer whose cut failed (not a slow one)
            if fast:
                chunks = [e.ids for e in _encode_texts(tokenizer, pieces)]
            else:
                chunks = tokenizer(pieces, add_special_tokens=False)["input_ids"]
        pairs = [(chunks[i], chunks[i + 1]) for i in range(0, len(chunks), 2)]
        head_text = r.prompts[0][: r.head_chars]
        tails = [
            min(_count_tokens(tokenizer, prompt[len(prompt) - n :], token_counts), len(prompt_ids))
            for prompt, n, (prompt_ids, _) in zip(
                r.prompts, r.tail_chars or [0] * len(pairs), pairs, strict=True
            )
        ]
        out.append(
            EncodedTurns(
                pairs, min(_count_tokens(tokenizer, head_text, token_counts), len(pairs[0][0])), tails
            )
        )
    if straddled:
        logger.debug(
            "%d conversations had a token across a prompt/reply seam; their pieces were tokenized one by one",
            straddled,
        )
    return out
