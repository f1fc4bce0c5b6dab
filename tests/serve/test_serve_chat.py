"""run_chat: one-shot answers (scriptable) and the REPL's /clear, /exit and EOF handling, on the tiny model."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import serve_helpers
from serve_helpers import QUESTION, REPLY

from tunesmith.model.detokenize import decode_complete
from tunesmith.model.generate import generate_reply
from tunesmith.model.load import load_model, load_tokenizer
from tunesmith.serve.chat import HELP, run_chat

speaking_model_dir = serve_helpers.speaking_model_fixture()


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


def test_prompt_cut_inside_a_character_prints_no_half_character(speaking_model_dir):
    """`tunesmith chat --prompt` with max_new_tokens ending the reply inside a character: the printed answer
    stops before that character (the bare decode would end in U+FFFD there)."""
    tokenizer = load_tokenizer(speaking_model_dir)
    ids = tokenizer.encode(REPLY, add_special_tokens=False)
    cuts = [n for n in range(1, len(ids) + 1) if tokenizer.decode(ids[:n]).endswith("\ufffd")]
    for n in [*cuts[::3], len(ids) + 1]:  # every third of the 26 cuts inside a character, then all of it
        output = io.StringIO()
        with serve_helpers.one_torch_thread():
            assert run_chat(str(speaking_model_dir), prompt=QUESTION, max_new_tokens=n, output=output,
                            device="cpu") == 0
        printed = output.getvalue()
        assert printed == decode_complete(tokenizer, ids[:n]) + "\n" and "\ufffd" not in printed, n
        assert REPLY.startswith(printed[:-1])
    assert printed == REPLY + "\n"


@pytest.mark.slow
def test_cli_chat_with_smollm2_cut_inside_chinese_characters():
    """The issue's case through the real console script: SmolLM2 answers 你是谁？ in Chinese under a Chinese
    system prompt, and --max-new-tokens ends the answer inside a character; nothing printed holds U+FFFD."""
    import torch

    from tunesmith.serve.chat import load_for_inference

    system, question = "你是甄嬛，请用中文回答。", "你是谁？"
    model, tokenizer, template = load_for_inference("smollm2-135m-instruct", device="cpu")
    prompt = template.encode_prompt(tokenizer, [{"role": "user", "content": question}], system)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             eos_token_id=template.stop_token_ids(tokenizer))
    ids = out[0, len(prompt) :].tolist()
    cuts = [n for n in range(1, len(ids) + 1) if tokenizer.decode(ids[:n]).endswith("\ufffd")]
    assert len(cuts) >= 3, tokenizer.decode(ids)  # greedy ids as generate_stream's (test_serve_generate.py)

    exe = Path(sys.executable).parent / "tunesmith"
    cli = [str(exe)] if exe.is_file() else [sys.executable, "-m", "tunesmith.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    for n in cuts[:3]:
        result = subprocess.run(
            [*cli, "chat", "smollm2-135m-instruct", "--system", system, "--prompt", question,
             "--max-new-tokens", str(n)],
            capture_output=True, text=True, encoding="utf-8", env=env, timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert "\ufffd" not in result.stdout and result.stdout == decode_complete(tokenizer, ids[:n]) + "\n", n
