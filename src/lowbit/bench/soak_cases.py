"""The request categories of ``lowbit bench soak`` (:mod:`lowbit.bench.soak`), and the helper they share.

Each :class:`Category` sends one request of its kind and says whether the server answered as expected
(:class:`Outcome`): greedy completions and chat, streamed and not, through the ``openai`` client (compared
with their one-at-a-time references); raw HTTP for what a client library would not send.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
from dataclasses import dataclass
from typing import Callable

PROMPTS = ["Name three colours.", "What is the capital of France?", "Write a haiku about the sea.",
           "Emoji 😀, NUL \x00, CJK 漢字, RTL שלום: repeat after me."]
FAULT = "injected model fault (stands for CUDA out of memory)"


@dataclass
class Outcome:
    category: str
    status: int | None  # the HTTP status seen; None when the client dropped the connection on purpose
    ok: bool  # the category's expectation held
    detail: str = ""
    greedy: bool | None = None  # for greedy requests: output equal to the one-at-a-time reference
    hung: bool = False
    skipped: bool = False  # not applicable to this server (e.g. no prompt exceeds the KV budget)


@dataclass
class Category:
    name: str
    expect: str  # what it expects, as printed in the table
    weight: int
    run: Callable[["Soak", random.Random], Outcome]
    induced: bool = False  # its 5xx is induced on purpose


class Soak:
    """One soak against an in-process server: the request helpers every category uses."""

    def __init__(self, srv, engine, api_key: str, max_tokens: int, timeout: float):
        import openai

        self.openai, self.srv, self.engine, self.key = openai, srv, engine, api_key
        self.model, self.max_tokens, self.timeout = engine.model_name, max_tokens, timeout
        self.refs: dict[tuple[str, int], str] = {}
        self.local = threading.local()
        vocab = len(engine.tokenizer)
        self.sentinel = [vocab - 1, vocab - 2, vocab - 3]
        self.over_budget = self._over_budget_length()

    def client(self, key: str | None = None):
        if key is not None:
            return self.openai.OpenAI(base_url=self.srv.url + "/v1", api_key=key, max_retries=0, timeout=self.timeout)
        if not hasattr(self.local, "client"):
            self.local.client = self.client(self.key)
        return self.local.client

    def _over_budget_length(self) -> int | None:
        """A prompt length whose KV alone exceeds the budget but fits the context, if there is one."""
        e = self.engine
        n = e.max_context - 2
        return n if e.reserve_for(n, 1) > e.budget else None

    def raw(self, method: str, path: str, body: bytes | dict | None = None, auth: bool = True,
            conn: http.client.HTTPConnection | None = None) -> tuple[int, dict, bytes]:
        """One request over http.client (on `conn` when given): status, lower-cased headers, body."""
        own = conn is None
        conn = conn or http.client.HTTPConnection(self.srv.host, self.srv.port, timeout=self.timeout)
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if auth:
            headers["Authorization"] = f"Bearer {self.key}"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            if own:
                conn.close()

    def greedy(self, kind: str, i: int, stream: bool) -> str:
        """The greedy output of prompt `i` as completion or chat, streamed or not (the openai client)."""
        c, kw = self.client(), dict(model=self.model, max_tokens=self.max_tokens, temperature=0)
        if kind == "completion":
            if not stream:
                return c.completions.create(prompt=PROMPTS[i], **kw).choices[0].text
            chunks = list(c.completions.create(prompt=PROMPTS[i], stream=True, **kw))
            assert chunks[-1].choices[0].finish_reason in ("stop", "length"), "the stream ended without finish_reason"
            return "".join(ch.choices[0].text for ch in chunks)
        msgs = [{"role": "user", "content": PROMPTS[i]}]
        if not stream:
            return c.chat.completions.create(messages=msgs, **kw).choices[0].message.content
        chunks = list(c.chat.completions.create(messages=msgs, stream=True, stream_options={"include_usage": True}, **kw))
        assert chunks[-1].usage is not None, "the stream ended without its usage chunk"
        return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


# ---------------------------------------------------------------------- categories
def _greedy(kind: str, stream: bool):
    def run(s: Soak, rng: random.Random) -> Outcome:
        i = rng.randrange(len(PROMPTS))
        text = s.greedy(kind, i, stream)
        same = text == s.refs[(kind, i)]
        return Outcome("", 200, same, "" if same else f"prompt {i}: {text!r} != {s.refs[(kind, i)]!r}", greedy=same)

    return run


def _expect(status: int, code: str | None = None, param: str | None = None, needle: str | None = None,
            header: tuple[str, str] | None = None):
    def check(got: int, headers: dict, body: bytes) -> tuple[bool, str]:
        err = json.loads(body).get("error", {}) if body[:1] == b"{" else {}
        bad = []
        if got != status:
            bad.append(f"status {got}")
        if code is not None and err.get("code") != code:
            bad.append(f"code {err.get('code')!r}")
        if param is not None and err.get("param") != param:
            bad.append(f"param {err.get('param')!r}")
        if needle is not None and needle not in err.get("message", ""):
            bad.append(f"message {err.get('message')!r}")
        if header is not None and headers.get(header[0], "").lower() != header[1]:
            bad.append(f"{header[0]}: {headers.get(header[0])!r}")
        return not bad, ", ".join(bad)

    return check


def _raw_case(cases: list[tuple[str, str, bytes | dict | None, Callable]]):
    def run(s: Soak, rng: random.Random) -> Outcome:
        method, path, body, check = cases[rng.randrange(len(cases))]
        if isinstance(body, dict) and "model" in body:
            body = {**body, "model": s.model}
        status, headers, data = s.raw(method, path, body)
        ok, why = check(status, headers, data)
        return Outcome("", status, ok, why)

    return run


def _completion(**kw) -> dict:
    return {"model": None, "prompt": "Hi", "max_tokens": 2, **kw}


WRONG_TYPES = [
    ("POST", "/v1/completions", _completion(max_tokens="8"), _expect(400, "invalid_value", "max_tokens")),
    ("POST", "/v1/completions", _completion(prompt=[True, False]), _expect(400, "invalid_value", "prompt")),
    ("POST", "/v1/completions", _completion(stream=True, stream_options={"include_usage": "yes"}),
     _expect(400, "invalid_value", "stream_options")),
    ("POST", "/v1/completions", {"max_tokens": 3}, _expect(400, "invalid_value", "prompt")),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, _expect(400, "invalid_value", "messages")),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, _expect(400, "invalid_value", "messages")),
]
BAD_RANGES = [
    ("POST", "/v1/completions", _completion(temperature=7), _expect(400, "invalid_value", "temperature")),
    ("POST", "/v1/completions", _completion(top_p=0), _expect(400, "invalid_value", "top_p")),
    ("POST", "/v1/completions", _completion(max_tokens=0), _expect(400, "invalid_value", "max_tokens")),
    ("POST", "/v1/completions", _completion(prompt=[-1, 5]), _expect(400, "invalid_value", "prompt")),
    ("POST", "/v1/completions", _completion(stop=["a", "b", "c", "d", "e"]), _expect(400, "invalid_value", "stop")),
    ("POST", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', _expect(400, "invalid_json")),
]
UNSUPPORTED = [
    ("POST", "/v1/completions", _completion(n=2), _expect(400, "unsupported_parameter", "n")),
    ("POST", "/v1/completions", _completion(logprobs=2), _expect(400, "unsupported_parameter", "logprobs")),
    ("POST", "/v1/completions", _completion(echo=True), _expect(400, "unsupported_parameter", "echo")),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     _expect(400, "unsupported_parameter", "tools")),
]
INVALID_JSON = [("POST", "/v1/completions", b, _expect(400, "invalid_json"))
                for b in (b'{"prompt": "x",', b"not json", b"[1, 2]", b"\xff\xfe")]
SURROGATES = [
    ("POST", "/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}',
     _expect(400, "invalid_value", "prompt", "at character 1")),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "ok \\udc00"}], "max_tokens": 2}',
     _expect(400, "invalid_value", "messages", "at character 3")),
]
PATHS = [
    ("GET", "/v1/nope", None, _expect(404)),
    ("GET", "/v1/completions", None, _expect(405)),
    ("HEAD", "/health", None, _expect(200)),
    ("GET", "/metrics", None, _expect(200)),
    ("GET", "/v1/models", None, _expect(200)),
]


def _seeded(s: Soak, rng: random.Random) -> Outcome:
    out = s.client().completions.create(model=s.model, prompt=PROMPTS[rng.randrange(len(PROMPTS))], temperature=0.8,
                                        top_p=0.95, seed=rng.randrange(1 << 30), max_tokens=s.max_tokens)
    return Outcome("", 200, out.usage.completion_tokens >= 1)


def _tiny_temperature(s: Soak, rng: random.Random) -> Outcome:
    status, _, body = s.raw("POST", "/v1/completions", _completion(model=s.model, temperature=1e-39, max_tokens=4))
    return Outcome("", status, status == 200, "" if status == 200 else body[:200].decode(errors="replace"))


def _unknown_model(s: Soak, rng: random.Random) -> Outcome:
    try:
        s.client().completions.create(model="no-such-model", prompt="Hi", max_tokens=2)
    except s.openai.NotFoundError as exc:
        return Outcome("", exc.status_code, exc.code == "model_not_found")
    return Outcome("", 200, False, "an unknown model was served")


def _bad_key(s: Soak, rng: random.Random) -> Outcome:
    if rng.random() < 0.5:
        status, _, body = s.raw("POST", "/v1/completions", _completion(model=s.model), auth=False)
        return Outcome("", status, status == 401 and b"invalid_api_key" in body)
    try:
        with s.client("sk-wrong") as c:
            c.completions.create(model=s.model, prompt="Hi", max_tokens=2)
    except s.openai.AuthenticationError as exc:
        return Outcome("", exc.status_code, True)
    return Outcome("", 200, False, "a wrong key was accepted")


def _over_context(s: Soak, rng: random.Random) -> Outcome:
    body = _completion(model=s.model, prompt=[5] * s.engine.max_context, max_tokens=4)
    status, headers, data = s.raw("POST", "/v1/completions", body)
    ok, why = _expect(400, "context_length_exceeded", "prompt")(status, headers, data)
    return Outcome("", status, ok, why)


def _over_budget(s: Soak, rng: random.Random) -> Outcome:
    if s.over_budget is None:
        return Outcome("", None, True, "skipped: the whole context fits the KV budget", skipped=True)
    status, headers, data = s.raw("POST", "/v1/completions", _completion(model=s.model, prompt=[5] * s.over_budget, max_tokens=1))
    ok, why = _expect(400, "kv_budget_exceeded", "prompt")(status, headers, data)
    return Outcome("", status, ok, why)


def _keepalive(s: Soak, rng: random.Random) -> Outcome:
    """A 400 (lone surrogate) then a 200 on the same kept-alive connection."""
    conn = http.client.HTTPConnection(s.srv.host, s.srv.port, timeout=s.timeout)
    try:
        first, _, _ = s.raw("POST", "/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}', conn=conn)
        sock = conn.sock
        second, _, _ = s.raw("POST", "/v1/completions", _completion(model=s.model, temperature=0), conn=conn)
        kept = sock is not None and conn.sock is sock
    finally:
        conn.close()
    return Outcome("", second, first == 400 and second == 200 and kept, f"{first} then {second}, kept alive: {kept}")


def _fault(s: Soak, rng: random.Random) -> Outcome:
    body = _completion(model=s.model, prompt=[7, 8] + s.sentinel + [9], max_tokens=4)
    status, headers, data = s.raw("POST", "/v1/completions", body)
    ok, why = _expect(500, None, None, FAULT, ("connection", "close"))(status, headers, data)
    return Outcome("", status, ok, why)


def _request_bytes(s: Soak, body: dict, stream: bool = False) -> bytes:
    data = json.dumps({**body, "stream": stream}).encode()
    return (f"POST /v1/completions HTTP/1.1\r\nHost: {s.srv.host}\r\nAuthorization: Bearer {s.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data


def _drop_mid_stream(s: Soak, rng: random.Random) -> Outcome:
    body = _completion(model=s.model, prompt=PROMPTS[0], max_tokens=64, temperature=0, ignore_eos=True)
    with socket.create_connection((s.srv.host, s.srv.port), timeout=s.timeout) as sock:
        sock.sendall(_request_bytes(s, body, stream=True))
        got = b""
        while b"data: " not in got:
            piece = sock.recv(4096)
            if not piece:
                break
            got += piece
    return Outcome("", None, got.startswith(b"HTTP/1.1 200") and b"data: " in got, got[:60].decode(errors="replace"))


def _drop_mid_body(s: Soak, rng: random.Random) -> Outcome:
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {s.srv.host}\r\nAuthorization: Bearer {s.key}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode()
    with socket.create_connection((s.srv.host, s.srv.port), timeout=s.timeout) as sock:
        sock.sendall(head + b'{"prompt"')
    return Outcome("", None, True)


CATEGORIES = [
    Category("completion", "200 = one-at-a-time", 6, _greedy("completion", False)),
    Category("completion_stream", "200 = one-at-a-time", 6, _greedy("completion", True)),
    Category("chat", "200 = one-at-a-time", 6, _greedy("chat", False)),
    Category("chat_stream", "200 = one-at-a-time", 6, _greedy("chat", True)),
    Category("seeded_sampling", "200", 3, _seeded),
    Category("temperature_1e-39", "200", 2, _tiny_temperature),
    Category("invalid_json", "400 invalid_json", 2, _raw_case(INVALID_JSON)),
    Category("wrong_types", "400 + param", 2, _raw_case(WRONG_TYPES)),
    Category("bad_ranges", "400 + param", 2, _raw_case(BAD_RANGES)),
    Category("unsupported", "400 + param", 1, _raw_case(UNSUPPORTED)),
    Category("lone_surrogate", "400 + position", 2, _raw_case(SURROGATES)),
    Category("unknown_model", "404", 1, _unknown_model),
    Category("over_context", "400", 1, _over_context),
    Category("over_kv_budget", "400", 1, _over_budget),
    Category("bad_key", "401", 1, _bad_key),
    Category("paths_methods", "404/405/200", 2, _raw_case(PATHS)),
    Category("keepalive_after_400", "400 then 200", 1, _keepalive),
    Category("drop_mid_stream", "(client gone)", 2, _drop_mid_stream),
    Category("drop_mid_body", "(client gone)", 1, _drop_mid_body),
    Category("model_fault", "500 induced", 1, _fault, induced=True),
]


def run_one(s: Soak, cat: Category, rng: random.Random) -> Outcome:
    try:
        out = cat.run(s, rng)
    except (socket.timeout, TimeoutError) as exc:
        out = Outcome("", None, False, f"timed out: {exc!r}", hung=True)
    except s.openai.APITimeoutError as exc:
        out = Outcome("", None, False, f"timed out: {exc!r}", hung=True)
    except s.openai.APIStatusError as exc:
        out = Outcome("", exc.status_code, False, f"{exc.status_code}: {exc.message[:200]}")
    except Exception as exc:  # noqa: BLE001 - reported as this request's failure
        out = Outcome("", None, False, repr(exc)[:300])
    out.category = cat.name
    return out


