"""KIVI+ (kv/kivi_plus.py) against a float64 reference, its presets, and the HF QuantizedCache baseline."""

import pytest
import torch

from lowbit.kv import KVShape, cache_bytes, cache_nbytes, make_cache, parse_kv_spec
from lowbit.kv.kivi import KiviLayer
from lowbit.kv.kivi_plus import KiviPlusCache, KiviPlusLayer, hadamard, layer_plans
from lowbit.spec import SpecError

SMOLLM2 = KVShape(layers=30, kv_heads=3, head_dim=64)


def ref_quant(x: torch.Tensor, bits: int, group: int, dim: int) -> torch.Tensor:
    """Float64 asymmetric min/max quantization in groups along `dim`, fp16 scale and zero (KIVI's grid)."""
    x = x.movedim(dim, -1)
    g = x.reshape(*x.shape[:-1], -1, group)
    zero = g.amin(-1, keepdim=True).half().double()
    scale = ((g.amax(-1, keepdim=True) - zero) / (2**bits - 1)).clamp_min(torch.finfo(torch.float16).tiny).half().double()
    q = torch.round((g - zero) / scale).clamp(0, 2**bits - 1)
    return (q * scale + zero).reshape(x.shape).movedim(-1, dim)


def ref_keys(k, o):
    """Expected dequantized quantized keys [B, H, n, D] (n a multiple of residual) under options `o`."""
    d, r = k.shape[-1], o["residual"]
    h = hadamard(d, torch.float64) if "k" in o["rotate"] else torch.eye(d, dtype=torch.float64)
    x = k @ h
    out = torch.empty_like(x)
    for b0 in range(0, x.shape[-2], r):
        blk = x[..., b0 : b0 + r, :]
        hi = set()
        if o["hi_channels"]:
            spread = (blk.amax(-2) - blk.amin(-2))[0, 0]  # one batch row, one head in this reference
            hi = set(torch.topk(spread, o["hi_channels"]).indices.tolist())
        for c in range(d):
            bits = o["hi_bits"] if c in hi else o["kbits"]
            out[..., b0 : b0 + r, c] = ref_quant(blk[..., c : c + 1], bits, o["kgroup"], dim=-2)[..., 0]
    return out @ h.t()


def ref_values(v, o):
    d = v.shape[-1]
    h = hadamard(d, torch.float64) if "v" in o["rotate"] else torch.eye(d, dtype=torch.float64)
    return ref_quant(v @ h, o["vbits"], o["vgroup"], dim=-1) @ h.t()


OPTIONS = [
    dict(kbits=2, vbits=2, kgroup=32, vgroup=32, residual=64, sinks=0, rotate="none", hi_channels=0, hi_bits=4),
    dict(kbits=2, vbits=4, kgroup=16, vgroup=16, residual=64, sinks=4, rotate="kv", hi_channels=0, hi_bits=4),
    dict(kbits=2, vbits=2, kgroup=32, vgroup=64, residual=32, sinks=2, rotate="k", hi_channels=5, hi_bits=4),
    dict(kbits=4, vbits=2, kgroup=32, vgroup=32, residual=64, sinks=0, rotate="v", hi_channels=3, hi_bits=8),
]


@pytest.mark.parametrize("o", OPTIONS, ids=lambda o: f"{o['rotate']}-{o['kbits']}{o['vbits']}-hi{o['hi_channels']}")
@pytest.mark.parametrize("prefill,decode", [(200, 90), (3, 140)])
def test_layer_matches_float64_reference(o, prefill, decode):
    torch.manual_seed(prefill + o["kgroup"] + o["hi_channels"])
    D = 64
    k = (torch.randn(1, 1, prefill + decode, D) * 2 + torch.randn(1, 1, 1, D) * 6).half().double()  # channel outliers
    v = torch.randn(1, 1, prefill + decode, D).half().double()
    layer = KiviPlusLayer(**o)
    layer.update(k[..., :prefill, :].float(), v[..., :prefill, :].float())
    for t in range(prefill, prefill + decode):
        K, V = layer.update(k[..., t : t + 1, :].float(), v[..., t : t + 1, :].float())
        assert torch.equal(K[..., -1, :], k[..., t, :].float())  # the new token attends with its exact state
    K, V = layer.full_keys().double(), layer.full_values().double()
    s, total = o["sinks"], prefill + decode
    nk = total // o["residual"] * o["residual"] - s  # key blocks aligned to absolute positions, sinks included
    nv = total - s - o["residual"]
    assert (layer.n_qk, layer.n_qv) == (nk, nv)
    assert torch.equal(K[..., :s, :], k[..., :s, :]) and torch.equal(K[..., s + nk :, :], k[..., s + nk :, :])
    assert torch.equal(V[..., s + nv :, :], v[..., s + nv :, :])
    block = torch.cat([k[..., s : s + 1, :].expand(1, 1, s, 64), k[..., s : s + nk, :]], dim=-2)  # sinks' placeholders
    want_k = ref_keys(block, o)[..., s:, :]
    want_v = ref_values(v[..., s : s + nv, :], o)
    # float32 vs float64 may flip a rare code at a rounding boundary: bound every error, count the flips
    for got, want in ((K[..., s : s + nk, :], want_k), (V[..., s : s + nv, :], want_v)):
        diff = (got - want).abs()
        assert diff.max() < 1.0 and (diff > 1e-3).double().mean() < 0.01, diff.max()
    assert (K[..., s : s + nk, :] - k[..., s : s + nk, :]).abs().mean() > 1e-3  # and it did quantize


def test_default_equals_faithful_kivi():
    """With no extra option KIVI+ stores exactly what KIVI-2 stores (the same codes, scales and bytes)."""
    torch.manual_seed(0)
    k, v = torch.randn(2, 3, 300, 64) * 3, torch.randn(2, 3, 300, 64)
    a, b = KiviLayer(2, 32, 128, 0), KiviPlusLayer()
    for lay in (a, b):
        lay.update(k[..., :170, :], v[..., :170, :])
        for t in range(170, 300):
            lay.update(k[..., t : t + 1, :], v[..., t : t + 1, :])
    assert torch.equal(a.full_keys(), b.full_keys()) and torch.equal(a.full_values(), b.full_values())
    assert a.nbytes() == b.nbytes()


def test_sinks_keep_key_blocks_aligned():
    """KIVI shifts its key blocks by the sinks and holds more fp16 keys; KIVI+ keeps them at absolute positions."""
    shape = KVShape(layers=1, kv_heads=1, head_dim=64)
    assert cache_bytes("kiviplus:sinks=4", shape, 4096) < cache_bytes("kivi:bits=2,sinks=4", shape, 4096)
    layer = KiviPlusLayer(sinks=4)
    layer.update(torch.randn(1, 1, 256, 64), torch.randn(1, 1, 256, 64))
    assert (layer.n_sink, layer.n_qk, layer.res_k.shape[-2]) == (4, 252, 0)
    assert layer.qk_packed.shape[-2] * 8 // 2 == 256  # 4 placeholder rows + 252 keys


def test_rotation_leaves_scores_unchanged_before_quantization():
    h = hadamard(64, torch.float64)
    assert torch.allclose(h @ h.t(), torch.eye(64, dtype=torch.float64), atol=1e-12)
    q, k = torch.randn(5, 64, dtype=torch.float64), torch.randn(7, 64, dtype=torch.float64)
    assert torch.allclose((q @ h) @ (k @ h).t(), q @ k.t(), atol=1e-10)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(48)


def test_rotation_shrinks_value_error_with_outlier_channels():
    """Per-token groups: one wide channel sets the scale of its whole group; the rotation spreads it over all."""
    torch.manual_seed(1)
    v = torch.randn(1, 1, 300, 64)
    v[..., 5] *= 25
    err = {}
    for rotate in ("none", "v"):
        layer = KiviPlusLayer(residual=32, rotate=rotate)
        layer.update(torch.randn_like(v), v)
        n = layer.n_qv
        err[rotate] = (layer.full_values()[..., :n, :] - v[..., :n, :]).pow(2).mean().item()
    assert err["v"] < 0.5 * err["none"], err


def test_presets_expand_and_fit_the_budget():
    (part,) = parse_kv_spec("2bit")
    assert part.name == "kiviplus" and part.options["kbits"] == 2
    (four,) = parse_kv_spec("4bit")
    assert four.name == "kiviplus" and four.options["vbits"] == 4
    for preset, most in (("2bit", 3.25), ("4bit", 5.25)):
        bits = 8 * cache_bytes(preset, SMOLLM2, 4096) / (SMOLLM2.layers * 4096 * 2 * SMOLLM2.kv_heads * SMOLLM2.head_dim)
        assert bits <= most, (preset, bits)
    faithful = cache_bytes("kivi:bits=2", SMOLLM2, 4096)
    assert cache_bytes("2bit", SMOLLM2, 4096) <= faithful * 3.25 / 3.2


def test_per_layer_plans_and_errors():
    plans = layer_plans(parse_kv_spec("kiviplus:hi_layers=0/-1,hi_channels=4")[0].options, 5)
    assert [p["kbits"] for p in plans] == [4, 2, 2, 2, 4] and [p["hi_channels"] for p in plans] == [0, 4, 4, 4, 0]
    with pytest.raises(ValueError, match="has 5 layers"):
        layer_plans(parse_kv_spec("kiviplus:hi_layers=7")[0].options, 5)
    for bad, fragment in (("kiviplus:hi_layers=0,1", "malformed option"), ("kiviplus:hi_layers=a", "layer indices"),
                          ("kiviplus:rotate=q", "one of"), ("kiviplus:residual=100", "multiple of kgroup"),
                          ("kiviplus:kbits=3", "one of")):
        with pytest.raises(SpecError, match=fragment):
            parse_kv_spec(bad)


def test_cache_in_a_model_counts_its_bytes(tiny_llama):
    spec = "kiviplus:rotate=kv,hi_channels=4,hi_layers=1,residual=32,sinks=2"
    cache = make_cache(spec, tiny_llama.config)
    assert isinstance(cache, KiviPlusCache)
    with torch.no_grad():
        tiny_llama(torch.randint(0, 97, (1, 70)), past_key_values=cache, use_cache=True)
        for t in range(30):
            out = tiny_llama(torch.randint(0, 97, (1, 1)), past_key_values=cache, use_cache=True)
    assert torch.isfinite(out.logits).all()
    held, fp16 = cache_nbytes(cache)
    assert held == cache_bytes(spec, KVShape.from_config(tiny_llama.config), 100) and held < fp16
    with pytest.raises(NotImplementedError):
        cache.layers[0].crop(10)


def test_hf_quantized_cache_bytes_are_bounded(tiny_llama):
    pytest.importorskip("optimum.quanto")
    shape = KVShape.from_config(tiny_llama.config)
    for spec in ("hfq:bits=2,group=32,residual=16", "hfq:bits=4,group=16,axis_key=-1"):
        cache = make_cache(spec, tiny_llama.config)
        gen = torch.Generator().manual_seed(0)
        for step in range(40):
            t = 32 if step == 0 else 1
            for layer in range(2):
                kv = torch.randn(2, 1, 2, t, 32, generator=gen)
                keys, _ = cache.update(kv[0], kv[1], layer)
            n = cache.get_seq_length()
            held = cache_nbytes(cache)[0]
            assert keys.shape[-2] == n and 0 < held <= cache_bytes(spec, shape, n)
        assert held < cache_nbytes(cache)[1]
