"""GPU tests: every Triton kernel against its PyTorch reference (skipped without CUDA; Triton imported lazily).

Error bounds (relative Frobenius error ||out - ref|| / ||ref||, reference in float32/float64):

* quantize-and-pack (keys, values) and activation quantization: bit-exact (codes, scales, zeros).
* decode attention: < 1e-2 (K and V dequantized in fp32, then rounded to the query dtype for the MMAs).
* GEMM: < 1e-5 with a float32 output (exact int32 partials, fp32 epilogue), < 1e-2 with bf16 output.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernels)")]

DEV = "cuda"


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------------- KIVI flush


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8, 128, 128), (3, 2, 64, 64), (2, 4, 256, 128)])
def test_quantize_pack_bit_exact(bits, group, dtype, shape):
    from lowbit.kernels.kivi_quant import quantize_pack_keys, quantize_pack_values
    from lowbit.quant.kivi import quantize_keys as quantize_pack_keys_ref, quantize_values as quantize_pack_values_ref

    if shape[-1] % group:
        pytest.skip("group must divide head dim")
    big = torch.randn(shape[0], shape[1], shape[2] + 16, shape[3], device=DEV).to(dtype) * 3
    x = big[:, :, 16:]  # a strided view, as the residual buffer hands it over
    for got, ref in ((quantize_pack_keys(x, bits, group), quantize_pack_keys_ref(x, bits, group)),
                     (quantize_pack_values(x, bits, group), quantize_pack_values_ref(x, bits, group))):
        for g, r in zip(got, ref):
            assert g.shape == r.shape and g.dtype == r.dtype
            assert torch.equal(g, r)


# -------------------------------------------------------------------------------- decode attention


def _layer(b, hkv, d, prefill, steps, bits, group, residual, sinks, dtype, seed=0, fused=False):
    from lowbit.kv.fused import FusedKiviLayer
    from lowbit.kv.kivi import KiviLayer

    g = torch.Generator(device=DEV).manual_seed(seed)
    layer = FusedKiviLayer(bits, group, residual, sinks) if fused else KiviLayer(bits, group, residual, sinks)
    k = torch.randn(b, hkv, prefill, d, device=DEV, generator=g).to(dtype)
    v = torch.randn(b, hkv, prefill, d, device=DEV, generator=g).to(dtype)
    layer.update(k, v)
    for _ in range(steps):
        k = torch.randn(b, hkv, 1, d, device=DEV, generator=g).to(dtype)
        v = torch.randn(b, hkv, 1, d, device=DEV, generator=g).to(dtype)
        layer.update(k, v)
    return layer, k, v


ATTN_CASES = [
    # b, hq, hkv, d, prefill, steps, bits, group, residual, sinks, nq
    (1, 32, 8, 128, 1000, 3, 2, 32, 128, 0, 1),
    (4, 32, 8, 128, 2048 + 77, 5, 4, 32, 128, 0, 1),
    (2, 8, 8, 128, 700, 1, 2, 32, 128, 4, 1),  # GQA ratio 1, sinks
    (3, 16, 2, 64, 513, 9, 8, 32, 64, 0, 1),  # GQA 8, 8-bit, head dim 64
    (2, 32, 4, 128, 100, 2, 2, 32, 128, 0, 1),  # short: everything in the residual
    (2, 8, 2, 128, 3000, 0, 4, 64, 128, 2, 2),  # two query tokens (causal), group 64
    (8, 32, 8, 128, 8192 + 5, 1, 2, 32, 128, 0, 1),
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_attention_vs_reference(case, dtype):
    from lowbit.kernels.kivi_attention import kivi_decode_attention_parts
    from lowbit.kernels.reference import decode_attention_ref

    b, hq, hkv, d, prefill, steps, bits, group, residual, sinks, nq = case
    layer, _, _ = _layer(b, hkv, d, prefill, steps, bits, group, residual, sinks, dtype)
    parts = layer.parts()
    q = torch.randn(b, hq, nq, d, device=DEV).to(dtype)
    ref = decode_attention_ref(q, parts)
    for opts in ({}, {"block_n": 32, "num_splits": 3}, {"block_n": 128, "num_warps": 8}, {"block_n": 64, "prefetch": True},
                 {"block_n": 32, "num_warps": 2, "prefetch": True, "num_splits": 5}, {"block_n": 16, "num_warps": 1}):
        out = kivi_decode_attention_parts(q, parts, **opts).transpose(1, 2)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert rel(out, ref) < 1e-2, opts


@pytest.mark.parametrize("bits", [2, 4])
def test_decode_attention_ragged_batch(bits):
    """Left-padded sequences of different lengths (per-sequence start) in one batch."""
    from lowbit.kernels.kivi_attention import kivi_decode_attention_parts
    from lowbit.kernels.reference import decode_attention_ref

    layer, _, _ = _layer(4, 8, 128, 1500, 3, bits, 32, 128, 0, torch.bfloat16, seed=3)
    parts = layer.parts()
    start = torch.tensor([0, 17, 700, 1490], device=DEV, dtype=torch.int32)
    q = torch.randn(4, 32, 1, 128, device=DEV, dtype=torch.bfloat16)
    out = kivi_decode_attention_parts(q, parts, start=start).transpose(1, 2)
    ref = decode_attention_ref(q, parts, start=start)
    assert rel(out, ref) < 1e-2


@pytest.mark.parametrize("bits", [2, 4])
def test_fused_layer_decode_matches_kivi_layer(bits):
    """FusedKiviLayer (buffers, Triton flushes, handles) + kernel == KiviLayer.update + SDPA, over flushes."""
    import torch.nn.functional as F

    from lowbit.kv.fused import FusedKiviLayer, kivi_decode_attention
    from lowbit.kv.kivi import KiviLayer

    torch.manual_seed(0)
    b, hkv, hq, d = 2, 4, 16, 128
    a, f = KiviLayer(bits, 32, 64), FusedKiviLayer(bits, 32, 64)
    k, v = torch.randn(b, hkv, 300, d, device=DEV, dtype=torch.bfloat16), torch.randn(b, hkv, 300, d, device=DEV, dtype=torch.bfloat16)
    a.update(k, v)
    f.update(k, v)
    for step in range(150):
        k, v = torch.randn(b, hkv, 1, d, device=DEV, dtype=torch.bfloat16), torch.randn(b, hkv, 1, d, device=DEV, dtype=torch.bfloat16)
        ka, va = a.update(k, v)
        kh, vh = f.update(k, v)
        assert kh.shape == k.shape  # a handle, not the assembled cache
        q = torch.randn(b, hq, 1, d, device=DEV, dtype=torch.bfloat16)
        ref = F.scaled_dot_product_attention(q.float(), ka.float(), va.float(), enable_gqa=True)
        out = kivi_decode_attention(f, q, key_states=kh, value_states=vh)
        assert rel(out, ref) < 1e-2, step
    for name in ("qk_packed", "qk_scale", "qk_zero", "qv_packed", "qv_scale", "qv_zero", "res_k", "res_v"):
        assert torch.equal(getattr(a, name), getattr(f, name)), name


def _tiny_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=32)
    return LlamaForCausalLM(cfg).to(DEV, dtype).eval()


@pytest.mark.parametrize("padded", [False, True])
def test_model_decode_through_attention_interface(padded, monkeypatch):
    """A Llama with FusedKiviCache + 'lowbit_kivi' attention == KiviCache + SDPA; the kernel path is taken."""
    import lowbit.kernels.kivi_attention as ka
    from lowbit.kv import FusedKiviCache, use_lowbit_attention as use_kivi_kernels
    from lowbit.kv.kivi import KiviCache

    model = _tiny_llama(torch.bfloat16)
    ids = torch.randint(0, 256, (3, 90), device=DEV)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :13] = 0
        mask[2, :50] = 0

    def run(cache_cls, steps=70):
        torch.manual_seed(5)
        cache = cache_cls(model.config, bits=2, group=32, residual=32)
        m = mask.clone()
        logits = []
        with torch.no_grad():
            out = model(ids, attention_mask=m, past_key_values=cache, use_cache=True)
            for _ in range(steps):
                tok = torch.randint(0, 256, (3, 1), device=DEV)
                m = torch.cat([m, torch.ones_like(tok)], dim=1)
                out = model(tok, attention_mask=m, past_key_values=cache, use_cache=True)
                logits.append(out.logits[:, -1].float())
        return torch.stack(logits)

    model.config._attn_implementation = "sdpa"
    ref = run(KiviCache)
    calls = {"n": 0}
    orig = ka.kivi_decode_attention_parts

    def counting(*args, **kwargs):
        calls["n"] += 1
        return orig(*args, **kwargs)

    monkeypatch.setattr(ka, "kivi_decode_attention_parts", counting)
    use_kivi_kernels(model)
    got = run(FusedKiviCache)
    assert calls["n"] == 70 * 2  # every decode step of every layer went through the kernel
    assert rel(got, ref) < 2e-2


# -------------------------------------------------------------------------------------------- GEMM


@pytest.mark.parametrize("m", [1, 5, 16, 33, 256])
@pytest.mark.parametrize("k,n", [(256, 96), (512, 256), (4096, 512)])
@pytest.mark.parametrize("block,group", [(128, 128), (64, 128), (128, 64)])
def test_w4a8_gemm_vs_reference(m, k, n, block, group):
    from lowbit.kernels.gemm import GemmConfig, quantize_activation, repack_weight, w4a8_gemm
    from lowbit.kernels.reference import w4a8_gemm_ref

    torch.manual_seed(m + k + n)
    qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEV)
    ws = (torch.rand(n, k // group, device=DEV) * 0.05 + 0.001).half()
    bias = torch.randn(n, device=DEV)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    mask = torch.rand(k // block, device=DEV) < 0.3
    codes, scale = quantize_activation(x, block, mask, 4)
    wk = repack_weight(qw, min(block, group))
    ref = w4a8_gemm_ref(codes, scale, block, qw, ws, group, bias=bias)
    for cfg in (None, GemmConfig(16, 32, 4, 2, 1), GemmConfig(32, 64, 4, 3, 3), GemmConfig(64, 128, 4, 3, 1),
                GemmConfig(16, 64, 4, 2, 2, asm=False, fast_cvt=False), GemmConfig(64, 128, 4, 3, 1, unpacked=True),
                GemmConfig(128, 128, 8, 3, 1, unpacked=True, fast_cvt=False), GemmConfig(64, 64, 4, 3, 1, unpacked=True, tma=True)):
        y = w4a8_gemm(codes, scale, block, wk, ws, group, bias=bias, out_dtype=torch.float32, config=cfg)
        assert rel(y, ref) < 1e-5, cfg
    yb = w4a8_gemm(codes, scale, block, wk, ws, group, bias=bias)
    assert yb.dtype == torch.bfloat16 and rel(yb, ref) < 1e-2


def test_w4a8_gemm_asymmetric_weights():
    from lowbit.kernels.gemm import GemmConfig, quantize_activation, repack_weight, w4a8_gemm
    from lowbit.kernels.reference import w4a8_gemm_ref

    qw = torch.randint(0, 256, (192, 256), dtype=torch.uint8, device=DEV)
    wz = torch.randint(0, 16, (192, 4), dtype=torch.uint8, device=DEV)
    ws = (torch.rand(192, 4, device=DEV) * 0.05 + 0.001).half()
    codes, scale = quantize_activation(torch.randn(20, 512, device=DEV), 128, None, 8)
    ref = w4a8_gemm_ref(codes, scale, 128, qw, ws, 128, w_zero=wz)
    for cfg in (None, GemmConfig(64, 64, 4, 3, 1, unpacked=True, tma=True)):
        y = w4a8_gemm(codes, scale, 128, repack_weight(qw, 128), ws, 128, w_zero=wz, out_dtype=torch.float32, config=cfg)
        assert rel(y, ref) < 1e-5, cfg


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("tile", [64, 128])
def test_unpack_weight_int8_exact(zero, tile):
    from lowbit.kernels.gemm import unpack_weight_int8
    from lowbit.kernels.layout import repack_weight

    n, k = 200, 512
    qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEV)
    wz = torch.randint(0, 16, (n, k // 128), dtype=torch.uint8, device=DEV) if zero else None
    codes = torch.stack([qw & 15, qw >> 4], dim=-1).reshape(n, k).to(torch.int16)  # channel order
    want = codes - (wz.to(torch.int16).repeat_interleave(128, dim=1) if zero else 8)
    for asm in (True, False):
        got = unpack_weight_int8(repack_weight(qw, tile), tile, 128, wz, use_asm=asm)
        assert got.dtype == torch.int8 and torch.equal(got.to(torch.int16), want)


@pytest.mark.parametrize("m", [1, 7, 300])
@pytest.mark.parametrize("low_bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_activation_quant_bit_exact(m, low_bits, dtype):
    from lowbit.kernels.gemm import quantize_activation
    from lowbit.kernels.reference import quantize_activation_ref

    k_in, kp, block = 1000, 1024, 128
    x = (torch.randn(m, k_in, device=DEV) * 4).to(dtype)
    x[0, :128] = 0  # an all-zero block gets scale 1
    perm = torch.randperm(k_in, device=DEV).int()
    mask = torch.rand(kp // block, device=DEV) < 0.25
    c, s = quantize_activation(x, block, mask, low_bits, perm=perm, padded_in=kp)
    cr, sr = quantize_activation_ref(x, block, mask, low_bits, perm=perm, padded_in=kp)
    assert torch.equal(c, cr) and torch.equal(s, sr)


@pytest.mark.parametrize("spec", ["fmpq:a=4,int8_frac=0.1", "fmpq:a=8", "w4a4", "fmpq:a=4,sym=false,block=64,group=64"])
def test_quant_linear_forward_matches_int_mode(spec):
    from lowbit.wa.linear import kernel_forward as quant_linear_forward, supports_kernel as supports_quant_linear
    from lowbit.wa.linear import QuantLinear
    from lowbit.wa.methods import resolve_config

    torch.manual_seed(0)
    cfg = resolve_config(spec)
    lin = torch.nn.Linear(1000, 384, bias=True, device=DEV)
    ql = QuantLinear.from_linear(lin, cfg, channel_stats=torch.rand(1000, device=DEV) + 0.1 if cfg.permute else None, mode="int")
    assert supports_quant_linear(ql)
    for shape in ((2, 9), (1, 5), (1, 1)):  # M 18, then decode-sized calls (the layer's prepared launches)
        for seed in (1, 2):  # the second call of a shape relaunches the recorded launches with the new x
            x = torch.randn(*shape, 1000, device=DEV) * seed
            ref = ql(x)
            got = quant_linear_forward(ql, x)
            assert got.shape == ref.shape and rel(got, ref) < 1e-5
            xb = x.bfloat16()
            assert rel(quant_linear_forward(ql, xb), ql(xb)) < 1e-2
