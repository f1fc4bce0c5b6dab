"""generate_stream's KV-cache loop against transformers' own greedy generate, stop tokens, seeded sampling, and
replies cut inside a multi-byte character."""

from __future__ import annotations

import pytest
import serve_helpers
import torch
from serve_helpers import QUESTION, REPLY

from tunesmith.data.templates import get_template
from tunesmith.model.detokenize import decode_complete
from tunesmith.model.generate import GenerationStats, generate_reply, generate_stream
from tunesmith.model.load import load_model, load_tokenizer

speaking_model_dir = serve_helpers.speaking_model_fixture()

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    return load_model(tiny_model_dir), tokenizer, get_template("auto", tokenizer)


def test_greedy_matches_transformers_generate(tiny):
    model, tokenizer, template = tiny
    prompt = template.encode_prompt(tokenizer, MESSAGES, "Be brief.")
    stops = template.stop_token_ids(tokenizer)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=stops[0],
        )
    new = [t for t in out[0, len(prompt) :].tolist() if t not in stops]
    expected = tokenizer.decode(new, skip_special_tokens=True)

    pieces = list(
        generate_stream(model, tokenizer, template, MESSAGES, system="Be brief.", max_new_tokens=12)
    )
    assert "".join(pieces) == expected and len(pieces) <= 12
    assert (
        generate_reply(model, tokenizer, "auto", MESSAGES, system="Be brief.", max_new_tokens=12) == expected
    )


def test_stops_at_the_templates_stop_tokens(tiny):
    model, tokenizer, template = tiny
    prompt = template.encode_prompt(tokenizer, MESSAGES, None)
    with torch.no_grad():
        first = int(model(torch.tensor([prompt])).logits[0, -1].argmax())

    class StopAtFirst:  # the real template, with the greedy first token declared a stop token
        def encode_prompt(self, tokenizer, messages, system=None):
            return template.encode_prompt(tokenizer, messages, system)

        def stop_token_ids(self, tokenizer):
            return [first]

    assert generate_reply(model, tokenizer, StopAtFirst(), MESSAGES) == ""


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(tiny):
    model, tokenizer, template = tiny
    torch.manual_seed(123)
    before = torch.get_rng_state()
    kwargs = {"max_new_tokens": 10, "temperature": 1.5, "top_p": 0.9, "seed": 7}
    first = generate_reply(model, tokenizer, template, MESSAGES, **kwargs)
    assert first and generate_reply(model, tokenizer, template, MESSAGES, **kwargs) == first
    assert torch.equal(torch.get_rng_state(), before)
    assert not model.training


def test_a_reply_cut_inside_a_character_never_ends_in_half_of_it(speaking_model_dir):
    """max_new_tokens cuts the taught reply after each of its tokens: the pieces never hold U+FFFD, the reply
    is a prefix of the whole one and, where the cut falls between characters, exactly today's decode."""
    tokenizer = load_tokenizer(speaking_model_dir)
    model, template = load_model(speaking_model_dir), get_template("auto", tokenizer)
    ids = tokenizer.encode(REPLY, add_special_tokens=False)
    inside = 0
    for n in range(1, len(ids) + 2):
        stats = GenerationStats()
        with serve_helpers.one_torch_thread():
            pieces = list(generate_stream(model, tokenizer, template, [{"role": "user", "content": QUESTION}],
                                          max_new_tokens=n, stats=stats))
        reply = "".join(pieces)
        assert all(pieces) and "\ufffd" not in reply and REPLY.startswith(reply), n
        assert reply == decode_complete(tokenizer, ids[:n])
        bare = tokenizer.decode(ids[:n])
        if bare.endswith("\ufffd"):
            inside += 1
            assert len(reply) < len(bare)
        else:
            assert reply == bare
        assert stats.completion_tokens == min(n, len(ids))
        assert stats.finish_reason == ("length" if n <= len(ids) else "stop")
    assert reply == REPLY and inside == 26
