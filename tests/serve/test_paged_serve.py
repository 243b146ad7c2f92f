"""``lowbit serve --engine paged`` on the CPU: the paged engine behind the same API (tiny random Llama, fake tokenizer;
one test on the bundled model): greedy output equal to the classic engine's, pages and steps in /metrics, cancellation
freeing pages, faults failing only their requests, seeded sampling, and the engine choice."""

import json
import queue
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import torch

from lowbit.serve.metrics import parse_exposition
from lowbit.serve.paged import PagedServeEngine, choose_engine, engine_store_kind
from lowbit.serve.request import Request
from lowbit.serve.sampling import SamplingParams
from lowbit.spec import SpecError

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], list(range(20, 60)), [40, 41]]
OOM = "CUDA out of memory (injected)"


def _metrics(srv):
    return parse_exposition(httpx.get(srv.url + "/metrics", timeout=30).text)


def _complete(srv, prompt, **kw):
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True, **kw}
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _concurrently(fn, args):
    out, threads = {}, []
    for i, a in enumerate(args):
        threads.append(threading.Thread(target=lambda i=i, a=a: out.__setitem__(i, fn(a))))
        threads[-1].start()
    for t in threads:
        t.join(180)
    return [out[i] for i in range(len(args))]


@pytest.fixture(scope="module")
def pair(tiny_llama, fake_tok, start_server):
    """A classic and a paged server over the same model (fp16 KV)."""
    return (start_server(tiny_llama, fake_tok, kv="fp16", kv_budget_mb=16),
            start_server(tiny_llama, fake_tok, kv="fp16", kv_budget_mb=16, backend="paged"))


def test_paged_greedy_output_equals_the_classic_engines(pair):
    classic, paged = pair
    want = [_complete(classic, p)["choices"][0]["text"] for p in PROMPTS]
    got = _concurrently(lambda p: _complete(paged, p), PROMPTS)  # batched in the paged engine
    assert [g["choices"][0]["text"] for g in got] == want
    assert all(g["usage"] == {"prompt_tokens": len(p), "completion_tokens": 10, "total_tokens": len(p) + 10}
               for g, p in zip(got, PROMPTS))
    body = {"prompt": PROMPTS[2], "max_tokens": 10, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", paged.url + "/v1/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert "".join(json.loads(x[6:])["choices"][0]["text"] for x in lines[:-1]) == want[2]
    m = _metrics(paged)
    assert m["lowbit_step_batch_size_sum"] > m["lowbit_step_batch_size_count"] > 0  # some steps were batched
    assert m["lowbit_step_seconds_count"] >= m["lowbit_step_batch_size_count"] and m["lowbit_step_seconds_sum"] > 0
    assert m["lowbit_kv_pages_used"] == 0 and m["lowbit_kv_pages_free"] == m["lowbit_kv_pages_total"] > 0
    h = httpx.get(paged.url + "/health", timeout=30).json()
    assert h["engine"] == "paged" and h["kv_store"] == "fp16" and h["pages_used"] == 0 and h["last_step_seconds"] > 0
    assert httpx.get(classic.url + "/health", timeout=30).json()["engine"] == "classic"


def test_chunked_prefill_serves_what_whole_prompts_serve(pair, tiny_llama, fake_tok, start_server):
    classic, _ = pair
    chunked = start_server(tiny_llama, fake_tok, kv="fp16", kv_budget_mb=16, backend="paged", prefill_chunk=16)
    prompts = PROMPTS + [[i % 90 for i in range(70)]]  # 40 and 70 tokens: prefilled 16 per step
    want = [_complete(classic, p)["choices"][0]["text"] for p in prompts]
    got = _concurrently(lambda p: _complete(chunked, p), prompts)
    assert [g["choices"][0]["text"] for g in got] == want
    assert sum(s.prefilled for s in chunked.engine.paged.history) >= len(prompts) + 3 + 5 - 2
    assert chunked.engine.paged.prefilling is None and _metrics(chunked)["lowbit_kv_pages_used"] == 0


def test_stop_strings_and_chat_through_the_paged_engine(pair):
    classic, paged = pair
    full = _complete(paged, PROMPTS[1])["choices"][0]["text"]
    stop = full[3:5]
    out = _complete(paged, PROMPTS[1], stop=[stop])
    assert out["choices"][0]["text"] == full[: full.index(stop)] and out["choices"][0]["finish_reason"] == "stop"
    msgs = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    a, b = (httpx.post(s.url + "/v1/chat/completions", json=msgs, timeout=60).json() for s in (classic, paged))
    assert a["choices"][0]["message"] == b["choices"][0]["message"]


def test_seeded_sampling_is_reproducible_and_top_p_is_served(pair):
    _, paged = pair
    kw = dict(temperature=1.5, top_p=0.9, max_tokens=12)
    a = _complete(paged, PROMPTS[0], seed=7, **kw)["choices"][0]["text"]
    crowd = _concurrently(lambda s: _complete(paged, PROMPTS[0], seed=s, **kw), [7, 8, 9, 10])
    texts = [c["choices"][0]["text"] for c in crowd]
    assert texts[0] == a  # the same seed, now in a batch with others
    assert len(set(texts)) > 1


def test_disconnect_cancels_and_frees_pages(pair):
    _, paged = pair
    before = _metrics(paged).get('lowbit_sequences_finished_total{reason="cancelled"}', 0)
    body = {"prompt": [5, 6], "max_tokens": 3000, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", paged.url + "/v1/completions", json=body, timeout=60) as r:
        it = r.iter_lines()
        assert next(it).startswith("data: ")
        m = _metrics(paged)
        assert m["lowbit_kv_pages_used"] == 24 and m["lowbit_kv_bytes_in_use"] > 0  # 3002 tokens: 24 pages of 128
    deadline = time.monotonic() + 30
    while _metrics(paged)["lowbit_kv_pages_used"] and time.monotonic() < deadline:
        time.sleep(0.05)
    m = _metrics(paged)
    assert m["lowbit_kv_pages_used"] == 0 and m["lowbit_running_sequences"] == 0
    assert m['lowbit_sequences_finished_total{reason="cancelled"}'] == before + 1
    assert paged.engine.paged.idle


def _run(engine, prompts, params):
    sinks = [queue.Queue() for _ in prompts]
    reqs = [engine.submit(Request(p, params, sink=q.put)) for p, q in zip(prompts, sinks)]
    engine.start()
    results = []
    for q in sinks:
        while (ev := q.get(timeout=60))["type"] == "delta":
            pass
        results.append(ev)
    return reqs, results


def _solo_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_a_decode_fault_fails_the_steps_requests_and_the_server_goes_on(tiny_llama, fake_tok, model_hook):
    armed = {"left": 1}

    def third_batched_decode(ids, pos):
        if ids.shape[0] == 3 and ids.shape[1] == 1 and armed["left"]:
            armed["left"] -= 1
            raise RuntimeError(OOM)

    model_hook(third_batched_decode, at="embed")
    engine = PagedServeEngine(tiny_llama, fake_tok, kv="fp16", kv_budget_mb=16, prefill_per_step=3)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    try:
        reqs, results = _run(engine, PROMPTS[:3], params)
        assert [ev["type"] for ev in results] == ["error"] * 3
        assert all("decode step over 3 requests" in ev["message"] and "out of memory" in ev["message"] for ev in results)
        assert engine.metrics.get("model_faults_total") == 1 and engine.store.used_blocks == 0
        after = engine.generate(PROMPTS[3], params, timeout=60)
        assert after.finish_reason == "length" and after.token_ids == _solo_greedy(tiny_llama, PROMPTS[3], 10)
        assert engine.alive and engine.loop_errors == 0 and engine.stats()["kv_bytes_reserved"] == 0
    finally:
        engine.shutdown()


def test_a_failing_request_fails_alone(tiny_llama, fake_tok, model_hook, monkeypatch):
    """A prefill that raises, and an exception in one request's token handling: those requests fail, the others
    finish with their solo output and the pages all come back."""
    model_hook(lambda ids, pos: (_ for _ in ()).throw(RuntimeError(OOM)) if ids.shape[1] == 5 else None, at="embed")
    engine = PagedServeEngine(tiny_llama, fake_tok, kv="fp16", kv_budget_mb=16)
    real = engine._take
    bad = {}

    def take(r, token):
        if r is bad.get("r") and r.n_generated == 3:
            raise ValueError("detokenizer broke")
        real(r, token)

    monkeypatch.setattr(engine, "_take", take)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = PROMPTS + [[1, 2, 3]]
    sinks = [queue.Queue() for _ in prompts]
    reqs = [Request(p, params, sink=q.put) for p, q in zip(prompts, sinks)]
    bad["r"] = reqs[4]
    try:
        for r in reqs:
            engine.submit(r)
        engine.start()
        for r in reqs:
            assert r.done.wait(60)
        assert [r.finish_reason for r in reqs] == ["length", "error", "length", "length", "error"]
        assert "prefill failed" in reqs[1].error and "out of memory" in reqs[1].error
        assert "detokenizer broke" in reqs[4].error and reqs[4].n_generated == 3
        assert engine.store.used_blocks == 0 and engine.metrics.get("kv_pages_used") == 0
    finally:
        engine.shutdown()


def test_engine_choice_and_store_mapping(tiny_llama):
    assert engine_store_kind("fp16") == "fp16"
    assert engine_store_kind("kivi:bits=2") == "kivi2"
    assert engine_store_kind("kivi:bits=4,group=32,residual=128,sinks=4") == "kivi4:sinks=4"
    for spec, needle in [("kivi:bits=2,residual=32", "residual=32"), ("kivi:bits=8", "bits=8"),
                         ("kivi:bits=2,group=64,residual=128", "group=64")]:
        with pytest.raises(SpecError, match=needle):
            engine_store_kind(spec)
    assert choose_engine("classic", tiny_llama, "fp16")[0] == "classic"
    kind, why = choose_engine("auto", tiny_llama, "fp16")
    assert kind == "classic" and "not CUDA" in why  # the CPU: today's engine
    assert choose_engine("paged", tiny_llama, "kivi:bits=2")[0] == "paged"
    with pytest.raises(SpecError, match="--engine paged.*residual=32"):
        choose_engine("paged", tiny_llama, "kivi:bits=2,residual=32")
    gpt = SimpleNamespace(config=SimpleNamespace(model_type="gpt2"), parameters=lambda: iter([torch.zeros(1)]))
    with pytest.raises(SpecError, match="model_type='gpt2'"):
        choose_engine("paged", gpt, "fp16")
    with pytest.raises(SpecError, match="--engine must be one of"):
        choose_engine("fast", tiny_llama, "fp16")
    with pytest.raises(SpecError, match="kivi"):
        PagedServeEngine(tiny_llama, None, kv="kivi:bits=2,residual=32")


@pytest.mark.model
def test_bundled_model_paged_equals_classic(smollm2, start_server):
    from lowbit.generation import generate_text

    model, tok = smollm2
    srv = start_server(model, tok, kv="fp16", kv_budget_mb=64, backend="paged", max_context=512)
    for prompt in ("The capital of France is", "Write a haiku about the sea."):
        want = generate_text(model, tok, prompt, kv="fp16", max_new_tokens=10, chat=False)
        body = {"model": "smollm2", "prompt": prompt, "max_tokens": 10, "temperature": 0}
        out = httpx.post(srv.url + "/v1/completions", json=body, timeout=120).json()
        assert out["choices"][0]["text"] == want
    with pytest.raises(SpecError, match="holds no page"):  # 32 rows of KIVI residual rings take 186 MiB
        PagedServeEngine(model, tok, kv="kivi:bits=2", kv_budget_mb=64)
    kivi = start_server(model, tok, kv="kivi:bits=2,sinks=4", kv_budget_mb=64, backend="paged", max_context=512,
                        max_batch=4)
    body = {"model": "smollm2", "prompt": "Tell me a story.", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    out = httpx.post(kivi.url + "/v1/completions", json=body, timeout=120).json()
    assert out["usage"]["completion_tokens"] == 12 and out["choices"][0]["text"]
    assert httpx.get(kivi.url + "/health", timeout=30).json()["kv_store"] == "kivi2:sinks=4"
