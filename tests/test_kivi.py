"""KIVI cache against a straightforward float64 reference of the same algorithm."""

import math

import pytest
import torch
from transformers import DynamicCache

from lowbit.kv import KiviCache, KiviLayer, make_cache, parse_kv_spec
from lowbit.spec import SpecError


def ref_quant(x: torch.Tensor, bits: int, group: int, dim: int) -> torch.Tensor:
    """Float64 reference: asymmetric min/max groups along `dim`, fp16 scale and zero."""
    x = x.double().movedim(dim, -1)
    g = x.reshape(*x.shape[:-1], -1, group)
    mn, mx = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    zero = mn.half().double()
    scale = ((mx - zero) / (2**bits - 1)).clamp_min(torch.finfo(torch.float16).tiny).half().double()
    q = torch.round((g - zero) / scale).clamp(0, 2**bits - 1)
    return (q * scale + zero).reshape(x.shape).movedim(-1, dim)


def ref_kivi(k, v, bits, group, residual, sinks):
    """Expected dequantized K, V after all tokens of k/v went through the cache (any update sizes)."""
    k, v = k.half().double(), v.half().double()
    total = k.shape[-2]
    n_sink = min(sinks, total)
    rest = total - n_sink
    nk = (rest // residual) * residual
    nv = max(0, rest - residual)
    s = slice(0, n_sink)
    kq = ref_quant(k[..., n_sink : n_sink + nk, :], bits, group, dim=-2) if nk else k[..., :0, :]
    vq = ref_quant(v[..., n_sink : n_sink + nv, :], bits, group, dim=-1) if nv else v[..., :0, :]
    K = torch.cat([k[..., s, :], kq, k[..., n_sink + nk :, :]], dim=-2)
    V = torch.cat([v[..., s, :], vq, v[..., n_sink + nv :, :]], dim=-2)
    return K, V, nk, nv


def close_up_to_rounding_flips(a, b, step_bound):
    diff = (a.double() - b.double()).abs()
    assert torch.all(diff <= step_bound * 1.01 + 1e-6), diff.max()
    assert (diff > 1e-4).double().mean() < 2e-3


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("prefill,decode", [(300, 70), (256, 1), (5, 140), (128, 0)])
def test_layer_matches_reference(bits, sinks, prefill, decode):
    torch.manual_seed(bits * 100 + sinks + prefill)
    B, H, D, G, R = 2, 3, 64, 32, 64
    k = torch.randn(B, H, prefill + decode, D) * 2 + torch.randn(1, 1, 1, D) * 4  # channel outliers, as in real keys
    v = torch.randn(B, H, prefill + decode, D)
    layer = KiviLayer(bits, G, R, sinks)
    K, V = layer.update(k[..., :prefill, :], v[..., :prefill, :])
    assert torch.equal(K, k[..., :prefill, :])  # the prefill attends with its exact states
    for t in range(prefill, prefill + decode):
        K, V = layer.update(k[..., t : t + 1, :], v[..., t : t + 1, :])
    assert torch.equal(K[..., -1, :], k[..., -1, :])  # so does each new token
    K, V = layer.full_keys(), layer.full_values()  # what later steps see
    refK, refV, nk, nv = ref_kivi(k, v, bits, G, R, sinks)
    assert layer.n_qk == nk and layer.n_qv == nv
    assert layer.get_seq_length() == prefill + decode
    krange = (k.amax() - k.amin()).item() / (2**bits - 1)
    vrange = (v.amax() - v.amin()).item() / (2**bits - 1)
    close_up_to_rounding_flips(K, refK, krange)
    close_up_to_rounding_flips(V, refV, vrange)
    # the newest tokens stay exact (up to fp16 storage) while they are in the residual
    if nk < prefill + decode - min(sinks, prefill + decode):
        assert torch.equal(K[..., -1, :], k[..., -1, :].half().float())
    assert torch.equal(V[..., -1, :], v[..., -1, :].half().float())
    if sinks:
        assert torch.equal(K[..., :sinks, :], k[..., :sinks, :].half().float())


def test_quantized_tokens_are_never_requantized():
    torch.manual_seed(0)
    layer = KiviLayer(2, 32, 64)
    k, v = torch.randn(1, 2, 400, 64), torch.randn(1, 2, 400, 64)
    layer.update(k[..., :100, :], v[..., :100, :])
    first_k = layer.qk_packed.clone()
    first_v = layer.qv_packed.clone()
    for t in range(100, 400):
        layer.update(k[..., t : t + 1, :], v[..., t : t + 1, :])
    assert torch.equal(layer.qk_packed[..., : first_k.shape[-2], :], first_k)
    assert torch.equal(layer.qv_packed[..., : first_v.shape[-2], :], first_v)
    # keys flush R at a time: the residual never reaches R
    assert layer.res_k is None or layer.res_k.shape[-2] < 64
    assert layer.res_v.shape[-2] == 64


def expected_nbytes(B, H, D, T, bits, G, R, layers):
    nk = (T // R) * R
    nv = max(0, T - R)
    keys = nk * D * bits / 8 + (nk // G) * D * 2 * 2 + (T - nk) * D * 2
    values = nv * D * bits / 8 + nv * (D // G) * 2 * 2 + (T - nv) * D * 2
    return int(B * H * layers * (keys + values))


@pytest.mark.parametrize("bits,T", [(2, 4096), (4, 4096), (2, 1000), (4, 77)])
def test_nbytes_exact_formula(bits, T):
    B, H, D, G, R, L = 1, 2, 64, 32, 128, 3
    cache = KiviCache(num_layers=L, bits=bits, group=G, residual=R)
    for i in range(L):
        cache.update(torch.randn(B, H, T, D), torch.randn(B, H, T, D), i)
    assert cache.nbytes() == expected_nbytes(B, H, D, T, bits, G, R, L)
    assert cache.nbytes_fp16() == 2 * 2 * B * H * T * D * L
    if bits == 2 and T == 4096:
        assert 0.19 < cache.nbytes() / cache.nbytes_fp16() < 0.21


def test_crop_and_reorder_and_reset():
    torch.manual_seed(0)
    k, v = torch.randn(3, 2, 300, 64), torch.randn(3, 2, 300, 64)
    layer = KiviLayer(4, 32, 64)
    layer.update(k, v)
    K, V = layer.full_keys(), layer.full_values()
    layer.crop(-50)
    assert layer.get_seq_length() == 250
    assert torch.allclose(layer.full_keys(), K[..., :250, :], atol=1e-3)
    assert torch.allclose(layer.full_values(), V[..., :250, :], atol=1e-3)
    layer.crop(100)  # legacy form: keep the first 100
    assert layer.get_seq_length() == 100
    assert torch.allclose(layer.full_keys(), K[..., :100, :], atol=1e-3)
    idx = torch.tensor([2, 0, 0])
    K, V = layer.full_keys(), layer.full_values()
    layer.reorder_cache(idx)
    assert torch.equal(layer.full_keys(), K[idx]) and torch.equal(layer.full_values(), V[idx])
    layer.update(k[:, :, :1], v[:, :, :1])  # still usable after crop
    assert layer.get_seq_length() == 101
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.nbytes() == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=3), "allowed bit-widths"),
        (dict(group=30), "multiple of 4"),
        (dict(residual=100), "multiple of group"),
        (dict(sinks=-1), "sinks"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KiviCache(num_layers=1, **kwargs)


def test_group_must_divide_head_dim():
    cache = KiviCache(num_layers=1, bits=2, group=48, residual=96)
    with pytest.raises(ValueError, match="head dimension 64"):
        cache.update(torch.randn(1, 1, 4, 64), torch.randn(1, 1, 4, 64), 0)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("kivi:bits=3", "allowed values are one of"),
        ("kivi:color=3", "unknown option 'color'.*allowed options are bits"),
        ("kivi:bits", "malformed option"),
        ("kivi:bits=two", "must be int"),
        ("quux:bits=2", "unknown KV method 'quux': allowed methods are fp16, kivi"),
        ("kivi:group=32,residual=100", "multiple of group"),
        ("kivi:bits=2,bits=4", "given twice"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(SpecError, match=match):
        parse_kv_spec(spec)


def test_spec_aliases_and_defaults():
    (p,) = parse_kv_spec("kivi:bits=4,g=64,r=128,sinks=4")
    assert p.options == {"bits": 4, "group": 64, "residual": 128, "sinks": 4, "kernel": "triton"}
    assert parse_kv_spec("kivi")[0].options == {"bits": 2, "group": 32, "residual": 128, "sinks": 0, "kernel": "triton"}


def test_forward_and_generate_on_gqa_model(tiny_llama):
    model = tiny_llama
    ids = torch.randint(0, 97, (2, 40))
    cache = make_cache("kivi:bits=8,group=32,residual=32", model.config)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=30, do_sample=False)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=DynamicCache(config=model.config), max_new_tokens=30, do_sample=False)
    assert out.shape == ref.shape
    assert cache.get_seq_length() == 69
    # 8-bit keys/values: logits of a plain forward stay close to the uncompressed ones
    c1, c2 = make_cache("kivi:bits=8,group=32,residual=32", model.config), DynamicCache(config=model.config)
    l1 = model(ids, past_key_values=c1).logits
    l2 = model(ids, past_key_values=c2).logits
    step = ids[:, :1]
    d1 = model(step, past_key_values=c1).logits
    d2 = model(step, past_key_values=c2).logits
    assert torch.allclose(l1, l2)  # prefill attends to the exact new states
    assert (d1 - d2).abs().max() < 0.05 * d2.abs().max()


def test_beam_search_runs_with_kivi(tiny_llama):
    ids = torch.randint(0, 97, (1, 20))
    cache = make_cache("kivi:bits=4,group=32,residual=32", tiny_llama.config)
    out = tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, num_beams=3, max_new_tokens=12, do_sample=False)
    assert out.shape == (1, 32)
