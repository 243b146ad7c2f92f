"""Pure-PyTorch references of the kernels in :mod:`lowbit.kernels` (CPU or GPU, no Triton).

These define *what* each Triton kernel computes; the GPU tests compare the kernels with them.

* :func:`attention_ref` is causal GQA attention in float32; :func:`decode_attention_ref` attends one or a few query tokens to a packed KIVI cache
  (:class:`~lowbit.quant.kivi.KiviParts`: sinks | quantized | residual, keys and values split at different
  token counts), dequantizing in float32. The KIVI flush kernels compute
  :func:`lowbit.quant.kivi.quantize_keys` / :func:`~lowbit.quant.kivi.quantize_values`.
* :func:`quantize_activation_ref` and :func:`w4a8_gemm_ref`: FMPQ per-token per-block activation
  quantization and the blocked integer GEMM with a dequantizing epilogue (:mod:`lowbit.quant.integer`).
"""

from __future__ import annotations

import math

import torch

from lowbit.quant import integer
from lowbit.quant.kivi import KiviParts, dequantized_kv


def attention_ref(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                  start: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 attention of ``query [B, H_q, n_q, D]`` (the newest n_q tokens) to keys/values ``[B, H_kv, T, D]``.

    GQA: query head ``h`` reads KV head ``h // (H_q // H_kv)``. Query ``i`` sits at position
    ``T - n_q + i`` and sees tokens up to it (causal). ``start [B]`` (optional): tokens before
    ``start[b]`` are padding (left padding) and are masked. Returns ``[B, H_q, n_q, D]`` float32.
    """
    b, hq, nq, d = query.shape
    hkv, t = k.shape[1], k.shape[2]
    rep = hq // hkv
    k = k.float().repeat_interleave(rep, dim=1)
    v = v.float().repeat_interleave(rep, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = torch.matmul(query.float(), k.transpose(-1, -2)) * scale  # [B, Hq, nq, T]
    pos = torch.arange(t, device=query.device)
    qpos = t - nq + torch.arange(nq, device=query.device)
    mask = (pos[None, :] <= qpos[:, None])[None, None]  # [1, 1, nq, T]
    if start is not None:
        mask = mask & (pos[None, None, None, :] >= start.to(query.device).view(b, 1, 1, 1))
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(p, v)


def decode_attention_ref(
    query: torch.Tensor,
    parts: KiviParts,
    scale: float | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query [B, H_q, n_q, D]`` to the KIVI cache `parts`, dequantized in float32
    (:func:`attention_ref`): ``[B, H_q, n_q, D]`` float32."""
    parts.check()
    k, v = dequantized_kv(parts, torch.float32)
    return attention_ref(query, k, v, scale=scale, start=start)


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
    x2 = x.reshape(-1, x.shape[-1]).float()
    if perm is not None:
        x2 = x2.index_select(1, perm.long())
    x2 = integer.pad_last(x2, padded_in or x2.shape[-1])
    codes, scale = integer.quantize_activation(x2, block, int8_mask, low_bits)
    return codes.to(torch.int8), scale


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
    """``sum_tiles (A_t @ W_t.T) * a_scale * w_scale (+ bias)`` in float32, with exact partials and a float64 epilogue.

    ``a_codes`` int8 ``[M, K]``, ``a_scale`` fp32 ``[M, K / block]``, ``qweight`` uint8 ``[N, K / 2]``
    (the :class:`~lowbit.wa.linear.QuantLinear` layout), ``w_scale`` fp16 ``[N, K / group]``.
    """
    w = integer.weight_integers(qweight, 4, group, w_zero)
    y = integer.int_matmul(a_codes, a_scale, block, w, w_scale, group, partial_dtype=torch.float64,
                           epilogue_dtype=torch.float64)
    if bias is not None:
        y = y + bias.double()
    return y.float()
