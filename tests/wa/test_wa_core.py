"""Integer kernels: packing, weight/activation quantizers, exactness of the blocked integer matmul."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quant import integer
from lowbit.wa import core

SETTINGS = settings(max_examples=25, deadline=None)


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=dtype) + 0.01).to(dtype)


@SETTINGS
@given(out=st.integers(1, 9), groups=st.integers(1, 4), group=st.sampled_from([2, 8, 32]),
       bits=st.sampled_from([4, 8]), sym=st.booleans(), seed=st.integers(0, 1000))
def test_weight_pack_round_trip(out, groups, group, bits, sym, seed):
    w = rand(out, groups * group, seed=seed) * 3
    q, scale, zero = core.quantize_weight(w, bits, group, sym)
    lo, hi = integer.qrange(bits, sym)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    packed = core.pack_weight(q, bits, sym)
    assert packed.dtype == torch.uint8 and packed.shape == (out, groups * group * bits // 8)
    assert torch.equal(core.unpack_weight(packed, bits, sym), q)
    # reconstruction error: half a step (sym); asym can lose up to one step at the range ends because
    # the zero point is rounded to an integer
    deq = core.dequantize_weight(packed, scale, zero, bits, sym, group)
    step = scale.float().repeat_interleave(group, dim=1)
    assert torch.all((deq - w).abs() <= step * (0.5 if sym else 1.0) + 1e-5)


def test_symmetric_weight_zero_maps_to_zero():
    w = rand(4, 64)
    w[:, 32:] = 0.0  # a padded-like region
    q, scale, _ = core.quantize_weight(w, 4, 32, sym=True)
    assert torch.all(q[:, 32:] == 0)
    q, scale, zero = core.quantize_weight(w.abs(), 4, 32, sym=False)  # all >= 0: zero point 0
    assert torch.all(zero[:, 0] == 0)


@SETTINGS
@given(t=st.integers(1, 7), nb=st.integers(1, 5), block=st.sampled_from([2, 16, 64]), seed=st.integers(0, 1000),
       mask_bits=st.integers(0, 31))
def test_activation_quantization_ranges_and_error(t, nb, block, seed, mask_bits):
    x = rand(t, nb * block, seed=seed) * 4
    mask = torch.tensor([(mask_bits >> i) & 1 == 1 for i in range(nb)])
    codes, scale = integer.quantize_activation(x, block, mask, 4)
    cb = codes.reshape(t, nb, block)
    for j in range(nb):
        hi = 127 if mask[j] else 7
        assert cb[:, j].abs().max() <= hi
    assert torch.equal(codes, codes.round())
    deq = integer.dequantize_activation(codes, scale, block)
    err = (deq - x).reshape(t, nb, block).abs()
    assert torch.all(err <= scale.unsqueeze(-1) * 0.5 + 1e-6)


def _reference(a_codes, a_scale, block, w_int, w_scale, group):
    """float64 dequantize-then-matmul reference of the same quantized values."""
    a = a_codes.double() * a_scale.double().repeat_interleave(block, dim=1)
    w = w_int.double() * w_scale.double().repeat_interleave(group, dim=1)
    return a @ w.t()


@SETTINGS
@given(t=st.integers(1, 9), n=st.integers(1, 12), k_units=st.integers(1, 4), block=st.sampled_from([8, 32, 64]),
       ratio=st.sampled_from([1, 2, 4, -2, -4]), sym=st.booleans(), seed=st.integers(0, 10_000))
def test_int_matmul_matches_float64_reference(t, n, k_units, block, ratio, sym, seed):
    group = block * ratio if ratio > 0 else max(2, block // -ratio)
    unit = max(block, group)
    k = k_units * unit
    x = rand(t, k, seed=seed) * 2
    x[:, : k // 3] *= 20  # some larger channels
    mask = torch.rand(k // block, generator=torch.Generator().manual_seed(seed)) < 0.3
    a_codes, a_scale = integer.quantize_activation(x, block, mask, 4)
    wq, w_scale, zero = core.quantize_weight(rand(n, k, seed=seed + 1), 4, group, sym)
    w_int = core.weight_int(core.pack_weight(wq, 4, sym), zero, 4, sym, group)
    y = integer.int_matmul(a_codes, a_scale, block, w_int, w_scale, group)
    ref = _reference(a_codes, a_scale, block, w_int, w_scale, group)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_int_partials_are_exact_integers():
    """With unit scales the result is the plain integer matmul: compare with int64 exactly."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (33, 256), generator=g)
    w = torch.randint(-8, 8, (17, 256), generator=g)
    exact = a @ w.t()  # int64 matmul
    for dtype in (torch.float32, torch.float64):
        y = integer.int_matmul(a.float(), torch.ones(33, 2), 128, w.to(torch.int16), torch.ones(17, 2, dtype=torch.float16), 128,
                            partial_dtype=dtype)
        assert torch.equal(y.double(), exact.double())


def test_partial_dtype_bounds():
    assert integer.int_partial_dtype(128, 128, 8) == torch.float32  # INT8 x INT4 tile of 128: 131072 < 2**24
    assert integer.int_partial_dtype(4096, 128, 128) == torch.float64  # per-channel INT8 x INT8 row
    with pytest.raises(ValueError):
        integer.int_partial_dtype(2**40, 2**10, 2**10)


def test_int_matmul_rejects_incompatible_block_and_group():
    with pytest.raises(ValueError, match="multiple"):
        integer.int_matmul(torch.ones(2, 96), torch.ones(2, 2), 48, torch.ones(3, 96), torch.ones(3, 3), 32)


def test_ceil_blocks():
    assert core.ceil_blocks(0.0, 12) == 0
    assert core.ceil_blocks(0.1, 10) == 1  # not 2 from 0.1 * 10 = 1.0000000000000002
    assert core.ceil_blocks(0.1, 12) == 2
    assert core.ceil_blocks(0.05, 5) == 1
    assert core.ceil_blocks(1.0, 7) == 7
