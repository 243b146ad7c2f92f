"""The one-launch CUDA GEMV (``lowbit.kernels.w4ax_gemv``): its PyTorch reference on the CPU; on a GPU with nvcc, the
kernel against the reference and against the Triton two-launch path (the same function, float32 sums in another
order: equal up to the output's last bit)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.kernels.layout import repack_weight, unpack_tiles


def _case(m, k_in, n, block, group, dtype, seed, perm=True, mask=True, bias=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    k = -(-k_in // max(block, group)) * max(block, group)  # padded width
    x = (torch.randn(m, k_in, generator=g) * 3).to(dtype)
    x[0, : min(block, k_in)] = 0  # an all-zero block: scale 1, codes 0
    x[-1, k_in // 2] = 60.0  # an outlier
    qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    ws = (torch.rand(n, k // group, generator=g) * 0.05 + 0.001).half()
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    p = torch.randperm(k_in, generator=g).int() if perm else None
    msk = (torch.rand(k // block, generator=g) < 0.3) if mask else None
    to = (lambda t: None if t is None else t.to(device))
    return dict(x=to(x), block=block, w_kernel=to(repack_weight(qw, min(block, group))), w_scale=to(ws), group=group,
                int8_mask=to(msk), perm=to(p), bias=to(b)), k


def _float64_reference(c, k, low_bits):
    """The definition, written out: x gathered by perm and zero-padded, per-token per-block codes rint(x / scale) with
    scale = amax / hi, the weight codes minus 8 from the plain nibbles, everything dequantized in float64."""
    x = c["x"].double()
    if c["perm"] is not None:
        x = x[:, c["perm"].long()]
    x = torch.nn.functional.pad(x, (0, k - x.shape[1]))
    block, group = c["block"], c["group"]
    xb = x.view(x.shape[0], -1, block)
    low = float((1 << (low_bits - 1)) - 1)
    hi = torch.full((k // block,), low, dtype=torch.float64)
    if c["int8_mask"] is not None:
        hi[c["int8_mask"].bool()] = 127.0
    scale = (xb.abs().amax(-1).float() / hi.float()).double()  # the quantizer divides in float32
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.maximum(torch.minimum(torch.round((xb.float() / scale[..., None].float()).double()), hi[:, None]),
                          -hi[:, None] - 1)
    a = (codes * scale[..., None]).view(x.shape[0], k)
    wq = unpack_tiles(c["w_kernel"], min(block, group)).double() - 8
    w = (wq.view(wq.shape[0], -1, group) * c["w_scale"].double()[..., None]).view(wq.shape[0], k)
    y = a @ w.t()
    return y + c["bias"].double() if c["bias"] is not None else y


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 4), k_in=st.integers(40, 2000), n=st.integers(1, 40),
       bg=st.sampled_from([(128, 128), (64, 128), (32, 64), (128, 32), (256, 1024)]),
       low_bits=st.sampled_from([4, 8]), seed=st.integers(0, 10_000))
def test_reference_is_the_integer_function(m, k_in, n, bg, low_bits, seed):
    """The reference is the quantize-then-multiply definition (float32 output of the float64 sum)."""
    from lowbit.kernels.w4ax_gemv import gemv_reference

    block, group = bg
    c, k = _case(m, k_in, n, block, group, torch.float32, seed)
    got = gemv_reference(**c, low_bits=low_bits, out_dtype=torch.float32)
    want = _float64_reference(c, k, low_bits)
    assert got.shape == (m, n)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


def test_reference_changes_with_the_inputs():
    """Not a constant: another weight gives another output."""
    from lowbit.kernels.w4ax_gemv import gemv_reference

    c, _ = _case(2, 256, 8, 128, 128, torch.bfloat16, seed=1)
    a = gemv_reference(**c)
    c["w_kernel"] = c["w_kernel"] ^ 0x11
    assert not torch.equal(a, gemv_reference(**c))


def test_env_is_checked():
    from lowbit.kernels.w4ax_gemv import AUTO, gemv_policy

    assert gemv_policy(None) == AUTO and gemv_policy("auto") == AUTO and gemv_policy("0") == (0, 1)
    assert gemv_policy("4") == (4, 1)
    for bad in ("yes", "5", "-1"):
        with pytest.raises(ValueError, match="LOWBIT_W4AX_GEMV"):
            gemv_policy(bad)


def test_supported_calls():
    from lowbit.kernels.w4ax_gemv import gemv_supported

    bf = torch.bfloat16
    assert gemv_supported(1, 4096, 128, 128, None, bf, bf)
    assert gemv_supported(4, 14336, 64, 128, None, torch.float16, bf)
    assert not gemv_supported(5, 4096, 128, 128, None, bf, bf)  # past the kernel's tokens
    assert not gemv_supported(1, 4096, 128, 128, torch.zeros(1), bf, bf)  # asymmetric weights
    assert not gemv_supported(1, 4096, 128, 128, None, torch.float32, bf)
    assert not gemv_supported(1, 4096, 128, 16, None, bf, bf)  # groups under 32
    assert not gemv_supported(1, 4096, 512, 128, None, bf, bf)  # blocks over 256
    assert not gemv_supported(1, 1536, 128, 128, None, bf, bf)  # K not a multiple of 1024


# ------------------------------------------------------------------------------------------ the kernel (GPU)

def _cuda_ready() -> bool:
    if not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return False
    from lowbit.kernels.w4ax_gemv import built

    return built()


gpu = pytest.mark.skipif(not _cuda_ready(), reason="needs CUDA, nvcc and Triton")


def _close_to(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to one rounding of the output dtype (float32 sums in another order), and equal for most elements."""
    ulp = torch.finfo(got.dtype).eps
    diff = (got.float() - want.float()).abs()
    assert (diff <= 2 * ulp * want.float().abs() + 1e-3 * ulp).all(), float(diff.max())
    assert (diff == 0).float().mean() > 0.8


@gpu
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("block,group", [(128, 128), (64, 128), (32, 64), (128, 32), (256, 1024)])
@pytest.mark.parametrize("n", [200, 4099])
def test_kernel_equals_the_reference_and_two_launches(m, block, group, n):
    from lowbit.kernels.gemm import linear_two_launch
    from lowbit.kernels.w4ax_gemv import gemv_reference, w4ax_gemv

    c, k = _case(m, 1000, n, block, group, torch.bfloat16, seed=m * 11 + block + n, device="cuda")
    got = w4ax_gemv(**c)
    _close_to(got, gemv_reference(**c))
    _close_to(got, linear_two_launch(**c, workspace=None))


@gpu
@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.float16),
                                               (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("opts", [dict(perm=False, mask=False, bias=False), dict(perm=True, mask=False, bias=True),
                                  dict(perm=False, mask=True, bias=False)])
@pytest.mark.parametrize("k_in", [4096, 3000])
def test_kernel_dtypes_options_and_widths(x_dtype, out_dtype, opts, k_in):
    from lowbit.kernels.gemm import linear_two_launch
    from lowbit.kernels.w4ax_gemv import w4ax_gemv

    c, k = _case(3, k_in, 136, 128, 128, x_dtype, seed=k_in, device="cuda", **opts)
    for low_bits in (4, 8):
        got = w4ax_gemv(**c, low_bits=low_bits, out_dtype=out_dtype)
        _close_to(got, linear_two_launch(**c, low_bits=low_bits, out_dtype=out_dtype, workspace=None))


@gpu
def test_kernel_on_a_side_stream_and_in_a_graph():
    from lowbit.kernels.w4ax_gemv import GemvLinear

    c, k = _case(1, 2048, 512, 128, 128, torch.bfloat16, seed=5, device="cuda")
    lin = GemvLinear(128, c["w_kernel"], c["w_scale"], 128, c["int8_mask"], 4, c["perm"], c["bias"], torch.bfloat16)
    want = lin(c["x"])
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = torch.empty(1, 512, dtype=torch.bfloat16, device="cuda")
        lin(c["x"], out)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            lin(c["x"], out)
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


@gpu
def test_bad_calls_are_refused():
    from lowbit.kernels.w4ax_gemv import w4ax_gemv

    c, _ = _case(1, 1024, 16, 128, 128, torch.bfloat16, seed=0, device="cuda")
    with pytest.raises(ValueError, match="bf16/fp16"):
        w4ax_gemv(**{**c, "x": c["x"].float()})
    with pytest.raises(ValueError, match="1..4"):
        w4ax_gemv(**{**c, "x": c["x"].expand(5, -1).contiguous()})
    with pytest.raises(ValueError, match=r"\[M, 1024\]"):
        w4ax_gemv(**{**c, "x": c["x"][:, :128].contiguous()})


@gpu
def test_layers_take_the_gemv_by_policy():
    """Under the default policy a one-token call of a wide layer (>= 16384 rows) takes the GEMV; narrower layers and
    more tokens keep the two launches (bit-exact to the two-launch call)."""
    from lowbit.kernels.gemm import linear_two_launch
    from lowbit.kernels.w4ax_fused import PreparedLinear
    from lowbit.kernels.w4ax_gemv import GEMV_ENV

    import os

    if os.environ.get(GEMV_ENV, "auto") not in ("", "auto"):
        pytest.skip(f"${GEMV_ENV} is set")
    for n, m, takes in ((16384, 1, True), (16384, 2, False), (4096, 1, False)):
        c, _ = _case(m, 1024, n, 128, 128, torch.bfloat16, seed=n + m, device="cuda")
        layer = PreparedLinear(128, c["w_kernel"], c["w_scale"], 128, c["int8_mask"], 4, c["perm"], bias=c["bias"],
                               launches="two")
        got = layer(c["x"])
        want = linear_two_launch(**c, workspace=None)
        assert bool(layer._gemv) == takes
        if takes:
            _close_to(got, want)
        else:
            assert torch.equal(got, want)
