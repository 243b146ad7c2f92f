"""LUT method specs (``silu:segments=8,lo=-8,hi=8``) through the shared parser in :mod:`lowbit.spec`."""

from __future__ import annotations

from torch import nn

from lowbit.lut.genetic import BITS_RANGE, MAX_SEGMENTS, MIN_SEGMENTS, fit
from lowbit.lut.functions import FUNCTIONS
from lowbit.lut.table import IN_SCALE_MODES, LutTable
from lowbit.spec import MethodSpec, Param, ParsedSpec, parse_one, parse_spec


def _params() -> dict[str, Param]:
    bits = f"an integer in {BITS_RANGE[0]}..{BITS_RANGE[1]}"
    return {
        "segments": Param(int, 8, aliases=("n", "seg"), check=lambda v: MIN_SEGMENTS <= v <= MAX_SEGMENTS,
                          allowed=f"an integer in {MIN_SEGMENTS}..{MAX_SEGMENTS}", help="number of linear segments"),
        "lo": Param(float, None, allowed="a float below hi", help="range start (default per function)"),
        "hi": Param(float, None, allowed="a float above lo", help="range end (default per function)"),
        "in_bits": Param(int, 8, aliases=("bits",), check=lambda v: BITS_RANGE[0] <= v <= BITS_RANGE[1], allowed=bits,
                         help="input code width"),
        "coef_bits": Param(int, 8, check=lambda v: BITS_RANGE[0] <= v <= BITS_RANGE[1], allowed=bits,
                           help="slope/intercept code width"),
        "in_scale": Param(str, "float", check=lambda v: v in IN_SCALE_MODES, allowed=" or ".join(IN_SCALE_MODES),
                          help="input scale: arbitrary float or power of two"),
        "seed": Param(int, 0, check=lambda v: v >= 0, allowed="an integer >= 0", help="GA seed"),
        "generations": Param(int, 300, check=lambda v: v >= 1, allowed="an integer >= 1", help="GA generations"),
        "population": Param(int, 128, check=lambda v: v >= 4, allowed="an integer >= 4", help="GA population"),
    }


LUT_METHODS: dict[str, MethodSpec] = {
    name: MethodSpec(name, _params(), help=f"{f.help}; default range [{f.default_range[0]:g}, {f.default_range[1]:g}]")
    for name, f in FUNCTIONS.items()
}


def parse_lut_spec(text: str) -> list[ParsedSpec]:
    """Parse ``silu:segments=8`` (or several joined by ``+``) against :data:`LUT_METHODS`."""
    return parse_spec(text, LUT_METHODS, family="LUT function")


def table_from_spec(parsed: ParsedSpec | str) -> LutTable:
    """Fit the GA table a spec describes (range defaults to the function's default range)."""
    if isinstance(parsed, str):
        parsed = parse_one(parsed, LUT_METHODS, family="LUT function")
    o = parsed.options
    return fit(parsed.name, segments=o["segments"], lo=o["lo"], hi=o["hi"], in_bits=o["in_bits"], seed=o["seed"],
               generations=o["generations"], population=o["population"], in_scale=o["in_scale"],
               coef_bits=o["coef_bits"]).table


def apply_spec(model: nn.Module, text: str) -> int:
    """Fit a table for each part of ``text`` (e.g. ``silu:segments=16``) and swap it into `model`."""
    from lowbit.lut.model import apply

    return apply(model, {p.name: table_from_spec(p) for p in parse_lut_spec(text)})
