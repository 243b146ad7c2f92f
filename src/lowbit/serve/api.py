"""The OpenAI-compatible HTTP API over an :class:`~lowbit.serve.engine.Engine` (FastAPI).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true``
server-sent events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` and
``GET /metrics`` (Prometheus text). Errors use OpenAI's body
``{"error": {"message", "type", "param", "code"}}``. With an API key set, every endpoint but
``/health`` wants ``Authorization: Bearer <key>``.

The request bodies are in :mod:`lowbit.serve.schemas`, the endpoints in :mod:`lowbit.serve.routes`,
the engine-to-asyncio bridge and SSE in :mod:`lowbit.serve.sse`; :func:`create_app` assembles them.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lowbit.serve.engine import Engine
from lowbit.serve.routes import ApiContext, chat_router, completions_router, info_router
from lowbit.serve.schemas import ApiError, error_body, error_response

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


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


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's error body: ApiError, HTTP errors (404 -> not_found_error) and internal errors (500)."""

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind, None, None), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {exc!r}", "server_error", None, "internal_error"), status_code=500)


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
    _add_error_handlers(app)
    ctx = ApiContext(engine)
    app.include_router(info_router(engine, created=int(time.time())))
    app.include_router(completions_router(ctx))
    app.include_router(chat_router(ctx))
    app.add_middleware(_Gate, api_key=api_key, metrics=engine.metrics)
    return app
