"""The opt-in FP8 prefill of W4Ax layers (lowbit.wa.fp8_prefill) on the CPU: e4m3 rounding bounds of both operands,
the layer's prefill-sized calls equal to the FP8 products computed independently and close to the quantized
function, decode-sized calls unchanged, the spec option; and on the GPU the weight kernel bit for bit and the
FP8 GEMM against the reference."""

import pytest
import torch

from lowbit.spec import SpecError
from lowbit.wa import fp8_prefill
from lowbit.wa.linear import QuantLinear
from lowbit.wa.methods import resolve_config

E4M3_REL = 2.0 ** -4  # half a unit in the last place of e4m3's 3 mantissa bits, relative


def _layer(spec, in_f=384, out_f=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(out_f, generator=g) * 0.1)
    stats = torch.rand(in_f, generator=g) + 0.1
    return QuantLinear.from_linear(lin, resolve_config(spec), stats)


@pytest.mark.parametrize("sym", [True, False])
def test_weight_rounding_is_within_e4m3(sym):
    q = _layer(f"w4a8:group=64,block=64,sym={str(sym).lower()}")
    factors, r = fp8_prefill.weight_factors(q.w_scale, 4, sym)
    w8 = fp8_prefill.fp8_weight_ref(q.weight_int(), factors, q.group)
    assert w8.dtype == torch.float8_e4m3fn and w8.float().abs().max() <= 448
    want = q.dequantized_weight(torch.float32)
    got = w8.float() * r[:, None]
    err = (got - want).abs()
    floor = r[:, None] * 2.0 ** -9  # e4m3's subnormal spacing, scaled
    assert bool((err <= E4M3_REL * want.abs() + floor).all())
    assert err.max() > 0  # e4m3 does round some of them


def test_activation_rounding_is_within_e4m3():
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(1)) * torch.logspace(-2, 1, 256)
    x8, s = fp8_prefill.fp8_activation(x)
    assert x8.dtype == torch.float8_e4m3fn and s.shape == (40,)
    err = ((x8.float() * s[:, None]) - x).abs()
    assert bool((err <= E4M3_REL * x.abs() + s[:, None] * 2.0 ** -9).all())


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_activation_scale_is_the_correctly_rounded_quotient(device):
    # float32 max|x| / 448 rounded once (a float64 quotient rounded to float32 is that), as the Triton kernel's
    # div_rn computes it; a multiply by 1/448 differs in the last bit for some inputs
    x = torch.rand(4096, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64).float().to(device)
    _, s = fp8_prefill.fp8_activation(x)
    want = (x.abs().amax(dim=1).double() / fp8_prefill.E4M3_MAX).float()
    assert torch.equal(s, want)


@pytest.mark.parametrize("spec", ["fmpq:a=4,block=64,group=64,int8_frac=0.25,prefill=fp8",
                                  "w4a4:block=32,group=64,sym=false,prefill=fp8"])
def test_prefill_sized_calls_take_the_fp8_products(spec):
    q = _layer(spec)
    plain = _layer(spec.replace("prefill=fp8", "prefill=int"))
    assert q.cfg.prefill == "fp8" and plain.cfg.prefill == "int"
    x = torch.randn(2, fp8_prefill.FP8_MIN_TOKENS // 2, 384, generator=torch.Generator().manual_seed(2))
    got = q(x)
    # the same products, built here from the layer's pieces
    xp = q.prepare_input(x, arrives_permuted=q.input_permuted)
    x8, sx = fp8_prefill.fp8_activation(xp)
    factors, r = fp8_prefill.weight_factors(q.w_scale, 4, q.cfg.sym)
    w8 = fp8_prefill.fp8_weight_ref(q.weight_int(), factors, q.group)
    want = fp8_prefill.fp8_matmul_ref(x8, sx, w8, r) + q.bias.float()
    torch.testing.assert_close(got, want.reshape(got.shape), rtol=1e-6, atol=1e-6)
    # close to the weights' own function (W4, float activations): e4m3 noise, not a different layer
    ref = xp @ q.dequantized_weight(torch.float32).t() + q.bias.float()
    rel = (got.reshape(ref.shape) - ref).norm() / ref.norm()
    assert rel < 0.05
    # a decode-sized call keeps the integer path
    small = x[:, :3]
    assert torch.equal(q(small), plain(small))


def test_prefill_option_in_the_spec():
    assert resolve_config("fmpq").prefill == "int"
    assert resolve_config("w4a8:prefill=fp8").prefill == "fp8"
    with pytest.raises(SpecError, match="prefill"):
        resolve_config("fmpq:prefill=bf16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FP8 tensor cores and Triton)")
@pytest.mark.parametrize("sym,group,block", [(True, 128, 128), (False, 64, 32)])
def test_gpu_weight_kernel_and_fp8_gemm(sym, group, block):
    from lowbit.kernels.fp8_weight import fp8_weight

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need sm_89+")
    q = _layer(f"w4a8:group={group},block={block},sym={str(sym).lower()},prefill=fp8", in_f=1024, out_f=512).cuda()
    factors, r = q._cached_fp8_factors()
    got = fp8_weight(q.qweight, factors, q.w_zero, q.group, q.tile, sym)
    want = fp8_prefill.fp8_weight_ref(q.weight_int(), factors, q.group)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    x = torch.randn(fp8_prefill.FP8_MIN_TOKENS + 3, 1024, device="cuda", dtype=torch.bfloat16)
    x[3] = 0  # an all-zero token: the smallest scale, codes 0
    from lowbit.kernels.fp8_weight import fp8_activation

    for xin in (x, x.float() * 1e-3):
        a8, sa = fp8_activation(xin)
        r8, sr = fp8_prefill.fp8_activation(xin)
        assert torch.equal(sa, sr) and torch.equal(a8.view(torch.uint8), r8.view(torch.uint8))
    y = q(x)
    xp = q.prepare_input(x, arrives_permuted=q.input_permuted)
    x8, sx = fp8_prefill.fp8_activation(xp)
    ref = fp8_prefill.fp8_matmul_ref(x8, sx, want, r) + q.bias.float()
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).norm() / ref.norm()).item() < 5e-3
