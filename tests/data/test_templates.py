"""Templates: ids equal apply_chat_template on real tokenizers, jinja() equals the template, prompts and stops."""

from __future__ import annotations

import copy
import json

import pytest

from tunesmith.data import TEMPLATES, Conversation, Turn, get_template
from tunesmith.errors import DataError


def conv(*pairs: tuple[str, str], system: str | None = None) -> Conversation:
    turns = [
        Turn(role, text) for user, reply in pairs for role, text in (("user", user), ("assistant", reply))
    ]
    return Conversation(turns, system, "test:row 1")


CONVS = {
    "single": conv(("What is 2+2?", "4.")),
    "single_system": conv(("Hi", "Hello! How can I help?"), system="You are terse."),
    "multi": conv(("Who are you?", "I am Ada."), ("你是谁？", "我是 Ada。"), (" spaced ", "  two  spaces\n")),
    "multi_system": conv(("a", "b"), ("c", "d"), system="Sys\nwith lines."),
}


@pytest.fixture(scope="module")
def qwen25_jinja(shared_dir) -> str:
    return (shared_dir / "templates" / "qwen2_5_chat_template.jinja").read_text(encoding="utf-8")


def joined(pairs: list[tuple[list[int], list[int]]]) -> list[int]:
    return [i for prompt, reply in pairs for i in prompt + reply]


def reference(
    tokenizer, c: Conversation, chat_template: str | None = None, system: str | None = None
) -> list[int]:
    out = tokenizer.apply_chat_template(c.to_messages(system), chat_template=chat_template, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("case", CONVS)
def test_qwen_equals_qwen25_apply_chat_template(qwen_tokenizer, qwen25_jinja, case):
    template = get_template("qwen", qwen_tokenizer)
    pairs = template.encode_turns(qwen_tokenizer, CONVS[case])
    assert joined(pairs) == reference(qwen_tokenizer, CONVS[case], qwen25_jinja)
    assert len(pairs) == len(CONVS[case].turns) // 2
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    newline = qwen_tokenizer("\n", add_special_tokens=False)["input_ids"]
    for prompt, reply in pairs:  # replies end with <|im_end|>\n, prompts with the assistant header
        assert reply[-2:] == [im_end, *newline]
        assert qwen_tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")


def test_qwen_inserts_default_system_and_cfg_default_overrides(qwen_tokenizer, qwen25_jinja):
    template = get_template("qwen", qwen_tokenizer)
    text = qwen_tokenizer.decode(template.encode_turns(qwen_tokenizer, CONVS["single"])[0][0])
    assert text.startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    )
    pairs = template.encode_turns(qwen_tokenizer, CONVS["single"], default_system="Custom.")
    assert joined(pairs) == reference(qwen_tokenizer, CONVS["single"], qwen25_jinja, system="Custom.")


def test_qwen_equals_reference_on_shared_alpaca_rows(qwen_tokenizer, qwen25_jinja, shared_dir):
    template = get_template("qwen", qwen_tokenizer)
    for name in ("alpaca_en_demo.json", "alpaca_zh_demo.json"):
        rows = json.loads((shared_dir / "data" / name).read_text(encoding="utf-8"))[:40]
        convs = [conv(("\n".join(p for p in (r["instruction"], r["input"]) if p), r["output"])) for r in rows]
        for c, turns in zip(convs, template.encode_many(qwen_tokenizer, convs), strict=True):
            assert joined(turns.pairs) == reference(qwen_tokenizer, c, qwen25_jinja), c.turns[0].content[:40]


@pytest.mark.parametrize("case", CONVS)
def test_qwen3_matches_the_tokenizers_own_template(qwen_tokenizer, case):
    """Qwen3's jinja: empty think block only before the last reply; we put it in the prompt."""
    template = get_template("qwen3", qwen_tokenizer)
    pairs = template.encode_turns(qwen_tokenizer, CONVS[case])
    assert joined(pairs) == reference(qwen_tokenizer, CONVS[case])
    assert qwen_tokenizer.decode(pairs[-1][0]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert all("<think>" not in qwen_tokenizer.decode(p + r) for p, r in pairs[:-1])
    prompt = template.encode_prompt(qwen_tokenizer, [{"role": "user", "content": "hi"}])
    expected = qwen_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, enable_thinking=False, tokenize=True
    )["input_ids"]
    assert prompt == list(expected)


def test_qwen3_thinking_reply_and_history_stripping(qwen_tokenizer):
    c = conv(("q1", "<think>\nold\n</think>\n\nA1"), ("q2", "<think>\nwhy\n</think>\n\nA2"))
    template = get_template("qwen3", qwen_tokenizer)
    pairs = template.encode_turns(qwen_tokenizer, c)
    assert joined(pairs) == reference(qwen_tokenizer, c)
    assert qwen_tokenizer.decode(pairs[0][1]) == "A1<|im_end|>\n"  # history loses its reasoning, as in Qwen3
    assert (
        qwen_tokenizer.decode(pairs[1][1]) == "<think>\nwhy\n</think>\n\nA2<|im_end|>\n"
    )  # trained thinking


@pytest.mark.parametrize("case", CONVS)
def test_chatml_equals_tiny_tokenizer_template(tiny_tokenizer, case):
    template = get_template("chatml", tiny_tokenizer)
    # the tiny tokenizer's jinja inserts "You are a helpful assistant."; chatml has no default of its own
    default = None if CONVS[case].system else "You are a helpful assistant."
    pairs = template.encode_turns(tiny_tokenizer, CONVS[case], default_system=default)
    assert joined(pairs) == reference(tiny_tokenizer, CONVS[case])
    bare = template.encode_turns(tiny_tokenizer, conv(("a", "b")))
    assert tiny_tokenizer.decode(bare[0][0]) == "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("case", CONVS)
def test_auto_splits_the_tokenizers_template(tiny_tokenizer, case):
    template = get_template("auto", tiny_tokenizer)
    pairs = template.encode_turns(tiny_tokenizer, CONVS[case])
    assert joined(pairs) == reference(tiny_tokenizer, CONVS[case])
    assert tiny_tokenizer.decode(pairs[0][1]) == CONVS[case].turns[1].content + "<|im_end|>\n"
    assert template.jinja() == tiny_tokenizer.chat_template
    assert template.stop_token_ids(tiny_tokenizer) == [tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_auto_on_qwen3_single_turn_equals_apply_chat_template(qwen_tokenizer):
    pairs = get_template("auto", qwen_tokenizer).encode_turns(qwen_tokenizer, CONVS["single_system"])
    assert joined(pairs) == reference(qwen_tokenizer, CONVS["single_system"])


@pytest.fixture(scope="module")
def rich_tokenizer(tiny_tokenizer):
    """The tiny tokenizer plus every registered template's special tokens (and a bos), for the other templates."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_special_tokens(
        {
            "bos_token": "<s>",
            "additional_special_tokens": [
                "<|im_start|>",
                "<|endoftext|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                "<|eom_id|>",
                *sorted({t for template in TEMPLATES.values() for t in template.special_tokens} - {"<|im_end|>"}),
            ],
        }
    )
    return tok


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("case", CONVS)
def test_jinja_renders_what_the_template_encodes(rich_tokenizer, name, case):
    template = get_template(name, rich_tokenizer)
    c = CONVS[case]
    pairs = template.encode_turns(rich_tokenizer, c)
    assert joined(pairs) == reference(rich_tokenizer, c, template.jinja())
    history = c.to_messages()[:-1]
    prompt = rich_tokenizer.apply_chat_template(
        history, chat_template=template.jinja(), add_generation_prompt=True, tokenize=True
    )["input_ids"]
    assert template.encode_prompt(rich_tokenizer, history) == list(prompt)


def test_llama3_and_default_shapes(rich_tokenizer):
    llama3 = get_template("llama3", rich_tokenizer)
    ((prompt, reply),) = llama3.encode_turns(rich_tokenizer, conv((" hi ", " yo "), system="S"))
    assert rich_tokenizer.decode(prompt) == (
        "<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert rich_tokenizer.decode(reply) == "yo<|eot_id|>"
    ids = rich_tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|eom_id|>", "<|im_end|>"])
    assert llama3.stop_token_ids(rich_tokenizer) == ids
    ((_, reply),) = get_template("default", rich_tokenizer).encode_turns(rich_tokenizer, conv(("a", "b")))
    assert reply[-2] == rich_tokenizer.eos_token_id


def test_template_errors(qwen_tokenizer, tiny_tokenizer):
    with pytest.raises(DataError, match="template llama3 needs the token <|start_header_id|>.*template=auto"):
        get_template("llama3", qwen_tokenizer)
    with pytest.raises(DataError, match="unknown template 'nonexistent'.*qwen, "):
        get_template("nonexistent", qwen_tokenizer)
    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    with pytest.raises(DataError, match="template=auto needs the tokenizer's chat template"):
        get_template("auto", bare)
    with pytest.raises(DataError, match="end with a user message"):
        get_template("chatml", tiny_tokenizer).encode_prompt(
            tiny_tokenizer, [{"role": "assistant", "content": "x"}]
        )


def test_reply_starting_with_newlines_keeps_generation_prompt(qwen_tokenizer):
    """A token across the prompt/reply seam ("\\n" + "\\n..."): the prompt stays what generation sees."""
    template = get_template("qwen", qwen_tokenizer)
    c = conv(("q", "\n\nindented"))
    ((prompt, reply),) = template.encode_turns(qwen_tokenizer, c)
    assert prompt == template.encode_prompt(qwen_tokenizer, [{"role": "user", "content": "q"}])
    assert qwen_tokenizer.decode(reply) == "\n\nindented<|im_end|>\n"
