"""Triton kernels of the engine's KIVI append (see :mod:`lowbit.engine.kivi_ops` for the schedule).

One program per (row, KV head); rows with nothing to flush only write their ring row. Codes go into the
page's fragment-ordered words with ``atomic_or`` (blocks are zeroed when reserved); scales and zeros are
computed exactly as :func:`lowbit.quant.affine.quantize_codes` computes them (float32, IEEE division,
round half to even, fp16 scale and zero).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from lowbit.quant.kivi import PAGE_GROUP, PAGE_TOKENS

FP16_TINY = tl.constexpr(6.103515625e-05)  # torch.finfo(torch.float16).tiny


@triton.jit
def _quantize(x, QMAX: tl.constexpr, axis: tl.constexpr):
    lo = tl.min(x, axis=axis)
    hi = tl.max(x, axis=axis)
    zero = lo.to(tl.float16)
    scale = tl.maximum(tl.math.div_rn(hi - zero.to(tl.float32), QMAX * 1.0), FP16_TINY).to(tl.float16)
    zf = tl.expand_dims(zero.to(tl.float32), axis)
    sf = tl.expand_dims(scale.to(tl.float32), axis)
    codes = libdevice.rint(tl.math.div_rn(x - zf, sf))
    codes = tl.minimum(tl.maximum(codes, 0.0), QMAX * 1.0).to(tl.int32)
    return codes, scale, zero


@triton.jit
def _append_kernel(pos_ptr, table_ptr, max_pages, k_ptr, v_ptr, nk_sb, nk_sh, ring_k, ring_v, rg_sb, rg_sh,
                   sink_k, sink_v, sk_sb, sk_sh, words_ptr, w_sb, w_sh, halves_ptr, h_sb, h_sh, vword_ptr, vshift_ptr,
                   SINKS: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr, P: tl.constexpr, R: tl.constexpr,
                   VCODE_W: tl.constexpr, VS_H: tl.constexpr, VZ_H: tl.constexpr):
    r = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.load(pos_ptr + r).to(tl.int32)
    c = tl.arange(0, D)
    kn = tl.load(k_ptr + r * nk_sb + h * nk_sh + c)
    vn = tl.load(v_ptr + r * nk_sb + h * nk_sh + c)
    if p < SINKS:
        tl.store(sink_k + r * sk_sb + h * sk_sh + p * D + c, kn.to(sink_k.dtype.element_ty))
        tl.store(sink_v + r * sk_sb + h * sk_sh + p * D + c, vn.to(sink_v.dtype.element_ty))
    else:
        k = p - SINKS
        slot = k % R
        ring_off = r * rg_sb + h * rg_sh + slot * D + c
        if k >= R:  # value k - R leaves the ring (it shares ring row `slot` with the new token)
            j = k - R
            old = tl.load(ring_v + ring_off).to(tl.float32)
            G: tl.constexpr = D // 32
            codes, scale, zero = _quantize(tl.reshape(old, (G, 32)), (1 << BITS) - 1, 1)
            codes = tl.reshape(codes, (D,))
            t = j % P
            blk = tl.load(table_ptr + r * max_pages + j // P).to(tl.int64)
            word = tl.load(vword_ptr + t * D + c)
            shift = tl.load(vshift_ptr + t * D + c)
            tl.atomic_or(words_ptr + blk * w_sb + h * w_sh + VCODE_W + word, codes << shift)
            gi = tl.arange(0, G)
            tl.store(halves_ptr + blk * h_sb + h * h_sh + VS_H + gi * P + t, scale)
            tl.store(halves_ptr + blk * h_sb + h * h_sh + VZ_H + gi * P + t, zero)
        tl.store(ring_k + ring_off, kn.to(ring_k.dtype.element_ty))
        tl.store(ring_v + ring_off, vn.to(ring_v.dtype.element_ty))


@triton.jit
def _key_flush_kernel(pos_ptr, table_ptr, max_pages, ring_k, rg_sb, rg_sh, words_ptr, w_sb, w_sh, halves_ptr, h_sb,
                      h_sh, kword_ptr, kshift_ptr, SINKS: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr,
                      P: tl.constexpr, R: tl.constexpr, KS_H: tl.constexpr, KZ_H: tl.constexpr):
    r = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.load(pos_ptr + r).to(tl.int32)
    k = p - SINKS
    if (p >= SINKS) & ((k + 1) % R == 0):  # the ring's R keys (ring row t = token first + t) go into their page
        first = k + 1 - R
        t = tl.arange(0, R)
        c = tl.arange(0, D)
        x = tl.load(ring_k + r * rg_sb + h * rg_sh + t[:, None] * D + c[None, :]).to(tl.float32)
        NG: tl.constexpr = R // 32
        codes, scale, zero = _quantize(tl.reshape(x, (NG, 32, D)), (1 << BITS) - 1, 1)
        codes = tl.reshape(codes, (R, D))
        blk = tl.load(table_ptr + r * max_pages + first // P).to(tl.int64)
        t0 = first % P  # the run's first token in the page
        elem = (t0 + t)[:, None] * D + c[None, :]
        word = tl.load(kword_ptr + elem)
        shift = tl.load(kshift_ptr + elem)
        tl.atomic_or(words_ptr + blk * w_sb + h * w_sh + word, codes << shift)
        gi = tl.arange(0, NG) + t0 // 32
        at = gi[:, None] * D + c[None, :]
        tl.store(halves_ptr + blk * h_sb + h * h_sh + KS_H + at, scale)
        tl.store(halves_ptr + blk * h_sb + h * h_sh + KZ_H + at, zero)


def append(ops, store, layer: int, pos, k, v) -> None:
    """The Triton form of :meth:`lowbit.engine.kivi_ops.KiviOps._append_ref` (same codes, bit for bit)."""
    b, h, d = k.shape
    if k.stride(-1) != 1 or v.stride() != k.stride():
        k, v = k.contiguous(), v.contiguous()
    words = store.pool[layer].view(_int32())
    halves = store.pool[layer].view(_fp16())
    ring_k, ring_v = store.ring_k[layer], store.ring_v[layer]
    sink_k, sink_v = store.sink_k[layer], store.sink_v[layer]
    lay = ops.layout
    _append_kernel[(b, h)](
        pos, store.table, store.max_pages, k, v, k.stride(0), k.stride(1), ring_k, ring_v, ring_k.stride(0),
        ring_k.stride(1), sink_k, sink_v, sink_k.stride(0), sink_k.stride(1), words, words.stride(0), words.stride(1),
        halves, halves.stride(0), halves.stride(1), ops.value_word, ops.value_shift,
        SINKS=ops.sinks, BITS=ops.bits, D=d, P=PAGE_TOKENS, R=ops.residual, VCODE_W=lay.code_bytes // 4,
        VS_H=lay.value_scale // 2, VZ_H=lay.value_zero // 2, num_warps=1)
    _key_flush_kernel[(b, h)](
        pos, store.table, store.max_pages, ring_k, ring_k.stride(0), ring_k.stride(1), words, words.stride(0),
        words.stride(1), halves, halves.stride(0), halves.stride(1), ops.key_word, ops.key_shift,
        SINKS=ops.sinks, BITS=ops.bits, D=d, P=PAGE_TOKENS, R=ops.residual, KS_H=lay.key_scale // 2,
        KZ_H=lay.key_zero // 2, num_warps=8 if ops.residual == PAGE_TOKENS else 4)


def _int32():
    import torch

    return torch.int32


def _fp16():
    import torch

    return torch.float16


assert PAGE_GROUP == 32
