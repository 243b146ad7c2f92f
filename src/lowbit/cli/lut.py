"""``lowbit lut``: fit GQA-LUT tables from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from lowbit.cli.common import QUIET_HELP, _quiet, _steps
from lowbit.lut.functions import FUNCTIONS
from lowbit.lut.genetic import dense_errors, fit

app = typer.Typer(
    help="GQA-LUT: genetic, quantization-aware piecewise-linear tables for non-linear functions "
    "(integer-only evaluation on int8 inputs).",
    no_args_is_help=True,
)


@app.callback()
def _main() -> None:
    """GQA-LUT tools."""


def parse_range(text: str) -> tuple[float, float]:
    """``"-4,4"`` (spaces allowed, ``:`` also accepted as separator) -> (-4.0, 4.0)."""
    parts = text.strip().replace(":", ",").split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = float(parts[0]), float(parts[1])
    except ValueError:
        raise typer.BadParameter(f"expected LO,HI (e.g. -4,4), got '{text}'") from None
    return lo, hi


@app.command("fit")
def fit_cmd(
    fn: str = typer.Option(..., "--fn", help=f"function: {', '.join(FUNCTIONS)}"),
    segments: int = typer.Option(8, "--segments", "-n", help="number of segments (2..64)"),
    range_: Optional[str] = typer.Option(
        None, "--range", help="LO,HI input range, e.g. --range -4,4 (default per function)"
    ),
    in_bits: int = typer.Option(8, "--in-bits", help="input code width"),
    coef_bits: int = typer.Option(8, "--coef-bits", help="slope/intercept code width"),
    in_scale: str = typer.Option("float", "--in-scale", help="input scale: float or pow2"),
    seed: int = typer.Option(0, "--seed", help="GA seed"),
    generations: int = typer.Option(300, "--generations", help="GA generations"),
    population: int = typer.Option(128, "--population", help="GA population"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write the table as JSON here"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="save a PNG of f, the LUTs and their errors"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Fit a GA table and the uniform baseline; print their errors, write JSON and optionally a plot."""
    _quiet(quiet)
    lo, hi = parse_range(range_) if range_ is not None else (None, None)
    try:
        with _steps(1, "generations") as steps, steps.step(f"GA fit {fn}, {segments} segments", generations) as advance:
            result = fit(fn, segments=segments, lo=lo, hi=hi, in_bits=in_bits, seed=seed, generations=generations,
                         population=population, in_scale=in_scale, coef_bits=coef_bits, progress=advance)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    t = result.table
    console = Console()
    grid = Table(title=f"GQA-LUT {t.fn}: {t.segments} segments on [{t.lo:g}, {t.hi:g}], "
                       f"int{t.in_bits} in (scale {t.in_scale:.6g}, codes {t.qlo}..{t.qhi}), int{t.coef_bits} coefs")
    for col in ("table", "max |err| (grid)", "mean |err| (grid)", "max |err| (dense x)"):
        grid.add_column(col, justify="right" if col != "table" else "left")
    grid.add_row("GA", f"{result.max_err:.3e}", f"{result.mean_err:.3e}", f"{dense_errors(t, t.fn)[0]:.3e}")
    grid.add_row("uniform", f"{result.baseline_max_err:.3e}", f"{result.baseline_mean_err:.3e}",
                 f"{dense_errors(result.baseline_table, t.fn)[0]:.3e}")
    console.print(grid)
    console.print(f"breakpoints (codes): {list(t.breakpoints)}")
    console.print(f"fit time: {result.seconds:.2f} s (seed {seed}, {population} x {generations})")
    if out is not None:
        t.save(str(out))
        console.print(f"wrote {out}")
    if plot is not None:
        from lowbit.lut.plot import plot_fit

        plot_fit(result, plot)
        console.print(f"wrote {plot}")
