import pytest
import torch
from hypothesis import given, settings, strategies as st

from lowbit.quant import dequantize, fake_quantize, pack, packed_size, quantize, unpack
from lowbit.quant.affine import quantize_codes


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    groups=st.integers(1, 5),
    dim_pos=st.integers(0, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_is_lossless(bits, lead, groups, dim_pos, seed):
    per = 8 // bits
    shape = list(lead)
    dim = min(dim_pos, len(shape))
    shape.insert(dim, groups * per * 2)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.uint8)
    packed = pack(codes, bits, dim)
    assert packed.dtype == torch.uint8
    assert packed.shape[dim] == shape[dim] // per
    assert torch.equal(unpack(packed, bits, dim), codes)


def test_pack_layout_low_bits_first():
    codes = torch.tensor([1, 2, 3, 0], dtype=torch.uint8)
    assert pack(codes, 2).tolist() == [1 | (2 << 2) | (3 << 4)]
    assert pack(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0x5A]


@settings(max_examples=80, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    group=st.sampled_from([4, 8, 16, 32]),
    n_groups=st.integers(1, 4),
    rows=st.integers(1, 6),
    dim=st.sampled_from([0, 1]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    scale_dtype=st.sampled_from([torch.float32, torch.float16]),
    spread=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantize_error_within_half_step(bits, group, n_groups, rows, dim, dtype, scale_dtype, spread, seed):
    g = torch.Generator().manual_seed(seed)
    shape = [rows, group * n_groups] if dim == 1 else [group * n_groups, rows]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * spread + spread / 3).to(dtype)
    q = quantize(x, bits, group, dim=dim, scale_dtype=scale_dtype)
    y = dequantize(q, torch.float64)
    step = q.scale.double().repeat_interleave(group, dim=dim)
    zero = q.zero.double().repeat_interleave(group, dim=dim)
    xd = x.double()
    # half a step, plus the rounding of the stored zero/scale to scale_dtype (for the top of the range)
    eps = torch.finfo(scale_dtype).eps
    slack = (xd.abs() + zero.abs()) * eps * 2 + step * (2**bits) * eps
    assert torch.all((y - xd).abs() <= step / 2 + slack)
    assert q.packed.dtype == torch.uint8
    assert q.nbytes() == q.packed.numel() + q.scale.numel() * q.scale.element_size() * 2


def test_quantize_matches_float64_reference():
    torch.manual_seed(3)
    x = torch.randn(6, 64, dtype=torch.float32) * 3
    codes, scale, zero = quantize_codes(x, 4, 16, dim=-1, scale_dtype=torch.float32)
    xg = x.double().reshape(6, 4, 16)
    mn, mx = xg.amin(-1), xg.amax(-1)
    ref_scale = ((mx - mn) / 15).float()
    assert torch.allclose(scale, ref_scale, rtol=1e-6)
    ref_codes = torch.round((xg - mn[..., None]) / ref_scale.double()[..., None]).clamp(0, 15).reshape(6, 64)
    assert (codes.double() != ref_codes).float().mean() < 1e-3


def test_constant_group_is_exact():
    x = torch.full((2, 8), 1.5) + torch.arange(2.0)[:, None]
    assert torch.equal(fake_quantize(x, 2, 8), x)


@pytest.mark.parametrize("bits", [1, 3, 5, 16])
def test_unsupported_bits_raise(bits):
    with pytest.raises(ValueError, match="allowed bit-widths are"):
        quantize(torch.randn(4, 8), bits, 4)


def test_group_must_divide_axis():
    with pytest.raises(ValueError, match="does not divide the quantized axis"):
        quantize(torch.randn(4, 10), 4, 4)
    with pytest.raises(ValueError, match="does not divide"):
        quantize(torch.randn(4, 8), 4, 0)


def test_pack_errors():
    with pytest.raises(ValueError, match="multiple of 4"):
        pack(torch.zeros(6, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="uint8"):
        pack(torch.zeros(8, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="supported bit-widths"):
        packed_size(8, 3)
