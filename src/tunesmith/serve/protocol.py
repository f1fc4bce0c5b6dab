"""The OpenAI chat-completions wire format: request validation, response / chunk bodies, error bodies.

Requests are validated strictly (a string where a number belongs is a 400, as OpenAI answers it, not coerced);
fields tunesmith does not use (``user``, ``frequency_penalty``, ``logit_bias``, ...) are accepted and ignored so
existing clients work unchanged.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

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


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


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


class ChatRequest(_Strict):
    model: str | None = None  # one model per server: any name is answered by it (as llama.cpp's server does)
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


def parse_chat_request(raw: bytes) -> ChatRequest:
    """The request body → ChatRequest, or an APIError(400) naming the offending field."""
    try:
        request = ChatRequest.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            raise APIError(400, f"could not parse the JSON body of the request ({first['msg']})") from None
        if not first["loc"]:
            raise APIError(400, "the request body must be a JSON object") from None
        param = ".".join(str(part) for part in first["loc"] if not _is_union_tag(part))
        raise APIError(400, f"{first['msg']} at {param!r}", param=param, code="invalid_value") from None
    if request.n != 1:
        raise APIError(400, "only n=1 is supported", param="n", code="invalid_value")
    if len(request.stop_strings()) > 4:
        raise APIError(400, "at most 4 stop sequences are allowed", param="stop", code="invalid_value")
    return request


def _is_union_tag(part: Any) -> bool:
    # pydantic names the union member it tried in the location ("content.str"); clients know only field names
    return isinstance(part, str) and (part in ("str", "list[TextPart]", "list[str]") or "[" in part)


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion_body(
    completion_id: str, model: str, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(
    completion_id: str,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    usage_info: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One server-sent ``chat.completion.chunk``; a usage-only chunk has no choices (OpenAI's shape)."""
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [] if usage_info else [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        ],
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
