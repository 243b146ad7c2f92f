"""The OpenAI-compatible HTTP API over an :class:`~lowbit.serve.engine.Engine` (FastAPI).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true``
server-sent events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` and
``GET /metrics`` (Prometheus text). Errors use OpenAI's body
``{"error": {"message", "type", "param", "code"}}``. With an API key set, every endpoint but
``/health`` wants ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal, Union

import anyio
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lowbit.serve.engine import MB, Engine, EngineError, Request
from lowbit.serve.sampling import SamplingParams

DEFAULT_CHAT_MAX_TOKENS = 256  # OpenAI's chat default is "up to the context"; a server default keeps reservations sane
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's legacy completions default
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)


# ---------------------------------------------------------------------- request bodies
class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
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


class CompletionBody(_Common):
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


class ChatBody(_Common):
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


# ---------------------------------------------------------------------- engine <-> asyncio
class _Bridge:
    """The sink of one request: the engine thread puts events, the handler awaits them."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def __call__(self, event: dict) -> None:  # engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server stopped)
            pass

    async def get(self) -> dict:
        return await self.queue.get()


class _SSEResponse(StreamingResponse):
    """Server-sent events that also watch for the client going away, whatever the ASGI version; on any
    exit before the request finished (disconnect, cancellation), the request is cancelled."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def run() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(run)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self.on_close()


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------- the app
class _Gate:
    """ASGI middleware: API-key check (all but /health) and request counting by endpoint and status."""

    def __init__(self, app, api_key: str | None, metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        counted = path.startswith("/v1/")

        async def counting_send(message):
            if counted and message["type"] == "http.response.start":
                self.metrics.inc("requests_total", endpoint=endpoint, status=str(message["status"]))
            await send(message)

        if self.api_key and path != "/health":
            auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                msg = "missing API key: send 'Authorization: Bearer <key>'" if not auth else "incorrect API key provided"
                response = JSONResponse(error_body(msg, "invalid_request_error", None, "invalid_api_key"), status_code=401)
                return await response(scope, receive, counting_send)
        return await self.app(scope, receive, counting_send)


def create_app(engine: Engine, api_key: str | None = None, drain_timeout: float = 60.0) -> FastAPI:
    """The FastAPI app; it starts the engine on startup and drains it on shutdown."""

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown, True, drain_timeout)

    app = FastAPI(title="lowbit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    metrics = engine.metrics
    tok = engine.tokenizer
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind, None, None), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {exc!r}", "server_error", None, "internal_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok" if engine.alive else "starting", "model": engine.model_name, "kv": engine.kv, **engine.stats()}

    @app.get("/metrics")
    async def metrics_endpoint():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{
                "id": engine.model_name, "object": "model", "created": created, "owned_by": "lowbit",
                "kv": engine.kv, "max_model_len": engine.max_context, "kv_budget_mb": engine.budget / MB,
                "kv_bytes_per_token_at_4k": engine.sizer.bytes_per_token(min(4096, engine.max_context)),
            }],
        }

    async def _body(request: HTTPRequest, model_cls):
        raw = await request.body()
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
        if body.model is not None and body.model != engine.model_name:
            raise ApiError(404, f"the model '{body.model}' does not exist: this server serves '{engine.model_name}'",
                           param="model", code="model_not_found")
        return body

    def _check_context(n_prompt: int, max_tokens: int | None) -> None:
        limit = engine.max_context
        if n_prompt >= limit or (max_tokens is not None and n_prompt + max_tokens > limit):
            asked = n_prompt + (max_tokens or 0)
            raise ApiError(400, f"this model's maximum context length is {limit} tokens, but you requested {asked} "
                                f"tokens ({n_prompt} in the prompt, {max_tokens or 0} for the completion)",
                           param="messages" if max_tokens is None else "max_tokens", code="context_length_exceeded")

    def _params(body: _Common, n_prompt: int, max_tokens: int | None, default: int) -> SamplingParams:
        _check_context(n_prompt, max_tokens)
        if max_tokens is None:
            max_tokens = max(1, min(default, engine.max_context - n_prompt))
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              stop=body.stop_list(), seed=body.seed, ignore_eos=body.ignore_eos)

    def _submit(ids: list[int], params: SamplingParams, bridge: _Bridge) -> Request:
        req = Request(ids, params, sink=bridge)
        try:
            engine.submit(req)
        except EngineError as exc:
            raise ApiError(exc.status, str(exc), exc.type, None, exc.code) from None
        return req

    async def _collect(request: HTTPRequest, req: Request, bridge: _Bridge) -> dict:
        parts = []
        loop = asyncio.get_running_loop()
        next_check = loop.time() + 0.25
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(bridge.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    ev = None
                # checked by the clock, not only when idle: tokens may arrive faster than the poll interval
                if loop.time() >= next_check:
                    next_check = loop.time() + 0.25
                    if await request.is_disconnected():
                        req.cancel()
                        raise ApiError(499, "client disconnected", code="client_closed_request") from None
                if ev is None:
                    continue
                if ev["type"] == "delta":
                    parts.append(ev["text"])
                elif ev["type"] == "error":
                    status = 503 if ev.get("code") == "shutting_down" else 500
                    raise ApiError(status, ev["message"], "server_error", None, ev.get("code"))
                else:
                    ev["text"] = "".join(parts)
                    return ev
        finally:
            if not req.done.is_set():
                req.cancel()

    def _usage(ev: dict) -> dict:
        return {"prompt_tokens": ev["prompt_tokens"], "completion_tokens": ev["completion_tokens"],
                "total_tokens": ev["prompt_tokens"] + ev["completion_tokens"]}

    def _finish_reason(reason: str) -> str:
        return reason if reason in ("stop", "length") else "stop"

    async def _stream(req: Request, bridge: _Bridge, chunk, include_usage: bool, first: dict | None):
        if first is not None:
            yield _sse(first)
        while True:
            ev = await bridge.get()
            if ev["type"] == "delta":
                yield _sse(chunk(ev["text"], None))
            elif ev["type"] == "error":
                yield _sse(error_body(ev["message"], "server_error", None, ev.get("code")))
                yield _sse("[DONE]")
                return
            else:
                yield _sse(chunk(None, _finish_reason(ev["finish_reason"])))
                if include_usage:
                    final = chunk(None, None)
                    final["choices"] = []
                    final["usage"] = _usage(ev)
                    yield _sse(final)
                yield _sse("[DONE]")
                return

    async def _tokenize_prompt(body: CompletionBody) -> list[int]:
        p = body.prompt
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, str):
            if not p:
                raise ApiError(400, "the prompt is empty", param="prompt")
            ids = await asyncio.to_thread(lambda: tok(p).input_ids)
            return list(ids)
        if isinstance(p, list) and all(isinstance(t, int) for t in p):
            if not p:
                raise ApiError(400, "the prompt is empty", param="prompt")
            vocab = len(tok)
            if any(t < 0 or t >= vocab for t in p):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            return list(p)
        raise ApiError(400, "only one prompt per request is supported (a string or a list of token ids)",
                       param="prompt", code="unsupported_parameter")

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await _body(request, CompletionBody)
        ids = await _tokenize_prompt(body)
        params = _params(body, len(ids), body.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS)
        bridge = _Bridge(asyncio.get_running_loop())
        req = _submit(ids, params, bridge)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text, finish):
            return {"id": rid, "object": "text_completion", "created": now, "model": engine.model_name,
                    "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return _SSEResponse(_stream(req, bridge, chunk, include, None), on_close=req.cancel)
        ev = await _collect(request, req, bridge)
        out = chunk(ev["text"], _finish_reason(ev["finish_reason"]))
        out["usage"] = _usage(ev)
        return out

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        body = await _body(request, ChatBody)
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, "this model has no chat template: use /v1/completions", code="no_chat_template")
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.messages]

        def apply():
            enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            return enc["input_ids"][0].tolist()

        try:
            ids = await asyncio.to_thread(apply)
        except Exception as exc:  # noqa: BLE001 - templates raise on odd role orders
            raise ApiError(400, f"the chat template rejected these messages: {exc}", param="messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = _params(body, len(ids), max_tokens, DEFAULT_CHAT_MAX_TOKENS)
        bridge = _Bridge(asyncio.get_running_loop())
        req = _submit(ids, params, bridge)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text, finish):
            delta = {} if text is None else {"content": text}
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": engine.model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            first = chunk("", None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            return _SSEResponse(_stream(req, bridge, chunk, include, first), on_close=req.cancel)
        ev = await _collect(request, req, bridge)
        return {
            "id": rid, "object": "chat.completion", "created": now, "model": engine.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ev["text"]}, "logprobs": None,
                         "finish_reason": _finish_reason(ev["finish_reason"])}],
            "usage": _usage(ev),
        }

    app.add_middleware(_Gate, api_key=api_key, metrics=metrics)
    return app
