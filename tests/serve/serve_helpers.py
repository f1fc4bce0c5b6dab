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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pytest
from model_helpers import QUESTION, REPLY, one_torch_thread, speaking_model_fixture, teach_reply  # noqa: F401

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
    from tunesmith.serve.app import ServerSettings
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
    yield from serving(model, tokenizer, template, settings)


def serving(model, tokenizer, template, settings):
    """Serve ``model`` with ``settings`` on a free port in a background thread; yields the LiveServer, then stops."""
    import uvicorn

    from tunesmith.serve.app import create_app

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
        yield LiveServer(f"http://127.0.0.1:{port}", port, settings.api_key, model, tokenizer, template, settings)
    finally:
        stopper.cancel()
        server.should_exit = True
        thread.join(timeout=15)
