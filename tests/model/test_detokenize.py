"""IncrementalDecoder on real tokenizers: Chinese, mixed Chinese / English / emoji text cut at every token boundary
never shows half a character, the whole sequence gives the text back exactly, and a U+FFFD the model really
generated (or bytes that can never form a character) is still shown, as tokenizer.decode shows it."""

from __future__ import annotations

import random

import pytest

from tunesmith.model.detokenize import _BYTE_LEVEL, IncrementalDecoder, decode_complete

FFFD = "\ufffd"
TEXTS = [
    "你是谁？我是通义千问，由阿里云开发的人工智能助手。",
    "臣妾做不到啊！皇上，四郎，那年杏花微雨，你说你是果郡王。",
    "Hello, 世界! 今天天气很好 😀🎉 🤗，emoji 👨‍👩‍👧 and rare 𠀀𪚥 chars; naïve café — ok.",
    "A genuine replacement character \ufffd stays, 中\ufffd文 too, and at the end: \ufffd",
]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def check_every_cut(tokenizer, text: str) -> int:
    """Cut text's tokens after each one. Where the tokenizer's own offsets say the cut falls between characters,
    the streamed text is exactly tokenizer.decode of the tokens so far (today's output); where it falls inside
    a character, it is the text before that character, and decode would have shown a U+FFFD. Either way the
    pieces join to decoder.text, a prefix of the text. Returns how many cuts fell inside a character."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = encoded["input_ids"], encoded["offset_mapping"]
    decoder, pieces, inside = IncrementalDecoder(tokenizer), [], 0
    for cut, token_id in enumerate(ids, start=1):
        pieces.append(decoder.add(token_id))
        shown = "".join(pieces)
        assert shown == decoder.text == decode_complete(tokenizer, ids[:cut])
        bare = tokenizer.decode(ids[:cut], skip_special_tokens=True)
        if cut < len(ids) and spans[cut - 1][1] > spans[cut][0]:  # the next token goes on with the character
            inside += 1
            assert shown == text[: spans[cut][0]] and bare.endswith(FFFD) and len(bare) > len(shown), cut
            assert decoder.pending_bytes > 0
        else:
            assert shown == bare and text.startswith(shown), cut
            assert decoder.pending_bytes == 0
    assert decoder.text == text and decode_complete(tokenizer, ids) == text
    return inside


@pytest.mark.parametrize("text", TEXTS)
def test_qwen_every_token_boundary(qwen_tokenizer, text):
    inside = check_every_cut(qwen_tokenizer, text)
    if "😀" in text:
        assert inside > 0  # the emoji and the rare characters take several tokens each


@pytest.mark.parametrize("text", TEXTS)
def test_tiny_byte_level_tokenizer_every_token_boundary(tiny_tokenizer, text):
    # the tiny tokenizer (vocab 400) spells nearly every Chinese character as two or three byte tokens
    assert check_every_cut(tiny_tokenizer, text) > 5


def test_cut_inside_a_token_keeps_the_complete_part(qwen_tokenizer):
    """Byte-level BPE merges a space with the first bytes of a character: cut after that token, the space is
    final and shown, the half character is not."""
    ids = encode(qwen_tokenizer, "Hi 🤗")
    assert qwen_tokenizer.convert_ids_to_tokens(ids) == ["Hi", "Ġ" + _char(0xF0) + _char(0x9F), _char(0xA4),
                                                         _char(0x97)]  # " \xf0\x9f" is one token
    decoder = IncrementalDecoder(qwen_tokenizer)
    assert [decoder.add(i) for i in ids] == ["Hi", " ", "", "🤗"]
    assert decode_complete(qwen_tokenizer, ids[:3]) == "Hi "


def test_bytes_that_never_form_a_character_are_shown_as_decode_shows_them(qwen_tokenizer):
    tok = qwen_tokenizer
    lead, cont, a, end = (tok.convert_tokens_to_ids(t) for t in (_char(0xE4), _char(0xBD), "a", "<|im_end|>"))
    cases = {
        (a, lead): "a",  # a lead byte at the end: its character may still come, so it is held back
        (a, lead, cont): "a",
        (a, lead, a): f"a{FFFD}a",  # an ASCII byte after a lead byte: invalid, shown as decode shows it
        (cont, a): f"{FFFD}a",  # a continuation byte with no lead
        (a, cont): f"a{FFFD}",
        (lead, lead): FFFD,  # the first lead is broken by the second, which may still complete
        (a, lead, end, cont): "a",  # a skipped special token between bytes, as decode skips it
        (a, lead, end, cont, _id(tok, 0xA0)): "a你",
    }
    for ids, expected in cases.items():
        assert decode_complete(tok, ids) == expected, ids
        full = tok.decode(list(ids), skip_special_tokens=True)
        assert full == expected or full == expected + FFFD  # only an unfinished tail is left out
    assert decode_complete(tok, [a, end], skip_special_tokens=False) == "a<|im_end|>"


def test_random_sequences_hide_only_an_unfinished_tail(qwen_tokenizer):
    """Random ids, byte tokens favoured: at every step the text is decode's, less one trailing U+FFFD exactly
    when the bytes end inside a character."""
    tok = qwen_tokenizer
    rng = random.Random(0)
    byte_ids = [tok.convert_tokens_to_ids(c) for c in _BYTE_LEVEL]
    pool = [*byte_ids, *range(len(tok) - 40, len(tok)), *(rng.randrange(len(tok)) for _ in range(300))]
    for _ in range(300):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 8))]
        decoder = IncrementalDecoder(tok)
        for cut, token_id in enumerate(ids, start=1):
            decoder.add(token_id)
            full = tok.decode(ids[:cut], skip_special_tokens=True)
            if decoder.pending_bytes:
                assert full == decoder.text + FFFD, ids[:cut]
            else:
                assert full == decoder.text, ids[:cut]


def test_sentencepiece_byte_fallback_tokenizer():
    """Llama-2 / Mistral style: characters outside the vocabulary become <0xHH> tokens, and decode shows a whole
    unfinished run of them as one U+FFFD per byte."""
    tokenizer = _byte_fallback_tokenizer()
    text = "Hello 你好 World, 世界! 😀 \ufffd ok"
    ids = encode(tokenizer, text)
    assert sum(t.startswith("<0x") for t in tokenizer.convert_ids_to_tokens(ids)) >= 16
    assert check_every_cut(tokenizer, text) >= 8


def test_whole_string_tokens_hold_nothing_back():
    """A tokenizer whose tokens are whole words cannot split a character: a U+FFFD word is just a word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "你好": 1, "世界": 2, FFFD: 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.add(i) for i in (1, 2, 3)] == ["你好", " 世界", f" {FFFD}"]
    assert decoder.pending_bytes == 0


def _char(byte: int) -> str:
    """The byte-level alphabet's character for one byte."""
    return next(c for c, b in _BYTE_LEVEL.items() if b == byte)


def _id(tokenizer, byte: int) -> int:
    return tokenizer.convert_tokens_to_ids(_char(byte))


def _byte_fallback_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyzHW,!你", "▁H", "el", "lo"]:
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.BPE(vocab, [("▁", "H"), ("e", "l"), ("l", "o")], byte_fallback=True,
                                   unk_token="<unk>", fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
