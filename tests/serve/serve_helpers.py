"""A live API server on 127.0.0.1 (a free port) with the tiny model, in a background thread of the test
process; it stops when the module using it ends (or after STOP_AFTER_S, whichever comes first). And the tiny
model taught one Chinese reply (``speaking_model_dir``), for replies cut inside a multi-byte character.

A test module declares the fixture with ``live_server = serve_helpers.live_server_fixture()``. This is a helper
module, not tests/serve/conftest.py, because a second module named ``conftest`` replaces tests/conftest.py in
sys.modules (see tests/train/train_helpers.py)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

API_KEY = "sk-test-key"
STOP_AFTER_S = 600  # a hung test session must not leave the server running forever


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


@dataclass
class LiveServer:
    base_url: str
    port: int
    api_key: str
    model: Any
    tokenizer: Any
    template: Any
    settings: Any

    def request(
        self,
        method: str,
        path: str,
        body: bytes | Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """Raw HTTP with the standard library (an iterable body is sent chunked, without Content-Length)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            chunked = body is not None and not isinstance(body, bytes)
            conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
            response = conn.getresponse()
            text = response.read().decode("utf-8")
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, text)
        finally:
            conn.close()

    def health(self) -> dict:
        return self.request("GET", "/health").json()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def live_server_fixture(name: str = "live_server", model_fixture: str = "tiny_model_dir"):
    """A module-scoped fixture ``name`` (a new one per module: each module gets its own server) serving the
    model folder that the fixture ``model_fixture`` gives."""

    def server(request):
        yield from _live_server(request.getfixturevalue(model_fixture))

    return pytest.fixture(scope="module", name=name)(server)


def _live_server(model_dir):
    import uvicorn

    from tunesmith.serve.app import ServerSettings, create_app
    from tunesmith.serve.chat import load_for_inference
    from tunesmith.serve.server import context_length

    model, tokenizer, template = load_for_inference(str(model_dir), device="cpu")
    settings = ServerSettings(
        model_id="tiny-qwen2",
        api_key=API_KEY,
        max_body_bytes=64 * 1024,
        max_tokens_limit=900,
        default_max_tokens=32,
        max_messages=20,
        context_length=context_length(model),
    )
    app = create_app(model, tokenizer, template, settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="tunesmith-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the test API server did not start within 30 s")
        time.sleep(0.05)
    stopper = threading.Timer(STOP_AFTER_S, lambda: setattr(server, "should_exit", True))
    stopper.daemon = True
    stopper.start()
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", port, API_KEY, model, tokenizer, template, settings)
    finally:
        stopper.cancel()
        server.should_exit = True
        thread.join(timeout=15)


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
