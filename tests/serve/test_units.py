"""Fast tests of the serving pieces on a tiny random Llama: batched cache, sizing, sampling, engine."""

import queue
import threading

import pytest
import torch

from lowbit.kv import cache_nbytes, make_cache
from lowbit.serve.batching import BatchedCache, decode_inputs
from lowbit.serve.engine import BudgetError, ContextLengthError, Engine, QueueFullError, Request
from lowbit.serve.metrics import Metrics, parse_exposition
from lowbit.serve.sampling import SamplingParams, TextTracker, sample_token
from lowbit.serve.sizing import KVSizer

KIVI_SMALL = "kivi:bits=2,group=32,residual=32"


def _prefill(model, spec, prompt):
    cache = make_cache(spec, model.config)
    out = model(prompt, past_key_values=cache, use_cache=True)
    return cache, int(out.logits[0, -1].argmax())


@pytest.mark.parametrize("spec", ["fp16", KIVI_SMALL, "kivi:bits=4,group=32,residual=32,sinks=4"])
@torch.no_grad()
def test_batched_decode_equals_each_request_alone(tiny_llama, spec):
    model = tiny_llama
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (1, n), generator=gen) for n in (5, 70, 33)]
    batched = [_prefill(model, spec, p) for p in prompts]
    alone = [_prefill(model, spec, p) for p in prompts]
    caches, toks = [c for c, _ in batched], [t for _, t in batched]
    for step in range(40):
        lengths = [c.get_seq_length() for c in caches]
        bc = BatchedCache(caches, model.config.num_hidden_layers)
        assert bc.get_seq_length() == max(lengths) and bc.get_mask_sizes(1, 0) == (max(lengths) + 1, 0)
        logits = model(**decode_inputs(toks, lengths, device="cpu"), past_key_values=bc, use_cache=True).logits[:, -1]
        assert not bc.failed
        ref = []
        for i, (cache, tok) in enumerate(alone):
            n = cache.get_seq_length()
            out = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True, position_ids=torch.tensor([[n]]))
            ref.append(out.logits[0, -1])
        ref = torch.stack(ref)
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
        toks = logits.argmax(-1).tolist()
        assert toks == ref.argmax(-1).tolist()
        alone = [(c, t) for (c, _), t in zip(alone, toks)]
    # each request's own cache grew by exactly its own tokens
    assert [c.get_seq_length() for c in caches] == [5 + 40, 70 + 40, 33 + 40]


def _budget_specs():
    from lowbit.kv import KV_METHODS

    if "h2o" not in KV_METHODS:
        return [pytest.param("h2o", marks=pytest.mark.skip(reason="budget KV methods not registered"))]
    return ["streaming:budget=0.5", "h2o:budget=0.5", "kvmerger:budget=0.4+kivi:bits=2"]


@pytest.mark.parametrize("spec", _budget_specs())
@torch.no_grad()
def test_batched_decode_with_token_dropping_methods(tiny_llama, spec):
    """Eviction/merging caches return fewer keys than tokens seen: positions and mask lengths differ."""
    model = tiny_llama
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 97, (1, n), generator=gen) for n in (50, 90, 37)]
    batched = [_prefill(model, spec, p) for p in prompts]
    alone = [_prefill(model, spec, p) for p in prompts]
    caches, toks = [c for c, _ in batched], [t for _, t in batched]
    alone_toks = [t for _, t in alone]
    for _ in range(50):
        bc = BatchedCache(caches, model.config.num_hidden_layers)
        logits = model(**decode_inputs(toks, bc.positions, bc.kv_lengths), past_key_values=bc, use_cache=True).logits[:, -1]
        assert not bc.failed
        ref = torch.stack([model(torch.tensor([[t]]), past_key_values=c, use_cache=True).logits[0, -1]
                           for (c, _), t in zip(alone, alone_toks)])
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
        toks = alone_toks = logits.argmax(-1).tolist()
    assert bc.kv_lengths != [p + 1 for p in bc.positions]  # tokens were really dropped


@pytest.mark.parametrize("spec", _budget_specs())
def test_budget_method_reservation_is_an_upper_bound(tiny_llama, spec):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sizer = KVSizer(spec, tiny_llama.config)
    gen = torch.Generator().manual_seed(4)
    for prompt in (5, 120):
        cache = make_cache(spec, tiny_llama.config)
        most = 0
        for step in range(160):
            t = prompt if step == 0 else 1
            for layer in range(2):
                cache.update(torch.randn(1, 2, t, 32, generator=gen), torch.randn(1, 2, t, 32, generator=gen), layer)
            most = max(most, cache_nbytes(cache)[0])
            if step % 40 == 39:
                assert most <= sizer.peak_bytes(cache.get_seq_length())


@torch.no_grad()
def test_batched_cache_isolates_a_failing_request(tiny_llama):
    model = tiny_llama
    caches = [make_cache("fp16", model.config) for _ in range(3)]
    for c, n in zip(caches, (4, 9, 6)):
        model(torch.randint(0, 97, (1, n)), past_key_values=c, use_cache=True)

    def boom(*a, **k):
        raise RuntimeError("injected")

    caches[1].layers[1].update = boom
    lengths = [c.get_seq_length() for c in caches]
    bc = BatchedCache(caches, 2)
    out = model(**decode_inputs([1, 2, 3], lengths, device="cpu"), past_key_values=bc, use_cache=True)
    assert set(bc.failed) == {1} and torch.isfinite(out.logits).all()
    assert [caches[0].get_seq_length(), caches[2].get_seq_length()] == [5, 7]


def test_decode_inputs_mask_and_positions():
    inp = decode_inputs([7, 8], [3, 1])
    assert inp["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert inp["position_ids"].tolist() == [[3], [1]]


@pytest.mark.parametrize("spec", ["fp16", "kivi:bits=2", "kivi:bits=4,group=32,residual=64", "kivi:bits=2,group=32,residual=32,sinks=4"])
def test_kv_sizer_matches_real_caches(tiny_llama, spec):
    sizer = KVSizer(spec, tiny_llama.config)
    layers = tiny_llama.config.num_hidden_layers
    for prefill in (1, 37, 130):
        cache = make_cache(spec, tiny_llama.config)
        gen = torch.Generator().manual_seed(prefill)
        shape = lambda t: (1, 2, t, 32)  # noqa: E731 - tiny_llama: 2 KV heads, head_dim 32
        seen = []
        for step in range(150):
            t = prefill if step == 0 else 1
            for layer in range(layers):
                cache.update(torch.randn(shape(t), generator=gen), torch.randn(shape(t), generator=gen), layer)
            n = cache.get_seq_length()
            got = cache_nbytes(cache)[0]
            assert got == sizer.bytes_at(n), (spec, prefill, n)
            seen.append(got)
        assert sizer.peak_bytes(cache.get_seq_length()) >= max(seen)
    if spec.startswith("kivi:bits=2"):
        assert sizer.bytes_at(4096) < KVSizer("fp16", tiny_llama.config).bytes_at(4096) / 4


def test_text_tracker_streams_what_it_returns_and_stops():
    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(ord("a") + i) for i in ids)

    t = TextTracker(Tok(), stop=["cde"])
    out = [t.add(i) for i in range(6)]
    out.append(t.flush())
    assert "".join(out) == "ab" and t.final_text == "ab" and t.stopped_at == 2
    t = TextTracker(Tok(), stop=["xyz"])
    assert "".join([t.add(i) for i in range(5)] + [t.flush()]) == "abcde" == t.final_text


def test_sampling_greedy_seeded_and_top_p():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    assert sample_token(logits, SamplingParams(temperature=0), None) == int(logits.argmax())
    p = SamplingParams(temperature=1.0, seed=7)
    a = [sample_token(logits, p, g) for g in [p.make_generator()] for _ in range(20)]
    b = [sample_token(logits, p, g) for g in [p.make_generator()] for _ in range(20)]
    assert a == b and len(set(a)) > 1
    tiny_p = SamplingParams(temperature=1.0, top_p=1e-6, seed=1)
    assert all(sample_token(logits, tiny_p, tiny_p.make_generator()) == int(logits.argmax()) for _ in range(5))
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


def test_metrics_exposition():
    m = Metrics()
    m.inc("requests_total", endpoint="/v1/completions", status="200")
    m.observe("time_to_first_token_seconds", 0.3)
    m.set("kv_bytes_in_use", 1234)
    text = m.render()
    assert "# TYPE lowbit_time_to_first_token_seconds histogram" in text
    parsed = parse_exposition(text)
    assert parsed['lowbit_requests_total{endpoint="/v1/completions",status="200"}'] == 1
    assert parsed['lowbit_time_to_first_token_seconds_bucket{le="0.5"}'] == 1
    assert parsed['lowbit_time_to_first_token_seconds_bucket{le="0.25"}'] == 0
    assert parsed["lowbit_kv_bytes_in_use"] == 1234


# ---------------------------------------------------------------------- engine on the tiny model
def _solo_greedy(model, spec, prompt, n):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         past_key_values=make_cache(spec, model.config), pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def _submit_all(engine, prompts, params):
    reqs, sinks = [], []
    for p in prompts:
        q = queue.Queue()
        reqs.append(engine.submit(Request(p, params, sink=q.put)))
        sinks.append(q)
    return reqs, sinks


def _eventually(fn, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _wait(req, sink, timeout=60):
    while True:
        ev = sink.get(timeout=timeout)
        if ev["type"] != "delta":
            return ev


@pytest.mark.parametrize("spec", ["fp16", KIVI_SMALL])
def test_engine_batches_and_matches_solo_generation(tiny_llama, fake_tok, spec):
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in (3, 40, 17, 60)]
    engine = Engine(tiny_llama, fake_tok, kv=spec, kv_budget_mb=64)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    reqs, sinks = _submit_all(engine, prompts, params)
    engine.start()
    try:
        for r, q, p in zip(reqs, sinks, prompts):
            ev = _wait(r, q)
            assert ev["type"] == "done" and ev["finish_reason"] == "length" and ev["completion_tokens"] == 24
            assert r.tracker.ids == _solo_greedy(tiny_llama, spec, p, 24)
        assert engine.metrics.get("running_sequences_peak") == 4
        assert _eventually(lambda: engine.metrics.get("kv_bytes_in_use") == 0 and engine.stats()["kv_bytes_reserved"] == 0)
    finally:
        engine.shutdown()


def test_engine_failure_in_one_request_fails_only_it(tiny_llama, fake_tok):
    engine = Engine(tiny_llama, fake_tok, kv="fp16", kv_budget_mb=64)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13]]
    reqs = [Request(p, params, sink=queue.Queue().put) for p in prompts]
    sinks = [queue.Queue() for _ in prompts]
    for r, q in zip(reqs, sinks):
        r.sink = q.put
    calls = {"n": 0}

    def faulty_cache():
        cache = make_cache("fp16", tiny_llama.config)
        real = cache.layers[1].update

        def update(*a, **k):
            calls["n"] += 1
            if calls["n"] > 4:  # fails in a batched decode step, after a good prefill
                raise RuntimeError("injected cache failure")
            return real(*a, **k)

        cache.layers[1].update = update
        return cache

    reqs[1].cache_factory = faulty_cache
    bad_prefill = Request([1, 2, 3], params)
    bad_prefill.cache_factory = lambda: (_ for _ in ()).throw(RuntimeError("no cache for you"))
    q_bad = queue.Queue()
    bad_prefill.sink = q_bad.put
    for r in reqs + [bad_prefill]:
        engine.submit(r)
    engine.start()
    try:
        results = [_wait(r, q) for r, q in zip(reqs, sinks)]
        assert results[1]["type"] == "error" and "injected" in results[1]["message"]
        assert _wait(bad_prefill, q_bad)["type"] == "error"
        for i in (0, 2):
            assert results[i]["type"] == "done" and reqs[i].tracker.ids == _solo_greedy(tiny_llama, "fp16", prompts[i], 12)
        after = engine.generate([4, 5, 6], params, timeout=60)  # the loop survived
        assert after.finish_reason == "length" and after.token_ids == _solo_greedy(tiny_llama, "fp16", [4, 5, 6], 12)
        assert _eventually(lambda: engine.metrics.get("kv_bytes_in_use") == 0)
    finally:
        engine.shutdown()


def test_admission_by_kv_budget_admits_more_with_kivi(tiny_llama, fake_tok):
    prompt = list(range(3, 3 + 90)) * 2  # 180 tokens
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    fp16 = KVSizer("fp16", tiny_llama.config).peak_bytes(186)
    kivi = KVSizer(KIVI_SMALL, tiny_llama.config).peak_bytes(186)
    assert kivi * 2.5 < fp16
    budget_mb = (fp16 * 1.5) / (1 << 20)  # room for 1 fp16 request, 3+ KIVI-2 ones
    peaks = {}
    for spec in ("fp16", KIVI_SMALL):
        engine = Engine(tiny_llama, fake_tok, kv=spec, kv_budget_mb=budget_mb)
        reqs, sinks = _submit_all(engine, [prompt] * 4, params)
        engine.start()
        try:
            assert all(_wait(r, q)["type"] == "done" for r, q in zip(reqs, sinks))
            peaks[spec] = engine.metrics.get("running_sequences_peak")
        finally:
            engine.shutdown()
    assert peaks["fp16"] == 1 and peaks[KIVI_SMALL] >= 3


def test_engine_refusals(tiny_llama, fake_tok):
    engine = Engine(tiny_llama, fake_tok, kv="fp16", kv_budget_mb=0.05, max_queue=1)
    params = SamplingParams(max_tokens=4, temperature=0)
    with pytest.raises(BudgetError):
        engine.submit(Request(list(range(3, 90)) * 4, params))
    with pytest.raises(ContextLengthError):
        engine.submit(Request([3] * 4095, SamplingParams(max_tokens=8)))
    engine.submit(Request([3, 4], params))  # not started: it waits
    with pytest.raises(QueueFullError):
        engine.submit(Request([3, 4], params))
    engine.start()
    engine.shutdown(drain=True, timeout=30)
    assert not engine.alive


def test_cancel_frees_the_cache(tiny_llama, fake_tok):
    engine = Engine(tiny_llama, fake_tok, kv=KIVI_SMALL, kv_budget_mb=64).start()
    try:
        got_first = threading.Event()
        events = []

        def sink(ev):
            events.append(ev)
            got_first.set()

        r = engine.submit(Request(list(range(3, 50)), SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True), sink=sink))
        assert got_first.wait(30)
        assert engine.stats()["kv_bytes_reserved"] > 0
        r.cancel()
        assert r.done.wait(30)
        assert events[-1]["finish_reason"] == "cancelled"
        assert _eventually(lambda: engine.stats()["kv_bytes_reserved"] == 0 and engine.metrics.get("kv_bytes_in_use") == 0)
    finally:
        engine.shutdown()
