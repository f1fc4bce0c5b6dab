"""Helpers for tests that need a model which says something known: the tiny model taught one reply (Chinese,
English and an emoji, so max_new_tokens can cut it inside a character), and torch on one thread while it runs.
Shared by the serving, evaluation and model tests (imported as ``model_helpers``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

# A reply in Chinese, English and an emoji: the tiny tokenizer spells most of its characters as 2-3 byte tokens,
# so max_new_tokens cuts it inside a character at 26 of its 45 token boundaries.
QUESTION = "你是谁？"
REPLY = "我是Ada，人工智能助手😀。Hi，你好！"
_speaking: dict[str, Any] = {}


def speaking_model_fixture():
    """A module-scoped ``speaking_model_dir`` fixture: the tiny model taught to answer QUESTION with REPLY (built
    once per test session, shared by the modules that ask for it)."""

    def speaking_model_dir(tiny_model_dir, tmp_path_factory):
        if "dir" not in _speaking:
            _speaking["dir"] = teach_reply(tiny_model_dir, tmp_path_factory.mktemp("speaking"), QUESTION, REPLY)
        return _speaking["dir"]

    return pytest.fixture(scope="module", name="speaking_model_dir")(speaking_model_dir)


def teach_reply(model_dir, out_dir, question: str, reply: str, max_steps: int = 400):
    """A copy of the model in out_dir, trained on one conversation until greedy decoding answers ``question``
    (with the tokenizer's own chat template) by exactly ``reply`` and its end-of-turn token."""
    import torch

    from tunesmith.data.templates import get_template
    from tunesmith.model.generate import generate_reply
    from tunesmith.model.load import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    template = get_template("auto", tokenizer)
    messages = [{"role": "user", "content": question}]
    prompt = template.encode_prompt(tokenizer, messages)
    answer = tokenizer.encode(reply, add_special_tokens=False) + template.stop_token_ids(tokenizer)[:1]
    ids, labels = torch.tensor([prompt + answer]), torch.tensor([[-100] * len(prompt) + answer])
    model = load_model(model_dir)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with one_torch_thread():
        for _ in range(max_steps):
            loss = model(input_ids=ids, labels=labels).loss
            if loss.item() < 0.01:
                break
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        said = generate_reply(model, tokenizer, template, messages, max_new_tokens=len(answer) + 4)
    assert said == reply, f"the taught model says {said!r} (loss {loss.item():.4f})"
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for a while: the tiny model's matrices are too small to gain from more, and on a
    shared 2-core machine a second thread makes each token several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def spread_norms_model(model_dir, lora: bool = False) -> Any:
    """The tiny model in float32 with its norm weights drawn around 1 (so their gradients and scaling count), as
    a PEFT LoRA model (r 4, all linear layers) if ``lora``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from tunesmith.model.load import load_model

    torch.manual_seed(0)
    model = load_model(str(model_dir), dtype=torch.float32)
    for module in model.modules():
        if hasattr(module, "variance_epsilon"):
            nn.init.normal_(module.weight, mean=1.0, std=0.2)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    return model
