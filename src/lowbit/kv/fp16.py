"""The uncompressed baseline: transformers' ``DynamicCache``, counted at 2 bytes per element."""

from __future__ import annotations

from transformers.cache_utils import DynamicCache

from lowbit.kv.registry import KVMethod, KVShape, register_kv_method
from lowbit.spec import MethodSpec


def _make(part, ctx, store) -> DynamicCache:
    return DynamicCache(config=ctx.config)


def _nbytes(options: dict, shape: KVShape, n_tokens: int, store) -> int:
    return shape.layers * n_tokens * shape.fp16_bytes_per_token


FP16 = register_kv_method(KVMethod(MethodSpec("fp16", {}, "uncompressed cache (the baseline)"), _make, _nbytes))
