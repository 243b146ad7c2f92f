"""The endpoints of the OpenAI-compatible API, as FastAPI routers over one :class:`~lowbit.serve.engine.Engine`.

:func:`completions_router` (``POST /v1/completions``), :func:`chat_router` (``POST /v1/chat/completions``),
:func:`info_router` (``GET /v1/models``, ``/health``, ``/metrics``); :class:`ApiContext` holds what the
generating endpoints share: body parsing, context checks, sampling parameters and submission.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse

from lowbit.serve.engine import MB, Engine, EngineError, Request
from lowbit.serve.request import RETRY_AFTER_DRAINING_S
from lowbit.serve.sampling import SamplingParams
from lowbit.serve.schemas import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    ApiError,
    ChatBody,
    CommonBody,
    CompletionBody,
    parse_body,
)
from lowbit.serve.sse import Bridge, SSEResponse, collect, finish_reason, stream_events, usage


class ApiContext:
    """Engine-bound helpers of the generating endpoints."""

    def __init__(self, engine: Engine):
        self.engine, self.tok = engine, engine.tokenizer

    async def body(self, request: HTTPRequest, model_cls: type[CommonBody]):
        body = parse_body(await request.body(), model_cls)
        name = self.engine.model_name
        if body.model is not None and body.model != name:
            raise ApiError(404, f"the model '{body.model}' does not exist: this server serves '{name}'",
                           param="model", code="model_not_found")
        return body

    def params(self, body: CommonBody, n_prompt: int, max_tokens: int | None, default: int,
               prompt_param: str = "prompt") -> SamplingParams:
        """Sampling parameters, after the context check (400 ``context_length_exceeded`` naming the culprit)."""
        limit = self.engine.max_context
        if n_prompt >= limit or (max_tokens is not None and n_prompt + max_tokens > limit):
            asked = n_prompt + (max_tokens or 0)
            raise ApiError(400, f"this model's maximum context length is {limit} tokens, but you requested {asked} "
                                f"tokens ({n_prompt} in the prompt, {max_tokens or 0} for the completion)",
                           param=prompt_param if n_prompt >= limit else "max_tokens", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = max(1, min(default, limit - n_prompt))
        return SamplingParams(max_tokens=max_tokens, **body.sampling())

    def submit(self, ids: list[int], params: SamplingParams) -> tuple[Request, Bridge]:
        bridge = Bridge(asyncio.get_running_loop())
        req = Request(ids, params, sink=bridge)
        try:
            self.engine.submit(req)
        except EngineError as exc:
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
            raise ApiError(exc.status, str(exc), exc.type, exc.param, exc.code, headers) from None
        return req, bridge

    async def prompt_ids(self, body: CompletionBody) -> list[int]:
        p = body.prompt
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, str):
            if not p:
                raise ApiError(400, "the prompt is empty", param="prompt", code="invalid_value")
            try:
                ids = await asyncio.to_thread(lambda: self.tok(p).input_ids)
            except Exception as exc:  # noqa: BLE001 - what the tokenizer cannot encode is the client's input
                raise ApiError(400, f"the tokenizer could not encode the prompt: {exc}", param="prompt",
                               code="invalid_value") from None
            return list(ids)
        if isinstance(p, list) and all(isinstance(t, int) for t in p):
            if not p:
                raise ApiError(400, "the prompt is empty", param="prompt", code="invalid_value")
            vocab = len(self.tok)
            bad = next((i for i, t in enumerate(p) if t < 0 or t >= vocab), None)
            if bad is not None:
                raise ApiError(400, f"prompt token ids must be in [0, {vocab}): prompt[{bad}] is {p[bad]}", param="prompt",
                               code="invalid_value")
            return list(p)
        raise ApiError(400, "only one prompt per request is supported (a string or a list of token ids)",
                       param="prompt", code="unsupported_parameter")

    async def chat_ids(self, body: ChatBody) -> list[int]:
        tok = self.tok
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, "this model has no chat template: use /v1/completions", code="no_chat_template")
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.messages]

        def apply():
            enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            return enc["input_ids"][0].tolist()

        try:
            return await asyncio.to_thread(apply)
        except Exception as exc:  # noqa: BLE001 - templates raise on odd role orders
            raise ApiError(400, f"the chat template rejected these messages: {exc}", param="messages",
                           code="invalid_value") from None


def completions_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await ctx.body(request, CompletionBody)
        ids = await ctx.prompt_ids(body)
        params = ctx.params(body, len(ids), body.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS)
        req, bridge = ctx.submit(ids, params)
        rid, now, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), ctx.engine.model_name

        def chunk(text, finish):
            return {"id": rid, "object": "text_completion", "created": now, "model": name,
                    "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            return SSEResponse(stream_events(req, bridge, chunk, body.include_usage(), None), req, request)
        ev = await collect(request, req, bridge)
        out = chunk(ev["text"], finish_reason(ev["finish_reason"]))
        out["usage"] = usage(ev)
        return out

    return router


def chat_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        body = await ctx.body(request, ChatBody)
        ids = await ctx.chat_ids(body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = ctx.params(body, len(ids), max_tokens, DEFAULT_CHAT_MAX_TOKENS, "messages")
        req, bridge = ctx.submit(ids, params)
        rid, now, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), ctx.engine.model_name

        def chunk(text, finish):
            delta = {} if text is None else {"content": text}
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            first = chunk("", None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            return SSEResponse(stream_events(req, bridge, chunk, body.include_usage(), first), req, request)
        ev = await collect(request, req, bridge)
        return {
            "id": rid, "object": "chat.completion", "created": now, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ev["text"]}, "logprobs": None,
                         "finish_reason": finish_reason(ev["finish_reason"])}],
            "usage": usage(ev),
        }

    return router


def info_router(engine: Engine, created: int) -> APIRouter:
    """``/health`` (no key needed), ``/metrics`` (Prometheus text) and ``/v1/models``."""
    router = APIRouter()

    @router.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        """200 while serving; 503 with Retry-After once shutting down (new requests are refused then)."""
        body = {"model": engine.model_name, "kv": engine.kv, "engine": engine.backend, **engine.stats()}
        if not engine.accepting:
            return JSONResponse({"status": "draining", **body}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_DRAINING_S)})
        return {"status": "ok" if engine.alive else "starting", **body}

    @router.get("/metrics")
    async def metrics_endpoint():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @router.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{
                "id": engine.model_name, "object": "model", "created": created, "owned_by": "lowbit",
                "kv": engine.kv, "max_model_len": engine.max_context, "kv_budget_mb": engine.budget / MB,
                "kv_bytes_per_token_at_4k": engine.sizer.bytes_per_token(min(4096, engine.max_context)),
            }],
        }

    return router
