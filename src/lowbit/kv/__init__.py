"""KV-cache methods as transformers Caches, registered by name so ``--kv`` specs build them.

Importing the package registers every method (one module each); see :mod:`lowbit.kv.registry`.
"""

from lowbit.kv import fp16, kivi, eviction, merging, kivi_plus, hf_quantized  # noqa: F401  (registration order = listing order)
from lowbit.kv.attention import use_lowbit_attention
from lowbit.kv.budget import BudgetCache, BudgetLayer
from lowbit.kv.fused import FusedKiviCache, FusedKiviLayer
from lowbit.kv.kivi import KiviCache, KiviLayer
from lowbit.kv.registry import (
    KV_METHODS,
    CacheContext,
    KVMethod,
    KVShape,
    cache_bytes,
    cache_nbytes,
    is_exact,
    make_cache,
    parse_kv_spec,
    peak_cache_bytes,
    register_kv_method,
    register_kv_preset,
)

__all__ = [
    "KV_METHODS",
    "BudgetCache",
    "BudgetLayer",
    "CacheContext",
    "FusedKiviCache",
    "FusedKiviLayer",
    "KVMethod",
    "KVShape",
    "KiviCache",
    "KiviLayer",
    "cache_bytes",
    "cache_nbytes",
    "is_exact",
    "make_cache",
    "parse_kv_spec",
    "peak_cache_bytes",
    "register_kv_method",
    "register_kv_preset",
    "use_lowbit_attention",
]
