"""Budget caches in a model: budget never exceeded, budget=1.0 is exact, positions/masks right, specs validated."""

import math

import pytest
import torch
from transformers import DynamicCache

from lowbit.kv import BudgetCache, cache_nbytes, make_cache, parse_kv_spec
from lowbit.kv.budget import BudgetLayer, target_size
from lowbit.kv.eviction import h2o_policy
from lowbit.spec import SpecError

METHODS = ["streaming", "h2o", "snapkv", "tova", "kvmerger"]


@torch.no_grad()
def stream(model, ids, cache, prefill, check=None):
    out = [model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits[0, -1]]
    if check:
        check(cache, prefill)
    for i in range(prefill, ids.shape[1] - 1):
        out.append(model(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits[0, -1])
        if check:
            check(cache, i + 1)
    return torch.stack(out)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (1, 200), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(tiny_llama, ids):
    return stream(tiny_llama, ids, DynamicCache(config=tiny_llama.config), 120)


@pytest.mark.parametrize("method", METHODS)
def test_budget_one_is_exactly_uncompressed(tiny_llama, ids, reference, method):
    cache = make_cache(f"{method}:budget=1.0", tiny_llama.config)
    logits = stream(tiny_llama, ids, cache, 120)
    assert torch.equal(logits, reference)
    assert cache.layers[0].n_compressions == 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [0.5, 0.35])
def test_budget_never_exceeded_and_sinks_window_kept(tiny_llama, ids, reference, method, budget):
    spec = f"{method}:budget={budget},slack=8" + (",sinks=4" if method in ("h2o", "snapkv", "tova") else "")
    cache = make_cache(spec, tiny_llama.config)
    layer0 = cache.layers[0]
    sinks, window = layer0.sinks, layer0.window

    def check(c, seen):
        for layer in c.layers:
            assert layer.get_seq_length() == seen
            kept = layer.n_kept()
            assert layer.keys.shape[-2] == kept == layer.positions.shape[-1]
            assert kept <= max(math.floor(budget * seen), sinks + window) + 8
            # the sinks and the most recent window are kept, unmerged, at their positions
            assert torch.equal(layer.positions[..., :sinks], torch.arange(sinks).expand_as(layer.positions[..., :sinks]))
            last = min(kept, max(window, 1))
            assert torch.equal(layer.positions[..., -last:], torch.arange(seen - last, seen).expand_as(layer.positions[..., -last:]))
            assert torch.all(layer.positions[..., 1:] > layer.positions[..., :-1])
        # right after the prefill the cache was compressed to the target exactly
        if seen == 120:
            assert c.layers[0].n_kept() == target_size(120, budget, sinks, window)

    logits = stream(tiny_llama, ids, cache, 120, check)
    assert torch.isfinite(logits).all()
    assert layer0.n_compressions >= 2  # after the prefill and again while decoding
    assert not torch.equal(logits, reference)
    kv, kv16 = cache_nbytes(cache)
    assert kv16 == 2 * 2 * 2 * (ids.shape[1] - 1) * 32 * 2  # 2 layers, K+V, 2 heads, 229 tokens, head_dim 32, fp16
    assert kv < kv16 * (budget + 0.2)


def test_mask_sizes_and_positions_follow_tokens_seen(tiny_llama, ids):
    """New tokens get their true position; the mask spans exactly the kept states plus the new ones."""
    cache = make_cache("h2o:budget=0.5,window=8", tiny_llama.config)
    with torch.no_grad():
        tiny_llama(ids[:, :100], past_key_values=cache, use_cache=True)
        kept = cache.layers[0].n_kept()
        assert kept == 50 and cache.get_seq_length() == 100
        assert cache.get_mask_sizes(1, 0) == (51, 50)
        # the new token's position ids: what the model derives from get_seq_length
        captured = {}
        h = tiny_llama.model.rotary_emb.register_forward_pre_hook(
            lambda m, a, kw: captured.update(pos=kw["position_ids"].clone()), with_kwargs=True
        )
        tiny_llama(ids[:, 100:103], past_key_values=cache, use_cache=True)
        h.remove()
    assert captured["pos"].tolist() == [[100, 101, 102]]
    assert cache.get_seq_length() == 103


def test_chunked_prefill_sees_kept_states_and_is_causal(tiny_llama, ids):
    """Feeding a chunk after compression equals feeding its tokens one by one (same kept states, causal chunk)."""
    a = make_cache("streaming:budget=0.5,slack=1000", tiny_llama.config)
    b = make_cache("streaming:budget=0.5,slack=1000", tiny_llama.config)
    with torch.no_grad():
        tiny_llama(ids[:, :120], past_key_values=a, use_cache=True)
        tiny_llama(ids[:, :120], past_key_values=b, use_cache=True)
        # with a huge slack, decoding one by one never compresses; a 5-token chunk does (after the forward)
        la = tiny_llama(ids[:, 120:125], past_key_values=a, use_cache=True).logits[0]
        lb = torch.stack([tiny_llama(ids[:, i : i + 1], past_key_values=b, use_cache=True).logits[0, -1] for i in range(120, 125)])
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["streaming", "kvmerger"])
def test_generate_budget_one_matches_and_evicting_runs(tiny_llama, ids, method):
    prompt = ids[:, :120]
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, pad_token_id=0)
    plain = tiny_llama.generate(prompt, **kw)
    same = tiny_llama.generate(prompt, past_key_values=make_cache(f"{method}:budget=1.0", tiny_llama.config), **kw)
    assert torch.equal(plain, same)
    cache = make_cache(f"{method}:budget=0.35", tiny_llama.config)
    out = tiny_llama.generate(prompt, past_key_values=cache, **kw)
    assert out.shape == plain.shape
    assert cache.get_seq_length() == 120 + 11
    assert cache.layers[0].n_kept() < 60


def test_scores_use_the_model_queries(tiny_llama, ids):
    """The accumulated scores equal attention probabilities recomputed from hooked queries."""
    cache = make_cache("snapkv:budget=1.0,obs=4", tiny_llama.config, tiny_llama)  # the model: queries reach the cache
    attn = tiny_llama.model.layers[0].self_attn
    captured = {}

    def pre(module, args, kwargs):
        captured["h"], captured["pe"] = kwargs["hidden_states"], kwargs["position_embeddings"]

    h = attn.register_forward_pre_hook(pre, with_kwargs=True)
    with torch.no_grad():
        tiny_llama(ids[:, :30], past_key_values=cache, use_cache=True)
    h.remove()
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hs = captured["h"]
    q = attn.q_proj(hs).view(1, 30, -1, 32).transpose(1, 2)
    cos, sin = captured["pe"]
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    k = cache.layers[0].keys.repeat_interleave(2, dim=1)  # GQA: q heads 0,1 -> kv head 0; 2,3 -> kv head 1
    logits = (q[..., -4:, :].double() @ k.double().transpose(-1, -2)) / math.sqrt(32)  # [1, 4, 4, 30]
    mask = torch.arange(30)[None, :] > torch.arange(26, 30)[:, None]
    p = torch.softmax(logits.masked_fill(mask, float("-inf")), -1).sum(-2)  # [1, 4 q heads, 30]
    expected = p.reshape(1, 2, 2, 30).sum(2)
    assert cache.layers[0].query_source == "queries"
    torch.testing.assert_close(cache.layers[0].scores.double(), expected, rtol=1e-4, atol=1e-5)
    # H2O: the column sums of the whole causal attention matrix (all 30 queries), computed in chunks of rows
    full = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(32)
    causal = torch.arange(30)[None, :] > torch.arange(30)[:, None]
    colsum = torch.softmax(full.masked_fill(causal, float("-inf")), -1).sum(-2).reshape(1, 2, 2, 30).sum(2)
    import lowbit.kv.budget as budget

    old, budget.CHUNK_ELEMENTS = budget.CHUNK_ELEMENTS, 4 * 30 * 7  # 7 query rows per chunk: 5 chunks
    try:
        h2o = make_cache("h2o:budget=1.0", tiny_llama.config, tiny_llama)
        with torch.no_grad():
            tiny_llama(ids[:, :30], past_key_values=h2o, use_cache=True)
            torch.testing.assert_close(h2o.layers[0].scores.double(), colsum, rtol=1e-4, atol=1e-5)
            # a decoding step adds its query's attention; TOVA keeps only the last query's
            tova = make_cache("tova:budget=1.0", tiny_llama.config, tiny_llama)
            tiny_llama(ids[:, :30], past_key_values=tova, use_cache=True)
            torch.testing.assert_close(tova.layers[0].scores[..., :30].sum(-1), torch.full((1, 2), 2.0))
            before = h2o.layers[0].scores.clone()
            tiny_llama(ids[:, 30:31], past_key_values=h2o, use_cache=True)
            after = h2o.layers[0].scores
            assert after.shape[-1] == 31
            torch.testing.assert_close((after[..., :30] - before).sum(-1) + after[..., 30], torch.full((1, 2), 2.0))
    finally:
        budget.CHUNK_ELEMENTS = old


@pytest.mark.parametrize("method", ["h2o", "kvmerger", "tova"])
def test_context_protocol_freezes_after_the_context(tiny_llama, ids, method):
    """Compress a context to its budget, freeze, then the question and answer are kept outside the budget."""
    cache = make_cache(f"{method}:budget=0.5,slack=4", tiny_llama.config, tiny_llama)
    with torch.no_grad():
        tiny_llama(ids[:, :100], past_key_values=cache, use_cache=True)
        kept = cache.layers[0].n_kept()
        assert kept == target_size(100, 0.5, cache.layers[0].sinks, cache.layers[0].window)
        cache.freeze()
        tiny_llama(ids[:, 100:110], past_key_values=cache, use_cache=True)  # the question, one chunk
        for i in range(110, 130):
            tiny_llama(ids[:, i : i + 1], past_key_values=cache, use_cache=True)
            for layer in cache.layers:
                assert layer.n_kept() == kept + (i + 1 - 100) and layer.get_seq_length() == i + 1
    assert cache.layers[0].n_compressions == 1
    assert cache.seconds()["compress"] > 0


def test_queries_need_the_attention_route(tiny_llama, ids):
    """Without the model the keys stand in for the queries; a layer waiting for queries that never come says so."""
    cache = make_cache("h2o:budget=0.5", tiny_llama.config)
    with torch.no_grad():
        tiny_llama(ids[:, :30], past_key_values=cache, use_cache=True)
    assert cache.layers[0].query_source == "keys"
    layer = BudgetLayer(h2o_policy, budget=0.5, scores_from="queries")
    k = torch.randn(1, 2, 8, 32)
    layer.update(k, k)  # no attention call delivers the queries
    with pytest.raises(RuntimeError, match="make_cache"):
        layer.update(k[..., :1, :], k[..., :1, :])


def test_kivi_composition_reports_fewer_bytes(tiny_llama, ids):
    res = {}
    for spec in ["kvmerger:budget=0.5", "kvmerger:budget=0.5+kivi:bits=4", "kvmerger:budget=0.5+kivi:bits=2,group=32,residual=32"]:
        cache = make_cache(spec, tiny_llama.config)
        logits = stream(tiny_llama, ids[:, :160], cache, 120)
        assert torch.isfinite(logits).all()
        res[spec] = cache_nbytes(cache)
    plain, k4, k2 = res.values()
    assert plain[1] == k4[1] == k2[1]  # same fp16 reference: all tokens seen
    assert k4[0] < 0.6 * plain[0] and k2[0] < k4[0]
    assert plain[0] < 0.6 * plain[1]


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("kvmerger:budget=0", "budget"),
        ("kvmerger:budget=-0.5", "budget"),
        ("h2o:budget=1.5", "(0, 1]"),
        ("streaming:budget=abc", "float"),
        ("kvmerger:budget=0.5,foo=1", "unknown option 'foo'"),
        ("streaming:window=4", "unknown option 'window'"),
        ("h2o:scores=bogus", "scores"),
        ("h2o:heads=some", "heads"),
        ("h2o:obs=4", "unknown option 'obs'"),
        ("snapkv:pool=0", "pool"),
        ("kvmerger:protect=0.7", "protect"),
        ("tova:heads=each", "unknown option 'heads'"),
        ("kivi:bits=4+kvmerger:budget=0.5", "budget method followed by kivi"),
        ("h2o:budget=0.5+kvmerger:budget=0.5", "budget method followed by kivi"),
        ("kvmerger:budget=0.5+kivi:bits=3", "bits"),
        ("kvmerge:budget=0.5", "unknown KV method"),
    ],
)
def test_invalid_specs(spec, needle):
    with pytest.raises(SpecError, match=None) as err:
        parse_kv_spec(spec)
    assert needle in str(err.value)


def test_layer_validation():
    with pytest.raises(ValueError, match="budget"):
        BudgetLayer(h2o_policy, budget=0.0)
    with pytest.raises(ValueError, match="budget"):
        BudgetLayer(h2o_policy, budget=1.01)
    with pytest.raises(ValueError, match="scores"):
        BudgetLayer(h2o_policy, budget=0.5, scores_from="attn")
    with pytest.raises(ValueError, match="scorer"):
        BudgetLayer(h2o_policy, budget=0.5, scorer="first")
    with pytest.raises(ValueError, match="config"):
        BudgetCache(policy=h2o_policy, budget=0.5)
