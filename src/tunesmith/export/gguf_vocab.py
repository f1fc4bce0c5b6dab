"""The tokenizer part of a GGUF file: a byte-level BPE vocabulary read from an HF ``tokenizer.json``.

llama.cpp re-implements each family's pre-tokenizer (the regex that cuts text into words before BPE) and picks it
by the ``tokenizer.ggml.pre`` name, so the name must describe exactly what ``tokenizer.json`` does, or llama.cpp
splits text differently from training. We read the pre-tokenizer's structure and name the few we know; anything
else is refused before training (``check``) rather than exported with a silently different tokenization.
SentencePiece tokenizers (Llama-2, InternLM2, Mistral v0.1) are refused too: their GGUF form ("llama" model with
scores) is not written yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import ModelError

# The regexes of the families llama.cpp knows (as tokenizer.json spells them) → its pre-tokenizer names.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_SPLIT_NAMES = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}
# Tokens that are control tokens although a tokenizer marks them non-special (llama.cpp's own rule of thumb).
_SPECIAL_LOOKING = (("<|", "|>"), ("<｜", "｜>"))


@dataclass
class GgufVocab:
    """What tokenizer.ggml.* holds: the token texts by id, their types, the merges, and the pre-tokenizer name."""

    pre: str
    tokens: list[str] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)


def read_tokenizer_json(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise ModelError(
            f"{model_dir} has no tokenizer.json, and GGUF export reads the vocabulary from it; export_format: gguf "
            "needs a model with a fast (tokenizers) tokenizer, or use export_format: hf."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def pre_tokenizer_name(data: dict[str, Any], where: str) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer, or a refusal naming what was found."""
    model = data.get("model") or {}
    normalizer = (data.get("normalizer") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or normalizer not in (None, "NFC"):
        raise ModelError(
            f"{where}: the tokenizer is a SentencePiece-style one (model {model.get('type')}, byte_fallback "
            f"{model.get('byte_fallback')}), which GGUF export does not write yet; export_format: gguf supports "
            "byte-level BPE tokenizers (Llama-3, Qwen2/3, SmolLM2) — use export_format: hf and llama.cpp's "
            "convert_hf_to_gguf.py for this model."
        )
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in _SPLIT_NAMES:
            return _SPLIT_NAMES[regex]
    raise ModelError(
        f"{where}: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not one whose "
        "llama.cpp counterpart tunesmith knows (GPT-2, SmolLM, Llama-3, Qwen2 byte-level BPE), so llama.cpp would "
        "split text differently; use export_format: hf and llama.cpp's convert_hf_to_gguf.py for this model."
    )


def build_vocab(data: dict[str, Any], vocab_size: int, where: str) -> GgufVocab:
    """Token texts for ids 0..vocab_size-1 (ids the tokenizer lacks, e.g. Qwen's padded embedding rows, become
    unused placeholders), with NORMAL / CONTROL / USER_DEFINED / UNUSED types as llama.cpp expects."""
    from gguf import TokenType

    vocab = GgufVocab(pre=pre_tokenizer_name(data, where))
    by_id: dict[int, tuple[str, int]] = {i: (text, TokenType.NORMAL) for text, i in data["model"]["vocab"].items()}
    for added in data.get("added_tokens") or []:
        text = added["content"]
        control = added.get("special") or any(text.startswith(a) and text.endswith(b) for a, b in _SPECIAL_LOOKING)
        by_id[added["id"]] = (text, TokenType.CONTROL if control else TokenType.USER_DEFINED)
    if by_id and max(by_id) >= vocab_size:
        raise ModelError(
            f"{where}: the tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}; the "
            "embedding matrix must have a row for every token (resize the model's embeddings)."
        )
    for i in range(vocab_size):
        text, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        vocab.tokens.append(text)
        vocab.types.append(int(kind))
    merges = data["model"].get("merges") or []
    vocab.merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return vocab


def add_vocab(writer: Any, vocab: GgufVocab, tokenizer: Any, stop_ids: list[int]) -> None:
    """tokenizer.ggml.* keys: the vocabulary, merges, special token ids and whether a bos is prepended."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (stop_ids[0] if stop_ids else None)
    if eos is not None:
        writer.add_eos_token_id(eos)
    if stop_ids and stop_ids[0] != eos:
        writer.add_eot_token_id(stop_ids[0])  # the template's end of turn: llama.cpp stops there too
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    # Whatever the HF tokenizer does, so llama.cpp's tokenize(text) gives the ids training saw.
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id
                             and len(probe) > 1)
