"""The integer program: exactness against a float64 reference, float interface, tails, JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lut_helpers import quick_fit
from lowbit.lut import LutTable, get_function, uniform_fit

CASES = [
    ("gelu", 8, -4.0, 4.0, {}),
    ("silu", 16, None, None, {}),
    ("exp", 8, None, None, {}),
    ("reciprocal", 8, None, None, {}),
    ("tanh", 8, None, None, {"in_scale": "pow2"}),
    ("sigmoid", 16, -6.0, 6.0, {"in_scale": "pow2", "coef_bits": 6}),
    ("rsqrt", 8, None, None, {"in_bits": 6}),
    ("hswish", 8, -5.0, 3.0, {"in_scale": "pow2"}),
]


def _table(i: int) -> LutTable:
    fn, n, lo, hi, kw = CASES[i]
    return quick_fit(fn, n, lo, hi, **kw).table


def float64_reference(t: LutTable, q: np.ndarray) -> np.ndarray:
    """The same program, written independently in float64 with a linear scan for the segment."""
    q = q.astype(np.float64)
    low = t.qlo if t.tail_left[0] == "clamp" else t.qmin
    high = t.qhi if t.tail_right[0] == "clamp" else t.qmax
    q = np.minimum(np.maximum(q, low), high)
    m = [t.tail_left[1] if t.tail_left[0] == "linear" else 0.0, *t.slopes,
         t.tail_right[1] if t.tail_right[0] == "linear" else 0.0]
    c = [t.tail_left[2] if t.tail_left[0] == "linear" else 0.0, *t.intercepts,
         t.tail_right[2] if t.tail_right[0] == "linear" else 0.0]
    bounds = [t.qlo, *t.breakpoints, t.qhi + 1]
    out = np.empty_like(q)
    for k, v in enumerate(q):
        i = sum(1 for b in bounds if b <= v)
        out[k] = m[i] * v * 2.0**t.prod_shift + c[i] * 2.0**t.bias_shift
    return out


@settings(max_examples=60, deadline=None)
@given(case=st.integers(0, len(CASES) - 1), data=st.data())
def test_integer_program_matches_float64_reference(case, data):
    t = _table(case)
    q = np.array(data.draw(st.lists(st.integers(t.qmin, t.qmax), min_size=1, max_size=64)), dtype=np.int64)
    acc = t.evaluate_int(q)
    assert acc.dtype == np.int64
    ref = float64_reference(t, q)
    np.testing.assert_array_equal(acc.astype(np.float64), ref)
    np.testing.assert_array_equal(t.dequantize(acc), ref * t.out_scale)
    # torch path gives the same integers
    acc_t = t.evaluate_int(torch.from_numpy(q))
    assert acc_t.dtype == torch.int64
    np.testing.assert_array_equal(acc_t.numpy(), acc)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_program_on_every_code_and_real_meaning(case):
    t = _table(case)
    q = np.arange(t.qmin, t.qmax + 1)
    acc = t.evaluate_int(q)
    np.testing.assert_array_equal(acc.astype(np.float64), float64_reference(t, q))
    assert np.abs(acc).max() < 2**31  # fits an int32 accumulator
    # inside the range, the output is slope * x + intercept with the documented real scales
    inside = np.arange(t.qlo, t.qhi + 1)
    idx = np.searchsorted(np.asarray(t.bounds), inside, side="right") - 1
    slope = np.asarray(t.slopes)[idx] * t.slope_scale
    icpt = np.asarray(t.intercepts)[idx] * t.intercept_scale
    np.testing.assert_allclose(t.dequantize(t.evaluate_int(inside)), slope * inside * t.in_scale + icpt, rtol=1e-12, atol=1e-12)
    # the two terms are aligned by a power of two
    ratio = t.intercept_scale / (t.slope_scale * t.in_scale)
    assert np.isclose(ratio, 2.0 ** (t.bias_shift - t.prod_shift), rtol=1e-12)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_breakpoints_on_grid_and_increasing(case):
    t = _table(case)
    qmin, qmax = -(2 ** (t.in_bits - 1)), 2 ** (t.in_bits - 1) - 1
    assert qmin <= t.qlo < t.qhi <= qmax
    assert t.qlo * t.in_scale >= t.lo - 1e-12 and t.qhi * t.in_scale <= t.hi + 1e-12
    bps = t.breakpoints
    assert len(bps) == t.segments - 1
    assert all(isinstance(p, int) for p in bps)
    assert all(a < b for a, b in zip(bps, bps[1:]))
    assert t.qlo < bps[0] and bps[-1] <= t.qhi
    cmin, cmax = -(2 ** (t.coef_bits - 1)), 2 ** (t.coef_bits - 1) - 1
    assert all(cmin <= v <= cmax for v in t.slopes + t.intercepts)
    if t.in_scale_mode == "pow2":
        assert np.log2(t.in_scale) == round(np.log2(t.in_scale))


@settings(max_examples=30, deadline=None)
@given(
    case=st.integers(0, len(CASES) - 1),
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 1000),
)
def test_call_is_quantize_program_dequantize(case, shape, dtype, seed):
    t = _table(case)
    g = torch.Generator().manual_seed(seed)
    span = max(abs(t.lo), abs(t.hi))
    x = ((torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * span * 1.1).to(dtype)
    y, y_sat = t(x), t(x, outside="saturate")
    assert y.shape == x.shape and y.dtype == x.dtype and y_sat.dtype == x.dtype
    q = t.quantize_input(x)
    expected = (t.evaluate_int(q).to(torch.float64) * t.out_scale).to(dtype)
    # the saturating call is exactly the integer program; so is the default call on the int grid
    tol = dict(rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=0)
    torch.testing.assert_close(y_sat, expected, **tol)
    raw = torch.round(x.to(torch.float64) / t.in_scale)
    on_grid = (raw >= t.qmin) & (raw <= t.qmax)
    torch.testing.assert_close(y[on_grid], expected[on_grid], **tol)


def test_call_accuracy_dense():
    t = quick_fit("gelu", 8, -4.0, 4.0).table
    x = torch.linspace(-4, 4, 2001, dtype=torch.float64)
    err = (t(x) - torch.nn.functional.gelu(x)).abs().max().item()
    # grid error + input rounding (slope <= 1.13 times half a step)
    assert err < 0.02 + 1.13 * t.in_scale / 2


def test_tails_use_asymptotes():
    silu = quick_fit("silu", 8, -4.0, 4.0, in_scale="pow2").table
    assert silu.qhi < silu.qmax  # pow2 leaves room on the grid for the integer tails
    x = torch.tensor([-100.0, -20.0, -6.0, 5.0, 7.0, 50.0, 1e4])
    y = silu(x)
    assert torch.all(y[:3].abs() < 0.02)  # y = 0 below the range
    torch.testing.assert_close(y[3:5], x[3:5], atol=0.05, rtol=0.01)  # integer tail: y ~ x
    torch.testing.assert_close(y[5:], x[5:])  # beyond the grid: exact asymptote in float
    assert silu(x, outside="saturate")[-1].item() == pytest.approx(silu.qmax * silu.in_scale, rel=0.02)
    sig = quick_fit("sigmoid", 8).table
    assert sig(torch.tensor([-1e6, 1e6])).tolist() == [0.0, 1.0]
    exp = quick_fit("exp", 8).table
    assert exp(torch.tensor([-50.0])).item() == 0.0
    assert exp(torch.tensor([3.0])).item() == pytest.approx(1.0, abs=0.02)  # clamped at the range end
    rec = quick_fit("reciprocal", 8).table
    y = rec(torch.tensor([0.01, 0.5, 100.0]))
    assert y[0].item() == pytest.approx(y[1].item()) and y[0].item() == pytest.approx(2.0, abs=0.05)
    assert y[2].item() == pytest.approx(0.25, abs=0.03)


def test_json_round_trip_exact(tmp_path):
    for i in range(len(CASES)):
        t = _table(i)
        text = t.to_json()
        back = LutTable.from_json(text)
        assert back == t
        assert back.to_json() == text
        q = np.arange(t.qmin, t.qmax + 1)
        np.testing.assert_array_equal(back.evaluate_int(q), t.evaluate_int(q))
    t.save(str(tmp_path / "t.json"))
    assert LutTable.load(str(tmp_path / "t.json")) == t
    d = json.loads(text)
    assert d["format"] == "lowbit.lut" and isinstance(d["breakpoints"][0], int)


def test_json_rejects_bad_tables():
    t = uniform_fit("gelu", 8, -4, 4)
    d = t.to_dict()
    bad = dict(d, breakpoints=list(reversed(d["breakpoints"])))
    with pytest.raises(ValueError, match="strictly increasing"):
        LutTable.from_dict(bad)
    with pytest.raises(ValueError, match="outside the 8-bit range"):
        LutTable.from_dict(dict(d, slopes=[500] + d["slopes"][1:]))
    with pytest.raises(ValueError, match="version"):
        LutTable.from_dict(dict(d, version=99))
    with pytest.raises(ValueError, match="segments=9 but 8 slopes"):
        LutTable.from_dict(dict(d, segments=9))
    with pytest.raises(ValueError, match="unknown LUT table fields"):
        LutTable.from_dict(dict(d, extra=1))


def test_evaluate_int_rejects_bad_codes():
    t = uniform_fit("gelu", 8, -4, 4)
    with pytest.raises(ValueError, match="grid"):
        t.evaluate_int(np.array([200]))
    with pytest.raises(ValueError, match="integer codes"):
        t.evaluate_int(np.array([0.5]))
    with pytest.raises(ValueError, match="integer codes"):
        t.evaluate_int(torch.tensor([0.5]))


def test_grid_error_matches_function():
    t = quick_fit("tanh", 8).table
    f = get_function("tanh").f
    q = np.arange(t.qlo, t.qhi + 1)
    err = np.abs(t.dequantize(t.evaluate_int(q)) - f(q * t.in_scale)).max()
    assert err < 0.05
