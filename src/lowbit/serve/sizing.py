"""How many KV-cache bytes one request will hold: the number the scheduler admits by.

The server admits a request only when the *peak* bytes its cache can reach (prompt plus
``max_tokens``) fit under ``--kv-budget-mb`` next to the reservations of the running requests.
Bytes are counted the way the methods report them (:func:`lowbit.kv.cache_nbytes`): an uncompressed
cache counts 2 bytes per element, KIVI counts its packed codes, fp16 scales/zeros, residual and sinks.

For the two registered methods the size after ``n`` tokens is a closed form that depends on ``n``
only, not on how the tokens arrived (one prefill or one at a time): KIVI flushes keys to the
quantized store in whole multiples of ``residual`` and values one token at a time beyond
``residual``, so the split between stores is a function of ``n``. :meth:`KVSizer.check` builds the
real cache on dummy K/V for a few lengths and compares, so a change in the cache layout is caught
at server start instead of silently mis-admitting.

A method without a closed form here (the budget methods: eviction, merging, their ``+kivi``
compositions) is sized half by formula, half by measurement: such a cache keeps at most
S = min(n, max(floor(budget x n), sinks + window) + slack + 1) states per head (its own documented
bound, independent of the data); the bytes of S states are measured by building the same store on
dummy K/V without compression, plus room for a full-precision residual when the store is KIVI. It is
an estimate (tested against real prefill-then-decode histories), memoized per length, and the server
says so with a warning at start.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings

import torch

from lowbit.kv.registry import cache_nbytes, make_cache, parse_kv_spec
from lowbit.spec import ParsedSpec


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


class KVSizer:
    """Bytes a one-sequence cache of method `spec` holds after n tokens, for a model `config`."""

    def __init__(self, spec: str | ParsedSpec, config, dtype: torch.dtype = torch.float32):
        self.parts = parse_kv_spec(spec) if isinstance(spec, str) else [spec]
        self.text = spec if isinstance(spec, str) else spec.text
        self.spec = self.parts[0]
        self.config = config
        text = _text_config(config)
        self.layers = text.num_hidden_layers
        self.kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.dtype = dtype
        # full-precision parts of a KIVI cache are stored in fp16 for an fp32 model, else the model dtype
        self.store_bytes = 2 if dtype == torch.float32 else torch.empty((), dtype=dtype).element_size()
        self.exact = len(self.parts) == 1 and self.spec.name in ("fp16", "kivi")
        if not self.exact:
            warnings.warn(f"KV sizing for '{self.text}' has no closed form: admitting by the measured peak of a "
                          "dummy cache (an estimate)", stacklevel=2)
            self._measured_peak = functools.lru_cache(maxsize=4096)(self._measure_peak)

    # ------------------------------------------------------------------ closed forms (per layer)
    def _layer_bytes(self, n: int) -> int:
        hd = self.kv_heads * self.head_dim  # elements per token per K (or V)
        if self.spec.name != "kivi":
            return 2 * 2 * hd * n  # K and V, 2 bytes per element as cache_nbytes counts them
        o = self.spec.options
        bits, group, residual, sinks = o["bits"], o["group"], o["residual"], o["sinks"]
        sb = self.store_bytes
        n_sink = min(sinks, n)
        rest = n - n_sink
        n_qk = (rest // residual) * residual  # keys leave the residual R at a time
        n_qv = max(0, rest - residual)  # values leave one at a time beyond R
        res_k, res_v = rest - n_qk, rest - n_qv
        total = 2 * n_sink * hd * sb + (res_k + res_v) * hd * sb
        total += n_qk * hd * bits // 8 + 2 * 2 * (n_qk // group) * hd  # key codes + fp16 scale/zero per group
        total += n_qv * hd * bits // 8 + 2 * 2 * n_qv * self.kv_heads * (self.head_dim // group)  # value codes + scale/zero
        return total

    def bytes_at(self, n_tokens: int) -> int:
        """Bytes held after exactly `n_tokens` tokens (all layers, batch 1); for methods without a closed
        form, the reservation estimate (see the module docstring)."""
        if not self.exact:
            return self._measured_peak(max(0, int(n_tokens)))
        return self.layers * self._layer_bytes(max(0, int(n_tokens)))

    def _measure_peak(self, n: int) -> int:
        """Budget methods: the kept set peaks at S = min(n, max(floor(budget*n), sinks+window) + slack + 1)
        states; measure S states in the same store without compression (budget=1), plus, when the store is
        KIVI, room for a full-precision residual (its size is not monotonic in the states held)."""
        if n == 0:
            return 0
        o = self.spec.options
        floor_states = int(o.get("sinks", 0)) + int(o.get("window", 0))
        states = min(n, max(math.floor(float(o.get("budget", 1.0)) * n), floor_states) + int(o.get("slack", 0)) + 1)
        uncompressed = [ParsedSpec(self.spec.name, {**o, "budget": 1.0}, self.spec.text), *self.parts[1:]]
        total = self.measured_bytes(states, spec=uncompressed)
        for part in self.parts[1:]:
            if part.name == "kivi":  # make_cache gives a composed KIVI store residual=group unless residual is given
                keys = {item.partition("=")[0].strip().lower() for item in part.text.partition(":")[2].split(",")}
                residual = part.options["residual"] if keys & {"residual", "residual_length", "r"} else part.options["group"]
                total += self.layers * 2 * 2 * self.kv_heads * self.head_dim * residual
        return total

    def peak_bytes(self, n_tokens: int) -> int:
        """The most bytes the cache holds at any length up to `n_tokens`: what admission reserves.

        KIVI's size drops when a block of R keys is quantized, so the peak is either at `n_tokens` or
        just before the last flush, which lies within the last R tokens.
        """
        n = max(0, int(n_tokens))
        if not self.exact or self.spec.name != "kivi":
            return self.bytes_at(n)
        window = self.spec.options["residual"] + 1
        return max(self.bytes_at(m) for m in range(max(0, n - window), n + 1))

    def bytes_per_token(self, n_tokens: int = 4096) -> float:
        """Average bytes per token at a given length (for reporting)."""
        return self.bytes_at(n_tokens) / max(1, n_tokens)

    # ------------------------------------------------------------------ measurement
    def measured_bytes(self, n_tokens: int, prefill: int | None = None, peak: bool = False, spec=None) -> int:
        """Build the method's real cache (one layer) on dummy K/V and read its bytes (x layers).

        `prefill` tokens arrive in one update and the rest one at a time (default: all at once);
        with `peak`, the most bytes seen after any update rather than the last.
        """
        cfg = copy.deepcopy(_text_config(self.config))
        cfg.num_hidden_layers = 1
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[:1]
        cache = make_cache(self.text if spec is None else spec, cfg)
        prefill = n_tokens if prefill is None else min(prefill, n_tokens)
        gen = torch.Generator().manual_seed(0)

        def kv(t):
            return torch.randn(1, self.kv_heads, t, self.head_dim, generator=gen).to(self.dtype)

        most = 0
        if prefill:
            cache.update(kv(prefill), kv(prefill), 0)
            most = cache_nbytes(cache)[0]
        for _ in range(n_tokens - prefill):
            cache.update(kv(1), kv(1), 0)
            most = max(most, cache_nbytes(cache)[0])
        return (most if peak else cache_nbytes(cache)[0]) * self.layers

    def check(self, lengths: tuple[int, ...] | None = None) -> None:
        """Compare the closed form with real caches; raise if they disagree (the layout changed)."""
        if not self.exact:
            return
        if lengths is None:
            r = self.spec.options.get("residual", 16) if self.spec.name == "kivi" else 16
            s = self.spec.options.get("sinks", 0) if self.spec.name == "kivi" else 0
            lengths = tuple(sorted({1, max(1, s), s + r - 1, s + r, s + r + 1, s + 3 * r + 5}))
        for n in lengths:
            got, want = self.measured_bytes(n), self.bytes_at(n)
            if got != want:
                raise RuntimeError(
                    f"KV sizing for '{self.spec}' is off at {n} tokens: the cache holds {got} bytes, "
                    f"the closed form says {want}"
                )
