"""API server throughput and latency: requests/s, time to first token, p50 / p99 latency at 1 / 4 / 16 clients.

    python bench/serve.py [--model smollm2-135m-instruct] [--levels 1,4,16] [--requests N] [--max-tokens 32]
                          [--threads N] [--max-batch-size N] [--json]

The server is the real `tunesmith serve` (tunesmith.cli.main) in its own process on 127.0.0.1 and a
free port; the clients are threads of this process using the official `openai` client, streaming, greedy
(temperature 0), each with ``--max-tokens`` and stream usage on. After one warm-up request, each level runs
``--requests`` requests (default: 2 per client, at least 4) with that many clients at once; each client sends
its next request when the previous one ends. Each question is first asked alone; the last column counts the
batched answers equal to it (greedy: batching must not change a token). Per request: time to the first content
chunk (TTFT) and to the end of the stream (latency). Per level: requests/s and generated tokens/s over the level's wall time, and
nearest-rank p50 / p99 (with few requests p99 is the slowest one). The server batches continuously (up to
``--max-batch-size`` sequences decode together, a new request joins at the next step), so requests/s grows with
the number of clients while the time to the first token stays short.

Everything is bounded: requests time out after 300 s, the server is stopped at the end (and on errors).
The machine may be shared; the 1-minute load average before and after is printed: compare quiet runs only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

QUESTIONS = [
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "Write a haiku about the sea.",
    "Who are you?",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: str, port: int, log_path: Path, threads: int | None, batch: int | None) -> subprocess.Popen:
    code = "import sys; from tunesmith.cli import main; sys.exit(main(sys.argv[1:]))"
    log = log_path.open("w")
    extra = ["--threads", str(threads)] if threads else []
    extra += ["--max-batch-size", str(batch)] if batch else []
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", model, "--port", str(port), "--max-queue", "1024", *extra],
        stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 600  # a first run may convert the packaged GGUF into the cache
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                json.load(response)
                return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_server(proc)
                raise SystemExit(f"the server did not start:\n{log_path.read_text()}") from None
            time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def one_request(client, model_id: str, question: str, max_tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    first = None
    tokens = 0
    pieces = []
    stream = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "latency": end - start, "tokens": tokens, "text": "".join(pieces),
            "question": question}


def run_level(
    client, model_id: str, clients: int, requests: int, max_tokens: int, alone: dict[str, str]
) -> dict[str, float]:
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            result = one_request(client, model_id, QUESTIONS[i % len(QUESTIONS)], max_tokens)
            with lock:
                results.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ttft = sorted(r["ttft"] for r in results)
    latency = sorted(r["latency"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "requests_per_s": len(results) / wall,
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "latency_p50_s": percentile(latency, 50),
        "latency_p99_s": percentile(latency, 99),
        "same_as_alone": sum(r["text"] == alone[r["question"]] for r in results),
    }


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q% of the values at or below it."""
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model folder, .gguf or packaged alias")
    parser.add_argument("--levels", default="1,4,16", help="comma list of concurrent clients")
    parser.add_argument("--requests", type=int, default=None, help="requests per level (default 2 per client, ≥ 4)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="the server's --threads (default: torch's)")
    parser.add_argument("--max-batch-size", type=int, default=None, help="the server's --max-batch-size (default 16)")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args(argv)
    import openai  # a dev extra

    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"load average (1 min) before: {os.getloadavg()[0]:.2f}", file=sys.stderr)
        proc = start_server(args.model, port, Path(tmp) / "serve.log", args.threads, args.max_batch_size)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=300,
                                   max_retries=0)
            model_id = client.models.list().data[0].id
            one_request(client, model_id, QUESTIONS[0], args.max_tokens)  # warm-up
            # each question's greedy answer asked alone: batching must not change a single token of it
            alone = {q: one_request(client, model_id, q, args.max_tokens)["text"] for q in QUESTIONS}
            rows = [
                run_level(client, model_id, n, args.requests or max(4, 2 * n), args.max_tokens, alone)
                for n in levels
            ]
        finally:
            stop_server(proc)
        print(f"load average (1 min) after: {os.getloadavg()[0]:.2f}", file=sys.stderr)

    threads = f"{args.threads} thread(s)" if args.threads else "torch's default threads"
    batch = f"max batch {args.max_batch_size or 16}"
    print(f"model {args.model}, max_tokens {args.max_tokens}, greedy, streaming, {threads}, {batch}; "
          "times in seconds")
    print("| clients | requests | req/s | tokens/s | TTFT p50 | TTFT p99 | latency p50 | latency p99 | = alone |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} | {r['latency_p50_s']:.3f} | {r['latency_p99_s']:.3f} | "
              f"{r['same_as_alone']}/{r['requests']} |")
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
