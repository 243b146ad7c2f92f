"""KV caches under a memory budget: a shared layer that keeps at most ``budget x tokens seen`` states per head.

One :class:`BudgetLayer` per decoder layer holds the *kept* states of every KV head, in token order:

* the first ``sinks`` tokens (attention sinks), never compressed;
* a compressed middle (evicted by StreamingLLM/H2O, merged by KVMerger);
* the ``window`` most recent tokens, never compressed.

**Size.** With N tokens seen, the target is ``T(N) = min(N, max(floor(budget*N), sinks+window))`` states per
head. After an update of several tokens (a prefill) the layer is compressed to T(N) as soon as it holds more; during
decoding it is compressed back to T(N) only once it holds more than ``T(N) + slack`` (amortises the compression
cost). So the cache always holds at most ``max(floor(budget*N), sinks+window) + slack`` states per head, and
``budget=1.0`` never compresses anything (it is exactly the uncompressed cache).

**Per-head lengths.** Every head keeps the same number of states by construction (H2O takes the same top-k per
head, KVMerger picks exactly the same number of merging sets per head), so keys/values stay dense
``[batch, kv_heads, kept, head_dim]`` tensors and attention never sees an invalid slot. Which tokens are kept (or
which sets are merged) differs per head.

**Positions.** HF Llama caches keys *after* RoPE, so kept (and merged) keys keep their rotary positions. The layer
reports ``get_seq_length() = N`` (tokens seen), which is what the model uses for the new tokens' position ids, while
``get_mask_sizes(q)`` returns ``(kept + q, N - kept)``: the mask covers exactly the states ``update`` returns, and the
offset ``N - kept`` makes every kept state visible to every new query and the new tokens causal among themselves
(the same construction transformers uses for its sliding-window layers). ``update`` returns the states *before*
compression (what the current forward attends to), then compresses what is stored for the next forward; all layers
compress on the same schedule, so the one mask built per forward fits every layer.

**Attention scores** (every method but StreamingLLM). Each kept state carries an fp32 score (counted in ``nbytes``),
computed from the attention probabilities that queries give it, summed over the query heads of a GQA group. Which
queries count is the method's *scorer*:

* ``all`` (H2O, KVMerger): every query ever seen -- the column sums of the prefill's causal attention matrix,
  computed in chunks of query rows (never the whole ``n x n`` matrix at once), then each decoding step's query
  added: the accumulated attention of H2O.
* ``window`` (SnapKV): only the last ``obs`` queries of a multi-token update (the observation window), then each
  decoding step's query.
* ``last`` (TOVA): the attention of the most recent query only; each update replaces the scores.

The queries (post-RoPE) reach the layer explicitly: ``update`` marks the keys it returns
(:func:`lowbit.kv.attention.attach`) and lowbit's attention function hands the attention call's queries to
:meth:`BudgetLayer.observe_queries`, which scores and compresses. This route is taken when the cache is built with
the model (``make_cache(spec, config, model)`` switches the model to that function); without it (or with
``scores=keys``) the keys stand in for the queries, inside ``update``.

**Freezing** (the ``context`` protocol). :meth:`BudgetCache.freeze` stops all further compression: a context is
prefilled and compressed to its budget, then the question and the answer are appended outside the budget, as
kvpress does.

**Composition.** ``<budget method>+kivi:...`` stores the kept states through a :class:`~lowbit.kv.kivi.KiviLayer`
(sinks in fp16, quantized body, full-precision residual); a compression re-quantizes the new kept set.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lowbit.kv.attention import attach, use_lowbit_attention
from lowbit.kv.kivi import KiviLayer
from lowbit.kv.registry import CacheContext, KVMethod, KVShape
from lowbit.quant.kivi import KiviFormat
from lowbit.spec import MethodSpec, Param, ParsedSpec

# A policy turns the middle of the kept states into exactly `m` states per head:
# policy(keys, values, scores, positions, m) -> (keys, values, scores, positions), tensors [B, H, n(, D)].
Policy = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, int], tuple]

SCORERS = ("all", "window", "last")  # which queries score the states (see the module docstring)
CHUNK_ELEMENTS = 1 << 22  # attention probabilities materialised at once when scoring a long chunk (16 MiB fp32)


def validate_budget_options(budget: float, sinks: int = 0, window: int = 0, slack: int = 0, obs: int = 1) -> None:
    """Raise a ValueError naming the bad option and what is allowed."""
    if not (isinstance(budget, (int, float)) and 0.0 < budget <= 1.0) or math.isnan(budget):
        raise ValueError(f"budget={budget} is not allowed: give the fraction of tokens kept, in (0, 1]")
    for name, value, low in (("sinks", sinks, 0), ("window", window, 0), ("slack", slack, 0), ("obs", obs, 1)):
        if int(value) != value or value < low:
            raise ValueError(f"{name}={value} must be an integer >= {low}")


def target_size(n_seen: int, budget: float, sinks: int, window: int) -> int:
    """States per head a budget cache compresses to after seeing `n_seen` tokens."""
    if budget >= 1.0:
        return n_seen
    return min(n_seen, max(int(math.floor(budget * n_seen)), sinks + window))


class _PlainStore:
    """Kept states in the model's dtype; bytes counted as fp16 (the convention of ``cache_nbytes``)."""

    def __init__(self):
        self.keys = self.values = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=-2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=-2)
        return self.keys, self.values

    def full(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.keys, self.values

    def replace(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys, self.values = k.contiguous(), v.contiguous()

    def map(self, fn) -> None:
        if self.keys is not None:
            self.keys, self.values = fn(self.keys), fn(self.values)

    def nbytes(self) -> int:
        return 0 if self.keys is None else 2 * (self.keys.numel() + self.values.numel())


class _KiviStore:
    """Kept states stored through KIVI (see :mod:`lowbit.kv.kivi`); a replace re-quantizes them."""

    def __init__(self, bits: int, group: int, residual: int, sinks: int):
        self.layer = KiviLayer(bits, group, residual, sinks)

    def update(self, k, v):
        return self.layer.update(k, v)

    def full(self):
        if not self.layer.is_initialized or self.layer.get_seq_length() == 0:
            return None, None
        return self.layer.full_keys(), self.layer.full_values()

    def replace(self, k, v) -> None:
        self.layer.reset()
        self.layer.update(k, v)

    def map(self, fn) -> None:
        if self.layer.is_initialized:
            self.layer._map_batch(fn)

    def nbytes(self) -> int:
        return self.layer.nbytes()


class BudgetLayer(DynamicLayer):
    """One decoder layer of a budget cache (see the module docstring). Tensors are [batch, kv_heads, tokens, dim]."""

    def __init__(
        self,
        policy: Policy,
        budget: float,
        sinks: int = 4,
        window: int = 32,
        slack: int = 16,
        obs: int = 32,
        scorer: str | None = "window",
        scores_from: str = "queries",
        accumulate: str = "sum",
        store: str | dict = "plain",
    ):
        super().__init__()
        validate_budget_options(budget, sinks, window, slack, obs)
        if scores_from not in ("queries", "keys"):
            raise ValueError(f"scores={scores_from!r}: allowed values are 'queries' and 'keys'")
        if scorer is not None and scorer not in SCORERS:
            raise ValueError(f"scorer={scorer!r}: allowed values are {', '.join(SCORERS)} (or None for no scores)")
        self.policy, self.budget, self.sinks, self.window, self.slack, self.obs = policy, budget, sinks, window, slack, obs
        if accumulate not in ("sum", "mean"):
            raise ValueError(f"accumulate={accumulate!r}: allowed values are 'sum' and 'mean'")
        self.scorer, self.scores_from, self.accumulate = scorer, scores_from, accumulate
        self.frozen = False  # freeze(): no more compression (the context protocol)
        self.store_spec = store
        self._clear()

    def _new_store(self):
        if self.store_spec == "plain":
            return _PlainStore()
        o = self.store_spec
        return _KiviStore(o["bits"], o["group"], o["residual"], self.sinks)

    def _clear(self) -> None:
        self.store = self._new_store()
        self.scores = None  # [B, H, kept] float32 accumulated attention
        self.positions = None  # [B, H, kept] int64 token index of each kept state (the pivot for merged ones)
        self.n_seen = 0
        self.n_compressions = 0
        self.seconds = {"score": 0.0, "compress": 0.0}  # wall time spent scoring and compressing
        self.query_source = None  # "queries" or "keys": what scored the states last
        self._pending = None  # (keys, values, n): stored states awaiting the attention call's queries
        self.keys = self.values = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = key_states.shape[-1]
        self.is_initialized = True

    def reset(self) -> None:
        self._clear()
        self.is_initialized = False

    # ----------------------------------------------------------------- sizes
    def get_seq_length(self) -> int:
        """Tokens seen (drives the new tokens' positions), not states kept."""
        return self.n_seen if self.is_initialized else 0

    def n_kept(self) -> int:
        return 0 if self.positions is None else self.positions.shape[-1]

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        """(kept + q, seen - kept): the mask spans exactly the states returned by ``update``."""
        q = query_length if isinstance(query_length, int) else int(query_length.shape[-1])
        kept = self.n_kept()
        return kept + q, self.get_seq_length() - kept

    def target(self, n_seen: int | None = None) -> int:
        return target_size(self.n_seen if n_seen is None else n_seen, self.budget, self.sinks, self.window)

    @property
    def needs_scores(self) -> bool:
        return self.scorer is not None

    # ----------------------------------------------------------------- scores
    @staticmethod
    def attention_mass(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Attention probabilities that the queries `q` [B, Hq, nq, D] (the last nq of the C states in `keys`
        [B, H, C, D], causal) give each state, summed over the queries and the query heads of each KV head: [B, H, C].

        Computed in chunks of query rows (at most ``CHUNK_ELEMENTS`` probabilities at once), so scoring a whole
        prefill costs ``nq x C`` work per head but never materialises the ``nq x C`` matrix in one piece."""
        B, Hq, nq, D = q.shape
        H, C = keys.shape[1], keys.shape[-2]
        group = Hq // H
        kt = keys.float().transpose(-1, -2)  # [B, H, D, C]
        qf = q.float().reshape(B, H, group, nq, D) / math.sqrt(D)
        cols = torch.arange(C, device=keys.device)
        mass = torch.zeros(B, H, C, dtype=torch.float32, device=keys.device)
        rows = max(1, CHUNK_ELEMENTS // max(1, B * Hq * C))
        for a in range(0, nq, rows):
            b = min(nq, a + rows)
            seen = C - nq + b  # query i of the last nq sits at state index C - nq + i and sees states <= that
            logits = qf[..., a:b, :].reshape(B, H, group * (b - a), D) @ kt[..., :seen]  # [B, H, group*(b-a), seen]
            qpos = torch.arange(C - nq + a, seen, device=keys.device).repeat(group)
            logits.masked_fill_(cols[None, :seen] > qpos[:, None], float("-inf"))
            mass[..., :seen] += torch.softmax(logits, dim=-1).sum(dim=-2)
        return mass

    # ----------------------------------------------------------------- Cache API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._pending is not None:
            raise RuntimeError(
                f"this cache scores states with the attention queries, but the last forward never delivered them: "
                "build it with make_cache(spec, config, model) (which switches the model to lowbit's attention "
                "function), or use the option scores=keys"
            )
        B, H, n, _ = key_states.shape
        keys, values = self.store.update(key_states, value_states)
        pos = torch.arange(self.n_seen, self.n_seen + n, device=key_states.device).expand(B, H, n)
        self.positions = pos.clone() if self.positions is None else torch.cat([self.positions, pos], dim=-1)
        self.n_seen += n
        self.keys, self.values = keys, values
        if self.needs_scores:
            zeros = torch.zeros(B, H, n, dtype=torch.float32, device=key_states.device)
            self.scores = zeros if self.scores is None else torch.cat([self.scores, zeros], dim=-1)
            if self.scores_from == "queries":  # scored by observe_queries, called by the attention function
                self._pending = (keys, values, n)
                return attach(keys, self), values
            self.query_source = "keys"
            self._score(key_states, keys, n)
        self._maybe_compress(keys, values, n)
        return keys, values

    def observe_queries(self, query: torch.Tensor) -> None:
        """The attention call's queries ``[B, H_q, n, D]`` for the states the last ``update`` stored: score, then compress."""
        if self._pending is None:
            return
        keys, values, n = self._pending
        self._pending = None
        self.query_source = "queries"
        self._score(query, keys, n)
        self._maybe_compress(keys, values, n)

    def _score(self, q: torch.Tensor, keys: torch.Tensor, n: int) -> None:
        """Add (``last``: set) the attention of the new chunk's scoring queries (`q`: its n queries) to the scores."""
        t0 = time.perf_counter()
        if self.scorer == "last":
            self.scores = self.attention_mass(q[..., -1:, :], keys)
        else:
            rows = n if self.scorer == "all" or n == 1 else min(self.obs, n)
            self.scores += self.attention_mass(q[..., n - rows :, :], keys)
        self.seconds["score"] += time.perf_counter() - t0

    def _maybe_compress(self, keys: torch.Tensor, values: torch.Tensor, n: int) -> None:
        kept, target = keys.shape[-2], self.target()
        if self.frozen:
            return
        if kept > target and (n > 1 or kept > target + self.slack):
            t0 = time.perf_counter()
            self._compress(keys, values, target)
            self.keys, self.values = self.store.full()
            self.seconds["compress"] += time.perf_counter() - t0

    def _compress(self, keys: torch.Tensor, values: torch.Tensor, target: int) -> None:
        kept = keys.shape[-2]
        lo, hi = min(self.sinks, kept), max(min(self.sinks, kept), kept - self.window)
        m = target - lo - (kept - hi)
        if m < 0:  # target below sinks + window can only happen when N < sinks + window: nothing to drop
            return
        scores = None if self.scores is None else self.scores[..., lo:hi]
        if scores is not None and self.accumulate == "mean":  # per query that could see the state (kvpress's H2O)
            scores = scores / (self.n_seen - self.positions[..., lo:hi]).clamp_min(1)
        mk, mv, ms, mp = self.policy(keys[..., lo:hi, :], values[..., lo:hi, :], scores, self.positions[..., lo:hi], m)
        if ms is not None and self.accumulate == "mean":  # store sums again (exact for kept states)
            ms = ms * (self.n_seen - mp).clamp_min(1)
        cat = lambda a, mid: torch.cat([a[..., :lo, :], mid, a[..., hi:, :]], dim=-2)  # noqa: E731
        self.store.replace(cat(keys, mk.to(keys.dtype)), cat(values, mv.to(values.dtype)))
        self.positions = torch.cat([self.positions[..., :lo], mp, self.positions[..., hi:]], dim=-1)
        if self.scores is not None:
            self.scores = torch.cat([self.scores[..., :lo], ms.float(), self.scores[..., hi:]], dim=-1)
        self.n_compressions += 1

    def _map(self, fn) -> None:
        if not self.is_initialized:
            return
        self.store.map(fn)
        if self.scores is not None:
            self.scores = fn(self.scores)
        if self.positions is not None:
            self.positions = fn(self.positions)
        self.keys, self.values = self.store.full()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a budget KV cache cannot be cropped (compressed states cannot be rolled back)")

    def offload(self):  # states live in the store; nothing to move separately
        pass

    def prefetch(self):
        pass

    # ----------------------------------------------------------------- accounting
    def nbytes(self) -> int:
        """Bytes held: kept keys/values (fp16, or KIVI's packed codes) plus fp32 accumulated scores."""
        scores = 0 if self.scores is None else self.scores.numel() * 4
        return self.store.nbytes() + scores

    def nbytes_fp16(self) -> int:
        """Bytes an uncompressed fp16 cache of all tokens seen would hold."""
        if self.positions is None:
            return 0
        B, H = self.positions.shape[:2]
        return 2 * 2 * B * H * self.n_seen * self.head_dim


class BudgetCache(Cache):
    """A cache of :class:`BudgetLayer` (one per decoder layer) sharing one policy."""

    def __init__(self, config=None, num_layers: int | None = None, name: str = "budget", **layer_kwargs):
        if num_layers is None:
            if config is None:
                raise ValueError("a budget cache needs the model config (or num_layers) to know how many layers to hold")
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        self.name, self.options = name, {k: v for k, v in layer_kwargs.items() if k != "policy"}
        super().__init__(layers=[BudgetLayer(**layer_kwargs) for _ in range(num_layers)])

    def seconds(self) -> dict[str, float]:
        """Wall time all layers spent scoring states and compressing them."""
        return {k: sum(layer.seconds[k] for layer in self.layers) for k in ("score", "compress")}

    def freeze(self) -> None:
        """Stop compressing: every later token is kept, outside the budget (the ``context`` protocol)."""
        for layer in self.layers:
            layer.frozen = True

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def nbytes_fp16(self) -> int:
        return sum(layer.nbytes_fp16() for layer in self.layers)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"BudgetCache({self.name}: {opts}, layers={len(self.layers)})"


# ------------------------------------------------------------------------------ registration helpers


def budget_params(sinks: int, window: int | None, scorer: str | None) -> dict[str, Param]:
    """The options every budget method shares (``window`` None: the method has no recent window; ``scorer`` one of
    :data:`SCORERS`, or None for a method without scores; ``window`` scorers get the ``obs`` option)."""
    params = {
        "budget": Param(float, 0.5, aliases=("b",), check=lambda b: 0.0 < b <= 1.0, allowed="a fraction of the tokens seen in (0, 1]"),
        "sinks": Param(int, sinks, check=lambda s: s >= 0, allowed="an integer >= 0"),
    }
    if window is not None:
        params["window"] = Param(int, window, aliases=("recent",), check=lambda w: w >= 0, allowed="an integer >= 0")
    params["slack"] = Param(int, 16, check=lambda s: s >= 0, allowed="an integer >= 0 (states over budget before decoding recompresses)")
    if scorer == "window":
        params["obs"] = Param(int, 32, check=lambda o: o >= 1, allowed="an integer >= 1 (prefill queries that score the prompt)")
    if scorer == "all":
        params["accumulate"] = Param(str, "sum", check=lambda a: a in ("sum", "mean"),
                                     allowed="'sum' (H2O) or 'mean' (divided by the queries that saw the state, as kvpress)")
    if scorer is not None:
        params["scores"] = Param(str, "queries", check=lambda s: s in ("queries", "keys"), allowed="'queries' or 'keys'")
    return params


def _store_options(store: ParsedSpec | None) -> str | dict:
    if store is None:
        return "plain"
    options = dict(store.options)
    if "residual" not in store.given:
        options["residual"] = options["group"]  # a small fp16 residual by default: kept sets are short
    return options


def max_kept(options: dict, n_tokens: int) -> int:
    """The most states per head a budget cache holds after `n_tokens` tokens: ``T(N) + slack + 1`` (the
    state that triggers a recompression included), at most N."""
    if n_tokens <= 0:
        return 0
    o = options
    target = target_size(n_tokens, o["budget"], o["sinks"], o.get("window", 0))
    return min(n_tokens, target + o["slack"] + 1)


def budget_method(
    name: str, policy: Callable[[dict], Policy], help: str, params: dict[str, Param], scorer: str | None = None
) -> KVMethod:
    """A :class:`~lowbit.kv.registry.KVMethod` for a budget cache whose compression is ``policy(options)`` and whose
    states are scored by ``scorer`` (see :data:`SCORERS`; None: no scores)."""
    scored = scorer is not None
    if scored != ("scores" in params):
        raise ValueError(f"{name}: a method with a scorer needs the 'scores' option (budget_params(..., scorer))")

    def make(part: ParsedSpec, ctx: CacheContext, store: ParsedSpec | None) -> BudgetCache:
        o = part.options
        queries = scored and o["scores"] == "queries" and ctx.model is not None
        if queries:
            use_lowbit_attention(ctx.model)
        return BudgetCache(
            ctx.config, name=part.name, policy=policy(o), budget=o["budget"], sinks=o["sinks"], window=o.get("window", 0),
            slack=o["slack"], obs=o.get("obs", 1), scorer=scorer, scores_from="queries" if queries else "keys",
            accumulate=o.get("accumulate", "sum"),
            store=_store_options(store),
        )

    def nbytes(o: dict, shape: KVShape, n: int, store: ParsedSpec | None) -> int:
        kept = max_kept(o, n)
        if store is None:
            held = kept * shape.fp16_bytes_per_token
        else:
            s = _store_options(store)
            fmt = KiviFormat(s["bits"], s["group"], s["residual"], o["sinks"])
            held = fmt.peak_nbytes(kept, shape.kv_heads, shape.head_dim, shape.store_bytes)
        scores = 4 * shape.kv_heads * kept if scored else 0
        return shape.layers * (held + scores)

    return KVMethod(MethodSpec(name, params, help), make, nbytes, takes_store=True, exact=False)
