"""The one-launch W4Ax linear against the two-launch path (quantize_activation + w4a8_gemm): bit for bit.

Runs on CUDA, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1`` with Triton installed); skipped
otherwise (CI's CPU install has no Triton).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAVE_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAVE_TRITON or not (torch.cuda.is_available() or INTERPRET),
                                reason="needs Triton and CUDA (or TRITON_INTERPRET=1)")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(m, k_in, n, block, group, dtype, seed, zero=False, perm=True, mask=True, bias=True):
    from lowbit.kernels.layout import repack_weight

    g = torch.Generator().manual_seed(seed)
    k = -(-k_in // block) * block  # padded width
    x = (torch.randn(m, k_in, generator=g) * 3).to(dtype)
    x[0, : min(block, k_in)] = 0  # an all-zero block: scale 1, codes 0
    qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    ws = (torch.rand(n, k // group, generator=g) * 0.05 + 0.001).half()
    wz = torch.randint(0, 16, (n, k // group), dtype=torch.uint8, generator=g) if zero else None
    b = torch.randn(n, generator=g) if bias else None
    p = torch.randperm(k_in, generator=g).int() if perm else None
    msk = (torch.rand(k // block, generator=g) < 0.3) if mask else None
    to = (lambda t: None if t is None else t.to(DEV))
    return dict(x=to(x), block=block, w_kernel=to(repack_weight(qw, min(block, group))), w_scale=to(ws), group=group,
                int8_mask=to(msk), perm=to(p), w_zero=to(wz), bias=to(b)), k


def _two_launch(c, k, low_bits, out_dtype, config):
    from lowbit.kernels.gemm import quantize_activation, w4a8_gemm

    codes, scale = quantize_activation(c["x"], c["block"], c["int8_mask"], low_bits, perm=c["perm"], padded_in=k)
    return w4a8_gemm(codes, scale, c["block"], c["w_kernel"], c["w_scale"], c["group"], w_zero=c["w_zero"],
                     bias=c["bias"], out_dtype=out_dtype, config=config)


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("block,group", [(128, 128), (64, 128), (32, 128)])
@pytest.mark.parametrize("split_k", [1, 3, 0])
def test_fused_equals_two_launches(m, block, group, split_k):
    from lowbit.kernels.layout import GemmConfig
    from lowbit.kernels.w4ax_fused import w4ax_linear

    c, k = _case(m, 1000, 96, block, group, torch.float32, seed=m * 7 + block + split_k)
    cfg = GemmConfig(16, 32, 4, 2, split_k) if split_k else None  # 0: the library's plan (split to fill the GPU)
    from lowbit.kernels.gemm import PLANS, _sm_count
    from lowbit.kernels.w4ax_fused import COUNTERS

    plan = PLANS.get(m, 96, k, block, torch.device(DEV), _sm_count, cfg)
    assert plan.split > 1 or split_k == 1  # the in-kernel reduction is exercised
    from lowbit.kernels.w4ax_fused import FUSED_CONFIG

    for low_bits in (4, 8):  # the same bits as the two-launch path at the same config (the fused default's, for 0)
        want = _two_launch(c, k, low_bits, torch.float32, cfg or FUSED_CONFIG)
        for _ in range(2):  # the second call finds the tile counters back at zero
            got = w4ax_linear(**c, low_bits=low_bits, out_dtype=torch.float32, config=cfg)
            assert torch.equal(got, want), (low_bits, cfg)
    if plan.split > 1:
        assert not COUNTERS.get(plan.tiles_mn, torch.device(DEV), 0 if DEV == "cpu" else
                                torch.cuda.current_stream().cuda_stream)[: plan.tiles_mn].any()


@pytest.mark.parametrize("zero,perm,mask,bias", [(True, False, False, False), (False, True, False, True),
                                                 (True, True, True, True)])
def test_fused_options_and_reference(zero, perm, mask, bias):
    """Asymmetric weights, no permutation / mask / bias; and the float reference of the int path."""
    from lowbit.kernels.layout import GemmConfig
    from lowbit.kernels.reference import quantize_activation_ref, w4a8_gemm_ref
    from lowbit.kernels.layout import unrepack_weight
    from lowbit.kernels.w4ax_fused import w4ax_linear

    c, k = _case(5, 500, 64, 128, 128, torch.float32, seed=11, zero=zero, perm=perm, mask=mask, bias=bias)
    cfg = GemmConfig(16, 32, 4, 2, 2)
    got = w4ax_linear(**c, out_dtype=torch.float32, config=cfg)
    assert torch.equal(got, _two_launch(c, k, 4, torch.float32, cfg))
    codes, scale = quantize_activation_ref(c["x"], 128, c["int8_mask"], 4, perm=c["perm"], padded_in=k)
    ref = w4a8_gemm_ref(codes, scale, 128, unrepack_weight(c["w_kernel"], 128), c["w_scale"], 128,
                        w_zero=c["w_zero"], bias=c["bias"])
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


def test_fused_half_precision_output():
    from lowbit.kernels.w4ax_fused import w4ax_linear

    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    c, k = _case(2, 640, 80, 64, 64, dtype, seed=3)
    from lowbit.kernels.w4ax_fused import FUSED_CONFIG

    got = w4ax_linear(**c, out_dtype=dtype)
    want = _two_launch(c, k, 4, dtype, FUSED_CONFIG)  # at the fused default's config (its split-K order)
    assert got.dtype == dtype and torch.equal(got, want)


def test_fused_refuses_what_it_cannot_take():
    from lowbit.kernels.w4ax_fused import fused_supported, w4ax_linear

    assert fused_supported(16, 128, 128) and not fused_supported(17, 128, 128) and not fused_supported(4, 128, 64)
    c, _ = _case(2, 256, 32, 128, 128, torch.float32, seed=5)
    with pytest.raises(ValueError, match="block <= group"):
        w4ax_linear(**{**c, "group": 64, "w_scale": c["w_scale"].repeat(1, 2)})
    with pytest.raises(ValueError, match="int8_mask has 3 entries"):
        w4ax_linear(**{**c, "int8_mask": torch.ones(3, dtype=torch.bool, device=DEV)})
    with pytest.raises(ValueError, match=r"x must be \[M, K_in\]"):
        w4ax_linear(**{**c, "x": c["x"][None]})


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="the compiled launcher exists on CUDA only")
def test_repeated_calls_take_the_compiled_launcher_with_the_same_bits():
    """The first call of a shape compiles through the JIT; later ones launch that kernel directly (kernels/launch.py),
    bit for bit the same, with fresh inputs each time; a differently aligned input is a different key."""
    from lowbit.kernels import w4ax_fused

    w4ax_fused._LAUNCH.kernels.clear()
    c, k = _case(4, 1000, 96, 128, 128, torch.bfloat16, seed=21)
    first = w4ax_fused.w4ax_linear(**c, out_dtype=torch.bfloat16)
    assert len(w4ax_fused._LAUNCH.kernels) == 1
    for seed in (1, 2):
        x = torch.randn_like(c["x"]) * seed
        got = w4ax_fused.w4ax_linear(**{**c, "x": x}, out_dtype=torch.bfloat16)
        assert torch.equal(got, _two_launch({**c, "x": x}, k, 4, torch.bfloat16, None))
    assert len(w4ax_fused._LAUNCH.kernels) == 1 and not torch.equal(got, first)
    odd = torch.empty(c["x"].numel() + 1, dtype=c["x"].dtype, device=DEV)[1:].view_as(c["x"]).copy_(c["x"])
    assert torch.equal(w4ax_fused.w4ax_linear(**{**c, "x": odd}, out_dtype=torch.bfloat16), first)
    assert len(w4ax_fused._LAUNCH.kernels) == 2


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="the recorded launch exists on CUDA only")
@pytest.mark.parametrize("m,split_k,opts", [(1, 0, {}), (5, 1, {"zero": True}), (16, 3, {"perm": False, "bias": False})])
def test_prepared_linear_relaunches_the_recorded_call_with_the_same_bits(monkeypatch, m, split_k, opts):
    """PreparedLinear: the first call of a key runs w4ax_linear and records its launch; later calls with fresh
    activations (and outputs, given or not) relaunch it without w4ax_linear's argument work, bit for bit the
    two-launch path; another M is another key."""
    from lowbit.kernels import w4ax_fused
    from lowbit.kernels.layout import GemmConfig

    c, k = _case(m, 1000, 96, 128, 128, torch.bfloat16, seed=31 + m, **opts)
    cfg = GemmConfig(16, 128, 4, 4, split_k=split_k) if split_k else None
    ops = {key: c[key] for key in ("block", "w_kernel", "w_scale", "group", "int8_mask", "perm", "w_zero", "bias")}
    prepared = w4ax_fused.PreparedLinear(**ops, out_dtype=torch.bfloat16, config=cfg)
    assert torch.equal(prepared(c["x"]), _two_launch(c, k, 4, torch.bfloat16, cfg))
    assert len(prepared._calls) == 1
    calls = []
    real = w4ax_fused._fused_call
    monkeypatch.setattr(w4ax_fused, "_fused_call", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    outs = []
    for seed in (1, 2):
        x = torch.randn_like(c["x"]) * seed
        out = torch.full((m, 96), float("nan"), dtype=torch.bfloat16, device=DEV) if seed == 2 else None
        got = prepared(x, out)
        assert got is out if out is not None else got.shape == (m, 96)
        assert torch.equal(got, _two_launch({**c, "x": x}, k, 4, torch.bfloat16, cfg))
        outs.append(got)
    assert len(calls) == 1  # the given output is a new key (its stride and alignment); the fresh one was not
    assert not torch.equal(outs[0], outs[1])
    other = torch.randn(m % 16 + 1, 1000, dtype=torch.bfloat16, device=DEV)  # another M
    assert torch.equal(prepared(other), _two_launch({**c, "x": other}, k, 4, torch.bfloat16, cfg))
    assert len(prepared._calls) == 3 and len(calls) == 2


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="the recorded launches exist on CUDA only")
@pytest.mark.parametrize("m,split_k,opts", [(1, 0, {}), (7, 1, {"zero": True}), (16, 3, {"bias": False})])
def test_prepared_two_launches_give_the_two_launch_bits(m, split_k, opts):
    """PreparedLinear(launches="two"): the quantizer and the GEMM recorded once and relaunched with fresh
    activations, bit for bit linear_two_launch (and the plain two-launch call) at the same config."""
    from lowbit.kernels import w4ax_fused
    from lowbit.kernels.gemm import linear_two_launch
    from lowbit.kernels.layout import GemmConfig

    c, k = _case(m, 1000, 96, 128, 128, torch.bfloat16, seed=41 + m, **opts)
    cfg = GemmConfig(16, 64, 4, 4, split_k=split_k) if split_k else None
    ops = {key: c[key] for key in ("block", "w_kernel", "w_scale", "group", "int8_mask", "perm", "w_zero", "bias")}
    prepared = w4ax_fused.PreparedLinear(**ops, out_dtype=torch.bfloat16, config=cfg, launches="two")
    for seed in (0, 1, 2):
        x = c["x"] if seed == 0 else torch.randn_like(c["x"]) * seed
        got = prepared(x)
        assert torch.equal(got, _two_launch({**c, "x": x}, k, 4, torch.bfloat16, cfg))
        assert torch.equal(got, linear_two_launch(x, **ops, out_dtype=torch.bfloat16, config=cfg))
    (steps,) = prepared._calls.values()
    assert steps is not None and len(steps) == 2  # the quantizer and the GEMM (split-K reduced inside it)

