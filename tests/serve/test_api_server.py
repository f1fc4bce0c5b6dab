"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official `openai` client and raw HTTP.

Greedy decoding is deterministic, so every answer is compared with generate_reply on the same model."""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import serve_helpers
from serve_helpers import QUESTION, REPLY

from tunesmith.model.detokenize import decode_complete
from tunesmith.model.generate import generate_reply, generate_stream

live_server = serve_helpers.live_server_fixture()
speaking_model_dir = serve_helpers.speaking_model_fixture()
speaking_server = serve_helpers.live_server_fixture("speaking_server", "speaking_model_dir")
openai = pytest.importorskip("openai", reason="the openai client is a dev extra: pip install -e '.[dev]'")


def reference(server, messages, max_tokens):
    return generate_reply(server.model, server.tokenizer, server.template, messages, max_new_tokens=max_tokens)


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=f"{live_server.base_url}/v1", api_key=live_server.api_key, max_retries=0,
                         timeout=60)


def ask(i: int) -> list[dict]:
    return [{"role": "user", "content": f"What is the capital of France? ({i})"}]


def post(server, body, key=None):
    headers = {"Authorization": f"Bearer {key or server.api_key}", "Content-Type": "application/json"}
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    return server.request("POST", "/v1/chat/completions", body, headers)


def assert_openai_error(response, status: int, param: str | None = None) -> dict:
    assert response.status == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_models_and_health(live_server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-qwen2"]
    health = live_server.health()
    assert health["status"] == "ok" and health["model"] == "tiny-qwen2"


def test_plain_completion_matches_generate_reply(live_server, client):
    messages = [{"role": "system", "content": "Be brief."}, *ask(0)]
    result = client.chat.completions.create(model="tiny-qwen2", messages=messages, temperature=0, max_tokens=12)
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == reference(live_server, messages, 12)
    assert choice.finish_reason in ("stop", "length")
    assert result.usage.completion_tokens <= 12 and result.usage.prompt_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_streaming_matches_generate_reply(live_server, client):
    stream = client.chat.completions.create(
        model="tiny-qwen2", messages=ask(1), temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference(live_server, ask(1), 12)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # streamed in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 12


def test_sixteen_concurrent_streaming_clients_all_finish(live_server, client):
    def run(i: int) -> str:
        stream = client.chat.completions.create(
            model="tiny-qwen2", messages=ask(i), temperature=0, max_tokens=24, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(run, range(16), timeout=120))
    assert answers == [reference(live_server, ask(i), 24) for i in range(16)]


def test_seeded_sampling_is_reproducible(client):
    def sample() -> str:
        result = client.chat.completions.create(
            model="tiny-qwen2", messages=ask(2), temperature=1.0, top_p=0.9, seed=7, max_tokens=10
        )
        return result.choices[0].message.content

    assert sample() == sample()


def test_stop_string_cuts_the_reply(live_server, client):
    full = reference(live_server, ask(3), 24)
    # a two-character stop that first occurs a little way into the reply
    stop = next(full[i : i + 2] for i in range(2, len(full) - 2) if full.find(full[i : i + 2]) >= 2)
    for stream in (False, True):
        result = client.chat.completions.create(
            model="tiny-qwen2", messages=ask(3), temperature=0, max_tokens=24, stop=[stop], stream=stream
        )
        if stream:
            chunks = [c for c in result if c.choices]
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = result.choices[0].message.content, result.choices[0].finish_reason
        assert text == full[: full.find(stop)] and reason == "stop"


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(live_server, client):
    server = live_server
    good = {"model": "tiny-qwen2", "messages": ask(4), "max_tokens": 4, "temperature": 0}

    assert_openai_error(post(server, b'{"messages": [{"role": "user", "content": "hi"}'), 400)  # malformed JSON
    assert_openai_error(post(server, b"[1, 2]"), 400)  # not an object
    assert_openai_error(post(server, {**good, "temperature": "hot"}), 400, "temperature")
    assert_openai_error(post(server, {**good, "max_tokens": "many"}), 400, "max_tokens")
    assert_openai_error(post(server, {**good, "messages": [{"role": "user", "content": 5}]}), 400,
                        "messages.0.content")
    assert_openai_error(post(server, {**good, "messages": [{"role": "wizard", "content": "hi"}]}), 400,
                        "messages.0.role")
    assert_openai_error(post(server, {**good, "messages": []}), 400, "messages")
    assert_openai_error(post(server, {**good, "messages": [{"role": "assistant", "content": "hi"}]}), 400,
                        "messages")
    assert_openai_error(post(server, {**good, "stream": "yes"}), 400, "stream")
    assert_openai_error(post(server, {**good, "n": 0}), 400, "n")
    assert_openai_error(post(server, {**good, "n": 17}), 400, "n")
    too_many = [{"role": r, "content": "hi"} for _ in range(11) for r in ("user", "assistant")][:-1]
    assert_openai_error(post(server, {**good, "messages": too_many}), 400, "messages")

    # too many tokens: over the server's limit, and over the model's context
    error = assert_openai_error(post(server, {**good, "max_tokens": 100_000}), 400, "max_tokens")
    assert "900" in error["message"]
    long_prompt = [{"role": "user", "content": "Paris " * 2000}]
    assert_openai_error(post(server, {**good, "messages": long_prompt, "max_tokens": 10}), 400)

    # oversize bodies: with Content-Length, and chunked (no length announced)
    huge = json.dumps({**good, "messages": [{"role": "user", "content": "x" * 100_000}]}).encode()
    assert_openai_error(post(server, huge), 413)
    pieces = [huge[i : i + 8192] for i in range(0, len(huge), 8192)]
    chunked = server.request("POST", "/v1/chat/completions", iter(pieces), {"Authorization": f"Bearer {server.api_key}"})
    assert_openai_error(chunked, 413)

    # authentication: missing, malformed and wrong keys
    bare = server.request("POST", "/v1/chat/completions", json.dumps(good).encode())
    assert assert_openai_error(bare, 401)["code"] == "invalid_api_key"
    assert bare.headers["www-authenticate"] == "Bearer"
    assert_openai_error(post(server, good, key="sk-wrong"), 401)
    basic = server.request("POST", "/v1/chat/completions", json.dumps(good).encode(), {"Authorization": "Basic eDp5"})
    assert_openai_error(basic, 401)
    assert_openai_error(server.request("GET", "/v1/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sk-wrong", max_retries=0).models.list()

    # unknown routes and methods keep the shape
    assert_openai_error(server.request("GET", "/v1/nothing"), 404)
    assert_openai_error(server.request("DELETE", "/v1/chat/completions"), 405)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-qwen2", messages=ask(4), max_tokens=100_000)

    # still serving, correctly
    answer = client.chat.completions.create(**good).choices[0].message.content
    assert answer == reference(server, ask(4), 4)
    assert live_server.health()["status"] == "ok"


def test_disconnect_mid_stream_frees_the_worker(live_server, client):
    before = live_server.health()
    body = {"model": "tiny-qwen2", "messages": ask(5), "max_tokens": 900, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {live_server.api_key}", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", live_server.port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(), headers)
        response = conn.getresponse()
        assert response.status == 200
        while True:
            line = response.readline().decode()
            assert line, "the stream ended before any token"
            if '"content": "' in line and '"content": ""' not in line:
                break  # one real token arrived: hang up
    finally:
        conn.close()
    # the worker sees the disconnect and stops before finishing 900 tokens
    deadline = time.monotonic() + 10
    while True:
        health = live_server.health()
        if health["cancelled"] > before["cancelled"] and not health["busy"]:
            break
        assert time.monotonic() < deadline, f"the disconnected request was not cancelled: {health}"
        time.sleep(0.02)
    assert health["completed"] == before["completed"]  # it was stopped, not finished
    quick = client.chat.completions.create(model="tiny-qwen2", messages=ask(6), temperature=0, max_tokens=4)
    assert quick.choices[0].message.content == reference(live_server, ask(6), 4)


def test_chat_page_is_served(live_server):
    page = live_server.request("GET", "/")
    assert page.status == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/chat/completions" in page.text and 'id="system"' in page.text


def ask_speaking(server, max_tokens: int, stop: list[str] | None = None) -> tuple[tuple[str, str], tuple[str, str]]:
    """The taught question, answered whole and streamed: ((content, finish_reason), (joined deltas, reason));
    no streamed delta may hold a U+FFFD."""
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0, timeout=60)
    kwargs = {"model": "tiny-qwen2", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
              "max_tokens": max_tokens, "stop": stop}
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    deltas = [c.choices[0].delta.content or "" for c in chunks]
    assert not any("\ufffd" in d for d in deltas), deltas
    return (whole.message.content, whole.finish_reason), ("".join(deltas), chunks[-1].choices[0].finish_reason)


def test_a_reply_cut_inside_a_character_is_never_sent_half(speaking_server):
    """max_tokens ends the taught reply after each of its tokens: the final message and the stream are the
    reply up to its last complete character, with no U+FFFD."""
    ids = speaking_server.tokenizer.encode(REPLY, add_special_tokens=False)
    with serve_helpers.one_torch_thread():
        for n in range(1, len(ids) + 2):
            expected = decode_complete(speaking_server.tokenizer, ids[:n])
            assert "\ufffd" not in expected and REPLY.startswith(expected)
            reason = "length" if n <= len(ids) else "stop"
            assert ask_speaking(speaking_server, n) == ((expected, reason), (expected, reason)), n
    assert expected == REPLY


@pytest.mark.parametrize("stop", ["😀", "。Hi", "你好"])
def test_a_stop_string_of_multi_byte_characters_cuts_at_a_whole_character(speaking_server, stop):
    """Stops made of characters the tiny tokenizer spells in bytes, with max_tokens ending the reply just before,
    inside and just after them: the reply is cut exactly at the stop, and never shows half a character."""
    tokenizer = speaking_server.tokenizer
    ids = tokenizer.encode(REPLY, add_special_tokens=False)
    reached = next(n for n in range(1, len(ids) + 1) if stop in decode_complete(tokenizer, ids[:n]))
    with serve_helpers.one_torch_thread():
        for n in [*range(reached - 4, reached + 2), len(ids) + 1]:
            text = decode_complete(tokenizer, ids[:n])
            found = text.find(stop)
            expected = text[:found] if found >= 0 else text
            reason = "stop" if found >= 0 or n > len(ids) else "length"
            assert ask_speaking(speaking_server, n, [stop]) == ((expected, reason), (expected, reason)), n
    assert expected == REPLY[: REPLY.find(stop)]


def continuation(server, prompt: str, max_tokens: int) -> str:
    ids = server.tokenizer.encode(prompt, add_special_tokens=True)
    return "".join(generate_stream(server.model, server.tokenizer, server.template, [], prompt_ids=ids,
                                   max_new_tokens=max_tokens))


def test_text_completions_continue_the_prompt_without_a_template(live_server, client):
    prompt = "The capital of France is"
    result = client.completions.create(model="tiny-qwen2", prompt=prompt, max_tokens=10, temperature=0)
    assert result.object == "text_completion" and result.choices[0].text == continuation(live_server, prompt, 10)
    assert result.usage.prompt_tokens == len(live_server.tokenizer.encode(prompt))
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    chunks = list(client.completions.create(model="tiny-qwen2", prompt=prompt, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == result.choices[0].text
    assert chunks[-1].usage.completion_tokens == result.usage.completion_tokens
    many = client.completions.create(model="tiny-qwen2", prompt=[prompt, "Paris"], max_tokens=5, temperature=0)
    assert [c.text for c in many.choices] == [continuation(live_server, p, 5) for p in (prompt, "Paris")]


def test_n_choices_are_separate_sequences_with_usage(live_server, client):
    greedy = client.chat.completions.create(model="tiny-qwen2", messages=ask(7), max_tokens=8, temperature=0, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert {c.message.content for c in greedy.choices} == {reference(live_server, ask(7), 8)}
    one = client.chat.completions.create(model="tiny-qwen2", messages=ask(7), max_tokens=8, temperature=0)
    assert greedy.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert greedy.usage.completion_tokens == 3 * one.usage.completion_tokens

    kwargs = {"model": "tiny-qwen2", "messages": ask(8), "max_tokens": 12, "temperature": 1.0, "seed": 5, "n": 3}
    sampled = client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in sampled.choices]
    assert len(set(texts)) > 1  # choice j samples with seed + j
    assert 3 <= sampled.usage.completion_tokens <= 36
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(3)]
    assert streamed == texts
    assert chunks[-1].usage.completion_tokens == sampled.usage.completion_tokens


def test_an_unknown_model_is_a_404(live_server, client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=ask(9), max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    assert_openai_error(live_server.request("GET", "/v1/models/gpt-4o",
                                            headers={"Authorization": f"Bearer {live_server.api_key}"}), 404)
