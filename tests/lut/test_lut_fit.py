"""The GA fit: beats the uniform baseline, determinism, validation, callables."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lut_helpers import full_fit, quick_fit
from lowbit.lut import FUNCTIONS, fit, grid_errors, uniform_fit


@pytest.mark.parametrize("fn", ["gelu", "silu"])
def test_ga_beats_uniform_at_8_segments(fn):
    r = full_fit(fn, 8, -4.0, 4.0, seed=0)
    assert r.max_err < r.baseline_max_err
    assert r.mean_err < r.baseline_mean_err
    assert r.max_err < 0.015  # 8 int8 segments on [-4, 4]
    assert r.table.method == "ga" and r.baseline_table.method == "uniform"
    # reported errors are those of the tables' integer programs
    assert (r.max_err, r.mean_err) == grid_errors(r.table, fn)
    assert (r.baseline_max_err, r.baseline_mean_err) == grid_errors(r.baseline_table, fn)
    # the best fitness never gets worse over generations (elitism)
    assert all(b <= a + 1e-15 for a, b in zip(r.history, r.history[1:]))


def test_uniform_fit_is_the_baseline():
    r = quick_fit("silu", 8, -4.0, 4.0)
    u = uniform_fit("silu", 8, -4.0, 4.0)
    assert u == r.baseline_table
    spacing = np.diff((u.qlo, *u.breakpoints, u.qhi + 1))
    assert spacing.max() - spacing.min() <= 1


def test_more_segments_help():
    assert quick_fit("silu", 16).max_err < quick_fit("silu", 4).max_err


def test_deterministic_per_seed():
    a = fit("gelu", 8, -4, 4, seed=3, generations=30, population=24)
    b = fit("gelu", 8, -4, 4, seed=3, generations=30, population=24)
    assert a.table == b.table and a.table.to_json() == b.table.to_json()
    assert a.history == b.history
    others = [fit("gelu", 8, -4, 4, seed=s, generations=30, population=24).table for s in (4, 5, 6)]
    assert any(o.breakpoints != a.table.breakpoints for o in others)
    assert all(o.seed != a.table.seed for o in others)


def test_all_registered_functions_fit():
    for name in FUNCTIONS:
        r = quick_fit(name, 8)
        assert r.max_err <= r.baseline_max_err
        assert r.max_err < 0.05, name


def test_callable_function_and_torch_callable():
    r = fit(lambda x: np.sin(x), 8, lo=-3, hi=3, generations=30, population=24)
    assert r.table.fn == "custom" and r.max_err < 0.05
    r2 = fit(torch.erf, 8, lo=-3, hi=3, generations=30, population=24)
    assert r2.table.fn == "erf" and r2.max_err < 0.05
    assert r2.table.tail_left == ("clamp",)
    assert grid_errors(r2.table, torch.erf)[0] == r2.max_err


def test_pow2_scale_and_widths():
    t = quick_fit("sigmoid", 16, -6.0, 6.0, in_scale="pow2", coef_bits=6).table
    assert t.in_scale == 2.0**-4 and (t.qlo, t.qhi) == (-96, 96)
    assert max(abs(v) for v in t.slopes + t.intercepts) <= 32
    t = quick_fit("rsqrt", 8, in_bits=6).table
    assert t.qmax == 31 and t.qhi == 31


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(fn="gelu", lo=4, hi=-4), r"invalid range \[4, -4\] for 'gelu': lo must be < hi"),
        (dict(fn="gelu", lo=1, hi=1), "lo must be < hi"),
        (dict(fn="gelu", lo=-math.inf, hi=1), "must be finite"),
        (dict(fn="exp", lo=-8, hi=1), r"must lie in \(-inf, 0\]"),
        (dict(fn="reciprocal", lo=0, hi=4), "strictly positive"),
        (dict(fn="rsqrt", lo=-1, hi=4), "strictly positive"),
        (dict(fn="softplus"), "unknown function 'softplus': allowed functions are gelu, silu"),
        (dict(fn="gelu", segments=1), r"segments must be an integer in \[2, 64\], got 1"),
        (dict(fn="gelu", segments=65), r"segments must be an integer in \[2, 64\]"),
        (dict(fn="gelu", segments=8.0), "segments must be an integer"),
        (dict(fn="gelu", in_bits=3), r"in_bits must be an integer in \[4, 16\]"),
        (dict(fn="gelu", coef_bits=20), r"coef_bits must be an integer in \[4, 16\]"),
        (dict(fn="gelu", in_scale="log"), "unknown in_scale 'log': allowed values are float, pow2"),
        (dict(fn="gelu", lo=3.9, hi=4, segments=8), r"range \[3.9, 4\] holds only 4 input codes at 8 bits"),
        (dict(fn=lambda x: x), "needs an explicit range"),
        (dict(fn=42, lo=0, hi=1), "must be a function name"),
        (dict(fn=lambda x: np.where(x < 0, np.nan, x), lo=-1, hi=1), "not finite"),
        (dict(fn="gelu", population=2), "population must be"),
    ],
)
def test_invalid_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit(**{"generations": 2, **kwargs})
