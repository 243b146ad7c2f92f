"""KV-cache methods as transformers Caches, and the registry that builds them from ``--kv`` specs."""

from lowbit.kv.budget import BudgetCache, BudgetLayer
from lowbit.kv.kivi import KiviCache, KiviLayer
from lowbit.kv.registry import BUDGET_METHODS, KV_METHODS, cache_nbytes, make_cache, parse_kv_spec

__all__ = [
    "BUDGET_METHODS",
    "BudgetCache",
    "BudgetLayer",
    "KV_METHODS",
    "KiviCache",
    "KiviLayer",
    "cache_nbytes",
    "make_cache",
    "parse_kv_spec",
]
