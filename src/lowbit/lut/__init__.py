"""GQA-LUT: genetic, quantization-aware piecewise-linear approximation of non-linear functions.

>>> from lowbit.lut import fit, apply
>>> result = fit("silu", segments=16, lo=-8, hi=8)         # GA table + uniform baseline
>>> result.max_err, result.baseline_max_err                # integer-program errors on the int8 grid
>>> y = result.table(torch.randn(4, 8))                     # float in -> int8 -> integer program -> float
>>> apply(model, {"silu": result.table})                   # swap every act_fn of a HF model

See docs/LUT.md for the integer program, the GA and the table format.
"""

from lowbit.lut.genetic import FitResult, dense_errors, fit, grid_errors, uniform_fit
from lowbit.lut.functions import FUNCTIONS, LutFunction, get_function
from lowbit.lut.model import APPLICABLE, LutActivation, apply, restore
from lowbit.lut.spec import LUT_METHODS, apply_spec, parse_lut_spec, table_from_spec
from lowbit.lut.table import LutTable

__all__ = [
    "APPLICABLE", "FUNCTIONS", "FitResult", "LUT_METHODS", "LutActivation", "LutFunction", "LutTable",
    "apply", "apply_spec", "dense_errors", "fit", "get_function", "grid_errors", "parse_lut_spec",
    "restore", "table_from_spec", "uniform_fit",
]
