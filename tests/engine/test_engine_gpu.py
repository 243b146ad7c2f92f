"""The engine's GPU paths against its PyTorch paths (skipped without CUDA): Triton append bit-exact, paged
attention kernels within bf16 tolerance, CUDA-graph decode equal to eager decode."""

import pytest
import torch

from lowbit.engine import PagedEngine, make_store

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _store(kind, rows=3, h=4, d=128, dtype=torch.bfloat16):
    return make_store(kind, layers=2, kv_heads=h, head_dim=d, rows=rows, max_tokens=1024, budget_bytes=256 << 20,
                      dtype=dtype, device="cuda")


def _fill(stores, prompts, steps, h=4, d=128, seed=0):
    """The same prompts and appends into every store (row r: prompt of prompts[r] tokens)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    for s in stores:
        for r, n in enumerate(prompts):
            s.reserve(r, n + steps + 1)
    for layer in range(2):
        for r, n in enumerate(prompts):
            k = torch.randn(h, n, d, device="cuda", generator=g, dtype=torch.bfloat16) * 2 + 0.3
            v = torch.randn(h, n, d, device="cuda", generator=g, dtype=torch.bfloat16)
            for s in stores:
                s.write_prompt(layer, r, k, v)
    pos = torch.tensor(prompts, device="cuda")
    for _ in range(steps):
        for s in stores:
            s.begin_step(pos)
        for layer in range(2):
            k = torch.randn(len(prompts), h, d, device="cuda", generator=g, dtype=torch.bfloat16) * 2
            v = torch.randn(len(prompts), h, d, device="cuda", generator=g, dtype=torch.bfloat16)
            for s in stores:
                s.append(layer, pos, k, v)
        pos = pos + 1
    return pos - 1


@cuda
@pytest.mark.skipif(not _triton(), reason="needs Triton")
@pytest.mark.parametrize("kind", ["kivi2", "kivi4:sinks=4", "kivi2:residual=32", "kivi4:sinks=3,residual=64"])
def test_triton_append_writes_the_reference_bytes(kind):
    fast, ref = _store(kind), _store(kind)
    ref.ops.use_triton = False
    assert fast.ops.use_triton
    _fill([fast, ref], [3, 200, 383], steps=140)
    assert fast.ops.use_triton, "the Triton append fell back to the PyTorch path"
    assert torch.equal(fast.pool, ref.pool)
    assert torch.equal(fast.ring_k, ref.ring_k) and torch.equal(fast.ring_v, ref.ring_v)
    assert torch.equal(fast.sink_k, ref.sink_k) and torch.equal(fast.sink_v, ref.sink_v)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@cuda
@pytest.mark.parametrize("kind", ["fp16", "kivi2", "kivi4:sinks=4", "kivi2:residual=64", "kivi2:sinks=3,residual=32"])
def test_paged_attention_kernels_match_the_reference(kind):
    store = _store(kind)
    pos = _fill([store], [5, 300, 700], steps=9, seed=1)
    q = torch.randn(3, 16, 128, device="cuda", dtype=torch.bfloat16)
    store.begin_step(pos)
    got = store.attend(0, q, pos, 0.088)
    if kind == "fp16":
        from lowbit.engine.fp16_ops import paged_decode_ref

        want = paged_decode_ref(q, store.k_pool[0], store.v_pool[0], store.table[:3], pos, 0.088)
    else:
        assert store.ops.use_kernel, "the paged CUDA kernel did not build"
        want = store.ops.attend_ref(store, 0, q, pos, 0.088)
    assert _rel(got, want) < 2e-2


@cuda
@pytest.mark.parametrize("kind", ["kivi2:residual=32", "kivi4:sinks=4,residual=64", "kivi2"])
def test_ring_attention_matches_the_reference_at_every_ring_fill(kind):
    """Step by step through more than a ring (every residual length 0..R, key flushes into partly filled pages), the
    kernel reading the ring (row k % R) matches the float32 reference."""
    store = _store(kind)
    r = store.residual
    prompts = [1, r + 3, 2 * r - 1]
    g = torch.Generator(device="cuda").manual_seed(r)
    for row, n in enumerate(prompts):
        store.reserve(row, n + r + 2)
    for layer in range(2):
        for row, n in enumerate(prompts):
            store.write_prompt(layer, row, torch.randn(4, n, 128, device="cuda", generator=g, dtype=torch.bfloat16),
                               torch.randn(4, n, 128, device="cuda", generator=g, dtype=torch.bfloat16))
    pos = torch.tensor(prompts, device="cuda")
    for _ in range(r + 1):
        store.begin_step(pos)
        for layer in range(2):
            store.append(layer, pos, torch.randn(3, 4, 128, device="cuda", generator=g, dtype=torch.bfloat16),
                         torch.randn(3, 4, 128, device="cuda", generator=g, dtype=torch.bfloat16))
        q = torch.randn(3, 16, 128, device="cuda", generator=g, dtype=torch.bfloat16)
        assert store.ops.use_kernel and store.ops.use_triton
        got, want = store.attend(1, q, pos, 0.088), store.ops.attend_ref(store, 1, q, pos, 0.088)
        assert _rel(got, want) < 2e-2, f"positions {pos.tolist()}"
        pos = pos + 1


def _random_llama(layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=128, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()


@cuda
@pytest.mark.parametrize("kind", ["fp16", "kivi2", "kivi2:residual=32"])
def test_graph_decode_equals_eager_decode(kind):
    model = _random_llama()
    prompts = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 260, 500)]
    outs = []
    for graphs in (True, False):
        engine = PagedEngine(model, kv=kind, kv_budget_mb=256, max_batch=4, max_tokens=1024, graphs=graphs)
        assert engine.graphs.enabled == graphs
        reqs = [engine.add(p, 150) for p in prompts]
        engine.run()
        outs.append([r.output for r in reqs])
        assert engine.store.used_blocks == 0
    assert outs[0] == outs[1]


@cuda
@pytest.mark.parametrize("kind", ["fp16", "kivi2"])
def test_chunked_prefill_with_graphs_equals_eager(kind):
    """Decode graphs replayed while a prompt is chunked in the last row leave that row alone (graphs == eager)."""
    model = _random_llama()
    prompts = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 900, 30)]
    outs = []
    for graphs in (True, False):
        engine = PagedEngine(model, kv=kind, kv_budget_mb=256, max_batch=4, max_tokens=1024, graphs=graphs,
                             prefill_chunk=256)
        reqs = [engine.add(p, 40) for p in prompts]
        engine.run()
        outs.append([r.output for r in reqs])
        assert engine.store.used_blocks == 0
    assert outs[0] == outs[1]


@cuda
@pytest.mark.parametrize("graphs", [True, False])
def test_decode_is_right_behind_a_busy_stream(graphs):
    """Each step uploads the rows' positions asynchronously from pinned memory: with the stream held back by queued
    work, the host must not change them before the step's sync (it did, and a step read the next step's positions)."""
    model = _random_llama()
    prompts = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 260)]
    outs = []
    for busy in (False, True):
        engine = PagedEngine(model, kv="fp16", kv_budget_mb=256, max_batch=4, max_tokens=1024, graphs=graphs)
        reqs = [engine.add(p, 40) for p in prompts]
        while not engine.idle:
            if busy:
                torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time queued ahead of the step's position upload
            engine.step()
        outs.append([r.output for r in reqs])
    assert outs[0] == outs[1]
