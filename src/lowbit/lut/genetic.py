"""GQA-LUT fitting: a genetic search over integer breakpoints, scored on the integer program.

For a candidate breakpoint vector each segment gets a least-squares slope on its input codes; the
slopes are quantized to ``coef_bits`` with one per-table scale, the intercepts are then refitted by
least squares *given the quantized slopes* (which cancels most of the slope rounding error at the
segment centre) and quantized with a scale that is the product scale times a power of two, so that
one shift aligns the two terms. The fitness is the error of that quantized program over every input
code in the range: ``max|err| + mean_weight * mean|err|``. Everything is computed for the whole
population at once with prefix sums over the codes (no per-candidate Python loop).

GA: population seeded with the uniform breakpoints plus random sorted vectors; tournament selection;
gene-wise uniform crossover; Gaussian integer mutation whose step decays geometrically from about half
a segment to one code; elitism; a repair step that sorts and spreads breakpoints so that they stay
strictly increasing integers inside the range. A short deterministic local search (move one breakpoint
by +-1 or +-2 codes) polishes the winner. All randomness comes from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from lowbit.lut.functions import resolve
from lowbit.lut.table import LutTable, code_range, input_scale
from lowbit.quant.integer import qrange

MIN_SEGMENTS, MAX_SEGMENTS = 2, 64
BITS_RANGE = (4, 16)


@dataclass
class FitResult:
    """GA table and the uniform-breakpoint baseline, with their integer-grid errors."""

    table: LutTable
    max_err: float
    mean_err: float
    baseline_table: LutTable
    baseline_max_err: float
    baseline_mean_err: float
    seconds: float = 0.0
    history: list[float] = field(default_factory=list)  # best fitness per generation


class _Problem:
    """Everything fixed during a fit: the code grid, targets, prefix sums and tails."""

    def __init__(self, fn, segments, lo, hi, in_bits, in_scale, coef_bits):
        _check_int("segments", segments, MIN_SEGMENTS, MAX_SEGMENTS)
        _check_int("in_bits", in_bits, *BITS_RANGE)
        _check_int("coef_bits", coef_bits, *BITS_RANGE)
        self.name, self.f, self.lo, self.hi, tail_l, tail_r = resolve(fn, lo, hi)
        self.segments, self.in_bits, self.coef_bits = segments, in_bits, coef_bits
        self.in_scale_mode = in_scale
        self.in_scale = input_scale(self.lo, self.hi, in_bits, in_scale)
        self.qlo, self.qhi = code_range(self.lo, self.hi, self.in_scale, in_bits)
        self.M = self.qhi - self.qlo + 1
        if self.M < segments:
            raise ValueError(
                f"range [{self.lo:g}, {self.hi:g}] holds only {self.M} input codes at {in_bits} bits "
                f"(scale {self.in_scale:g}); use at most {self.M} segments or a wider range"
            )
        self.X = np.arange(self.qlo, self.qhi + 1, dtype=np.int64)
        self.F = np.asarray(self.f(self.X * self.in_scale), dtype=np.float64)
        if self.F.shape != self.X.shape or not np.all(np.isfinite(self.F)):
            raise ValueError(f"'{self.name}' is not finite everywhere on [{self.lo:g}, {self.hi:g}]: choose a range inside its domain")
        x = self.X.astype(np.float64)
        zero = np.zeros(1)
        self.C1 = np.concatenate([zero, np.cumsum(x)])
        self.C2 = np.concatenate([zero, np.cumsum(x * x)])
        self.Cy = np.concatenate([zero, np.cumsum(self.F)])
        self.Cxy = np.concatenate([zero, np.cumsum(x * self.F)])
        self.tails = (tail_l, tail_r)
        # linear tails in the code domain: y = (slope * in_scale) * q + intercept
        self.tail_a = np.array([t[1] * self.in_scale if t[0] == "linear" else 0.0 for t in self.tails])
        self.tail_b = np.array([t[2] if t[0] == "linear" else 0.0 for t in self.tails])
        self.qc = qrange(coef_bits)[1]
        # largest alignment shift that keeps |acc| below 2**31 for the given widths
        self.max_shift = max(0, 31 - in_bits - coef_bits)
        self.mean_weight = 0.1

    def uniform(self) -> np.ndarray:
        j = np.arange(1, self.segments)
        return (self.qlo + np.round(j * self.M / self.segments)).astype(np.int64)[None, :]

    def repair(self, bps: np.ndarray) -> np.ndarray:
        """Sort and make strictly increasing integers inside (qlo, qhi]."""
        bps = np.sort(bps, axis=1)
        j = np.arange(bps.shape[1])
        t = np.maximum.accumulate(bps - j, axis=1)
        t = np.clip(t, self.qlo + 1, self.qhi - (self.segments - 2))
        return t + j

    def quantized_fit(self, bps: np.ndarray) -> dict[str, np.ndarray]:
        """Quantized least-squares coefficients and grid errors for a (P, N-1) batch of breakpoints."""
        P, N = bps.shape[0], self.segments
        cut = bps - self.qlo
        starts = np.concatenate([np.zeros((P, 1), np.int64), cut], axis=1)
        ends = np.concatenate([cut, np.full((P, 1), self.M, np.int64)], axis=1)
        n = (ends - starts).astype(np.float64)
        s1 = self.C1[ends] - self.C1[starts]
        s2 = self.C2[ends] - self.C2[starts]
        sy = self.Cy[ends] - self.Cy[starts]
        sxy = self.Cxy[ends] - self.Cxy[starts]
        var = s2 - s1 * s1 / n
        cov = sxy - s1 * sy / n
        a = np.where(var > 0.25, cov / np.where(var > 0.25, var, 1.0), 0.0)  # slope per input code
        A = np.maximum(np.abs(a).max(axis=1), np.abs(self.tail_a).max())
        qc, E = self.qc, self.max_shift
        # segment index of every code: a cumulative count of breakpoints
        Z = np.zeros((P, self.M), np.int64)
        np.put_along_axis(Z, cut, 1, axis=1)
        seg = np.cumsum(Z, axis=1)

        def finish(sig_p: np.ndarray) -> dict[str, np.ndarray]:
            m = np.clip(np.rint(a / sig_p[:, None]), -qc - 1, qc)
            b = (sy - m * sig_p[:, None] * s1) / n  # least-squares intercept given the quantized slope
            B = np.maximum(np.abs(b).max(axis=1), np.abs(self.tail_b).max())
            with np.errstate(divide="ignore"):
                e = np.ceil(np.log2(B / (qc * sig_p)))
            e = np.clip(np.where(B > 0, e, -E), -E, E)
            sig_b = sig_p * 2.0**e
            c = np.clip(np.rint(b / sig_b[:, None]), -qc - 1, qc)
            tm = np.clip(np.rint(self.tail_a[None, :] / sig_p[:, None]), -qc - 1, qc)
            tc = np.clip(np.rint(self.tail_b[None, :] / sig_b[:, None]), -qc - 1, qc)
            y = (np.take_along_axis(m, seg, 1) * sig_p[:, None]) * self.X + np.take_along_axis(c, seg, 1) * sig_b[:, None]
            err = np.abs(y - self.F)
            mx, mn = err.max(axis=1), err.mean(axis=1)
            return {
                "m": m, "c": c, "e": e, "sig_p": sig_p, "tail_m": tm, "tail_c": tc, "B": B,
                "max": mx, "mean": mn, "fitness": mx + self.mean_weight * mn,
            }

        # variant 1: the slopes get the exact scale A / qc, the intercept scale is that times 2**e (e <= E,
        # coarsening the slopes if the intercepts need more)
        sig_p = np.where(A > 0, A / qc, 1.0)  # with A == 0 every slope rounds to 0 whatever sig_p is
        b0 = (sy - np.clip(np.rint(a / sig_p[:, None]), -qc - 1, qc) * sig_p[:, None] * s1) / n
        B0 = np.maximum(np.abs(b0).max(axis=1), np.abs(self.tail_b).max())
        need = B0 / (qc * 2.0**E)
        sig_p = np.where(A > 0, np.maximum(sig_p, need), np.where(B0 > 0, need, 1.0))
        r1 = finish(sig_p)
        # variant 2: the intercepts get the exact scale B / qc, the slopes that divided by a power of two
        sig_b = np.where(r1["B"] > 0, r1["B"] / qc, sig_p)
        sig_p2 = sig_b * 2.0 ** -np.clip(np.floor(np.log2(sig_b / sig_p)), -E, E)
        r2 = finish(sig_p2)
        pick = r2["fitness"] < r1["fitness"]
        out = {}
        for k, v1 in r1.items():
            v2 = r2[k]
            out[k] = np.where(pick.reshape((-1,) + (1,) * (v1.ndim - 1)), v2, v1)
        for k in ("m", "c", "e", "tail_m", "tail_c"):
            out[k] = out[k].astype(np.int64)
        return out

    def make_table(self, bps: np.ndarray, method: str, seed: int | None) -> LutTable:
        r = self.quantized_fit(np.asarray(bps, np.int64).reshape(1, -1))
        sig_p, e = float(r["sig_p"][0]), int(r["e"][0])
        tails = []
        for k, t in enumerate(self.tails):
            if t[0] == "linear":
                tails.append(("linear", int(r["tail_m"][0, k]), int(r["tail_c"][0, k]), float(t[1]), float(t[2])))
            else:
                tails.append(("clamp",))
        prod_shift, bias_shift = max(0, -e), max(0, e)
        return LutTable(
            fn=self.name, lo=self.lo, hi=self.hi, in_bits=self.in_bits, in_scale_mode=self.in_scale_mode,
            in_scale=self.in_scale, qlo=self.qlo, qhi=self.qhi, coef_bits=self.coef_bits,
            breakpoints=tuple(int(v) for v in np.asarray(bps).ravel()),
            slopes=tuple(int(v) for v in r["m"][0]), intercepts=tuple(int(v) for v in r["c"][0]),
            slope_scale=sig_p / self.in_scale, intercept_scale=sig_p * 2.0**e,
            prod_shift=prod_shift, bias_shift=bias_shift, out_scale=sig_p * 2.0**-prod_shift,
            tail_left=tails[0], tail_right=tails[1], method=method, seed=seed,
        )


def _check_int(name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


def grid_errors(table: LutTable, fn: str | Callable) -> tuple[float, float]:
    """Max and mean |error| of the integer program over every code in the table's range vs fn(q * in_scale)."""
    _, f, *_ = resolve(fn, table.lo, table.hi)
    X = np.arange(table.qlo, table.qhi + 1, dtype=np.int64)
    err = np.abs(table.dequantize(table.evaluate_int(X)) - f(X * table.in_scale))
    return float(err.max()), float(err.mean())


def dense_errors(table: LutTable, fn: str | Callable, points: int = 4097) -> tuple[float, float]:
    """Max and mean |error| on a dense float grid over [lo, hi] (includes input rounding)."""
    _, f, *_ = resolve(fn, table.lo, table.hi)
    x = np.linspace(table.lo, table.hi, points)
    err = np.abs(table.evaluate_float(x) - f(x))
    return float(err.max()), float(err.mean())


def uniform_fit(fn: str | Callable, segments: int = 8, lo: float | None = None, hi: float | None = None,
                in_bits: int = 8, in_scale: str = "float", coef_bits: int = 8) -> LutTable:
    """Uniform breakpoints (equal numbers of codes per segment) with the same quantized fit."""
    prob = _Problem(fn, segments, lo, hi, in_bits, in_scale, coef_bits)
    return prob.make_table(prob.uniform()[0], "uniform", None)


def fit(fn: str | Callable, segments: int = 8, lo: float | None = None, hi: float | None = None,
        in_bits: int = 8, seed: int = 0, generations: int = 300, population: int = 128,
        in_scale: str = "float", coef_bits: int = 8, polish: bool = True,
        mean_weight: float = 0.1, progress: Callable[[], None] | None = None) -> FitResult:
    """Fit a GQA-LUT for `fn` (a registry name or a callable with lo/hi) and the uniform baseline.

    `progress`, when given, is called once per generation."""
    t0 = time.perf_counter()
    prob = _Problem(fn, segments, lo, hi, in_bits, in_scale, coef_bits)
    _check_int("generations", generations, 1, 100_000)
    _check_int("population", population, 4, 100_000)
    _check_int("seed", seed, 0, 2**63 - 1)
    rng = np.random.default_rng(seed)
    N, M, K = segments, prob.M, segments - 1
    uni = prob.uniform()

    prob.mean_weight = float(mean_weight)

    def fitness(pop: np.ndarray) -> np.ndarray:
        return prob.quantized_fit(pop)["fitness"]

    # initial population: the uniform vector plus random sorted distinct codes
    rand = np.argsort(rng.random((population - 1, M - 1)), axis=1)[:, :K] + prob.qlo + 1
    pop = prob.repair(np.concatenate([uni, rand], axis=0))
    n_elite = max(1, population // 16)
    n_child = population - n_elite
    sigma0 = max(1.0, M / N / 2.0)
    p_mut = max(1.0 / K, 0.2)
    history: list[float] = []
    fit_vals = fitness(pop)
    for g in range(generations):
        order = np.argsort(fit_vals, kind="stable")
        history.append(float(fit_vals[order[0]]))
        elites = pop[order[:n_elite]]
        # tournament selection (size 3) for two parents per child
        cand = rng.integers(0, population, size=(2 * n_child, 3))
        winners = cand[np.arange(2 * n_child), np.argmin(fit_vals[cand], axis=1)]
        pa, pb = pop[winners[:n_child]], pop[winners[n_child:]]
        # gene-wise uniform crossover (probability 0.9)
        mix = rng.random((n_child, K)) < 0.5
        do_cx = rng.random((n_child, 1)) < 0.9
        child = np.where(do_cx & mix, pb, pa)
        # integer Gaussian mutation with a geometrically decaying step
        sigma = sigma0 * (1.0 / sigma0) ** (g / max(1, generations - 1))
        step = np.rint(rng.normal(0.0, sigma, (n_child, K))).astype(np.int64)
        step = np.where(step == 0, rng.choice(np.array([-1, 1]), size=(n_child, K)), step)
        child = child + np.where(rng.random((n_child, K)) < p_mut, step, 0)
        pop = np.concatenate([elites, prob.repair(child)], axis=0)
        fit_vals = fitness(pop)
        if progress is not None:
            progress()
    best = pop[np.argmin(fit_vals)].copy()
    best_fit = float(fit_vals.min())
    if polish:  # deterministic local search: move one breakpoint by +-1 or +-2 codes
        moves = np.array([-2, -1, 1, 2])
        for _ in range(200):
            nb = np.repeat(best[None, :], K * len(moves), axis=0)
            nb[np.arange(K * len(moves)), np.repeat(np.arange(K), len(moves))] += np.tile(moves, K)
            nb = prob.repair(nb)
            fv = fitness(nb)
            i = int(np.argmin(fv))
            if fv[i] >= best_fit - 1e-15:
                break
            best, best_fit = nb[i].copy(), float(fv[i])
    history.append(best_fit)
    table = prob.make_table(best, "ga", seed)
    base = prob.make_table(uni[0], "uniform", None)
    mx, mn = grid_errors(table, prob.f)
    bmx, bmn = grid_errors(base, prob.f)
    return FitResult(table, mx, mn, base, bmx, bmn, time.perf_counter() - t0, history)
