"""KIVI on CUDA without dequantizing the packed cache: buffered storage, Triton flushes, kernel decode.

:class:`FusedKiviLayer` / :class:`FusedKiviCache` keep :class:`~lowbit.kv.kivi.KiviLayer`'s format and
schedule (same attributes, same quantization) but hold tensors in preallocated, growing buffers (appends
are O(new tokens), not a ``torch.cat`` of the whole cache) and flush with the Triton quantize-and-pack
kernels. On a **decode step** (one new token, kernels available) ``update()`` stores the token and returns
the new key/value states marked for lowbit's attention function (:mod:`lowbit.kv.attention`), which then
calls :meth:`FusedKiviLayer.attend`: the Triton decode kernel reads the packed cache directly. Prefill
(several tokens) keeps the parent's path: assembled tensors, attended by SDPA/FlashAttention.
"""

from __future__ import annotations

import torch

from lowbit.kernels import triton_ready
from lowbit.kernels.reference import decode_attention_ref
from lowbit.kv.attention import attach
from lowbit.kv.kivi import KiviCache, KiviLayer
from lowbit.quant.kivi import KiviParts


class FusedKiviLayer(KiviLayer):
    """A :class:`KiviLayer` with buffered storage, Triton flushes and a kernel decode path on CUDA."""

    growth = 1.5  # capacity growth factor of the token buffers

    def __init__(self, *args, fused: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused = fused
        self._bufs: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        super().reset()
        self._bufs = {}

    # ------------------------------------------------------------------ buffered token storage
    def _offset_in_buffer(self, name: str, cur: torch.Tensor | None) -> int | None:
        buf = self._bufs.get(name)
        if buf is None or cur is None:
            return 0 if buf is not None and cur is None else None
        if cur.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr() or cur.stride() != buf.stride():
            return None
        if cur.shape[:2] != buf.shape[:2] or cur.shape[3] != buf.shape[3]:
            return None
        return (cur.storage_offset() - buf.storage_offset()) // buf.stride(2)

    def _append(self, name: str, new: torch.Tensor) -> None:
        """``getattr(self, name) = cat(current, new)`` along tokens (dim 2), amortized O(len(new))."""
        cur = getattr(self, name)
        n0 = 0 if cur is None else cur.shape[2]
        n_new = new.shape[2]
        need = n0 + n_new
        off = self._offset_in_buffer(name, cur)
        buf = self._bufs.get(name)
        fits = (
            off is not None and buf is not None and buf.shape[:2] == new.shape[:2] and buf.shape[3] == new.shape[3]
            and buf.dtype == new.dtype and buf.device == new.device
        )
        if not fits or off + need > buf.shape[2]:
            if fits and need <= buf.shape[2]:  # room at the front: compact
                keep = cur.clone() if n0 else None
            else:
                keep = cur
                cap = max(need + n_new, int(need * self.growth) + 1, 16)
                buf = new.new_empty(new.shape[0], new.shape[1], cap, new.shape[3])
                self._bufs[name] = buf
            if n0:
                buf[:, :, :n0].copy_(keep)
            off = 0
        buf[:, :, off + n0 : off + need].copy_(new)
        setattr(self, name, buf[:, :, off : off + need])

    def _drop_front(self, name: str, n: int) -> None:
        cur = getattr(self, name)
        setattr(self, name, cur[:, :, n:])

    def reserve(self, tokens: int) -> None:
        """Preallocate room for `tokens` cached tokens (avoids regrowth while decoding)."""
        if not self.is_initialized:
            raise RuntimeError("reserve() needs an initialized layer (after the first update)")
        ref = next(getattr(self, n) for n in self._tensor_names() if getattr(self, n) is not None)
        b, h, d = ref.shape[0], ref.shape[1], self.head_dim
        dev, sd = ref.device, self.storage_dtype
        per = 8 // self.bits
        shapes = {
            "qk_packed": ((tokens + per - 1) // per, d, torch.uint8),
            "qk_scale": (tokens // self.group + 1, d, torch.float16),
            "qk_zero": (tokens // self.group + 1, d, torch.float16),
            "qv_packed": (tokens, d * self.bits // 8, torch.uint8),
            "qv_scale": (tokens, d // self.group, torch.float16),
            "qv_zero": (tokens, d // self.group, torch.float16),
            "res_k": (2 * self.residual + 1, d, sd),
            "res_v": (2 * self.residual + 1, d, sd),
        }
        for name, (cap, last, dt) in shapes.items():
            cur = getattr(self, name)
            if self._bufs.get(name) is not None and self._bufs[name].shape[2] >= cap:
                continue
            buf = torch.empty(b, h, cap, last, dtype=dt, device=dev)
            n0 = 0 if cur is None else cur.shape[2]
            if n0:
                buf[:, :, :n0].copy_(cur)
                setattr(self, name, buf[:, :, :n0])
            self._bufs[name] = buf

    # ------------------------------------------------------------------ quantization (flush)
    def _pack_keys(self, k: torch.Tensor):
        if not triton_ready(k):
            return super()._pack_keys(k)
        from lowbit.kernels.kivi_quant import quantize_pack_keys

        return quantize_pack_keys(k, self.bits, self.group)

    def _pack_values(self, v: torch.Tensor):
        if not triton_ready(v):
            return super()._pack_values(v)
        from lowbit.kernels.kivi_quant import quantize_pack_values

        return quantize_pack_values(v, self.bits, self.group)

    # ------------------------------------------------------------------ Cache API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not (self.fused and key_states.shape[-2] == 1 and triton_ready(key_states)):
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._store(key_states, value_states)
        return attach(key_states.detach(), self), value_states.detach()

    def attend(self, query, key, value, attention_mask, scaling) -> torch.Tensor:
        """Decode attention of ``query [B, H_q, 1, D]`` over the packed cache: ``[B, 1, H_q, D]``."""
        from lowbit.kernels.kivi_attention import kivi_decode_attention_parts

        parts = decode_parts(self, key, value)
        start = _start_from_mask(attention_mask, parts.total)
        return kivi_decode_attention_parts(query, parts, scale=scaling, start=start)


class FusedKiviCache(KiviCache):
    """:class:`KiviCache` whose layers are :class:`FusedKiviLayer` (same arguments, plus ``fused``)."""

    layer_class = FusedKiviLayer

    def reserve(self, tokens: int) -> None:
        for layer in self.layers:
            layer.reserve(tokens)


def decode_split(layer: KiviLayer, key_states: torch.Tensor,
                 value_states: torch.Tensor | None = None) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """``(quantized keys to use, residual keys, residual values)`` a decode kernel reads after ``update()`` stored
    the newest token.

    KIVI attends the current token with its exact states. When that token's key was just flushed into the
    quantized keys (the key residual is empty), the kernel reads one quantized key less and takes the exact key
    from `key_states` instead, as :meth:`KiviLayer.update` does. When the storage dtype differs from the states'
    dtype (e.g. fp16 storage of an fp32 model), the newest residual key and value are replaced by the exact
    states too (a copy of at most R tokens, off the fast path).
    """
    n_res_k = 0 if layer.res_k is None else layer.res_k.shape[-2]
    n_res_v = 0 if layer.res_v is None else layer.res_v.shape[-2]
    exact = key_states.dtype == layer.storage_dtype
    cur_k = key_states[:, :, -1:]
    n_qk, res_k, res_v = layer.n_qk, layer.res_k, layer.res_v
    if n_res_k == 0 and layer.n_qk > 0:
        n_qk, res_k = layer.n_qk - 1, cur_k.to(layer.storage_dtype) if exact else cur_k
    elif not exact and n_res_k:
        res_k = torch.cat([layer.res_k[:, :, :-1].to(cur_k.dtype), cur_k], dim=2)
    if not exact and value_states is not None and n_res_v:
        res_v = torch.cat([layer.res_v[:, :, :-1].to(value_states.dtype), value_states[:, :, -1:]], dim=2)
    return n_qk, res_k, res_v


def decode_parts(layer: KiviLayer, key_states: torch.Tensor | None = None,
                 value_states: torch.Tensor | None = None) -> KiviParts:
    """The :class:`KiviParts` the decode kernel reads after ``update()`` stored the newest token (see :func:`decode_split`)."""
    if key_states is None:
        return layer.parts()
    n_qk, res_k, res_v = decode_split(layer, key_states, value_states)
    parts = layer.parts(n_qk=n_qk, res_k=res_k)
    parts.res_v = res_v
    return parts


def kivi_decode_attention(
    cache,
    query: torch.Tensor,
    scale: float | None = None,
    start: torch.Tensor | None = None,
    key_states: torch.Tensor | None = None,
    value_states: torch.Tensor | None = None,
    **kernel_options,
) -> torch.Tensor:
    """Decode attention of ``query [B, H_q, n_q, D]`` over a :class:`KiviLayer` (or :class:`KiviParts`).

    Returns ``[B, H_q, n_q, D]`` in the query's dtype (a transposed view of a ``[B, n_q, H_q, D]``
    buffer). On CUDA it runs the Triton kernel; elsewhere the float32 PyTorch reference.
    """
    parts = cache if isinstance(cache, KiviParts) else decode_parts(cache, key_states, value_states)
    if not triton_ready(query):
        return decode_attention_ref(query, parts, scale=scale, start=start).to(query.dtype)
    from lowbit.kernels.kivi_attention import kivi_decode_attention_parts

    return kivi_decode_attention_parts(query, parts, scale=scale, start=start, **kernel_options).transpose(1, 2)


def _start_from_mask(mask: torch.Tensor | None, total: int) -> torch.Tensor | None:
    """First attended position per sequence from a 4D mask (bool, or additive float), left padding."""
    if mask is None or not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return None
    row = mask[:, 0, -1, -total:]
    allowed = row if row.dtype == torch.bool else row == 0
    return allowed.to(torch.int8).argmax(dim=-1).to(torch.int32)
