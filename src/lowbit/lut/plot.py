"""A PNG of a fitted GQA-LUT: f, the GA and uniform tables, and their errors on the input grid."""

from __future__ import annotations

from pathlib import Path

from lowbit.lut.functions import get_function
from lowbit.lut.genetic import FitResult


def plot_fit(result: FitResult, path: Path) -> None:
    """Save f(x), the GA table and the uniform baseline (top) and their errors (bottom) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    t = result.table
    f = get_function(t.fn).f
    codes = np.arange(t.qlo, t.qhi + 1)
    x = codes * t.in_scale
    fx = f(x)
    y_ga = t.dequantize(t.evaluate_int(codes))
    y_uni = result.baseline_table.dequantize(result.baseline_table.evaluate_int(codes))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    ax1.plot(x, fx, "k-", lw=1.5, label=f"{t.fn}(x)")
    ax1.plot(x, y_ga, "C0.", ms=3, label=f"GA LUT ({t.segments} seg)")
    ax1.plot(x, y_uni, "C1.", ms=2, alpha=0.6, label="uniform baseline")
    for p in t.breakpoints_real:
        ax1.axvline(p, color="C0", lw=0.5, alpha=0.4)
    ax1.set_ylabel("y")
    ax1.legend()
    ax1.set_title(f"{t.fn} on [{t.lo:g}, {t.hi:g}], int{t.in_bits} input, int{t.coef_bits} coefficients")
    ax2.plot(x, y_ga - fx, "C0-", label=f"GA  max {result.max_err:.2e}")
    ax2.plot(x, y_uni - fx, "C1-", alpha=0.7, label=f"uniform  max {result.baseline_max_err:.2e}")
    ax2.axhline(0, color="k", lw=0.5)
    ax2.set_xlabel("x (on the input grid)")
    ax2.set_ylabel("LUT - f")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
