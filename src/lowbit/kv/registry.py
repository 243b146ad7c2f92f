"""The registry of KV-cache methods: the one place a ``--kv`` spec becomes a Cache and a byte count.

A method is a :class:`KVMethod` object registered with :func:`register_kv_method`: its spec (options,
defaults, validation), a factory that builds a transformers ``Cache``, and the peak bytes a one-sequence
cache holds after ``n`` tokens. :func:`make_cache` (eval, generation, the server) and
:func:`cache_bytes` / :func:`peak_cache_bytes` (the server's admission) use nothing else, so a new method is one file with one
registration (``docs/ARCHITECTURE.md`` has the recipe).

Composition: a method that ``takes_store`` (the budget methods) may be followed by ``+`` and a method
that ``is_store`` (KIVI): ``kvmerger:budget=0.5+kivi:bits=4`` keeps the merged states in KIVI's format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers.cache_utils import Cache

from lowbit.spec import MethodSpec, ParsedSpec, SpecError, parse_spec


@dataclass(frozen=True)
class KVShape:
    """What the bytes of a one-sequence cache depend on besides the method: the model's KV geometry."""

    layers: int
    kv_heads: int
    head_dim: int
    store_bytes: int = 2  # element size of full-precision parts (fp16 for an fp32 model, else the model dtype)

    @classmethod
    def from_config(cls, config, dtype: torch.dtype = torch.float32) -> "KVShape":
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        store = 2 if dtype == torch.float32 else torch.empty((), dtype=dtype).element_size()
        return cls(text.num_hidden_layers, kv_heads, head_dim, store)

    @property
    def fp16_bytes_per_token(self) -> int:
        """Bytes of one token's K and V in one layer at 2 bytes per element (the uncompressed convention)."""
        return 2 * 2 * self.kv_heads * self.head_dim


@dataclass(frozen=True)
class CacheContext:
    """What a factory may use: the model config, and the model itself when the caller gave it.

    With a model, methods that score with the attention queries or compute attention with a kernel
    switch it to lowbit's attention function (:mod:`lowbit.kv.attention`); ``kernels=False`` keeps the
    PyTorch reference storage even on CUDA.
    """

    config: object
    model: object | None = None
    kernels: bool = True


@dataclass(frozen=True)
class KVMethod:
    """A registered KV method.

    ``make(part, ctx, store)`` builds the cache. ``nbytes(options, shape, n, store)`` is the bytes one
    sequence's cache holds (all layers) after ``n`` tokens -- exact, or an upper bound when ``exact`` is
    False; ``peak_nbytes`` (same arguments) the most at any length up to ``n``, when that differs.
    """

    spec: MethodSpec
    make: Callable[[ParsedSpec, CacheContext, ParsedSpec | None], Cache]
    nbytes: Callable[[dict, KVShape, int, ParsedSpec | None], int]
    peak_nbytes: Callable[[dict, KVShape, int, ParsedSpec | None], int] | None = None  # None: nbytes never drops
    validate: Callable[[ParsedSpec], None] | None = None  # cross-option checks; raise SpecError
    is_store: bool = False  # may follow '+' as the storage of a method that takes one
    takes_store: bool = False  # may be followed by '+<store method>'
    exact: bool = True  # nbytes is exact (False: an upper bound)

    @property
    def name(self) -> str:
        return self.spec.name


KV_METHODS: dict[str, KVMethod] = {}
KV_PRESETS: dict[str, str] = {}  # a preset name (e.g. "2bit") stands for a full spec


def register_kv_preset(name: str, spec: str) -> None:
    """Let `name` stand for `spec` wherever a ``--kv`` spec (or one part of a composition) is accepted."""
    KV_PRESETS[name] = spec


def register_kv_method(method: KVMethod) -> KVMethod:
    """Add `method` to the registry (replacing one of the same name); returns it."""
    KV_METHODS[method.name] = method
    return method


def parse_kv_spec(text: str) -> list[ParsedSpec]:
    """Validate a ``--kv`` spec (presets expanded); raises :class:`SpecError` naming what was wrong and what is allowed."""
    text = "+".join(KV_PRESETS.get(p.strip().lower(), p) for p in text.split("+"))
    parts = parse_spec(text, {name: m.spec for name, m in KV_METHODS.items()}, family="KV method")
    if len(parts) > 1:
        first, store = (KV_METHODS[p.name] for p in parts[:2]) if len(parts) == 2 else (None, None)
        if first is None or not first.takes_store or not store.is_store:
            takers = "|".join(n for n, m in KV_METHODS.items() if m.takes_store)
            stores = "|".join(n for n, m in KV_METHODS.items() if m.is_store)
            raise SpecError(
                f"'{text}': the only '+' composition is a budget method followed by {stores} "
                f"(<{takers}>:...+{stores}:...), got {' + '.join(p.name for p in parts)}"
            )
    for part in parts:
        check = KV_METHODS[part.name].validate
        if check is not None:
            check(part)
    return parts


def _parts(spec) -> list[ParsedSpec]:
    if isinstance(spec, str):
        return parse_kv_spec(spec)
    return [spec] if isinstance(spec, ParsedSpec) else list(spec)


def make_cache(spec: str | ParsedSpec | list[ParsedSpec], config, model=None, *, kernels: bool = True) -> Cache:
    """Build a fresh cache from a spec string (or parsed parts) for a model `config`.

    Given the `model`, score-based methods receive the attention queries and, on CUDA, KIVI decodes
    with the Triton kernels (unless ``kernels=False``); elsewhere the PyTorch reference path runs.
    """
    parts = _parts(spec)
    store = parts[1] if len(parts) > 1 else None
    return KV_METHODS[parts[0].name].make(parts[0], CacheContext(config, model, kernels), store)


def cache_bytes(spec: str | ParsedSpec | list[ParsedSpec], shape: KVShape, n_tokens: int) -> int:
    """Bytes a one-sequence cache of `spec` holds after `n_tokens` tokens (all layers; see :attr:`KVMethod.exact`)."""
    parts = _parts(spec)
    store = parts[1] if len(parts) > 1 else None
    return KV_METHODS[parts[0].name].nbytes(parts[0].options, shape, max(0, int(n_tokens)), store)


def peak_cache_bytes(spec: str | ParsedSpec | list[ParsedSpec], shape: KVShape, n_tokens: int) -> int:
    """The most bytes a one-sequence cache of `spec` holds at any length up to `n_tokens`: what admission reserves."""
    parts = _parts(spec)
    store = parts[1] if len(parts) > 1 else None
    method = KV_METHODS[parts[0].name]
    peak = method.peak_nbytes or method.nbytes
    return peak(parts[0].options, shape, max(0, int(n_tokens)), store)


def is_exact(spec: str | ParsedSpec | list[ParsedSpec]) -> bool:
    """Whether :func:`cache_bytes` is exact for `spec` (else a tight upper bound)."""
    return KV_METHODS[_parts(spec)[0].name].exact


def cache_nbytes(cache: Cache) -> tuple[int, int]:
    """(bytes held, bytes an fp16 cache would hold). An uncompressed cache counts 2 bytes per element."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes(), cache.nbytes_fp16()
    elements = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers if layer.keys is not None)
    return 2 * elements, 2 * elements
