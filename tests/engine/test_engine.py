"""The paged engine on the CPU (PyTorch paths): storage bit-exact against KIVI's own cache, generation equal to
transformers', exact admission, compact rows, clear errors."""

import pytest
import torch

from lowbit.engine import PagedEngine, PoolFullError, make_store
from lowbit.engine.runner import LlamaRunner
from lowbit.kv.kivi import KiviCache, KiviLayer
from lowbit.quant.kivi import dequantized_kv


def _store(kind, h=2, d=64, rows=2, max_tokens=1024, mb=64, dtype=torch.float32):
    return make_store(kind, layers=1, kv_heads=h, head_dim=d, rows=rows, max_tokens=max_tokens, budget_bytes=mb << 20,
                      dtype=dtype, device="cpu")


@pytest.mark.parametrize("bits,prompt,steps,sinks,residual", [(2, 300, 200, 0, 128), (2, 5, 270, 4, 128), (4, 140, 130, 0, 128),
                                                         (4, 128, 3, 2, 128), (2, 300, 200, 0, 64), (2, 5, 270, 4, 32),
                                                         (4, 100, 90, 3, 64), (2, 64, 70, 0, 32)])
def test_kivi_store_holds_exactly_what_kivi_cache_holds(bits, prompt, steps, sinks, residual):
    """Prompt write then appends (row 1; row 0 a second sequence) == KiviLayer, bit for bit, after every step; the
    shorter rings flush keys into a page a run of R tokens at a time."""
    g = torch.Generator().manual_seed(bits * 1000 + prompt + residual)
    h, d = 2, 64
    store = _store(f"kivi{bits}:sinks={sinks},residual={residual}", h, d)
    assert store.ring_k.shape[-2] == residual
    store.reserve(0, 400)
    store.reserve(1, prompt + steps)
    ref = KiviLayer(bits=bits, group=32, residual=residual, sinks=sinks, storage_dtype=torch.float32)
    k, v = torch.randn(1, h, prompt, d, generator=g) * 2 + 0.5, torch.randn(1, h, prompt, d, generator=g) * 2
    store.write_prompt(0, 1, k[0], v[0])
    ref.update(k, v)
    for i in range(steps + 1):
        pos = torch.tensor([i, prompt + i - 1])
        if i:
            kn, vn = torch.randn(2, h, d, generator=g) * 3, torch.randn(2, h, d, generator=g)
            store.begin_step(pos)
            store.append(0, pos, kn, vn)
            ref.update(kn[1:2, :, None], vn[1:2, :, None])
        if i % 37 and i % residual not in (0, 1) and i != steps:
            continue
        keys, values, valid = store.ops.dequantized(store, 0, 2, pos)
        want_k, want_v = dequantized_kv(ref.parts(), torch.float32)
        assert torch.equal(keys[1][:, valid[1]][:, :-1], want_k[0][:, :-1]) and torch.equal(values[1][:, valid[1]], want_v[0]), i


def test_fp16_engine_generates_what_transformers_generates(tiny_llama):
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 140, 300)]
    engine = PagedEngine(tiny_llama, kv="fp16", kv_budget_mb=64, max_batch=4, max_tokens=512)
    reqs = [engine.add(p, 12) for p in prompts]
    engine.run()
    for p, r in zip(prompts, reqs):
        want = tiny_llama.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):].tolist()
        assert r.output == want
    assert engine.store.used_blocks == 0 and max(s.batch for s in engine.history) == 3
    assert all(0 < s.admit_s <= s.step_s for s in engine.history if s.prefilled)  # the prefill's share of its step
    assert all(s.admit_s < s.step_s for s in engine.history if not s.prefilled)


@pytest.mark.parametrize("residual", [128, 32])
def test_kivi_runner_logits_match_kivi_cache(tiny_llama, residual):
    """Teacher-forced decode over KIVI-2 pages == transformers with lowbit's KiviCache (reference path)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 512, (1, 420), generator=g)
    n0 = 250
    cfg = tiny_llama.config
    store = make_store(f"kivi2:sinks=4,residual={residual}", layers=2, kv_heads=2, head_dim=64, rows=1, max_tokens=512,
                       budget_bytes=64 << 20, dtype=torch.float32, device="cpu")
    store.reserve(0, 420)
    runner = LlamaRunner(tiny_llama, store)
    cache = KiviCache(cfg, bits=2, group=32, residual=residual, sinks=4, storage_dtype=torch.float32)
    with torch.no_grad():
        want = tiny_llama(ids[:, :n0], past_key_values=cache).logits[0, -1]
        got = runner.prefill(0, ids[0, :n0])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for t in range(n0, 420):
            want = tiny_llama(ids[:, t : t + 1], past_key_values=cache).logits[0, -1]
            got = runner.decode(ids[0, t : t + 1], torch.tensor([t]))[0]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {t}: {m}")


def test_admission_is_exact_and_rows_stay_compact(tiny_llama):
    """A budget with pages for two requests at a time: never more pages than the pool, never more than two
    running, each output equal to running the request alone."""
    store_probe = _store("fp16", h=2, d=64, rows=4)
    page = store_probe.block_bytes() * 2  # 2 layers
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (300, 290, 280, 270)]
    budget = (2 * 3 * page + page) / 2**20  # 3 pages each (311-340 tokens): two requests, + the scratch block
    engine = PagedEngine(tiny_llama, kv="fp16", kv_budget_mb=budget, max_batch=4, max_tokens=384)
    assert engine.store.blocks - 1 == 6
    reqs = [engine.add(p, 40) for p in prompts]
    while not engine.idle:
        stats = engine.step()
        assert stats.pages_used <= 6 and stats.batch <= 2
        assert [r.row for r in engine.running] == list(range(len(engine.running)))
    assert engine.store.used_blocks == 0 and sorted(engine.store.free_blocks) == list(range(1, 7))
    for p, r in zip(prompts, reqs):
        alone = PagedEngine(tiny_llama, kv="fp16", kv_budget_mb=8, max_batch=1, max_tokens=384)
        want = alone.add(p, 40)
        alone.run()
        assert r.output == want.output and len(r.output) == 40


def test_cancel_frees_pages_and_keeps_the_others(tiny_llama):
    engine = PagedEngine(tiny_llama, kv="kivi2", kv_budget_mb=16, max_batch=4, max_tokens=512)
    a, b = engine.add(list(range(1, 200)), 30), engine.add(list(range(3, 150)), 30)
    engine.step()
    engine.step()
    used = engine.store.used_blocks
    engine.cancel(a)
    assert engine.store.used_blocks < used and b.row == 0
    engine.run()
    assert len(b.output) == 30 and engine.store.used_blocks == 0


def test_clear_errors(tiny_llama):
    with pytest.raises(ValueError, match="allowed are fp16, kivi2, kivi4"):
        PagedEngine(tiny_llama, kv="kivi3", kv_budget_mb=16)
    with pytest.raises(PoolFullError, match="holds no page"):
        PagedEngine(tiny_llama, kv="fp16", kv_budget_mb=0.01)
    engine = PagedEngine(tiny_llama, kv="kivi2", kv_budget_mb=4, max_batch=2, max_tokens=300)
    with pytest.raises(PoolFullError, match="max_tokens"):
        engine.add([1] * 290, 20)
    with pytest.raises(ValueError, match="at least one token"):
        engine.add([], 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.add([1, 2], 0)
    with pytest.raises(ValueError, match="temperature"):
        engine.add([1, 2], 3, temperature=-1)


def test_pages_for_follows_the_kivi_flush_schedule():
    store = _store("kivi2:sinks=4")
    assert [store.pages_for(n) for n in (0, 4, 131, 132, 260, 388)] == [0, 0, 0, 1, 2, 3]
    assert _store("fp16").pages_for(129) == 2
    assert store.block_bytes() < _store("fp16").block_bytes() / 4
    short = _store("kivi2:sinks=4,residual=32")  # keys flush every 32 tokens, values once 32 old: pages open sooner
    assert [short.pages_for(n) for n in (0, 35, 36, 163, 164)] == [0, 0, 1, 1, 2]
    assert short.row_bytes() * (128 + 4) == store.row_bytes() * (32 + 4)  # ring rows + sinks per row
    assert short.spec == "kivi2:sinks=4,residual=32" and store.spec == "kivi2:sinks=4"


def test_kivi_residual_errors_are_specific():
    with pytest.raises(ValueError, match="residual=48 is not supported: allowed are 32, 64, 128"):
        _store("kivi2:residual=48")
    with pytest.raises(ValueError, match="sinks and residual must be integers"):
        _store("kivi2:residual=short")


def test_describe_accounts_for_the_budget_and_hints_when_rows_dominate():
    """The pool's line adds up pages and per-row rings to what it holds; the hint appears only when rows dominate."""
    few, many = _store("kivi2", rows=2, mb=8), _store("kivi2", rows=48, mb=8)  # rings of 128 KiB per row
    for store in (few, many):
        line = store.describe()
        assert f"{store.blocks - 1} pages" in line and f"{store.rows} rows" in line
        assert store.blocks * store.block_bytes() + store.rows * store.row_bytes() == store.nbytes() <= 8 << 20
    assert "smaller max batch" not in few.describe()
    assert many.rows * many.row_bytes() > many.blocks * many.block_bytes()
    assert "smaller max batch" in many.describe()
    assert "rows" not in _store("fp16", rows=64).describe()  # fp16 rows hold nothing beside their pages


@pytest.mark.parametrize("kind", ["fp16", "kivi2"])
def test_engine_bench_decoder_steps_on_the_cpu(tiny_llama, kind):
    """`lowbit bench engine`'s decode functions: the engine's whole step emits one token per running row and stays
    at the same positions; it samples what the bare (eager) step's argmax gives."""
    from lowbit.bench.engine import engine_decoder

    engine, graph_step, eager_step, engine_step = engine_decoder(tiny_llama, kind, batch=3, context=40, steps=4)
    for n in (1, 2, 3):
        engine_step()
        assert [len(r.output) for r in engine.running] == [n] * 3
        assert engine.pos_host[:3].tolist() == [41] * 3  # reset to the context, then advanced by the step
    tokens = engine.graphs.tokens[:3].clone()
    engine.pos_host[:3] = 40
    expected = engine.runner.decode(tokens, torch.full((3,), 40)).argmax(-1)
    engine_step()
    assert [r.output[-1] for r in engine.running] == expected.tolist()
    graph_step(), eager_step()  # the other two run on the CPU too (no CUDA graphs there)


@pytest.mark.parametrize("bits,sinks,residual", [(2, 0, 128), (4, 4, 128), (2, 3, 128), (2, 0, 32), (4, 3, 64)])
def test_kivi_read_tokens_is_the_decode_view_without_a_sync(bits, sinks, residual):
    """read_tokens (host-side counts, only the pages in use) equals the batched decode view selected by its mask."""
    g = torch.Generator().manual_seed(bits + sinks)
    for n in (1, 2, sinks + 1, 31, 32, 33, 65, 127, 128, 129, 130, 255, 256, 300, 513):
        store = _store(f"kivi{bits}:sinks={sinks},residual={residual}", rows=2)
        store.reserve(1, n)
        k, v = torch.randn(2, n, 64, generator=g) * 2, torch.randn(2, n, 64, generator=g)
        store.write_prompt(0, 1, k, v)
        keys, values, valid = store.ops.dequantized(store, 0, 1, torch.tensor([n - 1]), row0=1)
        got_k, got_v = store.read_tokens(0, 1, n)
        assert got_k.shape == (2, n, 64)
        assert torch.equal(got_k, keys[0][:, valid[0]]) and torch.equal(got_v, values[0][:, valid[0]]), n


def test_engine_bench_decode_rates():
    """Decode-only steps' tokens/s, overall and at the peak batch; prefill steps and empty steps left out."""
    from lowbit.bench.engine import decode_rates
    from lowbit.engine.core import StepStats

    hist = [StepStats(1, 1, 0.5, 0, 0), StepStats(0, 2, 0.1, 0, 0), StepStats(0, 4, 0.2, 0, 0),
            StepStats(0, 4, 0.2, 0, 0), StepStats(0, 1, 0.1, 0, 0), StepStats(0, 0, 0.01, 0, 0)]
    got = decode_rates(hist)
    assert got == {"decode_tok_s": pytest.approx(11 / 0.6, abs=0.05), "peak_decode_tok_s": 20.0, "peak_decode_steps": 2}
    assert decode_rates([StepStats(1, 1, 0.5, 0, 0)]) == {"decode_tok_s": None, "peak_decode_tok_s": None,
                                                          "peak_decode_steps": 0}


def test_engine_bench_time_split():
    """The steps' time split into admission + prefill and decode, and the prefill share."""
    from lowbit.bench.engine import time_split
    from lowbit.engine.core import StepStats

    hist = [StepStats(1, 1, 0.5, 0, 0, 0.4), StepStats(0, 2, 0.1, 0, 0), StepStats(2, 3, 0.4, 0, 0, 0.3)]
    assert time_split(hist) == {"prefill_s": 0.7, "decode_s": 0.3, "prefill_pct": 70.0}
    assert time_split([])["prefill_pct"] is None


@pytest.mark.parametrize("kind,n", [("kivi2:sinks=3,residual=32", 300), ("kivi4", 128), ("kivi2", 100), ("kivi2", 5),
                                    ("fp16", 260)])
def test_prompt_write_of_many_layers_stores_what_per_layer_writes_store(kind, n):
    """write_prompt_layers (one set of launches for L layers) == write_prompt layer by layer, byte for byte."""
    g = torch.Generator().manual_seed(n)
    layers, h, d = 3, 2, 64
    stores = [make_store(kind, layers=layers, kv_heads=h, head_dim=d, rows=2, max_tokens=512, budget_bytes=64 << 20,
                         dtype=torch.float32, device="cpu") for _ in range(2)]
    k, v = torch.randn(layers, h, n, d, generator=g) * 2 + 0.5, torch.randn(layers, h, n, d, generator=g)
    for s in stores:
        s.reserve(0, 64)
        s.reserve(1, n + 8)
    for i in range(layers):
        stores[0].write_prompt(i, 1, k[i], v[i])
    stores[1].write_prompt_layers(0, 1, k[:2], v[:2])
    stores[1].write_prompt_layers(2, 1, k[2:], v[2:])
    names = ("k_pool", "v_pool") if kind == "fp16" else ("pool", "ring_k", "ring_v", "sink_k", "sink_v")
    assert getattr(stores[1], "k_pool" if kind == "fp16" else "ring_k").abs().sum() > 0  # something was written
    if kind != "fp16" and n > 128 + 32:
        assert stores[1].pool.abs().sum() > 0  # and the pages too
    for name in names:
        assert torch.equal(getattr(stores[0], name), getattr(stores[1], name)), name


def test_prefill_in_layer_groups_stores_what_one_group_stores(tiny_llama, monkeypatch):
    """The runner's grouped prompt writes (groups of one layer) leave the store as one group of all layers does."""
    import lowbit.engine.runner as runner_mod

    prompt = torch.randint(0, 512, (150,), generator=torch.Generator().manual_seed(3))
    pools = []
    for group_bytes in (1 << 30, 1):
        monkeypatch.setattr(runner_mod, "PROMPT_WRITE_BYTES", group_bytes)
        engine = PagedEngine(tiny_llama, kv="kivi2", kv_budget_mb=64, max_batch=2, max_tokens=256)
        engine.store.reserve(0, 200)
        logits = engine.runner.prefill(0, prompt)
        pools.append((logits, engine.store.pool.clone(), engine.store.ring_k.clone(), engine.store.ring_v.clone()))
    assert len(tiny_llama.model.layers) > 1
    for a, b in zip(*pools):
        assert torch.equal(a, b)
