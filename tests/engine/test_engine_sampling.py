"""The engine's vectorised sampling (temperature, top-p, per-request seeds keyed by position and token id) and a
prefill that raises failing its request alone. Tiny random Llama on the CPU."""

from types import SimpleNamespace

import pytest
import torch

from lowbit.engine import PagedEngine
from lowbit.engine.core import _exponential


def _engine(model, **kw):
    kw.setdefault("max_batch", 4)
    return PagedEngine(model, kv="fp16", kv_budget_mb=16, max_tokens=256, **kw)


def test_a_seeded_request_draws_the_same_tokens_whatever_the_batch(tiny_llama):
    prompt = [5, 6, 7, 8]
    alone = _engine(tiny_llama)
    a = alone.add(prompt, 12, temperature=1.5, top_p=0.95, seed=42)
    alone.run()
    crowded = _engine(tiny_llama)
    others = [crowded.add([9, 10 + i], 6 + 3 * i, temperature=0.7 * i, seed=i) for i in range(3)]
    b = crowded.add(prompt, 12, temperature=1.5, top_p=0.95, seed=42)
    crowded.run()
    assert max(s.batch for s in crowded.history) == 4 and all(len(o.output) == 6 + 3 * i for i, o in enumerate(others))
    assert a.output == b.output
    seeds = _engine(tiny_llama)
    outs = [seeds.add(prompt, 12, temperature=1.5, seed=s) for s in range(4)]
    seeds.run()
    assert len({tuple(r.output) for r in outs}) > 1  # the seed matters
    greedy = _engine(tiny_llama)
    g = [greedy.add(prompt, 12), greedy.add(prompt, 12, temperature=1e-39, seed=3)]
    greedy.run()
    assert g[0].output == g[1].output  # a vanishing temperature samples the argmax


def test_samples_follow_the_top_p_softmax(tiny_llama):
    rows = 400
    engine = PagedEngine(tiny_llama, kv="fp16", kv_budget_mb=16, max_batch=rows, max_tokens=128)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    engine.running = [SimpleNamespace(temperature=0.8, top_p=0.9)] * rows
    engine.temps[:] = 0.8
    engine.top_ps[:] = 0.9
    engine.seeds[:] = torch.arange(rows) * 7919 + 3
    drawn = torch.cat([engine._sample(logits.expand(rows, 6), rows, torch.full((rows,), p)) for p in range(15)])
    counts = torch.bincount(drawn, minlength=6).double()
    probs = torch.softmax(logits / 0.8, -1)
    nucleus = int(((torch.cumsum(probs, 0) - probs) < 0.9).sum())
    assert 1 < nucleus < 6 and counts[nucleus:].sum() == 0
    expected = probs[:nucleus] / probs[:nucleus].sum()
    assert torch.allclose(counts[:nucleus] / counts.sum(), expected.double(), atol=0.025)
    # without top_p every token is reachable; greedy rows ignore the noise
    engine.top_ps[:] = 1.0
    engine.running = [SimpleNamespace(temperature=0.8, top_p=1.0)] * rows
    drawn = torch.cat([engine._sample(logits.expand(rows, 6) * 0.3, rows, torch.full((rows,), p)) for p in range(5)])
    assert torch.bincount(drawn, minlength=6).min() > 0
    engine.temps[: rows // 2] = 0.0
    drawn = engine._sample(logits.expand(rows, 6) * 0.3, rows, torch.full((rows,), 99))
    assert (drawn[: rows // 2] == 0).all() and (drawn[rows // 2 :] != 0).any()


def test_exponential_draws_are_keyed_and_exp1():
    seeds, at = torch.tensor([1, 2, 1]), torch.tensor([10, 10, 11])
    e = _exponential(seeds, at, 20000)
    assert torch.equal(e, _exponential(seeds, at, 20000))
    assert not torch.equal(e[0], e[1]) and not torch.equal(e[0], e[2])
    assert (e > 0).all() and abs(float(e.mean()) - 1.0) < 0.02 and abs(float(e.var()) - 1.0) < 0.05


def test_a_prefill_that_raises_fails_its_request_alone(tiny_llama):
    def boom(module, args):
        if args[0].shape[-1] == 7:
            raise RuntimeError("CUDA out of memory (injected)")

    handle = tiny_llama.model.embed_tokens.register_forward_pre_hook(boom)
    try:
        engine = _engine(tiny_llama, max_batch=3)
        reqs = [engine.add(list(range(1, n + 1)), 8) for n in (5, 7, 9)]
        engine.run()
    finally:
        handle.remove()
    assert reqs[1].finished and "out of memory" in reqs[1].error and reqs[1].output == []
    for r in (reqs[0], reqs[2]):
        want = tiny_llama.generate(torch.tensor([r.prompt]), max_new_tokens=8, do_sample=False)[0, len(r.prompt):]
        assert r.error is None and r.output == want.tolist()
    assert engine.store.used_blocks == 0 and engine.idle


@pytest.mark.parametrize("bad", [0.0, 1.5])
def test_top_p_is_checked(tiny_llama, bad):
    with pytest.raises(ValueError, match="top_p"):
        _engine(tiny_llama).add([1, 2], 3, temperature=1.0, top_p=bad)
