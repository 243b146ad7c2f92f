"""The OpenAI-compatible server on the bundled model, driven by the real `openai` client over loopback."""

import json
import threading
import time

import httpx
import pytest

from lowbit.generation import generate_text
from lowbit.serve.metrics import parse_exposition

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.model

KIVI = "kivi:bits=2"
KIVI_R32 = "kivi:bits=2,residual=32"  # quantizes even short sequences
PROMPTS = ["Name three colours.", "What is the capital of France?", "Write a haiku about the sea.", "Say hello."]


def _metrics(url):
    return parse_exposition(httpx.get(url + "/metrics", timeout=10).text)


def _eventually(fn, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module", params=[("fp16", "classic"), (KIVI, "classic"), ("fp16", "paged")],
                ids=["fp16", "kivi", "paged-fp16"])
def server(request, smollm2, start_server):
    model, tok = smollm2
    kv, backend = request.param
    # the paged engine's CPU attention reads every page of the block table: a 2K context keeps it quick
    extra = {"max_context": 2048} if backend == "paged" else {}
    srv = start_server(model, tok, kv=kv, kv_budget_mb=256, backend=backend, **extra)
    srv.kv = kv
    return srv


@pytest.fixture(scope="module")
def fp16_server(smollm2, start_server):
    """For behaviour that does not depend on the KV method."""
    model, tok = smollm2
    srv = start_server(model, tok, kv="fp16", kv_budget_mb=256)
    srv.kv = "fp16"
    return srv


@pytest.fixture(scope="module")
def long_prompt(smollm2):
    """~170 tokens of WikiText: past KIVI's 128-token residual, so keys and values get quantized."""
    from lowbit.eval import DEFAULT_TEXT, load_tokens

    _, tok = smollm2
    return tok.decode(load_tokens(tok, DEFAULT_TEXT, 200).reshape(-1)[30:200].tolist())


def _client(srv, key="unused"):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_completions_equal_generate_text(server, smollm2, long_prompt):
    model, tok = smollm2
    prompt = long_prompt
    ref = generate_text(model, tok, prompt, kv=server.kv, max_new_tokens=12, chat=False)
    c = _client(server)
    out = c.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0)
    assert out.choices[0].text == ref and out.usage.completion_tokens <= 12
    stream = c.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    pieces = [ch.choices[0].text for ch in stream]
    assert "".join(pieces) == ref


def test_chat_equals_generate_text_streaming_and_not(server, smollm2):
    model, tok = smollm2
    prompt = PROMPTS[0]
    ref = generate_text(model, tok, prompt, kv=server.kv, max_new_tokens=12)
    c = _client(server)
    msgs = [{"role": "user", "content": prompt}]
    out = c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=12, temperature=0)
    assert out.choices[0].message.content == ref
    assert out.choices[0].finish_reason in ("stop", "length")
    chunks = list(c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_sse_wire_format_ends_with_done(server):
    body = {"model": "smollm2", "prompt": "Hello", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"] == "length"


def test_sixteen_concurrent_requests_batch_and_match(fp16_server, smollm2):
    server = fp16_server
    model, tok = smollm2
    refs = {p: generate_text(model, tok, p, kv=server.kv, max_new_tokens=6) for p in PROMPTS}
    c = _client(server)
    results, errors = {}, []

    def ask(i):
        try:
            p = PROMPTS[i % len(PROMPTS)]
            out = c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": p}], max_tokens=6, temperature=0)
            results[i] = (p, out.choices[0].message.content)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors and len(results) == 16
    assert all(text == refs[p] for p, text in results.values())
    m = _metrics(server.url)
    assert m["lowbit_running_sequences_peak"] >= 4  # they really ran batched
    assert m["lowbit_decode_step_sequences_total"] > m["lowbit_decode_steps_total"]


def test_seeded_sampling_is_reproducible(fp16_server):
    c = _client(fp16_server)
    kw = dict(model="smollm2", prompt="Once upon a time", max_tokens=10, temperature=0.9, top_p=0.9)
    a = c.completions.create(seed=11, **kw).choices[0].text
    b = c.completions.create(seed=11, **kw).choices[0].text
    assert a == b


def test_stop_strings(fp16_server):
    c = _client(fp16_server)
    full = c.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=10, temperature=0).choices[0].text
    assert "," in full
    stop = full[full.index(",") :][:2]
    out = c.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=10, temperature=0, stop=[stop])
    assert out.choices[0].text == full[: full.index(stop)] and out.choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_style_400(fp16_server):
    server = fp16_server
    url = server.url
    cases = [
        (b"{not json", None),
        (json.dumps({"model": "smollm2", "prompt": "x", "temperature": 7}).encode(), "temperature"),
        (json.dumps({"model": "smollm2", "max_tokens": 4}).encode(), "prompt"),
        (json.dumps({"model": "smollm2", "prompt": "x", "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({"model": "smollm2", "prompt": "x", "n": 2}).encode(), "n"),
        (json.dumps({"model": "smollm2", "prompt": [1] * 9000, "max_tokens": 4}).encode(), None),  # longer than the context
        (json.dumps({"model": "smollm2", "prompt": [10] * 8190, "max_tokens": 16}).encode(), "max_tokens"),
    ]
    for raw, param in cases:
        r = httpx.post(url + "/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 400, (raw[:60], r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        if param:
            assert err["param"] == param
    r = httpx.post(url + "/v1/chat/completions", json={"model": "smollm2", "messages": []}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(url + "/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        _client(server).completions.create(model="smollm2", prompt="x", temperature=-1)
    m = _metrics(url)
    assert m['lowbit_requests_total{endpoint="/v1/completions",status="400"}'] >= len(cases)


def test_models_health_metrics(server):
    models = _client(server).models.list()
    assert [m.id for m in models.data] == ["smollm2"]
    h = httpx.get(server.url + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["kv"] == server.kv
    m = _metrics(server.url)
    for key in ("lowbit_queue_depth", "lowbit_running_sequences", "lowbit_kv_bytes_in_use", "lowbit_prompt_tokens_total",
                "lowbit_completion_tokens_total", "lowbit_time_to_first_token_seconds_count",
                "lowbit_inter_token_latency_seconds_count"):
        assert key in m


def test_disconnect_cancels_and_frees_kv(server):
    url = server.url
    body = {"model": "smollm2", "prompt": "Tell me a very long story.", "max_tokens": 2000, "temperature": 0,
            "stream": True, "ignore_eos": True}
    before = _metrics(url).get('lowbit_sequences_finished_total{reason="cancelled"}', 0)
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        it = r.iter_lines()
        got = [next(it) for _ in range(4)]
        assert got[0].startswith("data: ")
        assert _metrics(url)["lowbit_kv_bytes_in_use"] > 0
    # the client closed the stream mid-generation
    assert _eventually(lambda: _metrics(url)["lowbit_kv_bytes_in_use"] == 0 and _metrics(url)["lowbit_running_sequences"] == 0)
    assert _metrics(url)['lowbit_sequences_finished_total{reason="cancelled"}'] == before + 1
    # a non-streaming client that gives up is noticed too
    body.update(stream=False)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/completions", json=body, timeout=2.0)
    assert _eventually(lambda: _metrics(url)['lowbit_sequences_finished_total{reason="cancelled"}'] == before + 2)
    assert _eventually(lambda: _metrics(url)["lowbit_kv_bytes_in_use"] == 0 and _metrics(url)["lowbit_kv_bytes_reserved"] == 0)


def test_api_key_enforced(smollm2, start_server):
    model, tok = smollm2
    srv = start_server(model, tok, kv="fp16", api_key="sekrit", kv_budget_mb=64)
    assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
    for path in ("/v1/models", "/metrics"):
        r = httpx.get(srv.url + path, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        _client(srv, "wrong").completions.create(model="smollm2", prompt="hi", max_tokens=2)
    out = _client(srv, "sekrit").completions.create(model="smollm2", prompt="hi", max_tokens=2, temperature=0)
    assert out.usage.completion_tokens >= 1


def test_queue_full_gives_429(smollm2, start_server):
    model, tok = smollm2
    srv = start_server(model, tok, kv="fp16", kv_budget_mb=256, max_batch=1, max_queue=1)
    long = {"model": "smollm2", "prompt": "Count to one thousand.", "max_tokens": 1000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    queued = {}

    def second():
        queued["r"] = httpx.post(srv.url + "/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 2,
                                                                     "temperature": 0}, timeout=120)

    with httpx.stream("POST", srv.url + "/v1/completions", json=long, timeout=60) as r:
        lines = r.iter_lines()  # keep a reference: dropping the iterator closes the connection
        next(lines)  # the long request is running
        t = threading.Thread(target=second)
        t.start()
        assert _eventually(lambda: _metrics(srv.url)["lowbit_queue_depth"] == 1)
        with pytest.raises(openai.RateLimitError) as exc:
            _client(srv).completions.create(model="smollm2", prompt="Hi", max_tokens=2)
        assert exc.value.status_code == 429 and int(exc.value.response.headers["retry-after"]) >= 1
    t.join(timeout=120)  # closing the long stream let the queued one run
    assert queued["r"].status_code == 200


def test_graceful_shutdown_drains_in_flight(smollm2, start_server):
    model, tok = smollm2
    srv = start_server(model, tok, kv=KIVI, kv_budget_mb=64)
    body = {"model": "smollm2", "prompt": "Write a poem.", "max_tokens": 16, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
        it = r.iter_lines()
        first = next(it)
        stopper = threading.Thread(target=srv.stop)
        stopper.start()  # shutdown begins while the request is in flight
        rest = [line for line in it if line]
    stopper.join(timeout=60)
    assert first.startswith("data: ") and rest[-1] == "data: [DONE]"
    usage = json.loads(rest[-2][6:])["usage"]
    assert usage["completion_tokens"] == 16
    assert not srv.thread.is_alive() and not srv.engine.alive


def test_engine_failure_fails_one_request_only(fp16_server, smollm2, monkeypatch):
    import lowbit.serve.engine as engine_mod

    real = engine_mod.make_cache
    armed = {"left": 1}

    def make_cache(spec, config, *args, **kwargs):
        cache = real(spec, config, *args, **kwargs)
        if armed["left"]:
            armed["left"] -= 1
            good = cache.layers[3].update
            calls = {"n": 0}

            def update(*a, **k):
                calls["n"] += 1
                if calls["n"] > 2:
                    raise RuntimeError("injected failure")
                return good(*a, **k)

            cache.layers[3].update = update
        return cache

    monkeypatch.setattr(engine_mod, "make_cache", make_cache)
    body = {"model": "smollm2", "prompt": "Hello there", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    r = httpx.post(fp16_server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"]
    ok = httpx.post(fp16_server.url + "/v1/completions", json=body, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 6
    assert fp16_server.engine.alive


def test_real_tokenizer_inputs_from_issue_18(fp16_server):
    """A lone surrogate is a 400 naming its position (the tokenizer would raise); a temperature of 1e-39 samples the
    argmax; NUL, emoji and CJK are served."""
    url = fp16_server.url
    r = httpx.post(url + "/v1/completions", content=b'{"prompt": "a\\ud800b", "max_tokens": 2}', timeout=60)
    assert r.status_code == 400 and "at character 1" in r.json()["error"]["message"]
    body = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 4}
    greedy = httpx.post(url + "/v1/completions", json={**body, "temperature": 0}, timeout=60).json()
    tiny = httpx.post(url + "/v1/completions", json={**body, "temperature": 1e-39, "seed": 5}, timeout=60)
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy["choices"][0]["text"]
    out = _client(fp16_server).completions.create(model="smollm2", prompt="NUL \x00 emoji 😀 漢字", max_tokens=3)
    assert out.usage.completion_tokens >= 1
