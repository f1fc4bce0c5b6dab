"""Token ids → text, incrementally, in whole characters only.

Byte-level BPE (GPT-2, Qwen, Llama 3, SmolLM2) and SentencePiece's byte fallback (Llama 2, Mistral, Gemma) spell
a character they have no token for as its UTF-8 bytes, one or a few bytes a token: a Chinese character or an
emoji often takes two or three tokens. A reply decoded after each token, or cut after any token (max_new_tokens,
a stop), can therefore end in the first bytes of a character, which ``tokenizer.decode`` shows as U+FFFD.

`IncrementalDecoder` follows the raw bytes of the tokens (read from the byte-level vocabulary or the ``<0xHH>``
byte tokens) through Python's incremental UTF-8 decoder. What that decoder holds back is exactly the bytes that
begin a character whose remaining bytes have not come yet; everything before them is final. The text itself still
comes from ``tokenizer.decode`` of the whole reply up to those bytes, so word joins, spaces and skipped special
tokens are the tokenizer's own, and a reply that ends in complete characters is exactly ``tokenizer.decode(ids)``.
The held bytes are shown once their character is complete, and never if it is not (the reply ends first).

A U+FFFD the model generated itself (the bytes EF BF BD: a complete character) holds nothing back and is shown,
like any other character; so are bytes that can never become a character (a continuation byte with no lead,
a lead byte followed by an ASCII one): the UTF-8 decoder resolves them at once, and ``tokenizer.decode`` shows them
as U+FFFD, as it always has. A tokenizer whose tokens are whole strings (WordPiece, SentencePiece without byte
fallback) cannot split a character: nothing is ever held back.
"""

from __future__ import annotations

import bisect
import codecs
import json
import re
from collections.abc import Iterable
from typing import Any

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback tokens
_REPLACEMENT = "\ufffd"


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character → byte: printable bytes stand for themselves, the 68 others are
    shifted to U+0100 onwards (the table of ``bytes_to_unicode`` in GPT-2 and the `tokenizers` ByteLevel decoder)."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in kept}
    shifted = [b for b in range(256) if chr(b) not in table]
    table.update({chr(0x100 + i): b for i, b in enumerate(shifted)})
    return table


_BYTE_LEVEL = _byte_level_table()


def _decoder_types(tokenizer: Any) -> set[str]:
    """The ``type``s in a fast tokenizer's decoder (a Sequence's members included); empty for other tokenizers."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    try:
        spec = json.loads(decoder.__getstate__()) if decoder is not None else None
    except (AttributeError, TypeError, ValueError):
        return set()
    types, stack = set(), [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            types.add(node.get("type"))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return types


class TokenBytes:
    """The raw bytes a token contributes to ``tokenizer.decode``'s byte string (cached per id).

    Byte-level tokenizers: each character of the token through the byte-level alphabet, or the token's UTF-8
    when a character is not in it (what the `tokenizers` ByteLevel decoder does, added tokens included). Byte
    fallback: ``<0xHH>`` is the byte HH. Tokenizers whose vocabulary holds ``bytes`` (tiktoken-based remote code):
    those bytes. Any other token is text, complete characters. A special token that decoding skips: nothing.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        slow_table = getattr(tokenizer, "byte_decoder", None)  # transformers' Python GPT-2 tokenizer
        if "ByteLevel" in _decoder_types(tokenizer):
            self.byte_level: dict[str, int] | None = _BYTE_LEVEL
        else:
            self.byte_level = slow_table if isinstance(slow_table, dict) else None
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self.maybe_skipped = set(added) | set(getattr(tokenizer, "all_special_ids", None) or ())
        self.cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        data = self.cache.get(token_id)
        if data is None:
            data = self.cache[token_id] = self._read(token_id)
        return data

    def _read(self, token_id: int) -> bytes:
        if token_id in self.maybe_skipped and self.skip_special_tokens:
            # decode's own rule for which added tokens it skips
            if self.tokenizer.decode([token_id], skip_special_tokens=True) == "":
                return b""
        token = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(token, bytes):
            return token
        if not isinstance(token, str):
            return b""
        table = self.byte_level
        if table is not None and all(c in table for c in token):
            return bytes(table[c] for c in token)
        match = _BYTE_TOKEN.fullmatch(token)
        if match:
            return bytes([int(match[1], 16)])
        return token.encode("utf-8")


class IncrementalDecoder:
    """Feed token ids; get back the text that became final, whole characters only (see the module docstring).

    ``text`` is everything returned so far: ``tokenizer.decode(ids)`` when the ids end in complete characters,
    else the decoded text of the ids up to the first byte of the unfinished character.
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_bytes = TokenBytes(tokenizer, skip_special_tokens)
        self.ids: list[int] = []
        self.text = ""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ends: list[int] = []  # the byte offset where each token's bytes end

    @property
    def pending_bytes(self) -> int:
        """How many bytes at the end begin a character that is not complete yet (0 to 3)."""
        return len(self._utf8.getstate()[0])

    def add(self, token_id: int) -> str:
        """Take one more token; return the text that is new and final ("" while a character is incomplete)."""
        return self.extend([token_id])

    def extend(self, token_ids: Iterable[int]) -> str:
        """Take several tokens (one decode call); return the new final text."""
        end = self._ends[-1] if self._ends else 0
        for token_id in token_ids:
            data = self.token_bytes(token_id)
            self._utf8.decode(data)  # only its state matters: which trailing bytes are still waiting
            end += len(data)
            self.ids.append(token_id)
            self._ends.append(end)
        text = self._final_text()
        if len(text) <= len(self.text):
            return ""
        new, self.text = text[len(self.text) :], text
        return new

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _final_text(self) -> str:
        pending = self.pending_bytes
        if not pending:
            return self._decode(self.ids)
        start = self._ends[-1] - pending  # the byte where the unfinished character begins
        first = bisect.bisect_right(self._ends, start)  # the token holding that byte
        if (self._ends[first - 1] if first else 0) == start:  # it is the token's first byte
            return self._decode(self.ids[:first])
        # The character begins inside a token (byte-level BPE merges, e.g. a space and a lead byte): decode
        # through that token, whose unfinished tail decode shows as one U+FFFD (invalid bytes → U+FFFD is
        # "maximal subpart" replacement, the same in Rust's from_utf8_lossy and Python), and drop that.
        text = self._decode(self.ids[: first + 1])
        return text[:-1] if text.endswith(_REPLACEMENT) else self._decode(self.ids[:first])


def decode_complete(tokenizer: Any, token_ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
    """``tokenizer.decode(token_ids)`` without an unfinished character at the end (see IncrementalDecoder)."""
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    decoder.extend(token_ids)
    return decoder.text
