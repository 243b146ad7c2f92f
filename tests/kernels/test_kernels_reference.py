"""CPU tests of lowbit.kernels: the PyTorch references, layout helpers and integration glue (no Triton needed)."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels.layout import repack_weight, unrepack_weight
from lowbit.kernels.reference import decode_attention_ref, quantize_activation_ref, w4a8_gemm_ref
from lowbit.kv.kivi import KiviLayer
from lowbit.quant.kivi import dequantized_kv
from lowbit.quant.kivi import quantize_keys as quantize_pack_keys_ref
from lowbit.quant.kivi import quantize_values as quantize_pack_values_ref


def _filled_layer(b, hkv, d, prefill, steps, bits=2, group=8, residual=16, sinks=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = KiviLayer(bits=bits, group=group, residual=residual, sinks=sinks)
    last = None
    k = torch.randn(b, hkv, prefill, d, generator=g)
    v = torch.randn(b, hkv, prefill, d, generator=g)
    last = layer.update(k, v)
    for _ in range(steps):
        k = torch.randn(b, hkv, 1, d, generator=g)
        v = torch.randn(b, hkv, 1, d, generator=g)
        last = layer.update(k, v)
    return layer, last, k, v


def test_import_without_triton():
    mod = importlib.import_module("lowbit.kernels")
    assert "kivi_decode_attention_parts" in mod.__all__
    importlib.import_module("lowbit.cli.bench")  # the typer app imports without Triton or CUDA
    with pytest.raises(AttributeError):
        mod.no_such_thing  # noqa: B018


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("prefill,steps,sinks", [(37, 5, 0), (64, 17, 3), (5, 2, 0), (16, 0, 0)])
def test_decode_ref_matches_sdpa_on_dequantized_cache(bits, gqa, prefill, steps, sinks):
    b, hkv, d = 2, 2, 16
    layer, *_ = _filled_layer(b, hkv, d, prefill, steps, bits=bits, sinks=sinks)
    parts = layer.parts()
    assert parts.total == layer.get_seq_length()
    q = torch.randn(b, hkv * gqa, 1, d)
    out = decode_attention_ref(q, parts)
    k, v = layer.full_keys().float(), layer.full_values().float()
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(gqa, 1), v.repeat_interleave(gqa, 1))
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


def test_decode_ref_several_queries_causal_and_padding():
    b, hkv, d, gqa, nq = 2, 2, 16, 2, 3
    layer, *_ = _filled_layer(b, hkv, d, 40, 9, bits=4)
    parts = layer.parts()
    t = parts.total
    q = torch.randn(b, hkv * gqa, nq, d)
    start = torch.tensor([0, 11])
    out = decode_attention_ref(q, parts, start=start)
    k, v = layer.full_keys().float(), layer.full_values().float()
    k, v = k.repeat_interleave(gqa, 1), v.repeat_interleave(gqa, 1)
    pos = torch.arange(t)
    allowed = (pos[None, :] <= (t - nq + torch.arange(nq))[:, None])[None, None] & (pos >= start.view(b, 1, 1, 1))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("residual,group", [(16, 8), (8, 8)])
def test_decode_parts_keeps_current_token_exact(residual, group):
    """After a flush the kernel path must see the exact current key, as KiviLayer.update returns it."""
    from lowbit.kv.fused import decode_parts

    b, hkv, d = 1, 2, 16
    seen_override = False
    for steps in range(1, 2 * residual + 2):
        layer, (keys, values), k_new, v_new = _filled_layer(b, hkv, d, 2 * residual - 1, steps, residual=residual, group=group)
        parts = decode_parts(layer, k_new, v_new)
        seen_override |= parts.n_qk < layer.n_qk
        kk, vv = dequantized_kv(parts)
        assert torch.allclose(kk, keys.float(), atol=1e-6) and torch.allclose(vv, values.float(), atol=1e-6)
    assert seen_override


def test_quantize_pack_refs_roundtrip():
    from lowbit.quant import unpack
    from lowbit.quant.affine import dequantize_codes

    x = torch.randn(2, 3, 64, 32)
    p, s, z = quantize_pack_keys_ref(x, 2, 32)
    assert p.shape == (2, 3, 16, 32) and s.shape == (2, 3, 2, 32)
    xk = dequantize_codes(unpack(p, 2, dim=-2), s, z, 32, -2, torch.float32)
    assert (xk - x).abs().max() <= s.float().max() / 2 + 1e-3
    p, s, z = quantize_pack_values_ref(x, 4, 16)
    assert p.shape == (2, 3, 64, 16) and s.shape == (2, 3, 64, 2)


@pytest.mark.parametrize("tile", [32, 64, 128])
def test_repack_roundtrip(tile):
    qw = torch.randint(0, 256, (24, 256), dtype=torch.uint8)
    wk = repack_weight(qw, tile)
    assert torch.equal(unrepack_weight(wk, tile), qw)
    # byte j of a tile holds channels j and j + tile/2
    from lowbit.quant import unpack

    codes = unpack(qw, 4, dim=1)
    assert torch.equal(wk[:, : tile // 2] & 0xF, codes[:, : tile // 2])
    assert torch.equal(wk[:, : tile // 2] >> 4, codes[:, tile // 2 : tile])


@pytest.mark.parametrize("spec", ["fmpq:a=4,int8_frac=0.25", "fmpq:a=8", "w4a4:block=64,group=128", "fmpq:a=4,sym=false"])
def test_gemm_ref_matches_quantlinear_int(spec):
    from lowbit.wa.linear import QuantLinear
    from lowbit.wa.methods import resolve_config

    torch.manual_seed(0)
    cfg = resolve_config(spec)
    lin = torch.nn.Linear(200, 48, bias=True)
    stats = torch.rand(200) + 0.1
    ql = QuantLinear.from_linear(lin, cfg, channel_stats=stats if cfg.permute else None, mode="int")
    x = torch.randn(5, 200)
    codes, scale = quantize_activation_ref(x, ql.block, ql.int8_mask, cfg.a_bits, ql.perm, ql.padded_in)
    c2, s2 = ql.quantize_input(x)
    assert torch.equal(codes.float(), c2) and torch.equal(scale, s2)
    plain = unrepack_weight(ql.qweight, ql.tile)  # QuantLinear stores the kernel's tile-split layout
    y = w4a8_gemm_ref(codes, scale, ql.block, plain, ql.w_scale, ql.group, ql.w_zero, ql.bias)
    ref = ql(x)
    assert (y - ref).norm() / ref.norm() < 1e-5


def test_start_from_mask():
    from lowbit.kv.fused import _start_from_mask

    m = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    m[1, ..., :4] = False
    m[2, ..., :9] = False
    assert _start_from_mask(m, 10).tolist() == [0, 4, 9]
    add = torch.zeros(3, 1, 1, 10).masked_fill(~m, -math.inf)
    assert _start_from_mask(add, 10).tolist() == [0, 4, 9]
    assert _start_from_mask(None, 10) is None


def test_fused_layer_buffers_and_cpu_fallback():
    """Off CUDA the fused layer behaves exactly like KiviLayer; its buffers append/compact correctly."""
    from lowbit.kv.fused import FusedKiviLayer

    torch.manual_seed(0)
    a, b = KiviLayer(2, 8, 16), FusedKiviLayer(2, 8, 16)
    for n in (20, 1, 1, 1, 15, 1):
        k, v = torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16)
        ka, va = a.update(k, v)
        kb, vb = b.update(k, v)
        assert torch.equal(ka, kb) and torch.equal(va, vb)
    layer = FusedKiviLayer(2, 8, 16)
    layer.res_v = None
    chunks = [torch.randn(1, 2, n, 4) for n in (3, 5, 1, 7, 2)]
    for i, c in enumerate(chunks):
        layer._append("res_v", c)
        if i == 2:
            layer._drop_front("res_v", 4)
    expect = torch.cat(chunks, dim=2)[:, :, 4:]
    assert torch.equal(layer.res_v, expect)


def test_host_launch_math_matches_its_definition():
    """cdiv and next_pow2 (the launchers' grid math, kept off Triton's constexpr functions) on a range of values."""
    import math

    from lowbit.kernels.layout import cdiv, next_pow2

    for a in range(0, 300):
        for b in (1, 2, 3, 7, 32, 128):
            assert cdiv(a, b) == math.ceil(a / b)
    for n in range(1, 5000):
        p = next_pow2(n)
        assert p >= n and p & (p - 1) == 0 and (p == 1 or p // 2 < n)
