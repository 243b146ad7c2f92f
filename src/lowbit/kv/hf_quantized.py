"""transformers' ``QuantizedCache`` (quanto backend) as a registered KV method, the baseline KIVI+ is held to.

``hfq:bits=2,group=32,residual=128`` builds ``QuantizedCache("quanto", ...)`` unchanged: the first update
(the prefill) is quantized whole; later tokens gather in a full-precision residual, and when it reaches
``residual`` tokens the *whole* cache is dequantized, joined with it and quantized again. ``axis_key`` /
``axis_value`` are transformers' axes: 0 (its default) groups ``group`` consecutive channels of one token,
-1 groups ``group`` consecutive tokens of one channel (KIVI's key layout). Needs ``pip install optimum-quanto``.

Bytes count what quanto holds, with its scales and shifts at 2 bytes each (fp16, as lowbit counts every
full-precision part; quanto keeps them in the model dtype): packed codes, one scale and one shift per
group, and the residual at 2 bytes per element. The residual length depends on how the tokens arrived,
so the registry's count is an upper bound (``exact=False``).
"""

from __future__ import annotations

from transformers.cache_utils import QuantizedCache

from lowbit.kv.registry import CacheContext, KVMethod, KVShape, register_kv_method
from lowbit.spec import MethodSpec, Param, ParsedSpec, SpecError

SCALE_BYTES = 2


def _quanto_nbytes(q) -> int:
    """Bytes of a quanto ``WeightQBitsTensor``: its packed codes, and scale and shift at 2 bytes per element."""
    data = q._data._data if hasattr(q._data, "_data") else q._data  # PackedTensor wraps the uint8 bytes
    return data.numel() * data.element_size() + SCALE_BYTES * (q._scale.numel() + q._shift.numel())


class HFQuantizedCache(QuantizedCache):
    """``QuantizedCache`` that reports the bytes it holds (:meth:`nbytes`) and an fp16 cache's (:meth:`nbytes_fp16`)."""

    def nbytes(self) -> int:
        total = 0
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            total += _quanto_nbytes(layer._quantized_keys) + _quanto_nbytes(layer._quantized_values)
            total += 2 * (layer.keys.numel() + layer.values.numel())
        return total

    def nbytes_fp16(self) -> int:
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                b, h, _, d = layer._quantized_keys.shape
                total += 2 * 2 * b * h * d * layer.get_seq_length()
        return total


def _make(part: ParsedSpec, ctx: CacheContext, store) -> HFQuantizedCache:
    o = part.options
    try:
        import optimum.quanto  # noqa: F401
    except ImportError as exc:
        raise ValueError("hfq needs optimum-quanto: pip install optimum-quanto") from exc
    return HFQuantizedCache("quanto", ctx.config, nbits=o["bits"], axis_key=o["axis_key"], axis_value=o["axis_value"],
                            q_group_size=o["group"], residual_length=o["residual"])


def _nbytes(o: dict, shape: KVShape, n: int, store) -> int:
    """Upper bound: every token quantized, plus the most a residual holds (``residual - 1`` tokens) at 2 bytes."""
    row = shape.kv_heads * shape.head_dim
    quantized = row * o["bits"] // 8 + 2 * SCALE_BYTES * row // o["group"]  # one token's K (or V) once quantized
    extra = min(n, o["residual"] - 1) * max(0, 2 * row - quantized)
    return shape.layers * 2 * (n * quantized + extra)


def _validate(part: ParsedSpec) -> None:
    if part.options["group"] % (8 // part.options["bits"]):
        raise SpecError(f"'{part.text}': group must be a multiple of {8 // part.options['bits']}")


HFQ = register_kv_method(KVMethod(
    MethodSpec(
        "hfq",
        {
            "bits": Param(int, 2, check=lambda b: b in (2, 4), allowed="2 or 4 (quanto's qint2/qint4)"),
            "group": Param(int, 32, aliases=("g",), check=lambda g: g > 0, allowed="a positive integer"),
            "residual": Param(int, 128, aliases=("r",), check=lambda r: r > 0, allowed="a positive integer"),
            "axis_key": Param(int, 0, check=lambda a: a in (0, -1), allowed="0 (per token) or -1 (per channel)"),
            "axis_value": Param(int, 0, check=lambda a: a in (0, -1), allowed="0 (per token) or -1 (per channel)"),
        },
        "transformers QuantizedCache, quanto backend (the HF baseline; re-quantizes the whole cache at each flush)",
    ),
    _make, _nbytes, validate=_validate, exact=False,
))
