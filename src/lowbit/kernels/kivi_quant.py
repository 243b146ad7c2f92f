"""KIVI quantize-and-pack kernels (the residual flush), bit-exact with :func:`lowbit.quant.affine.quantize_codes`.

* keys ``[B, H, n, D]`` (n a multiple of G): one program per (sequence, head, token group) reduces
  min/max over the G tokens of each channel, rounds scale/zero to fp16 first (as the reference
  does), computes the codes with IEEE division and round-half-even, and packs them along tokens.
* values ``[B, H, n, D]``: one program per (sequence, head, BLOCK_T tokens), groups of G channels
  per token, codes packed along channels.

Outputs are fresh tensors, or written into ``out=(packed, scale, zero)`` views (e.g. the tail of a
preallocated cache buffer), so a flush is one launch and no Python loop.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from lowbit.kernels.layout import cdiv, next_pow2

FP16_TINY = float(torch.finfo(torch.float16).tiny)
_MAGIC = 12582912.0  # 1.5 * 2**23: (x + M) - M rounds |x| < 2**22 half-to-even in float32
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read once: Triton decides when it decorates a kernel


def _interpreting() -> bool:
    return _INTERPRET


@triton.jit
def _rint(x, USE_LIBDEVICE: tl.constexpr):
    if USE_LIBDEVICE:
        return libdevice.rint(x)
    else:
        return (x + 12582912.0) - 12582912.0


@triton.jit
def _quant_group(x, lo, hi, QMAX: tl.constexpr, TINY: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """fp16 zero = lo, fp16 scale = max((hi - zero) / QMAX, tiny), codes = rint((x - zero) / scale)."""
    z16 = lo.to(tl.float16)
    zf = z16.to(tl.float32)
    sc = tl.div_rn(hi - zf, tl.full(hi.shape, QMAX, tl.float32))
    sc = tl.maximum(sc, TINY)
    s16 = sc.to(tl.float16)
    return z16, s16


@triton.jit
def _quant_pack_keys_kernel(X, s_xb, s_xh, s_xt, P, s_pb, s_ph, s_pr, SC, ZE, s_sb, s_sh, s_sg, HN,
                            D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, TINY: tl.constexpr,
                            USE_LIBDEVICE: tl.constexpr):
    pid_bh = tl.program_id(0)
    grp = tl.program_id(1)
    b = (pid_bh // HN).to(tl.int64)
    h = pid_bh % HN
    QMAX: tl.constexpr = (1 << BITS) - 1
    PER: tl.constexpr = 8 // BITS
    t = grp * G + tl.arange(0, G)
    d = tl.arange(0, D)
    x = tl.load(X + b * s_xb + h * s_xh + t[:, None] * s_xt + d[None, :]).to(tl.float32)  # [G, D]
    lo = tl.min(x, 0)
    hi = tl.max(x, 0)
    z16, s16 = _quant_group(x, lo, hi, QMAX, TINY, USE_LIBDEVICE)
    q = tl.div_rn(x - z16.to(tl.float32)[None, :], s16.to(tl.float32)[None, :])
    q = _rint(q, USE_LIBDEVICE)
    q = tl.minimum(tl.maximum(q, 0.0), QMAX).to(tl.int32)
    sbase = b * s_sb + h * s_sh + grp * s_sg
    tl.store(SC + sbase + d, s16)
    tl.store(ZE + sbase + d, z16)
    if PER == 1:
        packed = q
    else:
        sh = tl.arange(0, PER) * BITS
        q3 = tl.reshape(q, (G // PER, PER, D)) << sh[None, :, None]
        packed = tl.sum(q3, 1)
    r = grp * (G // PER) + tl.arange(0, G // PER)
    tl.store(P + b * s_pb + h * s_ph + r[:, None] * s_pr + d[None, :], packed.to(tl.uint8))


@triton.jit
def _quant_pack_values_kernel(X, s_xb, s_xh, s_xt, P, s_pb, s_ph, s_pt, SC, ZE, s_sb, s_sh, s_st, HN, N,
                              D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, BT: tl.constexpr,
                              TINY: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    pid_bh = tl.program_id(0)
    tb = tl.program_id(1)
    b = (pid_bh // HN).to(tl.int64)
    h = pid_bh % HN
    QMAX: tl.constexpr = (1 << BITS) - 1
    PER: tl.constexpr = 8 // BITS
    NG: tl.constexpr = D // G
    t = tb * BT + tl.arange(0, BT)
    tm = t < N
    d = tl.arange(0, D)
    x = tl.load(X + b * s_xb + h * s_xh + t[:, None] * s_xt + d[None, :], mask=tm[:, None], other=0).to(tl.float32)
    x3 = tl.reshape(x, (BT, NG, G))
    lo = tl.min(x3, 2)
    hi = tl.max(x3, 2)
    z16, s16 = _quant_group(x3, lo, hi, QMAX, TINY, USE_LIBDEVICE)
    q = tl.div_rn(x3 - z16.to(tl.float32)[:, :, None], s16.to(tl.float32)[:, :, None])
    q = _rint(q, USE_LIBDEVICE)
    q = tl.minimum(tl.maximum(q, 0.0), QMAX).to(tl.int32)
    gi = tl.arange(0, NG)
    sbase = b * s_sb + h * s_sh
    tl.store(SC + sbase + t[:, None] * s_st + gi[None, :], s16, mask=tm[:, None])
    tl.store(ZE + sbase + t[:, None] * s_st + gi[None, :], z16, mask=tm[:, None])
    q2 = tl.reshape(q, (BT, D))
    if PER == 1:
        packed = q2
    else:
        sh = tl.arange(0, PER) * BITS
        q3 = tl.reshape(q2, (BT, D // PER, PER)) << sh[None, None, :]
        packed = tl.sum(q3, 2)
    c = tl.arange(0, D // PER)
    tl.store(P + b * s_pb + h * s_ph + t[:, None] * s_pt + c[None, :], packed.to(tl.uint8), mask=tm[:, None])


def _check(x: torch.Tensor, bits: int, group: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected [B, H, tokens, D], got shape {tuple(x.shape)}")
    if bits not in (2, 4, 8):
        raise ValueError(f"bits={bits}: supported bit-widths are (2, 4, 8)")
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"head dim {d} must be a power of two")
    if group & (group - 1) or group < 8 // bits:
        raise ValueError(f"group size {group} must be a power of two >= {8 // bits}")


def quantize_pack_keys(k: torch.Tensor, bits: int, group: int, out=None):
    """Keys ``[B, H, n, D]`` -> ``(packed uint8 [B, H, n*bits/8, D], scale fp16 [B, H, n/G, D], zero)``."""
    _check(k, bits, group)
    bsz, hn, n, d = k.shape
    if n % group:
        raise ValueError(f"{n} key tokens are not a multiple of the group size {group}")
    if k.stride(-1) != 1:
        k = k.contiguous()
    if out is None:
        packed = torch.empty(bsz, hn, n * bits // 8, d, dtype=torch.uint8, device=k.device)
        scale = torch.empty(bsz, hn, n // group, d, dtype=torch.float16, device=k.device)
        zero = torch.empty_like(scale)
    else:
        packed, scale, zero = out
    if n == 0:
        return packed, scale, zero
    assert scale.stride() == zero.stride()
    _quant_pack_keys_kernel[(bsz * hn, n // group)](
        k, k.stride(0), k.stride(1), k.stride(2),
        packed, packed.stride(0), packed.stride(1), packed.stride(2),
        scale, zero, scale.stride(0), scale.stride(1), scale.stride(2), hn,
        D=d, BITS=bits, G=group, TINY=FP16_TINY, USE_LIBDEVICE=not _interpreting(), num_warps=4,
    )
    return packed, scale, zero


def quantize_pack_values(v: torch.Tensor, bits: int, group: int, out=None, block_t: int = 16):
    """Values ``[B, H, n, D]`` -> ``(packed uint8 [B, H, n, D*bits/8], scale fp16 [B, H, n, D/G], zero)``."""
    _check(v, bits, group)
    bsz, hn, n, d = v.shape
    if d % group:
        raise ValueError(f"group size {group} does not divide the head dim {d}")
    if v.stride(-1) != 1:
        v = v.contiguous()
    if out is None:
        packed = torch.empty(bsz, hn, n, d * bits // 8, dtype=torch.uint8, device=v.device)
        scale = torch.empty(bsz, hn, n, d // group, dtype=torch.float16, device=v.device)
        zero = torch.empty_like(scale)
    else:
        packed, scale, zero = out
    if n == 0:
        return packed, scale, zero
    assert scale.stride() == zero.stride()
    bt = min(block_t, next_pow2(n))
    _quant_pack_values_kernel[(bsz * hn, cdiv(n, bt))](
        v, v.stride(0), v.stride(1), v.stride(2),
        packed, packed.stride(0), packed.stride(1), packed.stride(2),
        scale, zero, scale.stride(0), scale.stride(1), scale.stride(2), hn, n,
        D=d, BITS=bits, G=group, BT=bt, TINY=FP16_TINY, USE_LIBDEVICE=not _interpreting(), num_warps=4,
    )
    return packed, scale, zero
