"""The GPU linear's Python call path without a GPU: the tile-split layout, launch plans cached per shape, reused
buffers, and kernel_forward driven through stand-ins for the two Triton launches (PyTorch references)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from lowbit.kernels.layout import (
    BufferPool,
    GemmConfig,
    PlanCache,
    pack_tiles,
    plan_gemm,
    repack_weight,
    unpack_tiles,
    unrepack_weight,
)
from lowbit.kernels.reference import quantize_activation_ref, w4a8_gemm_ref
from lowbit.quant import pack
from lowbit.wa import QuantLinear, resolve_config


@pytest.mark.parametrize("tile", [2, 8, 32, 128])
def test_tile_split_layout_round_trip(tile):
    codes = torch.randint(0, 16, (5, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(tile))
    packed = pack_tiles(codes, tile)
    assert packed.shape == (5, 128) and torch.equal(unpack_tiles(packed, tile), codes)
    assert torch.equal(packed[:, : tile // 2] & 0xF, codes[:, : tile // 2])  # byte j: channels j and j + tile/2
    assert torch.equal(packed[:, : tile // 2] >> 4, codes[:, tile // 2 : tile])
    if tile % 32 == 0:
        plain = pack(codes, 4, dim=1)
        assert torch.equal(repack_weight(plain, tile), packed) and torch.equal(unrepack_weight(packed, tile), plain)
    with pytest.raises(ValueError, match="even number dividing"):
        pack_tiles(codes, 3)
    with pytest.raises(ValueError, match="even number dividing"):
        unpack_tiles(packed, 512)


def test_quantlinear_stores_the_kernel_layout():
    lin = torch.nn.Linear(200, 24)
    q = QuantLinear.from_linear(lin, resolve_config("fmpq:a=4,block=64,group=32"), torch.rand(200) + 0.1)
    assert q.tile == 32 and q.qweight.shape == (24, 128)
    codes = (q.weight_int() + 8).to(torch.uint8)
    assert torch.equal(q.qweight, pack_tiles(codes, 32))


def test_plan_is_computed_once_per_key():
    calls = []

    def sm(device):
        calls.append(device)
        return 132

    cache = PlanCache()
    a = cache.get(4, 4096, 14336, 128, torch.device("cpu"), sm)
    assert cache.get(4, 4096, 14336, 128, torch.device("cpu"), sm) is a and len(calls) == 1
    b = cache.get(5, 4096, 14336, 128, torch.device("cpu"), sm)
    c = cache.get(4, 4096, 14336, 128, torch.device("meta"), sm)
    cfg = GemmConfig(32, 64, 4, 3, split_k=2)
    d = cache.get(4, 4096, 14336, 128, torch.device("cpu"), sm, cfg)
    assert len(cache) == 4 and len(calls) == 4 and d.config is cfg and d.split == 2
    assert a == b and c == a  # same plan values for neighbouring shapes, but separate entries
    assert a.config == GemmConfig(16, 64, 4, 4) and a.tiles_mn == 64 and a.split == 5 and a.tiles_per_split == 23


@pytest.mark.parametrize("m", [1, 16, 17, 512, 513, 4096])
def test_plan_matches_the_former_inline_rule(m):
    n, k, tile, sms = 4096, 14336, 128, 132
    p = plan_gemm(m, n, k, tile, sms)
    if m > 512:
        assert p.config.unpacked and p.split == 1
        return
    n_mn = -(-m // p.config.bm) * -(-n // p.config.bn)
    nt, split = k // tile, 1
    if n_mn < 2 * sms:
        split = min(-(-2 * sms // n_mn), max(1, nt // 2))
    tps = -(-nt // split)
    assert (p.tiles_mn, p.tiles_per_split, p.split) == (n_mn, tps, -(-nt // tps))
    with pytest.raises(ValueError, match="bad GEMM shape"):
        plan_gemm(m, n, k + 1, tile, sms)


def test_buffer_pool_reuses_and_grows():
    pool = BufferPool()
    a = pool.get("x", (4, 8), torch.int8, "cpu")
    assert pool.get("x", (4, 8), torch.int8, "cpu").data_ptr() == a.data_ptr()
    small = pool.get("x", (2, 3), torch.int8, "cpu")
    assert small.shape == (2, 3) and small.data_ptr() == a.data_ptr() and small.is_contiguous()
    big = pool.get("x", (16, 8), torch.int8, "cpu")  # grows once, then stays
    assert pool.get("x", (4, 8), torch.int8, "cpu").data_ptr() == big.data_ptr()
    assert pool.get("x", (4, 8), torch.float32, "cpu").data_ptr() != big.data_ptr()
    assert pool.get("x", (4, 8), torch.int8, "cpu", stream=7).data_ptr() != big.data_ptr()
    assert pool.get("y", (0, 8), torch.int8, "cpu").shape == (0, 8)
    assert len(pool) == 4 and pool.nbytes() == 128 + 128 + 32 + 1
    with pytest.raises(ValueError, match="negative"):
        pool.get("x", (-1, 2), torch.int8, "cpu")


@pytest.fixture
def fake_gemm(monkeypatch):
    """`lowbit.kernels.gemm` with its launches replaced by the references (writing into the given buffers)."""
    mod = types.ModuleType("lowbit.kernels.gemm")
    mod.WORKSPACE, mod.PLANS, mod.calls = BufferPool(), PlanCache(), []
    mod.stream_key = lambda device: 0

    def quantize_activation(x, block, int8_mask, low_bits=4, perm=None, padded_in=None, out=None):
        mod.calls.append(("quant", perm))
        c, s = quantize_activation_ref(x, block, int8_mask.bool(), low_bits, perm, padded_in)
        out[0].copy_(c)
        out[1].copy_(s)
        return out

    def w4a8_gemm(a_codes, a_scale, block, w_kernel, w_scale, group, w_zero=None, bias=None, out_dtype=torch.bfloat16,
                  config=None, out=None, workspace=None):
        tile = min(block, group)
        mod.PLANS.get(a_codes.shape[0], w_kernel.shape[0], a_codes.shape[1], tile, a_codes.device, lambda d: 4, config)
        mod.calls.append(("gemm", w_kernel.data_ptr()))
        y = w4a8_gemm_ref(a_codes, a_scale, block, unrepack_weight(w_kernel, tile), w_scale, group, w_zero, bias)
        if out is None:
            return y.to(out_dtype)
        return out.copy_(y)

    def linear_two_launch(x, block, w_kernel, w_scale, group, int8_mask=None, low_bits=4, perm=None, w_zero=None,
                          bias=None, out_dtype=torch.bfloat16, config=None, out=None, workspace=None):
        k, m = w_kernel.shape[1] * 2, x.shape[0]
        bufs = (mod.WORKSPACE.get("a_codes", (m, k), torch.int8, x.device),
                mod.WORKSPACE.get("a_scale", (m, k // block), torch.float32, x.device))
        codes, scale = quantize_activation(x, block, int8_mask, low_bits, perm=perm, padded_in=k, out=bufs)
        return w4a8_gemm(codes, scale, block, w_kernel, w_scale, group, w_zero, bias, out_dtype, config, out)

    mod.quantize_activation, mod.w4a8_gemm, mod.linear_two_launch = quantize_activation, w4a8_gemm, linear_two_launch
    monkeypatch.setitem(sys.modules, "lowbit.kernels.gemm", mod)
    return mod


@pytest.fixture
def fake_fused(monkeypatch, fake_gemm):
    """`lowbit.kernels.w4ax_fused` with a reference stand-in for the one-launch linear; its PreparedLinear fixes the
    layer's operands once, then passes only x (and out) per call, to that linear or the two-launch one."""
    mod = types.ModuleType("lowbit.kernels.w4ax_fused")
    mod.fused_supported = lambda m, block, group: 0 < m <= 16 and block <= group
    mod.seen, mod.made = [], []

    def w4ax_linear(x, block, w_kernel, w_scale, group, int8_mask=None, low_bits=4, perm=None, w_zero=None,
                    bias=None, out_dtype=torch.bfloat16, config=None, out=None, workspace=None):
        mod.seen.append((w_kernel.data_ptr(), low_bits, perm))
        c, s = quantize_activation_ref(x, block, int8_mask.bool(), low_bits, perm, w_kernel.shape[1] * 2)
        y = w4a8_gemm_ref(c, s, block, unrepack_weight(w_kernel, min(block, group)), w_scale, group, w_zero, bias)
        return y.to(out_dtype) if out is None else out.copy_(y)

    class PreparedLinear:
        def __init__(self, *ops, launches="fused"):
            mod.made.append(launches)
            self.ops, self.fn = ops, w4ax_linear if launches == "fused" else fake_gemm.linear_two_launch

        def __call__(self, x, out=None):
            return self.fn(x, *self.ops, out=out)

    mod.w4ax_linear, mod.PreparedLinear = w4ax_linear, PreparedLinear
    monkeypatch.setitem(sys.modules, "lowbit.kernels.w4ax_fused", mod)
    return mod


@pytest.mark.parametrize("spec", ["fmpq:a=4,block=64,group=64,int8_frac=0.25", "fmpq:a=8,block=32,group=64,sym=false"])
def test_kernel_forward_call_path(fake_gemm, fake_fused, monkeypatch, spec):
    from lowbit.wa import linear
    from lowbit.wa.linear import kernel_forward

    monkeypatch.setattr(linear, "FUSED_DECODE", "0")  # decode-sized calls: the two-launch path's prepared launches

    lin = torch.nn.Linear(200, 40)
    q = QuantLinear.from_linear(lin, resolve_config(spec), torch.rand(200) + 0.1)
    x = torch.randn(3, 7, 200)
    torch.testing.assert_close(kernel_forward(q, x), q(x), rtol=1e-5, atol=1e-5)
    perm_t = fake_gemm.calls[0][1]
    assert perm_t.dtype == torch.int32 and fake_gemm.calls[1][1] == q.qweight.data_ptr()  # the stored weight, no copy
    codes = fake_gemm.WORKSPACE.get("a_codes", (21, q.padded_in), torch.int8, "cpu")
    kernel_forward(q, x)
    assert fake_gemm.calls[2][1] is perm_t  # converted once, cached
    assert fake_gemm.WORKSPACE.get("a_codes", (21, q.padded_in), torch.int8, "cpu").data_ptr() == codes.data_ptr()
    assert len(fake_gemm.PLANS) == 1
    kernel_forward(q, x[:1])  # decode-sized: the layer's prepared two-launch call
    assert fake_fused.made == ["two"] and not fake_fused.seen
    assert len(fake_gemm.PLANS) == 2 and len(fake_gemm.WORKSPACE) == 2  # a new plan; buffers reused (prefix views)
    # reuse_output: one buffer per layer, the same storage for every call
    q.reuse_output = True
    y1 = kernel_forward(q, x)
    y2 = kernel_forward(q, x)
    assert y1.data_ptr() == y2.data_ptr()
    # folded: the input arrives permuted, no gather is requested from the kernel
    q.input_permuted = True
    q._cache = {}
    xp = x[..., q.perm.long()]
    torch.testing.assert_close(kernel_forward(q, xp), q(xp), rtol=1e-5, atol=1e-5)
    assert fake_gemm.calls[-2] == ("quant", None)


@pytest.mark.parametrize("spec,m,fused", [("fmpq:a=4,block=64,group=64,int8_frac=0.25", 3, True),
                                          ("fmpq:a=4,block=64,group=64", 17, False),  # past the decode bucket
                                          ("fmpq:a=8,block=64,group=32", 2, False)])  # block > group
def test_kernel_forward_routes_decode_calls_to_the_fused_linear(fake_gemm, fake_fused, monkeypatch, spec, m, fused):
    """Decode-sized calls go through the layer's prepared launches, made once per layer and path: two launches by
    default, the one-launch linear (a reference stand-in here) with $LOWBIT_W4AX_FUSED=1 where it applies; larger
    calls take the two-launch function directly."""
    from lowbit.wa import linear
    from lowbit.wa.linear import kernel_forward

    q = QuantLinear.from_linear(torch.nn.Linear(200, 40), resolve_config(spec), torch.rand(200) + 0.1)
    x = torch.randn(m, 200)
    monkeypatch.setattr(linear, "FUSED_DECODE", "0")  # two launches
    torch.testing.assert_close(kernel_forward(q, x), q(x), rtol=1e-5, atol=1e-5)
    decode = m <= 16
    assert not fake_fused.seen and fake_fused.made == (["two"] if decode else [])
    monkeypatch.setattr(linear, "FUSED_DECODE", "1")  # what $LOWBIT_W4AX_FUSED=1 sets at import
    torch.testing.assert_close(kernel_forward(q, x), q(x), rtol=1e-5, atol=1e-5)
    assert bool(fake_fused.seen) == fused
    if fused:
        assert fake_fused.seen[0][0] == q.qweight.data_ptr() and fake_fused.seen[0][1] == q.cfg.a_bits
        kernel_forward(q, x)
        assert fake_fused.made == ["two", "fused"] and len(fake_fused.seen) == 2  # prepared once per layer
    # "auto" (the default): two launches, as "0"
    monkeypatch.setattr(linear, "FUSED_DECODE", "auto")
    fake_fused.seen.clear()
    torch.testing.assert_close(kernel_forward(q, x), q(x), rtol=1e-5, atol=1e-5)
    assert not fake_fused.seen
    q._cache = {}
    fake_fused.made.clear()
    # "eager": the one-launch linear unless the call is being captured into a CUDA graph
    monkeypatch.setattr(linear, "FUSED_DECODE", "eager")
    for capturing in (False, True):
        fake_fused.seen.clear()
        monkeypatch.setattr(linear, "_fused_now", lambda x, c=capturing: not c)
        torch.testing.assert_close(kernel_forward(q, x), q(x), rtol=1e-5, atol=1e-5)
        assert bool(fake_fused.seen) == (fused and not capturing)
    # made once per path since the cache was cleared: one launch outside capture, two launches under it
    assert fake_fused.made == (["fused", "two"] if fused else ["two"] if decode else [])


def test_fused_mode_values():
    from lowbit.wa import linear

    assert [linear.fused_mode(v) for v in (None, "", " 1 ", "eager", "0", "auto")] == \
        ["auto", "auto", "1", "eager", "0", "auto"]
    with pytest.raises(ValueError, match="LOWBIT_W4AX_FUSED must be one of auto, 0, 1, eager"):
        linear.fused_mode("yes")


@pytest.mark.parametrize("mode,is_cuda,capturing,want", [
    ("0", True, False, False), ("auto", True, False, False), ("auto", False, False, False), ("1", True, True, True),
    ("eager", True, False, True), ("eager", True, True, False), ("eager", False, True, True)])
def test_fused_now_follows_the_mode_and_graph_capture(monkeypatch, mode, is_cuda, capturing, want):
    from lowbit.wa import linear

    monkeypatch.setattr(linear, "FUSED_DECODE", mode)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    assert linear._fused_now(types.SimpleNamespace(is_cuda=is_cuda, shape=(1, 64))) == want


def test_decode_calls_take_the_prepared_launches_directly_once_made(fake_gemm, fake_fused, monkeypatch):
    """After a decode-sized kernel_forward, the layer keeps a direct call of its prepared launches (what forward takes
    on CUDA for later calls of that dtype and device): the same launches, the same output; never where the general
    path does more (an output buffer reused per layer, an input rotation, a dtype conversion, the capture-dependent
    mode)."""
    from lowbit.kernels.layout import MAX_DECODE_M
    from lowbit.wa import linear
    from lowbit.wa.linear import DECODE_FAST_M, kernel_forward

    assert DECODE_FAST_M == MAX_DECODE_M
    monkeypatch.setattr(linear, "FUSED_DECODE", "0")
    q = QuantLinear.from_linear(torch.nn.Linear(200, 40), resolve_config("fmpq:a=8,block=32,group=64"),
                                torch.rand(200) + 0.1)
    x = torch.randn(2, 1, 200, dtype=torch.bfloat16)
    want = kernel_forward(q, x)
    fast = q._cache[("decode", torch.bfloat16, x.device, "0")]
    calls = len(fake_gemm.calls)
    got = fast(x)
    assert got.shape == (2, 1, 40) and got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert fake_fused.made == ["two"] and len(fake_gemm.calls) == calls + 2  # the same prepared launches, once more
    for change in ("float64", "reuse", "rotation", "eager"):
        q._cache = {}
        xc = x.double() if change == "float64" else x
        q.reuse_output = change == "reuse"
        q.in_rotation = torch.eye(200) if change == "rotation" else None
        monkeypatch.setattr(linear, "FUSED_DECODE", "eager" if change == "eager" else "0")
        kernel_forward(q, xc)
        assert not [k for k in q._cache if k[0] == "decode"], change
