"""The weight/activation quantization methods lowbit knows (``--wa`` specs) and their resolved config.

All four methods run through the same :class:`~lowbit.wa.linear.QuantLinear`; they differ only in
the resolved :class:`WAConfig`:

=========  ============================================================================================
``fmpq``   COMET's fine-grained mixed precision: INT4 weights (group-wise), per-token per-block
           activations, channels permuted by calibrated magnitude so outliers share a few blocks, the
           top ``int8_frac`` of blocks in INT8 and the rest in INT4 (``a=8``: every block INT8, W4A8).
``w8a8``   per-output-channel INT8 weights, per-token INT8 activations (one block = the whole row).
``w4a16``  weight-only INT4 group-wise; activations stay in floating point.
``w4a8``   INT4 weights, INT8 per-token per-block activations, no permutation.
``w4a4``   plain round-to-nearest W4A4: INT4 weights and INT4 per-token per-block activations, no
           permutation, no INT8 blocks.
=========  ============================================================================================

Every INT4-weight method also takes ``gptq=true`` (GPTQ error-compensating rounding on the calibration
tokens, :mod:`lowbit.wa.gptq`) and ``rotate=hadamard`` (QuaRot-style rotation, :mod:`lowbit.wa.rotation`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lowbit.spec import MethodSpec, Param, ParsedSpec, SpecError, parse_spec
from lowbit.wa.rotation import ROTATIONS


def _even(v: int) -> bool:
    return v > 0 and v % 2 == 0


_EVEN = "a positive even integer (e.g. 64 or 128)"
_BLOCK = Param(int, 128, aliases=("block_size", "b"), check=_even, allowed=_EVEN, help="activation block (input channels)")
_GROUP = Param(int, 128, aliases=("group_size", "g"), check=_even, allowed=_EVEN, help="weight group (input channels)")
_SYM = Param(bool, True, help="symmetric weights (false: asymmetric with an integer zero point)")
_PAD = Param(bool, True, help="zero-pad input dims that are not a multiple of block/group (false: reject them)")
_GPTQ = Param(bool, False, help="GPTQ error-compensating weight rounding on the calibration tokens")
_ROTATE = Param(str, "none", aliases=("rotation",), check=lambda r: r in ROTATIONS, allowed=f"one of {ROTATIONS}",
                help="hadamard: QuaRot-style rotation fused into the weights (+ one online Hadamard before down_proj)")
_CLIP = Param(bool, False, help="search each weight group's grid among shrunk ranges (least rounding error)")
_ACLIP = Param(float, 1.0, check=lambda v: 0.5 <= v <= 1.0, allowed="a ratio in [0.5, 1]",
               help="INT4 activation blocks are clipped to this fraction of their max |x| before quantization")
_DAMP = Param(float, 0.1, check=lambda v: 0.0 < v <= 1.0, allowed="a number in (0, 1]",
              help="GPTQ dampening: damp * mean(diag H) added to the Hessian's diagonal")
_FOLD = Param(bool, True, help="fold the permutations into the producing layers/norms (no per-linear gather; "
              "o_proj's permutation is then constrained within heads, see docs/FMPQ.md)")
_IMPROVE = {"gptq": _GPTQ, "damp": _DAMP, "rotate": _ROTATE, "clip": _CLIP}
PREFILL_MODES = ("int", "fp8")
_PREFILL = Param(str, "int", check=lambda v: v in PREFILL_MODES, allowed=f"one of {PREFILL_MODES}",
                 help="fp8: calls of 512+ tokens run one FP8 e4m3 GEMM (weights and activations rounded to e4m3; "
                 "not the integer function; lowbit.wa.fp8_prefill); int: every call integer W4Ax")

WA_METHODS: dict[str, MethodSpec] = {
    "fmpq": MethodSpec(
        "fmpq",
        {
            "w": Param(int, 4, aliases=("w_bits", "wbits"), check=lambda v: v in (4, 8), allowed="one of (4, 8)"),
            "a": Param(int, 4, aliases=("a_bits", "abits"), check=lambda v: v in (4, 8), allowed="one of (4, 8)"),
            "block": _BLOCK,
            "group": _GROUP,
            "int8_frac": Param(
                float, 0.1, aliases=("frac",), check=lambda v: 0.0 <= v <= 1.0, allowed="a number in [0, 1]",
                help="fraction of activation blocks kept in INT8 (ceil(frac * blocks)); ignored when a=8",
            ),
            "sym": _SYM,
            "pad": _PAD,
            **_IMPROVE,
            "aclip": _ACLIP,
            "fold": _FOLD,
            "prefill": _PREFILL,
        },
        "COMET FMPQ: INT4 weights, per-block INT4/INT8 activations with outlier-gathering permutation",
    ),
    "w8a8": MethodSpec("w8a8", {}, "per-channel INT8 weights, per-token INT8 activations"),
    "w4a16": MethodSpec("w4a16", {"group": _GROUP, "sym": _SYM, "pad": _PAD, **_IMPROVE}, "weight-only INT4, group-wise"),
    "w4a8": MethodSpec(
        "w4a8", {"block": _BLOCK, "group": _GROUP, "sym": _SYM, "pad": _PAD, **_IMPROVE, "prefill": _PREFILL},
        "INT4 weights, INT8 per-token per-block activations (no permutation)",
    ),
    "w4a4": MethodSpec(
        "w4a4", {"block": _BLOCK, "group": _GROUP, "sym": _SYM, "pad": _PAD, **_IMPROVE, "aclip": _ACLIP,
                 "prefill": _PREFILL},
        "round-to-nearest W4A4 (no permutation, no INT8 blocks)",
    ),
}


WHOLE_ROW = 0  # a group/block of WHOLE_ROW spans the whole (padded) input row: per-channel weights, per-token activations
UNQUANTIZED = 16  # a_bits of UNQUANTIZED: activations stay in floating point


@dataclass(frozen=True)
class WAConfig:
    """Resolved quantization config of one method (what a QuantLinear is built from).

    ``group``/``block`` of :data:`WHOLE_ROW` span the whole (padded) input row (per-channel weights /
    per-token activations); ``a_bits`` of :data:`UNQUANTIZED` means activations are not quantized.
    """

    method: str
    w_bits: int
    a_bits: int
    group: int
    block: int
    int8_frac: float
    sym: bool
    permute: bool
    pad: bool
    spec: str
    gptq: bool = False  # GPTQ weight rounding (needs calibration tokens)
    rotate: str = "none"  # "hadamard": the model is rotated before its linears are quantized
    clip: bool = False  # weight grids searched among shrunk ranges
    damp: float = 0.1  # GPTQ dampening (fraction of the mean Hessian diagonal)
    aclip: float = 1.0  # INT4 activation blocks clipped to this fraction of their max |x|
    fold: bool = False  # permutations folded into producers (fmpq: lowbit.wa.fold), not gathered per linear
    prefill: str = "int"  # "fp8": prefill-sized calls run one FP8 GEMM (lowbit.wa.fp8_prefill)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WAConfig":
        return cls(**d)

    @property
    def quantizes_activations(self) -> bool:
        return self.a_bits != UNQUANTIZED

    @property
    def needs_calibration(self) -> bool:
        """Calibration decides the permutation and the INT8 blocks (fmpq) and GPTQ's Hessians."""
        return self.permute or self.gptq


def parse_wa_spec(text: str) -> ParsedSpec:
    """Validate a ``--wa`` spec; raises :class:`SpecError` naming what was wrong and what is allowed."""
    parts = parse_spec(text, WA_METHODS, family="weight/activation method")
    if len(parts) > 1:
        raise SpecError(f"'{text}': composing weight/activation methods with '+' is not supported; give one of {', '.join(WA_METHODS)}")
    part = parts[0]
    o = part.options
    if "block" in o and "group" in o and max(o["block"], o["group"]) % min(o["block"], o["group"]):
        raise SpecError(
            f"'{text}': block ({o['block']}) and group ({o['group']}) must divide one another "
            "(equal, or one a multiple of the other) so that weight and activation scales are constant on each tile"
        )
    return part


def resolve_config(spec: str | ParsedSpec | WAConfig) -> WAConfig:
    """Turn a spec string (or a parsed spec) into the :class:`WAConfig` QuantLinear is built from."""
    if isinstance(spec, WAConfig):
        return spec
    part = parse_wa_spec(spec) if isinstance(spec, str) else spec
    o = part.options
    text = part.text
    extra = {"gptq": o.get("gptq", False), "rotate": o.get("rotate", "none"), "clip": o.get("clip", False),
             "damp": o.get("damp", 0.1)}
    aclip = o.get("aclip", 1.0)
    if part.name == "fmpq":
        return WAConfig("fmpq", o["w"], o["a"], o["group"], o["block"], o["int8_frac"] if o["a"] == 4 else 1.0,
                        o["sym"], True, o["pad"], text, **extra, aclip=aclip if o["a"] == 4 else 1.0,
                        fold=o["fold"], prefill=o["prefill"])
    if part.name == "w8a8":
        return WAConfig("w8a8", 8, 8, WHOLE_ROW, WHOLE_ROW, 1.0, True, False, True, text)
    if part.name == "w4a16":
        return WAConfig("w4a16", 4, UNQUANTIZED, o["group"], WHOLE_ROW, 0.0, o["sym"], False, o["pad"], text, **extra)
    if part.name == "w4a8":
        return WAConfig("w4a8", 4, 8, o["group"], o["block"], 1.0, o["sym"], False, o["pad"], text, **extra,
                        prefill=o["prefill"])
    if part.name == "w4a4":
        return WAConfig("w4a4", 4, 4, o["group"], o["block"], 0.0, o["sym"], False, o["pad"], text, **extra, aclip=aclip,
                        prefill=o["prefill"])
    raise SpecError(f"unknown weight/activation method '{part.name}': allowed methods are {', '.join(WA_METHODS)}")
