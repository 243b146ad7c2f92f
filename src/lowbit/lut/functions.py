"""Registry of the non-linear functions GQA-LUT knows by name.

Each entry gives a float64 reference implementation, a default input range, a check on the
range (exp needs ``hi <= 0``, reciprocal/rsqrt need ``lo > 0``), the behaviour outside the range
(the *tails*) and the ``torch.nn`` / ``transformers`` activation classes that :func:`lowbit.lut.apply`
may replace.

Tails: ``("linear", slope, intercept)`` continues the function by its asymptote
(``y = slope * x + intercept``, e.g. ``y = x`` above the range of SiLU, ``y = 0`` below it);
``("clamp",)`` holds the value at the range end (the input code is clamped to the fitted range).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

Tail = tuple  # ("clamp",) or ("linear", slope, intercept)
CLAMP: Tail = ("clamp",)


def _t(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[np.ndarray], np.ndarray]:
    def wrapped(x: np.ndarray) -> np.ndarray:
        return fn(torch.as_tensor(np.asarray(x, dtype=np.float64))).numpy()

    wrapped.__name__ = getattr(fn, "__name__", "fn")
    return wrapped


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.special.erf(x / np.sqrt(2.0)))


def _hswish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0


@dataclass(frozen=True)
class LutFunction:
    """A named function: float64 reference, default range, range rule, tails, matching modules."""

    name: str
    f: Callable[[np.ndarray], np.ndarray]
    default_range: tuple[float, float]
    tail_left: Tail = CLAMP
    tail_right: Tail = CLAMP
    domain: str = "any"  # "any", "nonpositive" (hi <= 0) or "positive" (lo > 0)
    modules: tuple[str, ...] = ()  # class names matched by apply()
    help: str = ""

    def check_range(self, lo: float, hi: float) -> None:
        check_range(lo, hi, self.name)
        if self.domain == "nonpositive" and hi > 0:
            raise ValueError(
                f"range [{lo:g}, {hi:g}] is invalid for '{self.name}': its range must lie in (-inf, 0] "
                f"(hi <= 0; softmax feeds x - max(x)), e.g. [-8, 0]"
            )
        if self.domain == "positive" and lo <= 0:
            raise ValueError(
                f"range [{lo:g}, {hi:g}] is invalid for '{self.name}': its range must be strictly positive "
                f"(lo > 0), e.g. [{self.default_range[0]:g}, {self.default_range[1]:g}]"
            )


def check_range(lo: float, hi: float, name: str = "function") -> None:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"range [{lo}, {hi}] for '{name}' must be finite: give lo < hi, both finite")
    if lo >= hi:
        raise ValueError(f"invalid range [{lo:g}, {hi:g}] for '{name}': lo must be < hi")


_GELU_MODULES = (
    "GELU",  # torch.nn.GELU
    "GELUActivation",
    "NewGELUActivation",
    "FastGELUActivation",
    "GELUTanh",
    "PytorchGELUTanh",
    "AccurateGELUActivation",
)

FUNCTIONS: dict[str, LutFunction] = {
    "gelu": LutFunction(
        "gelu", _t(_gelu), (-8.0, 8.0), ("linear", 0.0, 0.0), ("linear", 1.0, 0.0),
        modules=_GELU_MODULES, help="x * Phi(x) (erf form); tanh approximations are matched by apply() too",
    ),
    "silu": LutFunction(
        "silu", _t(lambda x: x * torch.sigmoid(x)), (-8.0, 8.0), ("linear", 0.0, 0.0), ("linear", 1.0, 0.0),
        modules=("SiLU", "SiLUActivation"), help="x * sigmoid(x) (swish)",
    ),
    "hswish": LutFunction(
        "hswish", _t(_hswish), (-4.0, 4.0), ("linear", 0.0, 0.0), ("linear", 1.0, 0.0),
        modules=("Hardswish",), help="x * relu6(x + 3) / 6",
    ),
    "sigmoid": LutFunction(
        "sigmoid", _t(torch.sigmoid), (-8.0, 8.0), ("linear", 0.0, 0.0), ("linear", 0.0, 1.0),
        modules=("Sigmoid",), help="1 / (1 + exp(-x))",
    ),
    "tanh": LutFunction(
        "tanh", _t(torch.tanh), (-4.0, 4.0), ("linear", 0.0, -1.0), ("linear", 0.0, 1.0),
        modules=("Tanh",), help="tanh(x)",
    ),
    "exp": LutFunction(
        "exp", _t(torch.exp), (-8.0, 0.0), ("linear", 0.0, 0.0), CLAMP,
        domain="nonpositive", help="exp(x) on (-inf, 0], as in softmax(x - max x)",
    ),
    "reciprocal": LutFunction(
        "reciprocal", _t(torch.reciprocal), (0.5, 4.0), CLAMP, CLAMP,
        domain="positive", help="1 / x on a positive range (inputs outside are clamped to it)",
    ),
    "rsqrt": LutFunction(
        "rsqrt", _t(torch.rsqrt), (0.25, 4.0), CLAMP, CLAMP,
        domain="positive", help="1 / sqrt(x) on a positive range (inputs outside are clamped to it)",
    ),
}


def get_function(name: str) -> LutFunction:
    key = name.strip().lower()
    if key not in FUNCTIONS:
        raise ValueError(f"unknown function '{name}': allowed functions are {', '.join(FUNCTIONS)} (or pass a Python callable)")
    return FUNCTIONS[key]


def evaluate_callable(fn: Callable, x: np.ndarray) -> np.ndarray:
    """Evaluate a user callable on float64 `x`: tried with a numpy array, then with a torch tensor."""
    x = np.asarray(x, dtype=np.float64)
    errors = []
    for arg in (x, torch.from_numpy(x.copy())):
        try:
            y = fn(arg)
            if isinstance(y, torch.Tensor):
                y = y.detach().cpu().double().numpy()
            y = np.asarray(y, dtype=np.float64)
            if y.shape == x.shape:
                return y
            y = np.broadcast_to(y, x.shape).astype(np.float64)
            return y
        except Exception as exc:  # try the next calling convention
            errors.append(exc)
    raise ValueError(f"could not evaluate {fn!r} elementwise on a numpy array or torch tensor: {errors[-1]}")


def resolve(fn: str | Callable, lo: float | None, hi: float | None) -> tuple[str, Callable[[np.ndarray], np.ndarray], float, float, Tail, Tail]:
    """Name, float64 evaluator, validated range and tails for a registry name or a callable."""
    if isinstance(fn, str):
        spec = get_function(fn)
        lo = spec.default_range[0] if lo is None else float(lo)
        hi = spec.default_range[1] if hi is None else float(hi)
        spec.check_range(lo, hi)
        return spec.name, spec.f, lo, hi, spec.tail_left, spec.tail_right
    if not callable(fn):
        raise ValueError(f"fn must be a function name ({', '.join(FUNCTIONS)}) or a callable, got {fn!r}")
    name = getattr(fn, "__name__", None) or "custom"
    if name == "<lambda>":
        name = "custom"
    if lo is None or hi is None:
        raise ValueError("a callable fn needs an explicit range: give lo and hi (lo < hi)")
    lo, hi = float(lo), float(hi)
    check_range(lo, hi, name)
    return name, (lambda x, _fn=fn: evaluate_callable(_fn, x)), lo, hi, CLAMP, CLAMP
