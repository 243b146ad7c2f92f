"""The OpenAI-compatible HTTP API over an :class:`~lowbit.serve.engine.Engine` (FastAPI).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true``
server-sent events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET|HEAD /health`` and
``GET /metrics`` (Prometheus text). Errors use OpenAI's body
``{"error": {"message", "type", "param", "code"}}``. With an API key set, every endpoint but
``/health`` wants ``Authorization: Bearer <key>``.

The request bodies are in :mod:`lowbit.serve.schemas`, the endpoints in :mod:`lowbit.serve.routes`,
the engine-to-asyncio bridge and SSE in :mod:`lowbit.serve.sse`; :func:`create_app` assembles them.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from lowbit.serve.engine import Engine
from lowbit.serve.request import RETRY_AFTER_DRAINING_S
from lowbit.serve.routes import ApiContext, chat_router, completions_router, info_router
from lowbit.serve.schemas import ApiError, ErrorJSONResponse, error_body, error_response
from lowbit.serve.sse import client_name, sse

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
log = logging.getLogger("lowbit.serve")


class _Gate:
    """ASGI middleware, the outermost of the app's own: API-key check (all but /health), request counting by
    endpoint and status, ``Connection: close`` on every 5xx, and the last word on anything that escapes a
    handler -- a client gone mid-body (one INFO line), a response cancelled by the server's shutdown (a 503 or
    an SSE error chunk + ``[DONE]``, one line), an unexpected exception (a 500 JSON body, logged with its
    traceback) -- so that uvicorn never answers in plain text or logs an expected cancellation as a crash."""

    def __init__(self, app, api_key: str | None, metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        counted = path.startswith("/v1/")
        state = {"started": False, "complete": False, "sse": False}

        async def gate_send(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                if message["status"] >= 500:
                    headers = [(k, v) for k, v in headers if k.lower() != b"connection"] + [(b"connection", b"close")]
                    message = {**message, "headers": headers}
                state["started"] = True
                state["sse"] = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)
                if counted:
                    self.metrics.inc("requests_total", endpoint=endpoint, status=str(message["status"]))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["complete"] = True
            await send(message)

        if self.api_key and path != "/health":
            auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                msg = "missing API key: send 'Authorization: Bearer <key>'" if not auth else "incorrect API key provided"
                response = ErrorJSONResponse(error_body(msg, "invalid_request_error", None, "invalid_api_key"), status_code=401)
                return await response(scope, receive, gate_send)
        try:
            await self.app(scope, receive, gate_send)
        except ClientDisconnect:
            log.info("client %s disconnected while sending the request body (%s %s)", client_name(scope),
                     scope.get("method"), path)
        except asyncio.CancelledError:  # the server gave up waiting for this response at shutdown
            log.info("response to %s (%s %s) cut at shutdown", client_name(scope), scope.get("method"), path)
            await self._answer(state, gate_send, scope, receive, 503, "the server shut down before this request finished",
                               "shutting_down")
        except Exception as exc:  # noqa: BLE001 - a bug: logged once with its traceback, answered as JSON
            log.exception("internal error on %s %s", scope.get("method"), path)
            await self._answer(state, gate_send, scope, receive, 500, f"internal error: {exc!r}", "internal_error")

    @staticmethod
    async def _answer(state, send, scope, receive, status: int, message: str, code: str) -> None:
        """End the response as well as its state allows: a JSON error before it started, an SSE error chunk
        and ``[DONE]`` in a stream; a started plain response is left for uvicorn to close."""
        try:
            if not state["started"]:
                headers = {"Retry-After": str(RETRY_AFTER_DRAINING_S)} if status == 503 else None
                await ErrorJSONResponse(error_body(message, "server_error", None, code), status_code=status,
                                        headers=headers)(scope, receive, send)
            elif state["sse"] and not state["complete"]:
                tail = sse(error_body(message, "server_error", None, code)) + sse("[DONE]")
                await send({"type": "http.response.body", "body": tail.encode(), "more_body": False})
        except (OSError, RuntimeError, asyncio.CancelledError):  # the connection is gone already
            pass


def _add_error_handlers(app: FastAPI) -> None:
    """ApiError and HTTP errors (404 -> not_found_error, 405 with Allow) as OpenAI's error body; anything else
    is answered by :class:`_Gate`."""

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ErrorJSONResponse(error_body(str(exc.detail), kind, None, None), status_code=exc.status_code,
                                 headers=getattr(exc, "headers", None))


def create_app(engine: Engine, api_key: str | None = None, drain_timeout: float = 60.0) -> FastAPI:
    """The FastAPI app; it starts the engine on startup and drains it on shutdown (``lowbit serve`` drains
    earlier, while connections are still open: :class:`lowbit.serve.server.LowbitServer`)."""

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown, True, drain_timeout)

    app = FastAPI(title="lowbit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.drain_timeout = drain_timeout
    _add_error_handlers(app)
    ctx = ApiContext(engine)
    app.include_router(info_router(engine, created=int(time.time())))
    app.include_router(completions_router(ctx))
    app.include_router(chat_router(ctx))
    app.add_middleware(_Gate, api_key=api_key, metrics=engine.metrics)
    return app
