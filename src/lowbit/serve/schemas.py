"""Request bodies of the OpenAI-compatible API (pydantic, strict types as OpenAI's API) and its error type and body.

Types are strict: ``"max_tokens": "8"``, ``"prompt": [true]`` or ``"include_usage": "yes"`` are 400s, not
coerced; an integer is accepted where a number is expected. ``null`` means "the default" for every optional
field, as in OpenAI's API. Unknown fields are ignored. Text that goes to the tokenizer must be valid
Unicode: a lone UTF-16 surrogate (``"\\ud800"``, valid JSON) is a 400 that names its position.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_CHAT_MAX_TOKENS = 256  # OpenAI's chat default is "up to the context"; a server default keeps reservations sane
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's legacy completions default
MAX_STOP = 4

# what a field accepts, for the fields whose type is a union (pydantic's own message names only one member)
EXPECTED = {
    "prompt": "a string, a list of token ids (integers), or a one-element list of either",
    "stop": f"a string or a list of up to {MAX_STOP} strings",
    "messages": "a non-empty list of {role, content} objects",
    "content": "a string or a list of {type: 'text', text} parts",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


class ErrorJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote client input, which may hold lone surrogates."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: ApiError) -> JSONResponse:
    return ErrorJSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                             headers=exc.headers)


def check_text(text: str, where: str, param: str) -> None:
    """400 when `text` is not valid Unicode (a lone surrogate), naming the character position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ord(text[exc.start])
        raise ApiError(400, f"{where} contains a lone UTF-16 surrogate U+{bad:04X} at character {exc.start}: text must "
                            "be valid Unicode (surrogates only in escaped pairs)", param=param, code="invalid_value") from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class CommonBody(_Strict):
    """The sampling and streaming fields shared by completions and chat completions (``None``: the default)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool | None = None  # extension (as vLLM): keep generating past EOS, for benchmarks

    def check(self) -> None:
        """400 for what the types allow but the server does not support."""
        if self.n not in (None, 1):
            raise ApiError(400, "only n=1 is supported", param="n", code="unsupported_parameter")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported (give 0)", param=name, code="unsupported_parameter")
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias", code="unsupported_parameter")
        stops = self.stop_list()
        if len(stops) > MAX_STOP:
            raise ApiError(400, f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}", param="stop",
                           code="invalid_value")
        for i, s in enumerate(stops):
            check_text(s, f"stop[{i}]", "stop")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling(self) -> dict:
        """The sampling fields with OpenAI's defaults filled in."""
        return {"temperature": 1.0 if self.temperature is None else self.temperature,
                "top_p": 1.0 if self.top_p is None else self.top_p,
                "stop": self.stop_list(), "seed": self.seed, "ignore_eos": bool(self.ignore_eos)}

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionBody(CommonBody):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        if self.echo:
            raise ApiError(400, "echo is not supported", param="echo", code="unsupported_parameter")
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported", param="best_of", code="unsupported_parameter")
        if self.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix", code="unsupported_parameter")
        texts = [self.prompt] if isinstance(self.prompt, str) else [p for p in self.prompt if isinstance(p, str)]
        for i, text in enumerate(texts):
            check_text(text, "prompt" if isinstance(self.prompt, str) else f"prompt[{i}]", "prompt")


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
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
                raise ApiError(400, f"message content of type '{p.type}' is not supported (text only)", param="messages",
                               code="unsupported_parameter")
            parts.append(p.text or "")
        return "".join(parts)


class ChatBody(CommonBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None

    def check(self) -> None:
        super().check()
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")
        if self.tools:
            raise ApiError(400, "tools are not supported", param="tools", code="unsupported_parameter")
        for i, m in enumerate(self.messages):
            check_text(m.text(), f"messages[{i}].content", "messages")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number (JSON has no NaN or Infinity)")


def _is_tag(p) -> bool:
    """A union member's tag in a pydantic error location ('str', 'list[int]', ...), not a field name."""
    return isinstance(p, str) and (p in ("str", "int", "float", "bool") or "[" in p)


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """The most specific error (the deepest location) as a message naming the parameter, and its top-level name."""
    first = max(exc.errors(), key=lambda e: len([p for p in e.get("loc", ()) if not _is_tag(p)]))
    raw = list(first.get("loc", ()))
    tag = next((k for k, p in enumerate(raw) if _is_tag(p)), None)
    union = tag is not None and not any(isinstance(p, str) for p in raw[tag + 1 :])  # no member matched at all
    loc = [p for p in (raw[:tag] if union else raw) if not _is_tag(p)]
    param = str(loc[0]) if loc else None
    path = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
    got = type(first.get("input")).__name__
    got = {"NoneType": "null", "dict": "object", "list": "array", "str": "string", "bool": "boolean"}.get(got, got)
    if first.get("type") == "missing":
        return f"missing required parameter '{path}'", param
    if union:
        shown = f", got {got}" if len(raw) == tag + 1 else ""
        return f"invalid type for '{path}': expected {EXPECTED.get(str(loc[-1]), 'another type')}{shown}", param
    return f"invalid value for '{path}': {first.get('msg')} (got {got})", param


def parse_body(raw: bytes, model_cls: type[CommonBody]) -> CommonBody:
    """Decode and validate a JSON request body, then reject unsupported parameters (ApiError 400)."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        body = model_cls.model_validate(data)
    except ValidationError as exc:
        message, param = _validation_message(exc)
        raise ApiError(400, message, param=param, code="invalid_value") from None
    body.check()
    return body
