"""How many KV-cache bytes one request will hold: the number the scheduler admits by.

The server admits a request only when the *peak* bytes its cache can reach (prompt plus ``max_tokens``)
fit under ``--kv-budget-mb`` next to the reservations of the running requests. The bytes come from the
KV method's own registration (:mod:`lowbit.kv.registry`): exact for ``fp16`` and ``kivi`` (KIVI's size
after n tokens depends on n only, :mod:`lowbit.quant.kivi`), and for the budget methods the bytes of the
most states they can hold, ``T(N) + slack + 1`` per head (:func:`lowbit.kv.budget.max_kept`), in their
store -- an upper bound that holds for any arrival pattern.
"""

from __future__ import annotations

import torch

from lowbit.kv.registry import KVShape, cache_bytes, is_exact, parse_kv_spec, peak_cache_bytes
from lowbit.spec import ParsedSpec


class KVSizer:
    """Bytes a one-sequence cache of method `spec` holds after n tokens, for a model `config`."""

    def __init__(self, spec: str | ParsedSpec | list[ParsedSpec], config, dtype: torch.dtype = torch.float32):
        self.parts = parse_kv_spec(spec) if isinstance(spec, str) else [spec] if isinstance(spec, ParsedSpec) else list(spec)
        self.shape = KVShape.from_config(config, dtype)
        self.exact = is_exact(self.parts)

    def bytes_at(self, n_tokens: int) -> int:
        """Bytes held after exactly `n_tokens` tokens (all layers, batch 1); an upper bound when not exact."""
        return cache_bytes(self.parts, self.shape, n_tokens)

    def peak_bytes(self, n_tokens: int) -> int:
        """The most bytes the cache holds at any length up to `n_tokens`: what admission reserves."""
        return peak_cache_bytes(self.parts, self.shape, n_tokens)

    def bytes_per_token(self, n_tokens: int = 4096) -> float:
        """Average bytes per token at a given length (for reporting)."""
        return self.bytes_at(n_tokens) / max(1, n_tokens)
