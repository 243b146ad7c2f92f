"""The KV-cache methods lowbit knows, their options, and the one place a ``--kv`` spec becomes a Cache."""

from __future__ import annotations

from transformers.cache_utils import Cache, DynamicCache

from lowbit.kv.budget import BudgetCache
from lowbit.kv.eviction import h2o_policy, streaming_policy
from lowbit.kv.kivi import KIVI_BITS, KiviCache
from lowbit.kv.merging import make_kvmerger_policy
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


def _budget_params(sinks: int, window: int | None, scored: bool) -> dict[str, Param]:
    params = {
        "budget": Param(float, 0.5, aliases=("b",), check=lambda b: 0.0 < b <= 1.0, allowed="a fraction of the tokens seen in (0, 1]"),
        "sinks": Param(int, sinks, check=lambda s: s >= 0, allowed="an integer >= 0"),
    }
    if window is not None:
        params["window"] = Param(int, window, aliases=("recent",), check=lambda w: w >= 0, allowed="an integer >= 0")
    params["slack"] = Param(int, 16, check=lambda s: s >= 0, allowed="an integer >= 0 (states over budget before decoding recompresses)")
    if scored:
        params["obs"] = Param(int, 32, check=lambda o: o >= 1, allowed="an integer >= 1 (prefill queries that score the prompt)")
        params["scores"] = Param(str, "queries", check=lambda s: s in ("queries", "keys"), allowed="'queries' or 'keys'")
    return params


# Methods that keep at most budget x tokens-seen states per head; they compose with kivi ('<method>+kivi:...').
BUDGET_METHODS = ("streaming", "h2o", "kvmerger")
KV_METHODS.update(
    {
        "streaming": MethodSpec("streaming", _budget_params(4, None, False), "StreamingLLM: attention sinks + most recent tokens"),
        "h2o": MethodSpec("h2o", _budget_params(0, 32, True), "H2O: heavy hitters by accumulated attention + recent window"),
        "kvmerger": MethodSpec(
            "kvmerger",
            {
                **_budget_params(4, 32, True),
                "sigma": Param(float, 0.0, check=lambda s: s >= 0, allowed="a number >= 0 (0 = adaptive per merging set)"),
            },
            "KVMerger: merge similar consecutive keys (Gaussian weights around the most-attended pivot)",
        ),
    }
)


def parse_kv_spec(text: str) -> list[ParsedSpec]:
    """Validate a ``--kv`` spec; raises :class:`SpecError` naming what was wrong and what is allowed."""
    parts = parse_spec(text, KV_METHODS, family="KV method")
    if len(parts) > 1:
        names = [p.name for p in parts]
        if len(parts) != 2 or names[0] not in BUDGET_METHODS or names[1] != "kivi":
            raise SpecError(
                f"'{text}': the only '+' composition is a budget method followed by kivi "
                f"(<{'|'.join(BUDGET_METHODS)}>:...+kivi:...), got {' + '.join(names)}"
            )
    for part in parts:
        if part.name == "kivi":
            o = part.options
            if o["residual"] % o["group"] or (o["group"] % (8 // o["bits"])):
                raise SpecError(
                    f"'{text}': residual ({o['residual']}) must be a multiple of group ({o['group']}), "
                    f"and group a multiple of {8 // o['bits']} for {o['bits']}-bit packing"
                )
    return parts


def _budget_cache(part: ParsedSpec, config, store) -> BudgetCache:
    o = part.options
    policy = {"streaming": streaming_policy, "h2o": h2o_policy}.get(part.name)
    if part.name == "kvmerger":
        policy = make_kvmerger_policy(o["sigma"])
    return BudgetCache(
        config,
        name=part.name,
        policy=policy,
        budget=o["budget"],
        sinks=o["sinks"],
        window=o.get("window", 0),
        slack=o["slack"],
        obs=o.get("obs", 1),
        needs_scores=part.name != "streaming",
        scores_from=o.get("scores", "keys"),
        store=store,
    )


def make_cache(spec: str | ParsedSpec, config, model=None) -> Cache:
    """Build a fresh cache for one sequence batch from a spec string (or a parsed spec).

    Given the `model` and a CUDA device, a plain KIVI cache comes with the Triton kernels: decode steps
    read the packed cache directly (``lowbit.kernels``); elsewhere the PyTorch reference path runs.
    """
    parts = parse_kv_spec(spec) if isinstance(spec, str) else [spec] if isinstance(spec, ParsedSpec) else list(spec)
    part = parts[0]
    if part.name == "fp16":
        return DynamicCache(config=config)
    if part.name in BUDGET_METHODS:
        store = "plain"
        if len(parts) > 1:  # kept states stored through KIVI; the budget method's sinks stay fp16
            store = dict(parts[1].options)
            if "residual" not in parts[1].given:
                store["residual"] = store["group"]  # a small fp16 residual by default: kept sets are short
        return _budget_cache(part, config, store)
    o = part.options
    kwargs = dict(bits=o["bits"], group_size=o["group"], residual_length=o["residual"], sinks=o["sinks"])
    if model is not None and next(model.parameters()).is_cuda:
        from lowbit.kernels import FusedKiviCache, use_kivi_kernels

        use_kivi_kernels(model)
        return FusedKiviCache(config, **kwargs)
    return KiviCache(config, **kwargs)


def cache_nbytes(cache: Cache) -> tuple[int, int]:
    """(bytes held, bytes an fp16 cache would hold). An uncompressed cache counts 2 bytes per element."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes(), cache.nbytes_fp16()
    elements = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers if layer.keys is not None)
    return 2 * elements, 2 * elements
