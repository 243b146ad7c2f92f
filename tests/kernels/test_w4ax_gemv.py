"""The one-launch CUDA GEMV (``lowbit.kernels.w4ax_gemv``): its PyTorch reference against the float64 integer
reference on the CPU; on a GPU with nvcc, the kernel against the Triton two-launch path bit for bit and against the
reference."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.kernels.layout import repack_weight


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
    from lowbit.kernels.reference import quantize_activation_ref, w4a8_gemm_ref
    from lowbit.kernels.layout import unrepack_weight

    codes, scale = quantize_activation_ref(c["x"], c["block"], c["int8_mask"], low_bits, perm=c["perm"], padded_in=k)
    qw = unrepack_weight(c["w_kernel"].cpu(), min(c["block"], c["group"])).to(c["x"].device)
    return w4a8_gemm_ref(codes, scale, c["block"], qw, c["w_scale"], c["group"], bias=c["bias"])


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 5), k_in=st.integers(40, 700), n=st.integers(1, 40),
       bg=st.sampled_from([(128, 128), (64, 128), (32, 64), (128, 32), (256, 256)]),
       tps=st.integers(1, 8), low_bits=st.sampled_from([4, 8]), seed=st.integers(0, 10_000))
def test_reference_matches_the_float64_integer_matmul(m, k_in, n, bg, tps, low_bits, seed):
    from lowbit.kernels.w4ax_gemv import gemv_reference

    block, group = bg
    c, k = _case(m, k_in, n, block, group, torch.float32, seed)
    got = gemv_reference(**c, low_bits=low_bits, out_dtype=torch.float32, tps=tps)
    want = _float64_reference(c, k, low_bits)
    scale = want.abs().max().clamp_min(1.0)
    assert got.shape == (m, n)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


def test_reference_changes_with_the_inputs():
    """Not a constant: another weight gives another output."""
    from lowbit.kernels.w4ax_gemv import gemv_reference

    c, _ = _case(2, 256, 8, 128, 128, torch.bfloat16, seed=1)
    a = gemv_reference(**c)
    c["w_kernel"] = c["w_kernel"] ^ 0x11
    assert not torch.equal(a, gemv_reference(**c))


def test_env_is_checked():
    from lowbit.kernels.w4ax_gemv import AUTO_M, gemv_tokens

    assert gemv_tokens(None) == AUTO_M and gemv_tokens("auto") == AUTO_M and gemv_tokens("0") == 0
    assert gemv_tokens("4") == 4
    for bad in ("yes", "5", "-1"):
        with pytest.raises(ValueError, match="LOWBIT_W4AX_GEMV"):
            gemv_tokens(bad)


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


@gpu
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("block,group", [(128, 128), (64, 128), (32, 64), (128, 32), (256, 1024)])
@pytest.mark.parametrize("split_k", [0, 1, 3])
def test_kernel_equals_two_launches(m, block, group, split_k):
    from lowbit.kernels.gemm import linear_two_launch
    from lowbit.kernels.layout import GemmConfig
    from lowbit.kernels.w4ax_gemv import gemv_reference, two_launch_tps, w4ax_gemv

    c, k = _case(m, 1000, 200, block, group, torch.bfloat16, seed=m * 11 + block + split_k, device="cuda")
    cfg = GemmConfig(16, 32, 4, 2, split_k) if split_k else None
    got = w4ax_gemv(**c, config=cfg)
    want = linear_two_launch(**c, config=cfg, workspace=None)
    assert torch.equal(got, want)
    tps = two_launch_tps(m, 200, k, block, group, torch.device("cuda"), cfg)
    ref = gemv_reference(**c, tps=tps)
    assert (got.float() - ref.float()).abs().max() <= 1e-2 * ref.float().abs().max()


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
        assert torch.equal(got, linear_two_launch(**c, low_bits=low_bits, out_dtype=out_dtype, workspace=None))


@gpu
def test_kernel_on_a_side_stream_and_in_a_graph():
    from lowbit.kernels.gemm import linear_two_launch
    from lowbit.kernels.w4ax_gemv import GemvLinear, two_launch_tps

    c, k = _case(1, 2048, 512, 128, 128, torch.bfloat16, seed=5, device="cuda")
    want = linear_two_launch(**c, workspace=None)
    lin = GemvLinear(128, c["w_kernel"], c["w_scale"], 128, c["int8_mask"], 4, c["perm"], c["bias"], torch.bfloat16,
                     lambda m: two_launch_tps(m, 512, k, 128, 128, torch.device("cuda")))
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
