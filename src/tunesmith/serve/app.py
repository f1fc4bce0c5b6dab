"""The HTTP server: OpenAI-compatible chat and text completions, model list, health, and the chat page at ``/``.

A request's ``model`` picks the base model or one of the adapters (vLLM's multi-LoRA convention: the adapter's
name is its model id); ``n`` choices are ``n`` sequences in the running batch (tunesmith.serve.worker).

Every error is answered in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``) with its 4xx /
5xx status — unknown routes, wrong methods and crashes included — and never stops the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.errors import DataError
from tunesmith.logging import get_logger
from tunesmith.serve.protocol import (
    APIError,
    ChatRequest,
    chunk_body,
    completion_body,
    new_completion_id,
    parse_chat_request,
    parse_completion_request,
    usage,
)
from tunesmith.serve.worker import GenerationJob, GenerationWorker, QueueFull

log = get_logger("serve")

_DRAIN_LIMIT = 16 << 20  # an oversize body is read (and dropped) up to this, so the client sees our 413


@dataclass
class ServerSettings:
    model_id: str  # the default model: what a request without ``model`` gets
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 2048  # the most a request may ask for with max_tokens
    default_max_tokens: int = 512  # when a request does not say
    max_messages: int = 256
    max_queue: int = 64  # requests waiting for a batch slot; more are answered 503
    max_batch_size: int = 16  # sequences generating together (a request with n choices takes n)
    context_length: int | None = None  # prompt + completion tokens the model can take (None: unknown)
    # model id → PEFT adapter name (None: the base model without adapter); empty: {model_id: None}
    models: dict[str, str | None] = field(default_factory=dict)

    def served(self) -> dict[str, str | None]:
        return self.models or {self.model_id: None}


def create_app(model: Any, tokenizer: Any, template: Any, settings: ServerSettings) -> FastAPI:
    worker = GenerationWorker(model, tokenizer, template, settings.max_queue, settings.max_batch_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await worker.start()
        yield
        await worker.stop()

    app = FastAPI(title="tunesmith", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.state.settings = settings
    add_error_handlers(app)
    add_info_routes(app, worker, settings)
    add_completion_routes(app, worker, tokenizer, template, settings)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours (APIError), Starlette's (unknown route, wrong method), crashes."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if err.status_code == 404 else None
        message = f"{request.method} {request.url.path}: {err.detail}"
        return JSONResponse(
            APIError(err.status_code, message, code=kind).body(), status_code=err.status_code, headers=err.headers
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception) -> JSONResponse:
        # Starlette re-raises the error after this response is sent, so uvicorn still logs its traceback.
        body = APIError(500, f"internal server error ({type(err).__name__})", type="server_error").body()
        return JSONResponse(body, status_code=500)


def authorize(request: Request, api_key: str | None) -> None:
    """A 401 unless the request carries ``Authorization: Bearer <api_key>`` (no key set: every request passes)."""
    if not api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "an API key is required: send the header 'Authorization: Bearer KEY'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "incorrect API key provided", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def add_info_routes(app: FastAPI, worker: GenerationWorker, settings: ServerSettings) -> None:
    """The chat page at ``/``, ``/health``, and the model list (the base model and every adapter)."""
    created = int(time.time())

    def card(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "tunesmith"}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        html = (resources.files("tunesmith") / "resources" / "web" / "chat.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": settings.model_id,
            "models": list(settings.served()),
            "queued": worker.queued,
            "running": worker.running,
            "max_batch_size": worker.max_batch_size,
            "busy": worker.busy,
            "completed": worker.completed,
            "cancelled": worker.cancelled,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request, settings.api_key)
        return {"object": "list", "data": [card(model_id) for model_id in settings.served()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str, request: Request) -> dict[str, Any]:
        authorize(request, settings.api_key)
        return card(resolve_model(model_id, settings)[0])


def resolve_model(name: str | None, settings: ServerSettings) -> tuple[str, str | None]:
    """(model id, PEFT adapter name) for a request's ``model``; omitted: the default model; unknown: a 404."""
    served = settings.served()
    if name is None:
        return settings.model_id, served.get(settings.model_id)
    if name not in served:
        raise APIError(404, f"the model {name!r} does not exist; this server serves "
                       f"{', '.join(repr(m) for m in served)}", param="model", code="model_not_found")
    return name, served[name]


def add_completion_routes(
    app: FastAPI, worker: GenerationWorker, tokenizer: Any, template: Any, settings: ServerSettings
) -> None:
    """``POST /v1/chat/completions`` and ``/v1/completions``: validated, queued (every choice its own sequence),
    then streamed (server-sent events) or answered whole."""
    text_stops = set(template.stop_token_ids(tokenizer)) | (
        {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()
    )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        authorize(request, settings.api_key)
        chat = parse_chat_request(await read_body(request, settings.max_body_bytes))
        model_id, adapter = resolve_model(chat.model, settings)
        prompt = encode_chat(chat, tokenizer, template, settings)
        jobs = make_jobs(chat, [prompt], adapter, None, settings)
        return await respond(request, worker, jobs, chat, model_id, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        authorize(request, settings.api_key)
        body = parse_completion_request(await read_body(request, settings.max_body_bytes))
        model_id, adapter = resolve_model(body.model, settings)
        prompts = [tokenizer.encode(text, add_special_tokens=True) for text in body.prompts()]
        if not all(prompts):
            raise APIError(400, "an empty prompt has nothing to continue", param="prompt", code="invalid_value")
        jobs = make_jobs(body, prompts, adapter, text_stops, settings)
        return await respond(request, worker, jobs, body, model_id, chat=False)


async def respond(
    request: Request, worker: GenerationWorker, jobs: list[GenerationJob], body: Any, model_id: str, chat: bool
) -> Any:
    try:
        worker.submit_all(jobs)
    except QueueFull as err:
        raise APIError(503, f"the server is busy ({err}); retry shortly", type="server_error",
                       code="server_overloaded", headers={"Retry-After": "1"}) from None
    completion_id = new_completion_id("chatcmpl" if chat else "cmpl")
    prompt_tokens = sum(len(job.prompt_ids) for job in jobs[:: body.n])  # each prompt once, not once per choice
    if body.stream:
        events = sse_events(jobs, completion_id, model_id, chat, body.include_usage(), prompt_tokens)
        return JobStream(events, jobs, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    texts = await collect(jobs, request)
    choices = [(text, job.finish_reason) for text, job in zip(texts, jobs, strict=True)]
    completion_tokens = sum(job.stats.completion_tokens for job in jobs)
    return completion_body(completion_id, model_id, choices, prompt_tokens, completion_tokens, chat=chat)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 when it is larger than ``limit`` bytes (checked while reading, so a body
    without Content-Length cannot slip past)."""
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                       code="request_too_large")
    if declared and declared.isdigit() and int(declared) > _DRAIN_LIMIT:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > _DRAIN_LIMIT:
            break
    if size > limit:
        raise too_big
    return b"".join(chunks)


def to_messages(chat: ChatRequest, max_messages: int) -> list[dict[str, str]]:
    if len(chat.messages) > max_messages:
        raise APIError(400, f"{len(chat.messages)} messages; this server accepts at most {max_messages}",
                       param="messages", code="invalid_value")
    messages = []
    for i, message in enumerate(chat.messages):
        role = "system" if message.role == "developer" else message.role
        if role == "system" and i > 0:
            raise APIError(400, "a system message may only come first", param=f"messages.{i}.role")
        messages.append({"role": role, "content": message.text()})
    return messages


def encode_chat(chat: ChatRequest, tokenizer: Any, template: Any, settings: ServerSettings) -> list[int]:
    messages = to_messages(chat, settings.max_messages)
    try:
        return template.encode_prompt(tokenizer, messages)
    except DataError as err:
        raise APIError(400, str(err), param="messages", code="invalid_value") from None


def make_jobs(
    body: Any, prompts: list[list[int]], adapter: str | None, stop_ids: set[int] | None, settings: ServerSettings
) -> list[GenerationJob]:
    """``n`` jobs per prompt, checked against the server's limits; choice j's seed is ``seed + j``, so the choices
    of a seeded request differ from each other and repeat across requests."""
    if len(prompts) * body.n > min(settings.max_queue, settings.max_batch_size * 4):
        raise APIError(400, f"{len(prompts)} prompt(s) × n={body.n} choices is more than this server takes in "
                       "one request", param="n", code="invalid_value")
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if top_p == 0.0:
        temperature = 0.0  # the smallest nucleus is the single likeliest token
    jobs = []
    for prompt in prompts:
        max_new = token_budget(body, len(prompt), settings)
        for j in range(body.n):
            seed = None if body.seed is None else body.seed + j
            jobs.append(GenerationJob(prompt, max_new, temperature, top_p, seed, body.stop_strings(), adapter,
                                      stop_ids))
    return jobs


def token_budget(body: Any, prompt_tokens: int, settings: ServerSettings) -> int:
    """max_new_tokens for one prompt: the request's max_tokens within the server's limit and the context."""
    asked = body.max_completion_tokens or body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    if asked is not None and asked > settings.max_tokens_limit:
        raise APIError(400, f"{param} is {asked}, but this server allows at most {settings.max_tokens_limit}",
                       param=param, code="invalid_value")
    max_new = asked or settings.default_max_tokens
    room = settings.context_length - prompt_tokens if settings.context_length else None
    if room is not None and room <= 0:
        raise APIError(400, f"the prompt takes {prompt_tokens} tokens; the model's context is "
                       f"{settings.context_length}", param="messages", code="context_length_exceeded")
    if room is not None and max_new > room:
        if asked is not None:
            raise APIError(400, f"the prompt takes {prompt_tokens} tokens and {param} is {asked}: more than "
                           f"the model's context of {settings.context_length}", param=param,
                           code="context_length_exceeded")
        max_new = room  # the default just fills what is left
    return max_new


async def merged_events(jobs: list[GenerationJob], tick: float | None = None) -> AsyncIterator[tuple[int, str, Any]]:
    """(choice index, kind, value) from every job, each job's in order, until all are done; with ``tick``,
    (-1, "tick", None) whenever nothing came for that many seconds."""
    waiting = {asyncio.ensure_future(job.events.get()): i for i, job in enumerate(jobs)}
    try:
        while waiting:
            done, _ = await asyncio.wait(waiting, timeout=tick, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                yield -1, "tick", None
            for future in sorted(done, key=waiting.__getitem__):
                i = waiting.pop(future)
                kind, value = future.result()
                if kind == "text":
                    waiting[asyncio.ensure_future(jobs[i].events.get())] = i
                yield i, kind, value
    finally:
        for future in waiting:
            future.cancel()


async def collect(jobs: list[GenerationJob], request: Request) -> list[str]:
    """Every choice's whole text; stops the jobs if the client disconnects while waiting."""
    pieces: list[list[str]] = [[] for _ in jobs]
    async for i, kind, value in merged_events(jobs, tick=0.5):
        if kind == "tick":
            if await request.is_disconnected():
                for job in jobs:
                    job.cancel.set()
        elif kind == "text":
            pieces[i].append(value)
        elif kind == "error":
            for job in jobs:
                job.cancel.set()
            raise APIError(500, f"generation failed ({type(value).__name__}: {value})", type="server_error")
        else:
            jobs[i].finish_reason = value
    return ["".join(p) for p in pieces]


async def sse_events(
    jobs: list[GenerationJob], completion_id: str, model_id: str, chat: bool, include_usage: bool, prompt_tokens: int
) -> AsyncIterator[str]:
    def event(body: dict[str, Any]) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def chunk(index: int, content: str | None, finish_reason: str | None = None) -> str:
        if chat:
            delta = {} if content is None else {"content": content}
            return event(chunk_body(completion_id, model_id, delta, finish_reason, index=index))
        return event(chunk_body(completion_id, model_id, None, finish_reason, index=index, text=content))

    if chat:
        for i in range(len(jobs)):
            yield event(chunk_body(completion_id, model_id, {"role": "assistant", "content": ""}, index=i))
    async for i, kind, value in merged_events(jobs):
        if kind == "text":
            yield chunk(i, value)
        elif kind == "error":
            # Headers are sent already: OpenAI reports a mid-stream failure as an error event.
            yield event(APIError(500, f"generation failed ({type(value).__name__})", type="server_error").body())
            return
        else:
            yield chunk(i, None, value)
    if include_usage:
        completion_tokens = sum(job.stats.completion_tokens for job in jobs)
        yield event(chunk_body(completion_id, model_id, {}, usage_info=usage(prompt_tokens, completion_tokens)))
    yield "data: [DONE]\n\n"


class JobStream(StreamingResponse):
    """A streamed reply that stops its generation however the response ends: finished, or the client gone
    (Starlette cancels the response when it sees the disconnect)."""

    def __init__(self, content: AsyncIterator[str], jobs: list[GenerationJob], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.jobs = jobs

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for job in self.jobs:
                job.cancel.set()
