"""The `serve` subcommand; cli.py adds it with ``add_parsers(sub)``.

The handler imports torch / FastAPI only when it runs, so `tunesmith --help` stays instant.
"""

from __future__ import annotations

import argparse
import os

from tunesmith.errors import TunesmithError

SERVE_HELP = "serve a model over an OpenAI-compatible HTTP API, with a chat page at /"
SERVE_DESCRIPTION = """\
Serve MODEL (+ --adapter) over an OpenAI-compatible API:
  GET  /v1/models, POST /v1/chat/completions (stream: true sends server-sent events), GET /health,
  and a browser chat page at /.
Requests queue for one generation worker, so every client is answered. Point any OpenAI client at
http://HOST:PORT/v1 (e.g. openai.OpenAI(base_url=..., api_key=KEY or "none")).
Binds 127.0.0.1 unless --host says otherwise; with --api-key (or TUNESMITH_API_KEY) every /v1 request needs
'Authorization: Bearer KEY'."""

def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add `serve` to the CLI's subcommands."""
    p = subparsers.add_parser(
        "serve", help=SERVE_HELP, description=SERVE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", help="model folder, .gguf, or packaged alias (e.g. smollm2-135m-instruct)")
    p.add_argument("--adapter", help="LoRA adapter folder to apply, e.g. a run folder or RUN/checkpoint-N")
    p.add_argument("--template", default="auto",
                   help="chat template the model was trained with (default auto: the tokenizer's own)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("TUNESMITH_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $TUNESMITH_API_KEY; unset: no key)")
    p.add_argument("--model-name", help="the model's id in /v1/models (default: the adapter's or model's folder name)")
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
                        help="requests that may wait for the generation worker (default 64; more: 503)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    for flag in ("max_tokens_limit", "default_max_tokens", "max_body_bytes", "max_messages", "max_queue"):
        if getattr(args, flag) < 1:
            raise TunesmithError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise TunesmithError("--threads must be at least 1")
    if not 0 < args.port < 65536:
        raise TunesmithError(f"--port {args.port} is not a TCP port (1-65535)")
    from tunesmith.serve.server import run_server

    return run_server(
        args.model,
        adapter=args.adapter,
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
        },
        access_log=getattr(args, "verbose", False),
    )
