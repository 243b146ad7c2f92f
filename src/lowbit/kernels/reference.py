"""Pure-PyTorch references of every kernel in :mod:`lowbit.kernels` (CPU or GPU, no Triton).

These define *what* each Triton kernel computes; the GPU tests compare the kernels with them.

* :func:`kivi_parts` gathers the cache parts of a KIVI layer into a :class:`KiviParts`.
* :func:`decode_attention_ref` attends one or a few query tokens to the packed KIVI cache (sinks |
  quantized | residual, keys and values split at different token counts), dequantizing in float32.
* :func:`quantize_pack_keys_ref` / :func:`quantize_pack_values_ref`: the KIVI flush (per-channel key
  groups along tokens, per-token value groups along channels), packed as :mod:`lowbit.quant.packing`.
* :func:`quantize_activation_ref` and :func:`w4a8_gemm_ref`: FMPQ per-token per-block activation
  quantization and the blocked integer GEMM with a dequantizing epilogue (:mod:`lowbit.wa.core`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.quant import pack, unpack
from lowbit.quant.uniform import dequantize_codes, quantize_codes


# ------------------------------------------------------------------------------------------ KIVI


@dataclass
class KiviParts:
    """The tensors a decode-attention kernel reads for one layer (shapes [B, H_kv, tokens, ...]).

    Token order is ``sinks | quantized | residual`` for keys and for values alike; the quantized and
    residual counts differ between keys and values, the totals agree. ``n_qk`` / ``n_qv`` are the
    numbers of quantized tokens to *use* (``n_qk`` may be one less than stored: see
    :func:`lowbit.kernels.integration.decode_parts`).
    """

    bits: int
    group_size: int
    sink_k: torch.Tensor | None
    sink_v: torch.Tensor | None
    qk_packed: torch.Tensor | None  # uint8 [B, H, n_qk * bits / 8, D], packed along tokens
    qk_scale: torch.Tensor | None  # fp16 [B, H, n_qk / G, D]
    qk_zero: torch.Tensor | None
    n_qk: int
    qv_packed: torch.Tensor | None  # uint8 [B, H, n_qv, D * bits / 8], packed along channels
    qv_scale: torch.Tensor | None  # fp16 [B, H, n_qv, D / G]
    qv_zero: torch.Tensor | None
    n_qv: int
    res_k: torch.Tensor | None
    res_v: torch.Tensor | None

    @property
    def n_sink(self) -> int:
        return 0 if self.sink_k is None else self.sink_k.shape[-2]

    @property
    def n_res_k(self) -> int:
        return 0 if self.res_k is None else self.res_k.shape[-2]

    @property
    def n_res_v(self) -> int:
        return 0 if self.res_v is None else self.res_v.shape[-2]

    @property
    def total(self) -> int:
        return self.n_sink + self.n_qk + self.n_res_k

    def check(self) -> None:
        tk = self.n_sink + self.n_qk + self.n_res_k
        tv = self.n_sink + self.n_qv + self.n_res_v
        if tk != tv:
            raise ValueError(f"KIVI parts disagree: {tk} key tokens but {tv} value tokens")
        if self.qk_packed is not None and self.n_qk > self.qk_packed.shape[-2] * 8 // self.bits:
            raise ValueError(f"n_qk={self.n_qk} exceeds the {self.qk_packed.shape[-2] * 8 // self.bits} stored quantized keys")
        if self.qv_packed is not None and self.n_qv > self.qv_packed.shape[-2]:
            raise ValueError(f"n_qv={self.n_qv} exceeds the {self.qv_packed.shape[-2]} stored quantized values")

    def any_tensor(self) -> torch.Tensor:
        return next(t for t in (self.res_v, self.res_k, self.qv_packed, self.qk_packed, self.sink_k) if t is not None)


def kivi_parts(layer, n_qk: int | None = None, res_k: torch.Tensor | None = None) -> KiviParts:
    """The parts of a :class:`lowbit.kv.kivi.KiviLayer` (optionally overriding the key split)."""
    return KiviParts(
        bits=layer.bits,
        group_size=layer.group_size,
        sink_k=layer.sink_k,
        sink_v=layer.sink_v,
        qk_packed=layer.qk_packed,
        qk_scale=layer.qk_scale,
        qk_zero=layer.qk_zero,
        n_qk=layer.n_qk if n_qk is None else n_qk,
        qv_packed=layer.qv_packed,
        qv_scale=layer.qv_scale,
        qv_zero=layer.qv_zero,
        n_qv=layer.n_qv,
        res_k=layer.res_k if res_k is None else res_k,
        res_v=layer.res_v,
    )


def dequantized_kv(parts: KiviParts, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """All keys and values of `parts` in token order, dequantized to `dtype` ([B, H, T, D] each)."""
    g, bits = parts.group_size, parts.bits
    ks, vs = [], []
    if parts.sink_k is not None:
        ks.append(parts.sink_k.to(dtype))
        vs.append(parts.sink_v.to(dtype))
    if parts.n_qk:
        n_groups = -(-parts.n_qk // g)
        rows = n_groups * g * bits // 8
        codes = unpack(parts.qk_packed[..., :rows, :].contiguous(), bits, dim=-2)
        k = dequantize_codes(codes, parts.qk_scale[..., :n_groups, :], parts.qk_zero[..., :n_groups, :], g, -2, dtype)
        ks.append(k[..., : parts.n_qk, :])
    if parts.n_qv:
        codes = unpack(parts.qv_packed[..., : parts.n_qv, :].contiguous(), bits, dim=-1)
        vs.append(dequantize_codes(codes, parts.qv_scale[..., : parts.n_qv, :], parts.qv_zero[..., : parts.n_qv, :], g, -1, dtype))
    if parts.res_k is not None:
        ks.append(parts.res_k.to(dtype))
    if parts.res_v is not None:
        vs.append(parts.res_v.to(dtype))
    return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)


def decode_attention_ref(
    query: torch.Tensor,
    parts: KiviParts,
    scale: float | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query [B, H_q, n_q, D]`` (the newest n_q tokens) to the KIVI cache, in float32.

    GQA: query head ``h`` reads KV head ``h // (H_q // H_kv)``. Query ``i`` sits at position
    ``T - n_q + i`` and sees tokens up to it (causal). ``start [B]`` (optional): tokens before
    ``start[b]`` are padding (left padding) and are masked. Returns ``[B, H_q, n_q, D]`` float32.
    """
    parts.check()
    b, hq, nq, d = query.shape
    k, v = dequantized_kv(parts, torch.float32)
    hkv, t = k.shape[1], k.shape[2]
    rep = hq // hkv
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = torch.matmul(query.float(), k.transpose(-1, -2)) * scale  # [B, Hq, nq, T]
    pos = torch.arange(t, device=query.device)
    qpos = t - nq + torch.arange(nq, device=query.device)
    mask = pos[None, :] <= qpos[:, None]  # [nq, T]
    mask = mask[None, None]
    if start is not None:
        mask = mask & (pos[None, None, None, :] >= start.to(query.device).view(b, 1, 1, 1))
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v)


def quantize_pack_keys_ref(k: torch.Tensor, bits: int, group_size: int):
    """KIVI key flush: per-channel groups of `group_size` tokens; codes packed along tokens."""
    codes, scale, zero = quantize_codes(k, bits, group_size, dim=-2)
    return pack(codes, bits, dim=-2), scale, zero


def quantize_pack_values_ref(v: torch.Tensor, bits: int, group_size: int):
    """KIVI value flush: per-token groups of `group_size` channels; codes packed along channels."""
    codes, scale, zero = quantize_codes(v, bits, group_size, dim=-1)
    return pack(codes, bits, dim=-1), scale, zero


# ------------------------------------------------------------------------------------------ FMPQ


def quantize_activation_ref(
    x: torch.Tensor,
    block: int,
    int8_mask: torch.Tensor | None,
    low_bits: int = 4,
    perm: torch.Tensor | None = None,
    padded_in: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K_in]`` -> permuted, zero-padded, per-token per-block codes (int8 ``[M, K]``) and float32
    scales ``[M, K / block]``, exactly as :meth:`lowbit.wa.linear.QuantLinear.quantize_input`."""
    from lowbit.wa import core

    x2 = x.reshape(-1, x.shape[-1]).float()
    if perm is not None:
        x2 = x2.index_select(1, perm.long())
    x2 = core.pad_last(x2, padded_in or x2.shape[-1])
    codes, scale = core.quantize_activation(x2, block, int8_mask, low_bits)
    return codes.to(torch.int8), scale


def unpack_weight_int(qweight: torch.Tensor, w_zero: torch.Tensor | None, group: int) -> torch.Tensor:
    """Signed INT4 weight integers ``[N, K]`` (``q - 8`` symmetric, ``q - z`` asymmetric) as int32."""
    codes = unpack(qweight, 4, dim=1).to(torch.int32)
    if w_zero is None:
        return codes - 8
    return codes - w_zero.to(torch.int32).repeat_interleave(group, dim=1)


def w4a8_gemm_ref(
    a_codes: torch.Tensor,
    a_scale: torch.Tensor,
    block: int,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    group: int,
    w_zero: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_tiles (A_t @ W_t.T) * a_scale * w_scale (+ bias)`` in float32, with exact int64 partials.

    ``a_codes`` int8 ``[M, K]``, ``a_scale`` fp32 ``[M, K / block]``, ``qweight`` uint8 ``[N, K / 2]``
    (the :class:`~lowbit.wa.linear.QuantLinear` layout), ``w_scale`` fp16 ``[N, K / group]``.
    """
    m, k = a_codes.shape
    tile = min(block, group)
    nt = k // tile
    w = unpack_weight_int(qweight, w_zero, group)  # [N, K]
    n = w.shape[0]
    a_t = a_codes.to(torch.float64).reshape(m, nt, tile).permute(1, 0, 2)  # [nt, M, tile]
    w_t = w.to(torch.float64).reshape(n, nt, tile).permute(1, 2, 0)  # [nt, tile, N]
    partial = torch.bmm(a_t, w_t)  # exact integers (|.| < 2^53)
    asc = a_scale.double().repeat_interleave(block // tile, dim=1).t().unsqueeze(-1)  # [nt, M, 1]
    wsc = w_scale.double().repeat_interleave(group // tile, dim=1).t().unsqueeze(1)  # [nt, 1, N]
    y = (partial * asc * wsc).sum(dim=0)
    if bias is not None:
        y = y + bias.double()
    return y.float()
