"""Shutdown in the stages of docs/SERVE.md (issue 18, defect 5): stop accepting (503 + Retry-After, /health 503
draining), the drain window (queued and running requests served), then what is left answered (503 JSON, or an SSE
error chunk and [DONE]); a second Ctrl-C ends the window at once; no tracebacks. Tiny Llama, slowed down, served by
the classic and by the paged engine."""

import asyncio
import json
import logging
import threading
import time

import httpx
import pytest

from lowbit.serve.api import _Gate
from lowbit.serve.metrics import Metrics


def _eventually(fn, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def slow(model_hook):
    """Every forward of the tiny Llama takes >= 20 ms, so requests are still running when shutdown starts."""
    model_hook(lambda ids, pos: time.sleep(0.02), at="embed")


@pytest.fixture(params=["classic", "paged"])
def backend(request):
    return request.param


@pytest.fixture
def tracebacks(caplog):
    """``tracebacks(srv)`` starts watching ``srv``'s logs (call it after the server started: uvicorn's config resets
    its loggers' handlers) and returns a function listing the records carrying a traceback or at ERROR."""
    uv = logging.getLogger("uvicorn.error")
    caplog.set_level(logging.INFO)

    def watch(srv):
        uv.addHandler(caplog.handler)
        return lambda: [r for r in caplog.records
                        if r.exc_info is not None or "Traceback" in r.getMessage() or r.levelno >= logging.ERROR]

    yield watch
    uv.removeHandler(caplog.handler)


class Stream(threading.Thread):
    """A streaming completion read to its end in a thread: its status and data lines."""

    def __init__(self, url, body):
        super().__init__(daemon=True)
        self.url, self.body, self.status, self.lines, self.started = url, body, None, [], threading.Event()

    def run(self):
        with httpx.stream("POST", self.url + "/v1/completions", json={**self.body, "stream": True}, timeout=120) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line:
                    self.lines.append(line)
                    self.started.set()
        self.started.set()

    def events(self):
        return [json.loads(line[6:]) for line in self.lines if line != "data: [DONE]"]


class Post(threading.Thread):
    def __init__(self, url, body):
        super().__init__(daemon=True)
        self.url, self.body, self.response = url, body, None

    def run(self):
        self.response = httpx.post(self.url + "/v1/completions", json=self.body, timeout=120)


LONG = {"prompt": [5, 6, 7], "max_tokens": 3000, "temperature": 0, "ignore_eos": True}
SHORT = {"prompt": [8, 9], "max_tokens": 12, "temperature": 0, "ignore_eos": True}


def _refused_while_draining(srv):
    r = httpx.post(srv.url + "/v1/completions", json=SHORT, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert int(r.headers["retry-after"]) >= 1 and r.headers["connection"] == "close"
    h = httpx.get(srv.url + "/health", timeout=30)
    assert h.status_code == 503 and h.json()["status"] == "draining" and "retry-after" in h.headers


def test_drain_serves_running_and_queued_requests_to_the_end(tiny_llama, fake_tok, start_server, slow, tracebacks,
                                                            backend):
    srv = start_server(tiny_llama, fake_tok, kv="fp16", max_batch=1, backend=backend, kv_budget_mb=16)
    bad_logs = tracebacks(srv)
    a = Stream(srv.url, {**SHORT, "max_tokens": 100})  # long enough for b to queue behind it
    a.start()
    assert a.started.wait(60)
    b = Post(srv.url, SHORT)  # queued behind a (max_batch 1)
    b.start()
    assert _eventually(lambda: srv.engine.stats()["waiting"] == 1)
    srv.begin_stop()
    assert _eventually(lambda: not srv.engine.accepting)
    _refused_while_draining(srv)
    a.join(120), b.join(120)
    srv.thread.join(120)
    assert a.lines[-1] == "data: [DONE]" and a.events()[-1]["choices"][0]["finish_reason"] == "length"
    assert len(a.events()) == 101  # 100 tokens (one character each) and the final chunk
    assert b.response.status_code == 200 and b.response.json()["usage"]["completion_tokens"] == 12
    assert not srv.thread.is_alive() and not srv.engine.alive and srv.server.shutdown_report["failed"] == 0
    assert bad_logs() == []


@pytest.mark.parametrize("how", ["window over", "second ctrl-c"])
def test_what_is_left_after_the_window_is_answered(tiny_llama, fake_tok, start_server, slow, tracebacks, how, backend):
    srv = start_server(tiny_llama, fake_tok, kv="fp16", max_batch=1, drain_timeout=0.5 if how == "window over" else 600,
                       backend=backend, kv_budget_mb=16)
    bad_logs = tracebacks(srv)
    running = Stream(srv.url, LONG)
    running.start()
    assert running.started.wait(60)
    queued_post, queued_stream = Post(srv.url, LONG), Stream(srv.url, LONG)
    queued_post.start(), queued_stream.start()
    assert _eventually(lambda: srv.engine.stats()["waiting"] == 2)
    srv.begin_stop()
    if how == "second ctrl-c":
        assert _eventually(lambda: not srv.engine.accepting)
        _refused_while_draining(srv)
        srv.begin_stop(force=True)
    for t in (running, queued_post, queued_stream):
        t.join(120)
    srv.thread.join(120)
    assert not srv.thread.is_alive() and srv.server.shutdown_report["failed"] == 3
    for stream in (running, queued_stream):
        assert stream.status == 200 and stream.lines[-1] == "data: [DONE]"
        assert stream.events()[-1]["error"]["code"] == "shutting_down"
    assert len(running.events()) > 1  # it was really streaming tokens before
    r = queued_post.response
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert int(r.headers["retry-after"]) >= 1 and r.headers["connection"] == "close"
    assert bad_logs() == []


async def _drive(app_coro_factory):
    """Run the gate around a fake app; the messages it sends."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    gate = _Gate(app_coro_factory, api_key=None, metrics=Metrics())
    await gate({"type": "http", "path": "/v1/completions", "method": "POST", "headers": [], "client": ("t", 1)},
               receive, send)
    return sent


def test_gate_ends_responses_cut_by_the_server(caplog):
    """Past uvicorn's flush timeout handlers are cancelled: the gate answers 503 (not started) or closes the SSE
    stream with an error chunk and [DONE]; a crash is a JSON 500 with Connection: close."""

    async def cancelled_before_start(scope, receive, send):
        raise asyncio.CancelledError()

    async def cancelled_mid_stream(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        raise asyncio.CancelledError()

    async def crash(scope, receive, send):
        raise KeyError("boom")

    with caplog.at_level(logging.INFO, logger="lowbit.serve"):
        sent = asyncio.run(_drive(cancelled_before_start))
        assert sent[0]["status"] == 503 and (b"connection", b"close") in sent[0]["headers"]
        assert any(k == b"retry-after" for k, _ in sent[0]["headers"])
        assert json.loads(sent[1]["body"])["error"]["code"] == "shutting_down"
        sent = asyncio.run(_drive(cancelled_mid_stream))
        tail = sent[-1]["body"].decode()
        assert sent[-1]["more_body"] is False and tail.endswith("data: [DONE]\n\n") and "shutting_down" in tail
        sent = asyncio.run(_drive(crash))
        assert sent[0]["status"] == 500 and (b"connection", b"close") in sent[0]["headers"]
        assert json.loads(sent[1]["body"])["error"]["code"] == "internal_error"
    assert [r.exc_info is not None for r in caplog.records if r.levelno >= logging.ERROR] == [True]  # the crash only
