"""NVIDIA kvpress interoperability (optional extra ``lowbit[kvpress]``; tested with kvpress 0.5.5).

* :func:`press_kivi_cache` -- a KIVI cache any kvpress press can prune: the prefill's exact states stay readable and
  writable as ``layer.keys``/``layer.values`` until the next forward (what kvpress's hooks read and replace), and are
  then stored in KIVI's format, so the states the press *kept* are the ones quantized. Pass it as kvpress pipeline's
  ``cache=`` (or as the model's cache under ``with press(model)``).
* :class:`KVMergerPress` -- lowbit's KVMerger (heavy hitters protected, adaptive threshold, Gaussian merge) as a
  kvpress press: ``pipe(context, question=q, press=KVMergerPress(compression_ratio=0.5))``.
* :func:`kvpress_compat` -- kvpress 0.5.5's hooks read ``past_key_values`` and ``cache_position`` from the attention
  call; transformers >= 5.2x passes ``cache`` and no cache position, so every press fails there with
  ``KeyError: 'past_key_values'``. Inside ``with kvpress_compat(model)`` a pre-hook on each attention module adds both.
  kvpress's pipeline itself still passes ``past_key_values=`` to the model (transformers warns; not lowbit's doing).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lowbit.kv.kivi import KiviCache, KiviLayer
from lowbit.kv.merging import make_kvmerger_policy
from lowbit.kv.registry import parse_kv_spec

try:
    from kvpress import BasePress
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("kvpress is not installed: pip install --no-deps kvpress==0.5.5 && pip install 'lowbit[kvpress]'") from exc


class _HookKwargs(dict):
    """The attention call's keyword arguments as the hooks see them: ``past_key_values`` answers with ``cache``
    without being a key, so the forward itself (which gets ``**kwargs``) never sees the deprecated name."""

    def __missing__(self, key):
        if key == "past_key_values" and "cache" in self:
            return self["cache"]
        raise KeyError(key)

    def get(self, key, default=None):
        return self[key] if key in self or (key == "past_key_values" and "cache" in self) else default


@contextmanager
def kvpress_compat(model):
    """Give kvpress's hooks the ``past_key_values`` and ``cache_position`` arguments newer transformers no longer pass."""

    def pre(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None:
            return None
        kwargs = _HookKwargs(kwargs)
        if kwargs.get("cache_position") is None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            past = cache.get_seq_length(module.layer_idx)
            kwargs["cache_position"] = torch.arange(past, past + hidden.shape[1], device=hidden.device)
        return args, kwargs

    hooks = [layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True) for layer in model.model.layers]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


class PressKiviLayer(KiviLayer):
    """KIVI storage with a window in which a press may replace the states: a forward into an empty layer (the
    prefill) is held exactly as ``keys``/``values``; the next update (or a byte count) stores what is there then."""

    def _clear(self) -> None:
        super()._clear()
        self._pending = None

    @property
    def keys(self):
        pending = getattr(self, "_pending", None)
        if pending is not None:
            return pending[0]
        return self.full_keys() if self.is_initialized and self.get_seq_length() else None

    @keys.setter
    def keys(self, value) -> None:
        self._replace(0, value)

    @property
    def values(self):
        pending = getattr(self, "_pending", None)
        if pending is not None:
            return pending[1]
        return self.full_values() if self.is_initialized and self.get_seq_length() else None

    @values.setter
    def values(self, value) -> None:
        self._replace(1, value)

    def _replace(self, which: int, value) -> None:
        if value is None:  # KiviLayer's own bookkeeping (``self.keys = None``)
            return
        if getattr(self, "_pending", None) is None:  # a press rewriting stored states: hold them exactly again
            self._pending = [self.full_keys(), self.full_values()]
        self._pending[which] = value

    def commit(self) -> None:
        """Store the held states in KIVI's format (quantized past the residual window)."""
        if getattr(self, "_pending", None) is None:
            return
        k, v = self._pending
        self._pending = None
        self._clear()
        self._store(k, v)

    def get_seq_length(self) -> int:
        pending = getattr(self, "_pending", None)
        return pending[0].shape[-2] if pending is not None else super().get_seq_length()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.commit()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if super().get_seq_length() == 0:
            self._pending = [key_states.detach(), value_states.detach()]
            return key_states, value_states
        return super().update(key_states, value_states, *args, **kwargs)

    def nbytes(self) -> int:
        self.commit()
        return super().nbytes()

    def nbytes_fp16(self) -> int:
        self.commit()
        return super().nbytes_fp16()


class PressKiviCache(KiviCache):
    layer_class = PressKiviLayer


def press_kivi_cache(model, spec: str = "kivi:bits=2") -> PressKiviCache:
    """A :class:`PressKiviCache` for `model` from a ``kivi:...`` spec (bits, group, residual, sinks)."""
    parts = parse_kv_spec(spec)
    if len(parts) != 1 or parts[0].name != "kivi":
        raise ValueError(f"'{spec}': a press runs over plain KIVI storage, give a kivi:... spec")
    o = parts[0].options
    return PressKiviCache(model.config, bits=o["bits"], group=o["group"], residual=o["residual"], sinks=o["sinks"])


def prefill_attention_scores(module, hidden_states: torch.Tensor, keys: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """H2O's scores [B, kv_heads, n]: the attention every prefill query gives each key, summed over the query heads
    of each KV head (queries recomputed from the layer's input, RoPE applied as the model does)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, n, _ = hidden_states.shape
    D, Hkv = keys.shape[-1], keys.shape[1]
    q = module.q_proj(hidden_states).view(B, n, -1, D).transpose(1, 2)
    cos, sin = kwargs["position_embeddings"]
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    q = q[..., -n:, :].float()
    G = q.shape[1] // Hkv
    k = keys.float().repeat_interleave(G, dim=1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(D)  # [B, Hq, n, n]
    causal = torch.ones(n, keys.shape[-2], dtype=torch.bool, device=keys.device).tril(keys.shape[-2] - n)
    attn = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    return attn.sum(-2).view(B, Hkv, G, -1).sum(2)


@dataclass
class KVMergerPress(BasePress):
    """lowbit's KVMerger as a kvpress press: keeps ``1 - compression_ratio`` of the states; `sinks` first and `window`
    last states as they are, the middle merged into sets of similar consecutive keys (`protect`: the fraction of the
    merged slots kept for unmerged heavy hitters; `sigma` 0 = adaptive Gaussian width)."""

    compression_ratio: float = 0.0
    sinks: int = 4
    window: int = 32
    protect: float = 0.5
    sigma: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.compression_ratio < 1.0:
            raise ValueError(f"compression_ratio={self.compression_ratio} must be in [0, 1)")
        if self.sinks < 0 or self.window < 0 or not 0.0 <= self.protect <= 0.5 or self.sigma < 0:
            raise ValueError("sinks and window must be >= 0, protect in [0, 0.5], sigma >= 0")

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        n = keys.shape[-2]
        keep = max(1, round(n * (1.0 - self.compression_ratio)))
        m = keep - self.sinks - self.window
        if self.compression_ratio == 0 or m < 1 or n <= keep:
            return keys, values
        scores = prefill_attention_scores(module, hidden_states, keys, kwargs)
        mid = slice(self.sinks, n - self.window)
        positions = torch.arange(n, device=keys.device).expand(*keys.shape[:2], n)
        mk, mv, _, _ = make_kvmerger_policy(self.sigma, self.protect)(
            keys[..., mid, :], values[..., mid, :], scores[..., mid], positions[..., mid], m)
        keys = torch.cat([keys[..., : self.sinks, :], mk, keys[..., n - self.window :, :]], dim=-2)
        values = torch.cat([values[..., : self.sinks, :], mv, values[..., n - self.window :, :]], dim=-2)
        return keys, values
