"""Plugging the kernels into transformers and lowbit modules.

KIVI decode on CUDA, without ever dequantizing the packed cache to a full copy:

* :class:`FusedKiviLayer` / :class:`FusedKiviCache` subclass :class:`lowbit.kv.kivi.KiviLayer` /
  ``KiviCache``. Storage is the same (same attributes, same quantization), but tensors live in
  preallocated, growing buffers (appends are O(new tokens), not a ``torch.cat`` of the whole cache),
  flushes run the Triton quantize-and-pack kernels, and on a **decode step** (one new token, CUDA)
  ``update()`` stores the token and returns the new key/value states *tagged* with the layer instead
  of assembling dequantized ``[B, H, T, D]`` tensors. Prefill (several tokens) keeps the parent's path:
  assembled tensors, attended by SDPA/FlashAttention.
* :func:`kivi_attention_forward` is registered in transformers' ``AttentionInterface`` as
  ``"lowbit_kivi"`` (:func:`register_kivi_attention`); when the key it receives is tagged it calls the
  Triton decode kernel on the packed cache, otherwise it defers to SDPA.
* :func:`use_kivi_kernels` registers the function and switches a model to it.

FMPQ / W4A8 :class:`~lowbit.wa.linear.QuantLinear` on CUDA: :func:`quant_linear_forward`.
"""

from __future__ import annotations

import os

import torch

from lowbit.kernels.reference import KiviParts, kivi_parts
from lowbit.kv.kivi import KiviCache, KiviLayer

ATTN_NAME = "lowbit_kivi"
_TAG = "_lowbit_kivi_layer"


def _triton_ok(t: torch.Tensor) -> bool:
    """Kernels run on CUDA tensors (or anywhere under ``TRITON_INTERPRET=1``, for testing)."""
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------- KIVI cache


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
            "qk_scale": (tokens // self.group_size + 1, d, torch.float16),
            "qk_zero": (tokens // self.group_size + 1, d, torch.float16),
            "qv_packed": (tokens, d * self.bits // 8, torch.uint8),
            "qv_scale": (tokens, d // self.group_size, torch.float16),
            "qv_zero": (tokens, d // self.group_size, torch.float16),
            "res_k": (2 * self.residual_length + 1, d, sd),
            "res_v": (2 * self.residual_length + 1, d, sd),
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
    def _quantize_keys(self, k: torch.Tensor) -> None:
        if not _triton_ok(k):
            return super()._quantize_keys(k)
        from lowbit.kernels.kivi_quant import quantize_pack_keys

        packed, scale, zero = quantize_pack_keys(k, self.bits, self.group_size)
        self._append("qk_packed", packed)
        self._append("qk_scale", scale)
        self._append("qk_zero", zero)
        self.n_qk += k.shape[-2]

    def _quantize_values(self, v: torch.Tensor) -> None:
        if not _triton_ok(v):
            return super()._quantize_values(v)
        from lowbit.kernels.kivi_quant import quantize_pack_values

        packed, scale, zero = quantize_pack_values(v, self.bits, self.group_size)
        self._append("qv_packed", packed)
        self._append("qv_scale", scale)
        self._append("qv_zero", zero)
        self.n_qv += v.shape[-2]

    # ------------------------------------------------------------------ Cache API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not (self.fused and key_states.shape[-2] == 1 and _triton_ok(key_states)):
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k = key_states.detach().to(self.storage_dtype)
        v = value_states.detach().to(self.storage_dtype)
        if self.n_sink < self.sinks:
            self._append("sink_k", k)
            self._append("sink_v", v)
            self.n_sink += 1
        else:
            self._append("res_k", k)
            self._append("res_v", v)
            n_flush = (self.res_k.shape[-2] // self.residual_length) * self.residual_length
            if n_flush:
                self._quantize_keys(self.res_k[:, :, :n_flush])
                self._drop_front("res_k", n_flush)
            excess = self.res_v.shape[-2] - self.residual_length
            if excess > 0:
                self._quantize_values(self.res_v[:, :, :excess])
                self._drop_front("res_v", excess)
        kh, vh = key_states.detach(), value_states.detach()
        setattr(kh, _TAG, self)
        setattr(vh, _TAG, self)
        return kh, vh


class FusedKiviCache(KiviCache):
    """:class:`KiviCache` whose layers are :class:`FusedKiviLayer` (same arguments)."""

    def __init__(self, config=None, bits: int = 2, group_size: int = 32, residual_length: int = 128, sinks: int = 0,
                 storage_dtype: torch.dtype | None = None, num_layers: int | None = None, fused: bool = True):
        super().__init__(config, bits, group_size, residual_length, sinks, storage_dtype, num_layers)
        self.layers = [
            FusedKiviLayer(bits, group_size, residual_length, sinks, storage_dtype, fused=fused) for _ in self.layers
        ]

    def reserve(self, tokens: int) -> None:
        for layer in self.layers:
            layer.reserve(tokens)

    def __repr__(self) -> str:
        return "Fused" + super().__repr__()


def decode_parts(layer: KiviLayer, key_states: torch.Tensor | None = None,
                 value_states: torch.Tensor | None = None) -> KiviParts:
    """The parts the decode kernel reads after ``update()`` stored the newest token.

    KIVI attends the current token with its exact states. When that token's key was just flushed
    into the quantized keys (the residual is empty), the kernel reads one quantized key less and takes
    the exact key from `key_states` instead, as :meth:`KiviLayer.update` does. When the storage dtype
    differs from the states' dtype (e.g. fp16 storage of an fp32 model), the newest residual key and
    value are replaced by the exact states too (a copy of at most R tokens, off the fast path).
    """
    n_res_k = 0 if layer.res_k is None else layer.res_k.shape[-2]
    n_res_v = 0 if layer.res_v is None else layer.res_v.shape[-2]
    if key_states is None:
        return kivi_parts(layer)
    exact = key_states.dtype == layer.storage_dtype
    cur_k = key_states[:, :, -1:]
    if n_res_k == 0 and layer.n_qk > 0:
        parts = kivi_parts(layer, n_qk=layer.n_qk - 1, res_k=cur_k.to(layer.storage_dtype) if exact else cur_k)
    elif not exact and n_res_k:
        parts = kivi_parts(layer, res_k=torch.cat([layer.res_k[:, :, :-1].to(cur_k.dtype), cur_k], dim=2))
    else:
        parts = kivi_parts(layer)
    if not exact and value_states is not None and n_res_v:
        parts.res_v = torch.cat([layer.res_v[:, :, :-1].to(value_states.dtype), value_states[:, :, -1:]], dim=2)
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
    if not _triton_ok(query):
        from lowbit.kernels.reference import decode_attention_ref

        return decode_attention_ref(query, parts, scale=scale, start=start).to(query.dtype)
    from lowbit.kernels.kivi_attention import kivi_decode_attention_parts

    return kivi_decode_attention_parts(query, parts, scale=scale, start=start, **kernel_options).transpose(1, 2)


# ---------------------------------------------------------------------------------- transformers


def _start_from_mask(mask: torch.Tensor | None, total: int) -> torch.Tensor | None:
    """First attended position per sequence from a 4D mask (bool, or additive float), left padding."""
    if mask is None or not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return None
    row = mask[:, 0, -1, -total:]
    allowed = row if row.dtype == torch.bool else row == 0
    return allowed.to(torch.int8).argmax(dim=-1).to(torch.int32)


def kivi_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: Triton KIVI decode on tagged keys, SDPA otherwise."""
    layer = getattr(key, _TAG, None)
    if layer is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    from lowbit.kernels.kivi_attention import kivi_decode_attention_parts

    parts = decode_parts(layer, key, value)
    start = _start_from_mask(attention_mask, parts.total)
    out = kivi_decode_attention_parts(query, parts, scale=scaling, start=start)  # [B, n_q, H_q, D]
    return out, None


def register_kivi_attention(name: str = ATTN_NAME) -> str:
    """Register :func:`kivi_attention_forward` (and SDPA's mask builder) under `name`; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, kivi_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def use_kivi_kernels(model) -> None:
    """Register the attention function and switch `model` to it (prefill still runs SDPA)."""
    name = register_kivi_attention()
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(name)
            return
        except Exception:  # older/newer transformers may validate differently: fall back to the config
            pass
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None:
            cfg._attn_implementation = name


# ---------------------------------------------------------------------------------- QuantLinear


def supports_quant_linear(ql) -> bool:
    """Whether :func:`quant_linear_forward` can run this :class:`~lowbit.wa.linear.QuantLinear`."""
    cfg = ql.cfg
    tile = min(ql.group, ql.block)
    return (
        cfg.w_bits == 4 and ql.quantizes_activations and cfg.a_bits in (4, 8) and tile % 32 == 0
        and ql.block & (ql.block - 1) == 0 and _triton_ok(ql.qweight)
    )


def quant_linear_forward(ql, x: torch.Tensor) -> torch.Tensor:
    """CUDA forward of a W4A4/W4A8 QuantLinear: fused permute+pad+quantize, then the INT8-tensor-core GEMM.

    Computes the same function as ``QuantLinear(mode="int")`` (equal activation codes; float32
    epilogue in a different summation order, then the output dtype).
    """
    from lowbit.kernels.gemm import quantize_activation, repack_weight, w4a8_gemm

    tile = min(ql.group, ql.block)
    key = ("triton_w", tile)
    if key not in ql._cache:
        ql._cache[key] = repack_weight(ql.qweight, tile)
    lead = x.shape[:-1]
    codes, scale = quantize_activation(x, ql.block, ql.int8_mask, ql.cfg.a_bits, perm=ql.perm, padded_in=ql.padded_in)
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    y = w4a8_gemm(codes, scale, ql.block, ql._cache[key], ql.w_scale, ql.group, w_zero=ql.w_zero, bias=ql.bias,
                  out_dtype=out_dtype)
    return y.reshape(*lead, ql.out_features).to(x.dtype)
