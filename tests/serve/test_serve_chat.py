"""run_chat: one-shot answers (scriptable) and the REPL's /clear, /exit and EOF handling, on the tiny model."""

from __future__ import annotations

import io

from tunesmith.model.generate import generate_reply
from tunesmith.model.load import load_model, load_tokenizer
from tunesmith.serve.chat import HELP, run_chat


def test_prompt_answers_once(tiny_model_dir):
    output = io.StringIO()
    assert run_chat(str(tiny_model_dir), prompt="Hi", max_new_tokens=8, output=output) == 0
    assert output.getvalue().strip()


def test_repl_streams_clears_history_and_exits(tiny_model_dir):
    script = iter(["Hello there", "", "/clear", "Capital of France?", "/exit", "never read"])
    output = io.StringIO()
    # device cpu: the reference reply below is computed in float32 on the CPU, as run_chat does there.
    code = run_chat(
        str(tiny_model_dir), max_new_tokens=6, input_fn=lambda _: next(script), output=output, device="cpu"
    )
    assert code == 0 and next(script) == "never read"
    text = output.getvalue()
    assert text.startswith(HELP) and text.count("Assistant: ") == 2 and "History cleared." in text

    # After /clear the second question is answered as a fresh conversation.
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    fresh = generate_reply(
        model, tokenizer, "auto", [{"role": "user", "content": "Capital of France?"}], max_new_tokens=6
    )
    assert text.rstrip("\n").endswith("Assistant: " + fresh)


def test_repl_quits_on_eof(tiny_model_dir):
    def eof(_prompt: str) -> str:
        raise EOFError

    assert run_chat(str(tiny_model_dir), input_fn=eof, output=io.StringIO()) == 0
