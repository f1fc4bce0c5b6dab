"""The `serve` subcommand; cli.py adds it with ``add_parsers(sub)``.

The handler imports torch / FastAPI only when it runs, so `tunesmith --help` stays instant.
"""

from __future__ import annotations

import argparse
import os

from tunesmith.errors import TunesmithError

SERVE_HELP = "serve a model over an OpenAI-compatible HTTP API, with a chat page at /"
SERVE_DESCRIPTION = """\
Serve MODEL (+ adapters) over an OpenAI-compatible API:
  GET  /v1/models, POST /v1/chat/completions and /v1/completions (stream: true sends server-sent events;
  n choices; usage in every answer, and in the stream with stream_options.include_usage), GET /health,
  and a browser chat page at /.
Requests are batched continuously: one that arrives while others generate joins the next decoding step
(up to --max-batch-size sequences), a finished one leaves; each keeps its own temperature, top_p, seed,
stop and max_tokens. Point any OpenAI client at http://HOST:PORT/v1 (openai.OpenAI(base_url=..., api_key=KEY
or "none")).
Several adapters on one base (one copy of the base in memory; a request's "model" picks one, the base's id
the base without adapter, as vLLM's multi-LoRA serving does):
  tunesmith serve BASE --adapter support=runs/support --adapter sql=runs/sql
A single --adapter PATH (no NAME=) serves that adapter alone, under its folder name.
--backend vllm runs the equivalent vLLM server instead (Linux + CUDA, pip install vllm):
  vllm serve BASE --host HOST --port PORT --max-num-seqs MAX_BATCH_SIZE --served-model-name BASE_ID
       [--api-key KEY] [--enable-lora --max-loras N --max-lora-rank R --lora-modules NAME=PATH ...]
Binds 127.0.0.1 unless --host says otherwise; with --api-key (or TUNESMITH_API_KEY) every /v1 request needs
'Authorization: Bearer KEY'."""

def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add `serve` to the CLI's subcommands."""
    p = subparsers.add_parser(
        "serve", help=SERVE_HELP, description=SERVE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", help="model folder, .gguf, or packaged alias (e.g. smollm2-135m-instruct)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="adapter folder (a run folder or RUN/checkpoint-N); NAME=PATH serves it as model NAME beside "
                   "the base; repeat for several adapters on one base")
    p.add_argument("--template", default="auto",
                   help="chat template the model was trained with (default auto: the tokenizer's own)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("TUNESMITH_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $TUNESMITH_API_KEY; unset: no key)")
    p.add_argument("--model-name", help="the model's id in /v1/models (default: the adapter's or model's folder name)")
    p.add_argument("--backend", choices=("tunesmith", "vllm"), default="tunesmith",
                   help="tunesmith (default: this process, CPU or GPU) or vllm (runs `vllm serve` with the same "
                   "model, adapters, address, key and batch size; needs vllm installed)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then NPU, then CPU) or a torch device")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for generation (torch.set_num_threads; default: torch's, one per core). "
                   "On a machine busy with other work, fewer threads than cores is often much faster")
    limits = p.add_argument_group("limits (a request over one gets a 4xx error)")
    limits.add_argument("--max-tokens-limit", type=int, default=2048, metavar="N",
                        help="largest max_tokens a request may ask for (default 2048)")
    limits.add_argument("--default-max-tokens", type=int, default=512, metavar="N",
                        help="max_tokens when a request does not say (default 512)")
    limits.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                        help="largest request body (default 1 MiB; larger: 413)")
    limits.add_argument("--max-messages", type=int, default=256, metavar="N",
                        help="most messages in one request (default 256)")
    limits.add_argument("--max-queue", type=int, default=64, metavar="N",
                        help="requests that may wait for a batch slot (default 64; more: 503 with Retry-After)")
    limits.add_argument("--max-batch-size", type=int, default=16, metavar="N",
                        help="sequences generated together (default 16; a request with n choices takes n)")
    p.set_defaults(func=_cmd_serve)


def parse_adapters(values: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """--adapter values → (the single unnamed adapter, or None; (name, path) pairs). One PATH alone keeps the old
    meaning (that adapter, served alone); NAME=PATH, or several, serve each beside the base (an unnamed one in a
    list is named after its folder)."""
    from tunesmith.serve.server import default_model_id

    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if sep and name and "/" not in name and os.sep not in name and not os.path.exists(value):
            if not path:
                raise TunesmithError(f"--adapter {value!r} names no folder: write NAME=PATH "
                                     "(e.g. --adapter support=runs/support)")
            pairs.append((name, path, True))
        else:
            pairs.append((default_model_id(value), value, False))
    if len(pairs) == 1 and not pairs[0][2]:
        return values[0], []
    names = [name for name, _, _ in pairs]
    if len(set(names)) != len(names):
        raise TunesmithError(f"--adapter: the names {names} repeat; give each adapter its own NAME=PATH")
    return None, [(name, path) for name, path, _ in pairs]


def _cmd_serve(args: argparse.Namespace) -> int:
    for flag in ("max_tokens_limit", "default_max_tokens", "max_body_bytes", "max_messages", "max_queue",
                 "max_batch_size"):
        if getattr(args, flag) < 1:
            raise TunesmithError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise TunesmithError("--threads must be at least 1")
    if not 0 < args.port < 65536:
        raise TunesmithError(f"--port {args.port} is not a TCP port (1-65535)")
    single, adapters = parse_adapters(args.adapter)
    if args.backend == "vllm":
        from tunesmith.serve.server import default_model_id, run_vllm, vllm_command

        if args.template != "auto":
            raise TunesmithError("--backend vllm uses the tokenizer's own chat template; drop --template, or serve "
                                 "with the default backend")
        everything = adapters or ([(default_model_id(single), single)] if single else [])
        return run_vllm(vllm_command(args.model, everything, host=args.host, port=args.port, api_key=args.api_key,
                                     model_id=args.model_name, max_batch_size=args.max_batch_size))
    from tunesmith.serve.server import run_server

    return run_server(
        args.model,
        adapter=single,
        adapters=adapters,
        template=args.template,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        model_id=args.model_name,
        device=args.device,
        threads=args.threads,
        limits={
            "max_tokens_limit": args.max_tokens_limit,
            "default_max_tokens": min(args.default_max_tokens, args.max_tokens_limit),
            "max_body_bytes": args.max_body_bytes,
            "max_messages": args.max_messages,
            "max_queue": args.max_queue,
            "max_batch_size": args.max_batch_size,
        },
        access_log=getattr(args, "verbose", False),
    )
