"""Request bodies of the OpenAI-compatible API (pydantic) and its error type and body."""

from __future__ import annotations

import json
from typing import Any, Literal, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_CHAT_MAX_TOKENS = 256  # OpenAI's chat default is "up to the context"; a server default keeps reservations sane
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's legacy completions default


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)


class StreamOptions(BaseModel):
    include_usage: bool = False


class CommonBody(BaseModel):
    """The sampling and streaming fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False  # extension (as vLLM): keep generating past EOS, for benchmarks

    def unsupported(self) -> None:
        if self.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n", code="unsupported_parameter")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported (give 0)", param=name, code="unsupported_parameter")
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias", code="unsupported_parameter")
        stops = self.stop_list()
        if len(stops) > 4:
            raise ApiError(400, "at most 4 stop sequences are allowed", param="stop")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionBody(CommonBody):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.echo:
            raise ApiError(400, "echo is not supported", param="echo", code="unsupported_parameter")
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported", param="best_of", code="unsupported_parameter")
        if self.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix", code="unsupported_parameter")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.type != "text":
                raise ApiError(400, f"message content of type '{p.type}' is not supported (text only)", param="messages")
            parts.append(p.text or "")
        return "".join(parts)


class ChatBody(CommonBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")
        if self.tools:
            raise ApiError(400, "tools are not supported", param="tools", code="unsupported_parameter")


def parse_body(raw: bytes, model_cls: type[CommonBody]) -> CommonBody:
    """Decode and validate a JSON request body, then reject unsupported parameters (ApiError 400)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        body = model_cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        raise ApiError(400, f"invalid parameter {param}: {first.get('msg')}", param=param.split(".")[0] if param else None,
                       code="invalid_value") from None
    body.unsupported()
    return body
