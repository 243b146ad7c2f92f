"""Shared, cached LUT fits so the suite fits each table once."""

from __future__ import annotations

import functools

from lowbit.lut import fit

QUICK = dict(generations=40, population=32)


@functools.lru_cache(maxsize=None)
def quick_fit(fn: str, segments: int = 8, lo: float | None = None, hi: float | None = None, **kw):
    """A cheap GA fit (small population, few generations) for tests that only need a valid table."""
    opts = {**QUICK, **dict(kw)}
    return fit(fn, segments=segments, lo=lo, hi=hi, **opts)


@functools.lru_cache(maxsize=None)
def full_fit(fn: str, segments: int = 8, lo: float | None = None, hi: float | None = None, seed: int = 0):
    """A fit with the default GA settings."""
    return fit(fn, segments=segments, lo=lo, hi=hi, seed=seed)
