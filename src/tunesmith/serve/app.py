"""The HTTP server: OpenAI-compatible chat completions, model list, health, and the browser chat page at ``/``.

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
from dataclasses import dataclass
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
    usage,
)
from tunesmith.serve.worker import GenerationJob, GenerationWorker, QueueFull

log = get_logger("serve")

_DRAIN_LIMIT = 16 << 20  # an oversize body is read (and dropped) up to this, so the client sees our 413


@dataclass
class ServerSettings:
    model_id: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 2048  # the most a request may ask for with max_tokens
    default_max_tokens: int = 512  # when a request does not say
    max_messages: int = 256
    max_queue: int = 64  # requests waiting for the worker; more are answered 503
    context_length: int | None = None  # prompt + completion tokens the model can take (None: unknown)


def create_app(model: Any, tokenizer: Any, template: Any, settings: ServerSettings) -> FastAPI:
    worker = GenerationWorker(model, tokenizer, template, settings.max_queue)

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
    add_completion_route(app, worker, tokenizer, template, settings)
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
    """The chat page at ``/``, ``/health``, and the model list (one model)."""
    card = {"id": settings.model_id, "object": "model", "created": int(time.time()), "owned_by": "tunesmith"}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        html = (resources.files("tunesmith") / "resources" / "web" / "chat.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": settings.model_id,
            "queued": worker.queued,
            "busy": worker.busy,
            "completed": worker.completed,
            "cancelled": worker.cancelled,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request, settings.api_key)
        return {"object": "list", "data": [dict(card)]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str, request: Request) -> dict[str, Any]:
        authorize(request, settings.api_key)
        if model_id != settings.model_id:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {settings.model_id!r}",
                           param="model", code="model_not_found")
        return dict(card)


def add_completion_route(
    app: FastAPI, worker: GenerationWorker, tokenizer: Any, template: Any, settings: ServerSettings
) -> None:
    """``POST /v1/chat/completions``: validated, queued, then streamed (server-sent events) or answered whole."""

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        authorize(request, settings.api_key)
        chat = parse_chat_request(await read_body(request, settings.max_body_bytes))
        job = make_job(chat, tokenizer, template, settings)
        try:
            worker.submit(job)
        except QueueFull as err:
            raise APIError(503, f"the server is busy ({err}); retry shortly", type="server_error",
                           code="server_overloaded", headers={"Retry-After": "1"}) from None
        completion_id = new_completion_id()
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            events = sse_events(job, completion_id, settings.model_id, include_usage)
            return JobStream(events, job, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text = await collect(job, request)
        return completion_body(completion_id, settings.model_id, text, job.finish_reason,
                               job.stats.prompt_tokens, job.stats.completion_tokens)


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


def make_job(chat: ChatRequest, tokenizer: Any, template: Any, settings: ServerSettings) -> GenerationJob:
    """Validate the request against the server's limits and the template; encode the prompt."""
    messages = to_messages(chat, settings.max_messages)
    try:
        prompt_ids = template.encode_prompt(tokenizer, messages)
    except DataError as err:
        raise APIError(400, str(err), param="messages", code="invalid_value") from None
    asked = chat.max_completion_tokens or chat.max_tokens
    param = "max_completion_tokens" if chat.max_completion_tokens else "max_tokens"
    if asked is not None and asked > settings.max_tokens_limit:
        raise APIError(400, f"{param} is {asked}, but this server allows at most {settings.max_tokens_limit}",
                       param=param, code="invalid_value")
    max_new = asked or settings.default_max_tokens
    room = settings.context_length - len(prompt_ids) if settings.context_length else None
    if room is not None and room <= 0:
        raise APIError(400, f"the messages take {len(prompt_ids)} tokens; the model's context is "
                       f"{settings.context_length}", param="messages", code="context_length_exceeded")
    if room is not None and max_new > room:
        if asked is not None:
            raise APIError(400, f"the messages take {len(prompt_ids)} tokens and {param} is {asked}: more than "
                           f"the model's context of {settings.context_length}", param=param,
                           code="context_length_exceeded")
        max_new = room  # the default just fills what is left
    temperature = 1.0 if chat.temperature is None else chat.temperature
    top_p = 1.0 if chat.top_p is None else chat.top_p
    if top_p == 0.0:
        temperature = 0.0  # the smallest nucleus is the single likeliest token
    return GenerationJob(prompt_ids, max_new, temperature, top_p, chat.seed, chat.stop_strings())


async def collect(job: GenerationJob, request: Request) -> str:
    """The whole reply; stops the job if the client disconnects while waiting."""
    pieces = []
    while True:
        try:
            kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancel.set()
            continue
        if kind == "text":
            pieces.append(value)
        elif kind == "error":
            raise APIError(500, f"generation failed ({type(value).__name__}: {value})", type="server_error")
        else:
            job.finish_reason = value
            return "".join(pieces)


async def sse_events(job: GenerationJob, completion_id: str, model_id: str, include_usage: bool) -> AsyncIterator[str]:
    def event(body: dict[str, Any]) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield event(chunk_body(completion_id, model_id, {"role": "assistant", "content": ""}))
    while True:
        kind, value = await job.events.get()
        if kind == "text":
            yield event(chunk_body(completion_id, model_id, {"content": value}))
        elif kind == "error":
            # Headers are sent already: OpenAI reports a mid-stream failure as an error event.
            yield event(APIError(500, f"generation failed ({type(value).__name__})", type="server_error").body())
            return
        else:
            yield event(chunk_body(completion_id, model_id, {}, finish_reason=value))
            if include_usage:
                yield event(chunk_body(completion_id, model_id, {},
                                       usage_info=usage(job.stats.prompt_tokens, job.stats.completion_tokens)))
            yield "data: [DONE]\n\n"
            return


class JobStream(StreamingResponse):
    """A streamed reply that stops its generation however the response ends: finished, or the client gone
    (Starlette cancels the response when it sees the disconnect)."""

    def __init__(self, content: AsyncIterator[str], job: GenerationJob, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel.set()
