"""`tunesmith chat`: a terminal REPL over a model (+ adapter), or a one-shot answer with `prompt=` (scriptable)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

import torch

from tunesmith.model.adapt import load_adapter
from tunesmith.model.generate import generate_stream, get_chat_template
from tunesmith.model.load import load_model, load_tokenizer, pick_device

HELP = "Type a message; /clear forgets the conversation, /exit (or Ctrl-D) quits."


def run_chat(
    model_path: str,
    adapter: str | None = None,
    system: str | None = None,
    prompt: str | None = None,
    template: str = "auto",
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    cache_dir: str | None = None,
    input_fn: Callable[[str], str] = input,
    output: TextIO = sys.stdout,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device: str = "auto",
) -> int:
    """Chat with a model; returns the process exit code (0)."""
    model, tokenizer, chat_template = load_for_inference(
        model_path,
        adapter,
        template,
        cache_dir,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        device=device,
    )

    def reply(history: list[dict]) -> str:
        pieces = []
        for piece in generate_stream(
            model,
            tokenizer,
            chat_template,
            history,
            system=system,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
        ):
            output.write(piece)
            output.flush()
            pieces.append(piece)
        output.write("\n")
        output.flush()
        return "".join(pieces)

    if prompt is not None:
        reply([{"role": "user", "content": prompt}])
        return 0

    output.write(HELP + "\n")
    history: list[dict] = []
    while True:
        try:
            text = input_fn("User: ").strip()
        except (EOFError, KeyboardInterrupt):
            output.write("\n")
            return 0
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/clear":
            history.clear()
            output.write("History cleared.\n")
            continue
        history.append({"role": "user", "content": text})
        output.write("Assistant: ")
        try:
            answer = reply(history)
        except KeyboardInterrupt:
            # Ctrl-C stops this reply, not the session; the unanswered message is dropped from the history.
            history.pop()
            output.write("\n[interrupted]\n")
            continue
        history.append({"role": "assistant", "content": answer})


def load_for_inference(
    model_path: str,
    adapter: str | None = None,
    template: str = "auto",
    cache_dir: str | None = None,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device: str = "auto",
) -> tuple[Any, Any, Any]:
    """(model in eval mode, tokenizer, chat Template) for chat and the API server."""
    target = pick_device(device)
    # Half precision on accelerators (memory, speed); float32 on CPU, where bf16 matmuls are slow.
    dtype = torch.float32 if target.type == "cpu" else _accelerator_dtype(target)
    tokenizer = load_tokenizer(model_path, cache_dir, trust_remote_code)
    model: Any = load_model(
        model_path,
        dtype=dtype,
        cache_dir=cache_dir,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        device=target,
    )
    if adapter:
        model = load_adapter(model, adapter, trainable=False, allow_pickle=allow_pickle)
    model.eval()
    return model, tokenizer, get_chat_template(template, tokenizer)


def _accelerator_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16
