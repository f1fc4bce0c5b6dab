"""The OpenAI wire format (chat completions and legacy completions): request validation, response / chunk
bodies, error bodies.

Requests are validated strictly (a string where a number belongs is a 400, as OpenAI answers it, not coerced);
fields tunesmith does not use (``user``, ``frequency_penalty``, ``logit_bias``, ...) are accepted and ignored so
existing clients work unchanged.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}`` with a status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


MAX_N = 16  # the most choices one request may ask for (each is its own sequence in the batch)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


_Req = TypeVar("_Req", bound="_Sampling")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """The fields chat and text completions share."""

    model: str | None = None  # picks the base model or an adapter; omitted: the server's first model
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    """``/v1/completions``: the prompt is plain text, continued as is (no chat template)."""

    prompt: str | list[str] = Field(min_length=1)

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def parse_chat_request(raw: bytes) -> ChatRequest:
    """The request body → ChatRequest, or an APIError(400) naming the offending field."""
    return _parse(ChatRequest, raw)


def parse_completion_request(raw: bytes) -> CompletionRequest:
    """The request body → CompletionRequest, or an APIError(400) naming the offending field."""
    return _parse(CompletionRequest, raw)


def _parse(kind: type[_Req], raw: bytes) -> _Req:
    try:
        request = kind.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            raise APIError(400, f"could not parse the JSON body of the request ({first['msg']})") from None
        if not first["loc"]:
            raise APIError(400, "the request body must be a JSON object") from None
        param = ".".join(str(part) for part in first["loc"] if not _is_union_tag(part))
        raise APIError(400, f"{first['msg']} at {param!r}", param=param, code="invalid_value") from None
    if len(request.stop_strings()) > 4:
        raise APIError(400, "at most 4 stop sequences are allowed", param="stop", code="invalid_value")
    return request


def _is_union_tag(part: Any) -> bool:
    # pydantic names the union member it tried in the location ("content.str"); clients know only field names
    return isinstance(part, str) and (part in ("str", "list[TextPart]", "list[str]") or "[" in part)


def new_completion_id(kind: str = "chatcmpl") -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"


def completion_body(
    completion_id: str,
    model: str,
    choices: list[tuple[str, str | None]],
    prompt_tokens: int,
    completion_tokens: int,
    chat: bool = True,
) -> dict[str, Any]:
    """A whole response: ``choices`` are (text, finish_reason) in index order; chat or text completion."""
    return {
        "id": completion_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, **_content(text, chat), "logprobs": None, "finish_reason": reason}
            for i, (text, reason) in enumerate(choices)
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def _content(text: str, chat: bool) -> dict[str, Any]:
    return {"message": {"role": "assistant", "content": text}} if chat else {"text": text}


def chunk_body(
    completion_id: str,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage_info: dict[str, int] | None = None,
    index: int = 0,
    text: str | None = None,
) -> dict[str, Any]:
    """One server-sent chunk: a chat ``delta`` (chat.completion.chunk), or for text completions ``text``
    (``delta`` None); a usage-only chunk has no choices (OpenAI's shape)."""
    chat = delta is not None
    choice = {"index": index, **({"delta": delta} if chat else {"text": text or ""}), "logprobs": None,
              "finish_reason": finish_reason}
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [] if usage_info else [choice],
    }
    if usage_info:
        body["usage"] = usage_info
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
