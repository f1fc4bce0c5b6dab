"""Continuous batching: rows joining and leaving a running batch decode exactly as they would alone (fp32,
greedy), per-request sampling coexists in one batch, a full waiting line is a 503 with Retry-After over HTTP,
and a client that hangs up frees its batch slot for a waiting request."""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import serve_helpers

from tunesmith.model.generate import GenerationStats, Sampler, _token_loop, generate_reply

openai = pytest.importorskip("openai", reason="the openai client is a dev extra: pip install -e '.[dev]'")
live_server = serve_helpers.live_server_fixture()

QUESTIONS = ["hi", "What is the capital of France? Tell me in many words, please.", "Paris is nice " * 6, "x y"]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from tunesmith.serve.chat import load_for_inference

    return load_for_inference(str(tiny_model_dir), device="cpu")


def greedy_alone(model, prompt: list[int], count: int) -> list[int]:
    return list(_token_loop(model, prompt, count, Sampler(model, 0.0, 1.0, None), None, GenerationStats()))


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_rows_joining_and_leaving_a_batch_decode_exactly_as_alone(loaded, shared_prefix):
    """Four prompts of 5 to 60+ tokens: two start together, one joins after 3 steps, one after 8, the shortest
    budget leaves early; every row's greedy tokens equal the single-request loop's, token for token, whether
    the prompts' common opening is prefilled once and copied (shared_prefix) or with each prompt."""
    import torch

    from tunesmith.serve.batch import DecodeBatch

    model, tokenizer, template = loaded
    system = [{"role": "system", "content": "You are a helpful assistant who answers briefly."}]
    prompts = [template.encode_prompt(tokenizer, [*system, {"role": "user", "content": q}]) for q in QUESTIONS]
    budgets = [20, 24, 6, 16]
    expected = [greedy_alone(model, p, n) for p, n in zip(prompts, budgets, strict=True)]
    assert len({len(p) for p in prompts}) == 4
    prefix = next(i for i in range(len(prompts[0])) if len({tuple(p[: i + 1]) for p in prompts}) > 1)
    assert prefix > 10  # the system prompt and the user header
    batch = DecodeBatch(model, prefix=prompts[0][:prefix] if shared_prefix else None)
    got: dict[int, list[int]] = {i: [] for i in range(4)}

    def join(indices: list[int]) -> None:
        logits = batch.add([prompts[i] for i in indices], indices)
        for i, row in zip(indices, logits, strict=True):
            got[i].append(int(torch.argmax(row)))

    with serve_helpers.one_torch_thread():
        join([0, 1])
        for step in range(40):
            if step == 3:
                join([2])
            if step == 8:
                join([3])
            batch.keep([len(got[i]) < budgets[i] for i in batch.rows])
            if not batch.rows:
                break
            for i, row in zip(batch.rows, batch.step([got[i][-1] for i in batch.rows]), strict=True):
                got[i].append(int(torch.argmax(row)))
    assert [got[i] for i in range(4)] == expected
    assert (batch._prefix_cache is not None) == shared_prefix


def ask(i: int) -> list[dict]:
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}]


def test_concurrent_requests_of_different_lengths_and_sampling_match_their_single_answers(live_server):
    """Greedy requests with different prompts and max_tokens, and seeded sampled ones, all at once: each answer
    is the one it gets alone."""
    client = openai.OpenAI(base_url=f"{live_server.base_url}/v1", api_key=live_server.api_key, max_retries=0,
                           timeout=60)
    sampled = {"temperature": 1.0, "top_p": 0.9, "seed": 11}

    def run(i: int) -> str:
        extra = sampled if i % 3 == 2 else {"temperature": 0}
        result = client.chat.completions.create(model="tiny-qwen2", messages=ask(i), max_tokens=4 + 3 * i, **extra)
        return result.choices[0].message.content

    alone_sampled = {i: run(i) for i in range(8) if i % 3 == 2}  # one at a time: nothing else in the batch
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(run, range(8), timeout=120))
    for i, answer in enumerate(answers):
        if i % 3 == 2:
            assert answer == alone_sampled[i], i
        else:
            m = live_server
            assert answer == generate_reply(m.model, m.tokenizer, m.template, ask(i), max_new_tokens=4 + 3 * i), i


@pytest.fixture(scope="module")
def slow_server(loaded):
    """Batch of 2, waiting line of 1, and a model slowed to ≥ 20 ms a step, so requests stay in flight."""
    from tunesmith.serve.app import ServerSettings

    model, tokenizer, template = loaded
    handle = model.register_forward_pre_hook(lambda module, args: time.sleep(0.02))
    settings = ServerSettings(model_id="tiny-qwen2", api_key=serve_helpers.API_KEY, max_tokens_limit=900,
                              max_queue=1, max_batch_size=2, context_length=1024)
    try:
        yield from serve_helpers.serving(model, tokenizer, template, settings)
    finally:
        handle.remove()


def open_stream(server, i: int) -> http.client.HTTPConnection:
    """A streaming request of 900 tokens, read up to its first token (so it is in the batch)."""
    body = {"model": "tiny-qwen2", "messages": ask(i), "max_tokens": 900, "temperature": 0, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(),
                 {"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    while '"content": "' not in (line := response.readline().decode()) or '"content": ""' in line:
        assert line, "the stream ended before any token"
    return conn


def wait_for(server, test, what: str) -> dict:
    deadline = time.monotonic() + 20
    while not test(health := server.health()):
        assert time.monotonic() < deadline, f"{what}: {health}"
        time.sleep(0.02)
    return health


def test_a_full_queue_is_a_503_with_retry_after_and_a_hang_up_frees_the_slot(slow_server):
    server = slow_server
    streams = [open_stream(server, 0), open_stream(server, 1)]  # the batch of 2 is full
    waiting_answer: list[str] = []
    quick = {"model": "tiny-qwen2", "messages": ask(2), "max_tokens": 3, "temperature": 0}
    headers = {"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"}
    waiter = threading.Thread(target=lambda: waiting_answer.append(
        server.request("POST", "/v1/chat/completions", json.dumps(quick).encode(), headers).text))
    try:
        waiter.start()
        before = wait_for(server, lambda h: h["queued"] == 1 and h["running"] == 2, "the third request did not wait")
        full = server.request("POST", "/v1/chat/completions", json.dumps(quick).encode(), headers)
        assert full.status == 503 and full.headers["retry-after"] == "1"
        assert full.json()["error"]["code"] == "server_overloaded"
        streams.pop(0).close()  # a client hangs up: its row leaves, the waiting request takes the slot
        waiter.join(timeout=30)
        assert not waiter.is_alive() and waiting_answer
        answer = json.loads(waiting_answer[0])["choices"][0]["message"]["content"]
        assert answer == generate_reply(server.model, server.tokenizer, server.template, ask(2), max_new_tokens=3)
        assert server.health()["cancelled"] == before["cancelled"] + 1
    finally:
        for conn in streams:
            conn.close()
    wait_for(server, lambda h: h["running"] == 0 and h["queued"] == 0, "the hung-up streams kept generating")
