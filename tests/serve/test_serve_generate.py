"""generate_stream's KV-cache loop against transformers' own greedy generate, stop tokens, seeded sampling."""

from __future__ import annotations

import pytest
import torch

from tunesmith.data.templates import get_template
from tunesmith.model.generate import generate_reply, generate_stream
from tunesmith.model.load import load_model, load_tokenizer

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
