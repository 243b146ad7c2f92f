"""The LUT table and its integer program.

An input ``x`` is an ``in_bits`` signed integer code ``q`` with scale ``in_scale`` (``x ~ q * in_scale``).
The fitted range covers the codes ``qlo..qhi`` (the codes whose value lies inside ``[lo, hi]``), cut by
``N - 1`` integer breakpoints ``qlo < p_1 < ... < p_{N-1} <= qhi`` into ``N`` segments; segment ``i``
holds the codes ``p_i <= q < p_{i+1}`` (``p_0 = qlo``, ``p_N = qhi + 1``). Each segment has an integer
slope ``m_i`` and intercept ``c_i`` (``coef_bits`` signed), and the output is::

    i   = #{bounds <= q}                       # lookup: bounds = [qlo, p_1, ..., p_{N-1}, qhi + 1]
    acc = (m[i] * q << prod_shift) + (c[i] << bias_shift)     # integer multiply, shift, add
    y   = acc * out_scale                                       # one output scale

Index 0 / N + 1 are the tails (codes below qlo / above qhi, still on the int grid): a *linear* tail has
its own integer (m, c) (the function's asymptote, e.g. y = x above the range of SiLU); a *clamp* tail
clamps q to the fitted range first, so the value is held at the range end.

Real-valued meaning: slope = m * slope_scale (per unit of x), intercept = c * intercept_scale, and
``intercept_scale / (slope_scale * in_scale) = 2 ** (bias_shift - prod_shift)`` is a power of two,
which is why a shift aligns the two terms. ``out_scale = slope_scale * in_scale / 2 ** prod_shift``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from lowbit.quant.integer import qrange

FORMAT_VERSION = 1
IN_SCALE_MODES = ("float", "pow2")


def input_scale(lo: float, hi: float, in_bits: int, mode: str) -> float:
    """Smallest scale (arbitrary float, or a power of two) for which [lo, hi] fits the signed grid."""
    if mode not in IN_SCALE_MODES:
        raise ValueError(f"unknown in_scale '{mode}': allowed values are {', '.join(IN_SCALE_MODES)}")
    qmin, qmax = qrange(in_bits)
    scale = max(hi / qmax if hi > 0 else 0.0, lo / qmin if lo < 0 else 0.0)
    if mode == "pow2":
        k = math.ceil(math.log2(scale))
        if max(hi / 2.0**k, lo / 2.0**k) > qmax or lo / 2.0**k < qmin:  # guard log2 rounding
            k += 1
        scale = 2.0**k
    return float(scale)


def code_range(lo: float, hi: float, in_scale: float, in_bits: int) -> tuple[int, int]:
    """The integer codes whose value q * in_scale lies in [lo, hi]."""
    qmin, qmax = qrange(in_bits)
    eps = 1e-9
    qlo = max(qmin, math.ceil(lo / in_scale - eps))
    qhi = min(qmax, math.floor(hi / in_scale + eps))
    return int(qlo), int(qhi)


def _tail_tuple(t: Any) -> tuple:
    t = tuple(t)
    if t[0] == "clamp":
        return ("clamp",)
    if t[0] == "linear" and len(t) == 5:
        return ("linear", int(t[1]), int(t[2]), float(t[3]), float(t[4]))
    raise ValueError(f"bad tail {t!r}: expected ['clamp'] or ['linear', m, c, slope, intercept]")


@dataclass
class LutTable:
    """A quantization-aware piecewise-linear table; see the module docstring for the program."""

    fn: str
    lo: float
    hi: float
    in_bits: int
    in_scale_mode: str
    in_scale: float
    qlo: int
    qhi: int
    coef_bits: int
    breakpoints: tuple[int, ...]
    slopes: tuple[int, ...]
    intercepts: tuple[int, ...]
    slope_scale: float
    intercept_scale: float
    prod_shift: int
    bias_shift: int
    out_scale: float
    tail_left: tuple = ("clamp",)
    tail_right: tuple = ("clamp",)
    method: str = "ga"
    seed: int | None = None
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.breakpoints = tuple(int(v) for v in self.breakpoints)
        self.slopes = tuple(int(v) for v in self.slopes)
        self.intercepts = tuple(int(v) for v in self.intercepts)
        self.tail_left, self.tail_right = _tail_tuple(self.tail_left), _tail_tuple(self.tail_right)
        n = len(self.slopes)
        if len(self.intercepts) != n or len(self.breakpoints) != n - 1 or n < 1:
            raise ValueError(f"inconsistent table: {n} slopes, {len(self.intercepts)} intercepts, {len(self.breakpoints)} breakpoints")
        qmin, qmax = qrange(self.in_bits)
        if not qmin <= self.qlo <= self.qhi <= qmax:
            raise ValueError(f"code range [{self.qlo}, {self.qhi}] is not inside the {self.in_bits}-bit grid [{qmin}, {qmax}]")
        bounds = (self.qlo, *self.breakpoints, self.qhi + 1)
        if any(b >= a for a, b in zip(bounds[1:], bounds[:-1])):
            raise ValueError(f"breakpoints must be strictly increasing inside ({self.qlo}, {self.qhi}]: {self.breakpoints}")
        cmin, cmax = qrange(self.coef_bits)
        coefs = list(self.slopes) + list(self.intercepts)
        coefs += [v for t in (self.tail_left, self.tail_right) if t[0] == "linear" for v in t[1:3]]
        if any(not cmin <= v <= cmax for v in coefs):
            raise ValueError(f"a coefficient lies outside the {self.coef_bits}-bit range [{cmin}, {cmax}]")
        if self.prod_shift < 0 or self.bias_shift < 0:
            raise ValueError("shifts must be >= 0")

    # ----------------------------------------------------------------- properties
    @property
    def segments(self) -> int:
        return len(self.slopes)

    @property
    def qmin(self) -> int:
        return qrange(self.in_bits)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.in_bits)[1]

    @property
    def bounds(self) -> tuple[int, ...]:
        """Lookup boundaries [qlo, p_1, ..., p_{N-1}, qhi + 1]: index = #{bounds <= q}."""
        return (self.qlo, *self.breakpoints, self.qhi + 1)

    @property
    def breakpoints_real(self) -> tuple[float, ...]:
        return tuple(p * self.in_scale for p in self.breakpoints)

    def _full_coefs(self) -> tuple[list[int], list[int]]:
        ml = self.tail_left[1] if self.tail_left[0] == "linear" else 0
        cl = self.tail_left[2] if self.tail_left[0] == "linear" else 0
        mr = self.tail_right[1] if self.tail_right[0] == "linear" else 0
        cr = self.tail_right[2] if self.tail_right[0] == "linear" else 0
        return [ml, *self.slopes, mr], [cl, *self.intercepts, cr]

    def _clip_bounds(self) -> tuple[int, int]:
        low = self.qlo if self.tail_left[0] == "clamp" else self.qmin
        high = self.qhi if self.tail_right[0] == "clamp" else self.qmax
        return low, high

    # ----------------------------------------------------------------- integer program
    def evaluate_int(self, x_codes: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Integer accumulator for integer input codes (numpy in -> numpy int64, torch in -> torch int64).

        Codes must lie on the ``in_bits`` signed grid; the real output is ``acc * out_scale``.
        """
        if isinstance(x_codes, torch.Tensor):
            if x_codes.is_floating_point() or x_codes.is_complex():
                raise ValueError("evaluate_int expects integer codes; use table(x) for float inputs")
            q = x_codes.to(torch.int64)
            if q.numel() and (int(q.min()) < self.qmin or int(q.max()) > self.qmax):
                raise ValueError(f"input codes must lie in the {self.in_bits}-bit grid [{self.qmin}, {self.qmax}]")
            return self._program_torch(q)
        q = np.asarray(x_codes)
        if not np.issubdtype(q.dtype, np.integer):
            if np.issubdtype(q.dtype, np.floating) and np.all(q == np.round(q)):
                q = q.astype(np.int64)
            else:
                raise ValueError("evaluate_int expects integer codes; use table(x) for float inputs")
        q = q.astype(np.int64)
        if q.size and (q.min() < self.qmin or q.max() > self.qmax):
            raise ValueError(f"input codes must lie in the {self.in_bits}-bit grid [{self.qmin}, {self.qmax}]")
        low, high = self._clip_bounds()
        q = np.clip(q, low, high)
        m_full, c_full = (np.asarray(v, dtype=np.int64) for v in self._full_coefs())
        idx = np.searchsorted(np.asarray(self.bounds, dtype=np.int64), q, side="right")
        return ((m_full[idx] * q) << self.prod_shift) + (c_full[idx] << self.bias_shift)

    def _consts(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._cache:
            m_full, c_full = self._full_coefs()
            self._cache[key] = (
                torch.tensor(self.bounds, dtype=torch.int64, device=device),
                torch.tensor(m_full, dtype=torch.int64, device=device),
                torch.tensor(c_full, dtype=torch.int64, device=device),
            )
        return self._cache[key]

    def _program_torch(self, q: torch.Tensor, consts: tuple | None = None) -> torch.Tensor:
        bounds, m_full, c_full = consts if consts is not None else self._consts(q.device)
        low, high = self._clip_bounds()
        q = q.clamp(low, high)
        idx = torch.bucketize(q, bounds, right=True)
        return ((m_full[idx] * q) << self.prod_shift) + (c_full[idx] << self.bias_shift)

    # ----------------------------------------------------------------- float interface
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Float -> int64 codes: round(x / in_scale) (half to even), clamped to the signed grid."""
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        return torch.round(x.to(work) / self.in_scale).clamp(self.qmin, self.qmax).to(torch.int64)

    def dequantize(self, acc: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        if isinstance(acc, torch.Tensor):
            return acc.to(torch.float64) * self.out_scale
        return np.asarray(acc, dtype=np.float64) * self.out_scale

    def __call__(self, x: torch.Tensor, outside: str = "asymptote", consts: tuple | None = None) -> torch.Tensor:
        """Float in -> int codes -> integer program -> float out, in x's dtype and shape.

        Inputs beyond the int grid (|x| > 2**(in_bits-1) * in_scale) saturate; with
        ``outside="asymptote"`` (default) a linear tail is instead evaluated in float there
        (``y = slope * x + intercept``, e.g. y = x for large SiLU inputs); ``outside="saturate"``
        keeps the pure integer result (held at the grid edge).
        """
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x, dtype=torch.float32)
        if not x.is_floating_point():
            raise ValueError(f"LUT call expects a floating-point tensor, got {x.dtype}; use evaluate_int for codes")
        if outside not in ("asymptote", "saturate"):
            raise ValueError(f"outside must be 'asymptote' or 'saturate', got {outside!r}")
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        xw = x.to(work)
        raw = torch.round(xw / self.in_scale)
        q = raw.clamp(self.qmin, self.qmax).to(torch.int64)
        acc = self._program_torch(q, consts)
        y = acc.to(work) * self.out_scale
        if outside == "asymptote":
            if self.tail_left[0] == "linear":
                y = torch.where(raw < self.qmin, xw * self.tail_left[3] + self.tail_left[4], y)
            if self.tail_right[0] == "linear":
                y = torch.where(raw > self.qmax, xw * self.tail_right[3] + self.tail_right[4], y)
        return y.to(x.dtype)

    def evaluate_float(self, x: np.ndarray) -> np.ndarray:
        """Numpy convenience: float64 inputs through the same quantize -> integer program -> dequantize path."""
        return self(torch.as_tensor(np.asarray(x, dtype=np.float64))).numpy()

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_cache")
        for k in ("breakpoints", "slopes", "intercepts", "tail_left", "tail_right"):
            d[k] = list(d[k])
        return {"format": "lowbit.lut", "version": FORMAT_VERSION, "segments": self.segments, **d}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LutTable":
        d = dict(d)
        if d.pop("format", "lowbit.lut") != "lowbit.lut":
            raise ValueError("not a lowbit.lut table")
        version = d.pop("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported LUT table format version {version}: this lowbit reads version {FORMAT_VERSION}")
        segments = d.pop("segments", None)
        if segments is not None and segments != len(d.get("slopes", ())):
            raise ValueError(f"inconsistent table: segments={segments} but {len(d.get('slopes', ()))} slopes")
        names = {f for f in cls.__dataclass_fields__ if not f.startswith("_")}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown LUT table fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "LutTable":
        return cls.from_dict(json.loads(text))

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str) -> "LutTable":
        with open(path, encoding="utf-8") as fh:
            return cls.from_json(fh.read())
