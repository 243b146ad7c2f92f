"""Between the engine thread and asyncio: the per-request event bridge, server-sent events, and collection."""

from __future__ import annotations

import asyncio
import json
import logging

import anyio
from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from lowbit.serve.engine import Request
from lowbit.serve.request import RETRY_AFTER_DRAINING_S
from lowbit.serve.schemas import ApiError, error_body

log = logging.getLogger("lowbit.serve")


def client_name(scope) -> str:
    host, port = scope.get("client") or ("?", 0)
    return f"{host}:{port}"


def log_disconnect(scope, req: Request, what: str) -> None:
    """One INFO line when a client goes away before its request finished."""
    log.info("client %s disconnected %s (%s %s, request %s, %d tokens generated): request cancelled",
             client_name(scope), what, scope.get("method"), scope.get("path"), req.id, req.n_generated)


class Bridge:
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


class SSEResponse(StreamingResponse):
    """Server-sent events that also watch for the client going away, whatever the ASGI version; on any
    exit before the request finished (disconnect, cancellation), the request is cancelled."""

    def __init__(self, content, req: Request, request: HTTPRequest):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.req, self.scope_of = req, request.scope

    def on_close(self) -> None:
        if self.req.status != "finished":  # set before the final event is emitted: a finished stream is not a drop
            self.req.cancel()
            log_disconnect(self.scope_of, self.req, "mid-stream")

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


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def usage(ev: dict) -> dict:
    return {"prompt_tokens": ev["prompt_tokens"], "completion_tokens": ev["completion_tokens"],
            "total_tokens": ev["prompt_tokens"] + ev["completion_tokens"]}


def finish_reason(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


async def stream_events(req: Request, bridge: Bridge, chunk, include_usage: bool, first: dict | None):
    """The SSE lines of one request: `first` (if any), a ``chunk(text, finish)`` per delta, the final chunk,
    the usage chunk with `include_usage`, then ``[DONE]`` (also after an error body)."""
    if first is not None:
        yield sse(first)
    while True:
        ev = await bridge.get()
        if ev["type"] == "delta":
            yield sse(chunk(ev["text"], None))
        elif ev["type"] == "error":
            yield sse(error_body(ev["message"], "server_error", None, ev.get("code")))
            yield sse("[DONE]")
            return
        else:
            yield sse(chunk(None, finish_reason(ev["finish_reason"])))
            if include_usage:
                final = chunk(None, None)
                final["choices"] = []
                final["usage"] = usage(ev)
                yield sse(final)
            yield sse("[DONE]")
            return


async def collect(request: HTTPRequest, req: Request, bridge: Bridge) -> dict:
    """Wait for the request to finish (non-streaming): its final event with the joined ``text``.

    Cancels the request if the client disconnects (ApiError 499) or on any other exit before it finished.
    """
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
                    log_disconnect(request.scope, req, "while waiting for its completion")
                    raise ApiError(499, "client disconnected", code="client_closed_request") from None
            if ev is None:
                continue
            if ev["type"] == "delta":
                parts.append(ev["text"])
            elif ev["type"] == "error":
                if ev.get("code") == "shutting_down":
                    raise ApiError(503, ev["message"], "server_error", None, ev["code"],
                                   {"Retry-After": str(RETRY_AFTER_DRAINING_S)})
                raise ApiError(500, ev["message"], "server_error", None, ev.get("code"))
            else:
                ev["text"] = "".join(parts)
                return ev
    finally:
        if not req.done.is_set():
            req.cancel()
