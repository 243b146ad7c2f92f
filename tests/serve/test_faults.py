"""Model faults (the batched forward raises, standing for CUDA out of memory) and the recovery of the engine,
and admission refusals that happen before any model work. Tiny random Llama, fake tokenizer."""

import queue

import pytest
import torch

from lowbit.kv import make_cache
from lowbit.serve.engine import MAX_FAULTS, Engine, Request
from lowbit.serve.sampling import SamplingParams

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (injected)"


def _solo_greedy(model, prompt, n, spec="fp16"):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         past_key_values=make_cache(spec, model.config), pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture
def fault(model_hook):
    """``fault(predicate)``: the tiny Llama's forward raises OOM whenever ``predicate(input_ids, position_ids)``."""

    def install(predicate):
        def check(ids, pos):
            if predicate(ids, pos):
                raise RuntimeError(OOM)

        model_hook(check)

    return install


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


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], list(range(20, 31)), [40, 41]]


@pytest.mark.parametrize("spec", ["fp16", "kivi:bits=2,group=32,residual=32"])
def test_one_model_fault_in_a_decode_step_is_recovered(tiny_llama, fake_tok, fault, spec):
    calls = {"batched": 0}

    def third_batched_step(ids, pos):
        if ids is not None and ids.shape[0] > 1:
            calls["batched"] += 1
            return calls["batched"] == 3
        return False

    fault(third_batched_step)
    engine = Engine(tiny_llama, fake_tok, kv=spec, kv_budget_mb=64)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    try:
        reqs, results = _run(engine, PROMPTS, params)
        assert [ev["type"] for ev in results] == ["done"] * 4
        assert engine.metrics.get("model_faults_total") == 1
        assert engine.step_size == 2  # 4 in the faulty step, halved
        assert [r.faults for r in reqs] == [1, 1, 1, 1]  # all four were in the faulty step, and recomputed once
        for r, p in zip(reqs, PROMPTS):
            assert r.tracker.ids == _solo_greedy(tiny_llama, p, 10, spec)
        assert engine.alive and engine.metrics.get("kv_bytes_in_use") == 0
    finally:
        engine.shutdown()


def test_a_request_the_model_always_fails_on_fails_alone(tiny_llama, fake_tok, fault):
    """The model raises whenever position 30 is computed: only the request that gets there (prompt of 25 + 10
    tokens) fails -- its recompute alone raises again -- and the others finish with their solo output."""

    def position_30(ids, pos):
        if pos is not None:
            return bool((pos == 30).any())
        return ids is not None and ids.shape[-1] > 30

    fault(position_30)
    engine = Engine(tiny_llama, fake_tok, kv="fp16", kv_budget_mb=64)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    prompts = PROMPTS[:2] + [list(range(3, 28))]  # 25 tokens: reaches position 30 at its 6th decode step
    try:
        reqs, results = _run(engine, prompts, params)
        assert [ev["type"] for ev in results] == ["done", "done", "error"]
        assert "out of memory" in results[2]["message"]
        for r, p in zip(reqs[:2], prompts[:2]):
            assert r.tracker.ids == _solo_greedy(tiny_llama, p, 10)
        after = engine.generate([4, 5, 6], params, timeout=60)  # and it keeps serving
        assert after.finish_reason == "length" and after.token_ids == _solo_greedy(tiny_llama, [4, 5, 6], 10)
        assert engine.stats()["kv_bytes_reserved"] == 0 and engine.metrics.get("kv_bytes_in_use") == 0
    finally:
        engine.shutdown()


def test_a_fault_at_every_large_batch_shrinks_the_step(tiny_llama, fake_tok, fault):
    """Out of memory whenever more than 2 sequences decode together: after one fault the engine decodes in steps
    of 2, and every request completes with its solo output."""
    fault(lambda ids, pos: ids is not None and ids.shape[0] > 2)
    engine = Engine(tiny_llama, fake_tok, kv="fp16", kv_budget_mb=64)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    try:
        reqs, results = _run(engine, PROMPTS, params)
        assert [ev["type"] for ev in results] == ["done"] * 4
        assert engine.step_size <= 2 and engine.metrics.get("model_faults_total") >= 1
        assert all(r.faults <= MAX_FAULTS for r in reqs)
        for r, p in zip(reqs, PROMPTS):
            assert r.tracker.ids == _solo_greedy(tiny_llama, p, 12)
    finally:
        engine.shutdown()


def test_a_request_in_too_many_faults_fails(tiny_llama, fake_tok, fault):
    """A model that fails every decode step but succeeds on prefills: each request is recomputed MAX_FAULTS times,
    then fails with the fault's message; the loop survives."""
    fault(lambda ids, pos: pos is not None)  # only decode steps pass position_ids
    engine = Engine(tiny_llama, fake_tok, kv="fp16", kv_budget_mb=64)
    try:
        reqs, results = _run(engine, PROMPTS[:2], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
        assert [ev["type"] for ev in results] == ["error", "error"]
        assert all("failed 3 times" in ev["message"] and "out of memory" in ev["message"] for ev in results)
        assert [r.faults for r in reqs] == [MAX_FAULTS + 1] * 2
        assert engine.alive and engine.loop_errors == 0
    finally:
        engine.shutdown()
