"""KIVI: tuning-free asymmetric 2/4-bit KV-cache quantization (Liu et al., 2024) as a transformers Cache.

Per layer, tokens live in up to three places, always concatenated in token order:

* **sinks** (optional, ``sinks=N``): the first N tokens of every sequence, kept in full precision;
* **quantized**: keys per-channel (each channel's ``group_size`` consecutive tokens share one fp16
  scale and zero), values per-token (each token's ``group_size`` consecutive channels share them),
  codes packed 4 (2-bit) or 2 (4-bit) per byte;
* **residual**: the newest tokens in full precision. Keys leave it ``residual_length`` (R) at a time
  once R are held (after a prefill of P tokens, all but the last ``P mod R`` are quantized at once);
  values leave it one token at a time, oldest first, once more than R are held.

The tokens of the current forward attend with their exact states (as in KIVI); what they left in the
cache is what later steps see. Quantized tokens are never re-quantized. Full-precision parts are stored in ``storage_dtype``
(fp16 by default for an fp32 model, else the model's dtype), so :meth:`KiviCache.nbytes` is the
true number of bytes a deployment would hold.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lowbit.quant import pack, unpack
from lowbit.quant.uniform import dequantize_codes, quantize_codes

KIVI_BITS = (2, 4, 8)


def _cat(a: torch.Tensor | None, b: torch.Tensor, dim: int = -2) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=dim)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class KiviLayer(DynamicLayer):
    """One decoder layer's KIVI cache. Tensors are [batch, kv_heads, tokens, head_dim]."""

    def __init__(
        self,
        bits: int = 2,
        group_size: int = 32,
        residual_length: int = 128,
        sinks: int = 0,
        storage_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        validate_kivi_options(bits, group_size, residual_length, sinks)
        self.bits, self.group_size, self.residual_length, self.sinks = bits, group_size, residual_length, sinks
        self.requested_storage_dtype = storage_dtype
        self._clear()

    # ----------------------------------------------------------------- state
    def _clear(self) -> None:
        self.sink_k = self.sink_v = None  # full precision, first `sinks` tokens
        self.qk_packed = self.qk_scale = self.qk_zero = None  # keys: codes packed along tokens
        self.qv_packed = self.qv_scale = self.qv_zero = None  # values: codes packed along channels
        self.res_k = self.res_v = None  # full-precision residuals
        self.n_sink = self.n_qk = self.n_qv = 0
        self.keys = self.values = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = head_dim = key_states.shape[-1]
        if head_dim % self.group_size:
            raise ValueError(
                f"KIVI group size {self.group_size} must divide the head dimension {head_dim} "
                "(values are quantized per token in groups of channels)"
            )
        if self.requested_storage_dtype is not None:
            self.storage_dtype = self.requested_storage_dtype
        else:
            self.storage_dtype = torch.float16 if self.dtype == torch.float32 else self.dtype
        self.is_initialized = True

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        n_res = 0 if self.res_k is None else self.res_k.shape[-2]
        return self.n_sink + self.n_qk + n_res

    def reset(self) -> None:
        self._clear()
        self.is_initialized = False

    # ----------------------------------------------------------------- quantization
    def _quantize_keys(self, k: torch.Tensor) -> None:
        codes, scale, zero = quantize_codes(k, self.bits, self.group_size, dim=-2)
        self.qk_packed = _cat(self.qk_packed, pack(codes, self.bits, dim=-2))
        self.qk_scale = _cat(self.qk_scale, scale)
        self.qk_zero = _cat(self.qk_zero, zero)
        self.n_qk += k.shape[-2]

    def _quantize_values(self, v: torch.Tensor) -> None:
        codes, scale, zero = quantize_codes(v, self.bits, self.group_size, dim=-1)
        self.qv_packed = _cat(self.qv_packed, pack(codes, self.bits, dim=-1))
        self.qv_scale = _cat(self.qv_scale, scale)
        self.qv_zero = _cat(self.qv_zero, zero)
        self.n_qv += v.shape[-2]

    def _assemble(self, sink, packed, scale, zero, n_quant: int, residual, dim: int) -> torch.Tensor:
        """sinks | dequantized | residual in token order, written once into one [B, H, T, D] tensor."""
        ref = next(t for t in (sink, residual, scale) if t is not None)
        total = self.get_seq_length()
        out = torch.empty(ref.shape[0], ref.shape[1], total, self.head_dim, dtype=self.dtype, device=ref.device)
        if sink is not None:
            out[..., : self.n_sink, :] = sink
        if n_quant:
            codes = unpack(packed, self.bits, dim=dim)
            view = out[..., self.n_sink : self.n_sink + n_quant, :]
            dequantize_codes(codes, scale, zero, self.group_size, dim, self.dtype, out=view)
        if residual is not None:
            out[..., self.n_sink + n_quant :, :] = residual
        return out

    def full_keys(self) -> torch.Tensor:
        """All cached keys in token order, dequantized to the model dtype."""
        return self._assemble(self.sink_k, self.qk_packed, self.qk_scale, self.qk_zero, self.n_qk, self.res_k, -2)

    def full_values(self) -> torch.Tensor:
        """All cached values in token order, dequantized to the model dtype."""
        return self._assemble(self.sink_v, self.qv_packed, self.qv_scale, self.qv_zero, self.n_qv, self.res_v, -1)

    # ----------------------------------------------------------------- Cache API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k = key_states.detach().to(self.storage_dtype)  # a cache is for inference: no autograd through codes
        v = value_states.detach().to(self.storage_dtype)
        if self.n_sink < self.sinks:
            take = min(self.sinks - self.n_sink, k.shape[-2])
            self.sink_k = _cat(self.sink_k, k[..., :take, :])
            self.sink_v = _cat(self.sink_v, v[..., :take, :])
            self.n_sink += take
            k, v = k[..., take:, :], v[..., take:, :]
        if k.shape[-2]:
            self.res_k = _cat(self.res_k, k)
            self.res_v = _cat(self.res_v, v)
            n_flush = (self.res_k.shape[-2] // self.residual_length) * self.residual_length
            if n_flush:
                self._quantize_keys(self.res_k[..., :n_flush, :])
                self.res_k = self.res_k[..., n_flush:, :].contiguous()
            excess = self.res_v.shape[-2] - self.residual_length
            if excess > 0:
                self._quantize_values(self.res_v[..., :excess, :])
                self.res_v = self.res_v[..., excess:, :].contiguous()
        # as in KIVI, the tokens of this step attend with their exact states; quantization applies from the next step
        keys, values = self.full_keys(), self.full_values()
        n = key_states.shape[-2]
        keys[..., -n:, :] = key_states
        values[..., -n:, :] = value_states
        return keys, values

    def _tensor_names(self) -> tuple[str, ...]:
        return ("sink_k", "sink_v", "qk_packed", "qk_scale", "qk_zero", "qv_packed", "qv_scale", "qv_zero", "res_k", "res_v")

    def _map_batch(self, fn) -> None:
        for name in self._tensor_names():
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t[indices, ...])

    def crop(self, max_length: int) -> None:
        """Drop the newest tokens: ``crop(-n)`` removes n; ``crop(n >= 0)`` keeps the first n (legacy form).

        Tokens removed from the quantized keys leave whole groups: the surviving tokens of a partially
        removed key group move back to the residual as their dequantized values (never re-quantized
        from their originals, which are gone).
        """
        if not self.is_initialized:
            return
        total = self.get_seq_length()
        keep = total + max_length if max_length < 0 else min(max_length, total)
        if keep >= total:
            return
        keep = max(keep, 0)
        keys, values = self.full_keys().to(self.storage_dtype), self.full_values().to(self.storage_dtype)
        # sinks
        n_sink = min(self.n_sink, keep)
        self.sink_k = keys[..., :n_sink, :] if n_sink else None
        self.sink_v = values[..., :n_sink, :] if n_sink else None
        self.n_sink = n_sink
        rest = keep - n_sink
        # keys: keep whole quantized groups, the rest goes (dequantized) to the residual
        kept_k = min(self.n_qk, (rest // self.group_size) * self.group_size)
        if kept_k < self.n_qk:
            rows = kept_k * self.bits // 8
            self.qk_packed = self.qk_packed[..., :rows, :] if kept_k else None
            g = kept_k // self.group_size
            self.qk_scale = self.qk_scale[..., :g, :] if kept_k else None
            self.qk_zero = self.qk_zero[..., :g, :] if kept_k else None
            self.n_qk = kept_k
        self.res_k = keys[..., n_sink + kept_k : keep, :] if keep > n_sink + kept_k else None
        # values: per-token, so quantized rows are dropped exactly
        kept_v = min(self.n_qv, rest)
        if kept_v < self.n_qv:
            for name in ("qv_packed", "qv_scale", "qv_zero"):
                setattr(self, name, getattr(self, name)[..., :kept_v, :] if kept_v else None)
            self.n_qv = kept_v
        self.res_v = values[..., n_sink + kept_v : keep, :] if keep > n_sink + kept_v else None

    # ----------------------------------------------------------------- accounting
    def nbytes(self) -> int:
        """True bytes held: packed codes, fp16 scales/zeros, residual and sinks."""
        return _nbytes(*(getattr(self, n) for n in self._tensor_names()))

    def nbytes_fp16(self) -> int:
        """Bytes an fp16 cache would hold for the same tokens."""
        if not self.is_initialized or self.get_seq_length() == 0:
            return 0
        ref = next(getattr(self, n) for n in self._tensor_names() if getattr(self, n) is not None)
        return 2 * 2 * ref.shape[0] * ref.shape[1] * self.get_seq_length() * self.head_dim


def validate_kivi_options(bits: int, group_size: int, residual_length: int, sinks: int) -> None:
    """Raise a ValueError naming the bad option and what is allowed."""
    if bits not in KIVI_BITS:
        raise ValueError(f"KIVI bits={bits} is not supported: allowed bit-widths are {KIVI_BITS}")
    if group_size <= 0 or group_size % (8 // bits):
        raise ValueError(f"KIVI group_size={group_size} must be a positive multiple of {8 // bits} for {bits}-bit packing")
    if residual_length <= 0 or residual_length % group_size:
        raise ValueError(
            f"KIVI residual_length={residual_length} must be a positive multiple of group_size={group_size}"
        )
    if sinks < 0:
        raise ValueError(f"KIVI sinks={sinks} must be >= 0")


class KiviCache(Cache):
    """KIVI-quantized KV cache: ``model.generate(..., past_key_values=KiviCache(model.config, bits=2))``."""

    def __init__(
        self,
        config=None,
        bits: int = 2,
        group_size: int = 32,
        residual_length: int = 128,
        sinks: int = 0,
        storage_dtype: torch.dtype | None = None,
        num_layers: int | None = None,
    ):
        validate_kivi_options(bits, group_size, residual_length, sinks)
        if num_layers is None:
            if config is None:
                raise ValueError("KiviCache needs the model config (or num_layers) to know how many layers to hold")
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        self.bits, self.group_size, self.residual_length, self.sinks = bits, group_size, residual_length, sinks
        layers = [KiviLayer(bits, group_size, residual_length, sinks, storage_dtype) for _ in range(num_layers)]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """True bytes held by the cache across all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def nbytes_fp16(self) -> int:
        """Bytes an uncompressed fp16 cache would hold for the same tokens."""
        return sum(layer.nbytes_fp16() for layer in self.layers)

    def __repr__(self) -> str:
        return (
            f"KiviCache(bits={self.bits}, group_size={self.group_size}, residual_length={self.residual_length}, "
            f"sinks={self.sinks}, layers={len(self.layers)})"
        )
