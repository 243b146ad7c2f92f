"""The KV-cache methods lowbit knows, their options, and the one place a ``--kv`` spec becomes a Cache."""

from __future__ import annotations

from transformers.cache_utils import Cache, DynamicCache

from lowbit.kv.kivi import KIVI_BITS, KiviCache
from lowbit.spec import MethodSpec, Param, ParsedSpec, SpecError, parse_spec

KV_METHODS: dict[str, MethodSpec] = {
    "fp16": MethodSpec("fp16", {}, "uncompressed cache (the baseline)"),
    "kivi": MethodSpec(
        "kivi",
        {
            "bits": Param(int, 2, check=lambda b: b in KIVI_BITS, allowed=f"one of {KIVI_BITS}"),
            "group": Param(int, 32, aliases=("group_size", "g"), check=lambda g: g > 0, allowed="a positive integer"),
            "residual": Param(int, 128, aliases=("residual_length", "r"), check=lambda r: r > 0, allowed="a positive multiple of group"),
            "sinks": Param(int, 0, check=lambda s: s >= 0, allowed="an integer >= 0"),
        },
        "KIVI: keys per-channel, values per-token, full-precision residual window",
    ),
}


def parse_kv_spec(text: str) -> list[ParsedSpec]:
    """Validate a ``--kv`` spec; raises :class:`SpecError` naming what was wrong and what is allowed."""
    parts = parse_spec(text, KV_METHODS, family="KV method")
    if len(parts) > 1:
        raise SpecError(f"'{text}': composing KV methods with '+' is not supported yet; give one of {', '.join(KV_METHODS)}")
    part = parts[0]
    if part.name == "kivi":
        o = part.options
        if o["residual"] % o["group"] or (o["group"] % (8 // o["bits"])):
            raise SpecError(
                f"'{text}': residual ({o['residual']}) must be a multiple of group ({o['group']}), "
                f"and group a multiple of {8 // o['bits']} for {o['bits']}-bit packing"
            )
    return parts


def make_cache(spec: str | ParsedSpec, config) -> Cache:
    """Build a fresh cache for one sequence batch from a spec string (or a parsed spec)."""
    part = parse_kv_spec(spec)[0] if isinstance(spec, str) else spec
    if part.name == "fp16":
        return DynamicCache(config=config)
    o = part.options
    return KiviCache(config, bits=o["bits"], group_size=o["group"], residual_length=o["residual"], sinks=o["sinks"])


def cache_nbytes(cache: Cache) -> tuple[int, int]:
    """(bytes held, bytes an fp16 cache would hold). An uncompressed cache counts 2 bytes per element."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes(), cache.nbytes_fp16()
    elements = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers if layer.keys is not None)
    return 2 * elements, 2 * elements
