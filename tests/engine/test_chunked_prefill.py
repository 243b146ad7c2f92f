"""Chunked prefill on the CPU: chunk writes store the bytes a one-shot prompt write stores, a chunked prompt
generates what a whole one generates (fp16 exactly; KIVI drifts as decoding does), and decoding rows go on while a prompt is chunked."""

import pytest
import torch

from lowbit.engine import PagedEngine, make_store


def _store(kind, rows=2, dtype=torch.float32):
    return make_store(kind, layers=1, kv_heads=2, head_dim=64, rows=rows, max_tokens=1024, budget_bytes=64 << 20,
                      dtype=dtype, device="cpu")


@pytest.mark.parametrize("kind", ["fp16", "kivi2", "kivi4", "kivi2:sinks=4", "kivi2:residual=32", "kivi4:sinks=3,residual=64"])
@pytest.mark.parametrize("n,chunks", [(700, [128, 128, 256, 188]), (300, [3, 200, 97]), (130, [64, 66]),
                                      (517, [250, 1, 129, 137])])
def test_chunk_writes_store_what_one_write_stores(kind, n, chunks):
    g = torch.Generator().manual_seed(n + len(kind))
    k, v = torch.randn(2, n, 64, generator=g) * 2 + 0.3, torch.randn(2, n, 64, generator=g) * 1.5
    one, parts = _store(kind), _store(kind)
    for s in (one, parts):
        s.reserve(1, n + 10)
    one.write_prompt(0, 1, k, v)
    start = 0
    for c in chunks:
        got_k, got_v = parts.read_tokens(0, 1, start) if start else (None, None)
        if start:  # what a chunk attends to: the tokens so far as the store gives them back
            want_k, want_v = _one_shot(kind, k[:, :start], v[:, :start]).read_tokens(0, 1, start)
            assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
        parts.write_tokens(0, 1, k[:, start : start + c], v[:, start : start + c], start)
        start += c
    names = ["k_pool", "v_pool"] if kind == "fp16" else ["pool", "ring_k", "ring_v", "sink_k", "sink_v"]
    for name in names:
        assert torch.equal(getattr(parts, name), getattr(one, name)), name
    rk, rv = one.read_tokens(0, 1, n)
    if kind == "fp16":
        assert torch.equal(rk, k) and torch.equal(rv, v)
    else:  # quantized: close to the input, exact for the sinks and the newest (ring) tokens
        last = min(100, one.residual)  # the newest values are still in the full-precision ring
        assert (rk - k).abs().mean() < 0.5 * k.std() and torch.equal(rv[:, -last:], v[:, -last:])


def _one_shot(kind, k, v):
    s = _store(kind)
    s.reserve(1, k.shape[1] + 10)
    s.write_prompt(0, 1, k, v)
    return s


def _run(model, kv, prompts, chunk, max_batch=4, new=10):
    engine = PagedEngine(model, kv=kv, kv_budget_mb=64, max_batch=max_batch, max_tokens=1024, prefill_chunk=chunk)
    reqs = [engine.add(p, new) for p in prompts]
    engine.run()
    assert engine.store.used_blocks == 0 and engine.prefilling is None
    return engine, [r.output for r in reqs]


PROMPTS = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 600, 300, 5)]


def test_fp16_chunked_generates_what_whole_prompts_generate(tiny_llama):
    _, whole = _run(tiny_llama, "fp16", PROMPTS, None)
    engine, chunked = _run(tiny_llama, "fp16", PROMPTS, 128)
    assert chunked == whole
    steps = [s for s in engine.history if s.prefilled]
    assert len(steps) >= 5 + 3 + 1  # 600 tokens take 5 chunks, 300 take 3, the short ones one step each
    # the first request decodes while the long prompt is chunked: a step with a prefill and a batch of 1 or more
    assert any(s.prefilled and s.batch >= 1 for s in engine.history[1:6])


def _last_logprobs(model, kv, ids, chunk=None, decode_from=None):
    """Log-probs after the last of `ids`: prefilled in chunks of `chunk`, or prefilled up to `decode_from` and
    teacher-forced one token per decode step from there."""
    e = PagedEngine(model, kv=kv, kv_budget_mb=64, max_batch=1, max_tokens=1024, graphs=False)
    e.store.reserve(0, len(ids) + 1)
    if decode_from is None:
        for start in range(0, len(ids), chunk):
            out = e.runner.prefill_chunk(0, ids[start : start + chunk], start)
    else:
        e.runner.prefill(0, ids[:decode_from])
        for t in range(decode_from, len(ids)):
            pos = torch.tensor([t])
            e.store.begin_step(pos)
            out = e.runner.decode(ids[t : t + 1], pos)[0]
    return out.double().log_softmax(-1)


@pytest.mark.parametrize("kv", ["kivi2", "kivi4:sinks=4", "kivi2:residual=32"])
def test_kivi_chunks_read_earlier_chunks_as_decode_does(tiny_llama, kv):
    """A chunk attends to earlier chunks quantized, as a decode step does: its drift from the fp16 model is that
    of teacher-forced decoding over the same tokens (not zero, not larger), and short prompts are not chunked."""
    ids = torch.tensor(PROMPTS[1])
    ref = _last_logprobs(tiny_llama, "fp16", ids, chunk=len(ids))

    def kl(lp):
        return float((ref.exp() * (ref - lp)).sum())

    assert kl(_last_logprobs(tiny_llama, "fp16", ids, chunk=128)) < 1e-9  # fp16: chunked == whole
    assert kl(_last_logprobs(tiny_llama, kv, ids, chunk=len(ids))) < 1e-9  # one chunk: full precision
    chunked, decoded = kl(_last_logprobs(tiny_llama, kv, ids, chunk=256)), kl(_last_logprobs(tiny_llama, kv, ids, decode_from=344))
    assert 0.01 < chunked < 1.5 * decoded + 0.05, (chunked, decoded)
    _, whole = _run(tiny_llama, kv, PROMPTS, None)
    _, parts = _run(tiny_llama, kv, PROMPTS, 256)
    assert parts[0] == whole[0] and parts[3] == whole[3]


def test_chunked_prompt_in_a_single_row_engine_and_cancel(tiny_llama):
    _, whole = _run(tiny_llama, "kivi2", PROMPTS[1:2], None, max_batch=1)
    _, chunked = _run(tiny_llama, "kivi2", PROMPTS[1:2], 700, max_batch=1)  # one chunk: the same as whole
    assert chunked == whole
    engine = PagedEngine(tiny_llama, kv="fp16", kv_budget_mb=64, max_batch=2, max_tokens=1024, prefill_chunk=128)
    long = engine.add(PROMPTS[1], 5)
    engine.step()
    assert engine.prefilling is long and engine.store.used_blocks > 0
    engine.cancel(long)
    assert engine.prefilling is None and engine.store.used_blocks == 0 and long.finished and engine.idle
    with pytest.raises(ValueError, match="prefill_chunk"):
        PagedEngine(tiny_llama, kv="fp16", kv_budget_mb=64, max_batch=2, prefill_chunk=0)


def test_engine_bench_workload_runs_chunked_on_the_cpu(tiny_llama):
    """`lowbit bench engine`'s workload (the GPU benchmark's code path) with --prefill-chunk: every request's
    tokens come out, pages come back, and chunking spreads the prefill over more steps."""
    from lowbit.bench.engine import workload

    whole = workload(tiny_llama, "kivi2", requests=3, prompt=300, output=4, budget_gb=0.0625, max_batch=2)
    chunked = workload(tiny_llama, "kivi2", requests=3, prompt=300, output=4, budget_gb=0.0625, max_batch=2,
                       prefill_chunk=128)
    assert chunked["prefill_chunk"] == 128 and whole["prefill_chunk"] is None
    assert chunked["output_tok_s"] > 0 and chunked["steps"] > whole["steps"]
