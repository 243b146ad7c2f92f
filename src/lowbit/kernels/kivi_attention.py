"""KIVI decode attention in Triton: query tokens against the packed 2/4/8-bit KV cache, flash-decoding style.

One program per (sequence, KV head, split) reads its share of the *quantized* tokens straight from
the packed bytes (keys: codes packed along tokens, one fp16 scale/zero per channel per group of G
tokens; values: codes packed along channels, one scale/zero per token per group of G channels),
dequantizes them in registers and runs an online softmax for all the query heads of its GQA group
at once (one ``tl.dot`` of ``[rows, D] x [D, BLOCK_N]`` with ``rows = GQA * n_q`` padded to 16), so
each KV byte is read once whatever the GQA ratio. One extra program per (sequence, KV head) takes
the full-precision tokens (sinks) and the mixed tail where keys or values are still in the residual
(at most about 2 R tokens). A second small kernel merges the splits (log-sum-exp) and writes the
output ``[B, n_q, H_q, D]``. Nothing is ever dequantized to a full copy in memory.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lowbit.kernels.layout import cdiv, next_pow2
from lowbit.quant.kivi import KiviParts

LOG2E = 1.4426950408889634


@triton.jit
def _u2f(c):
    """Small non-negative int32 codes -> float32 exactly, by bit pattern (2**23 + c) - 2**23: no I2F."""
    return (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _load_keys_raw(KP, KS, KZ, kp_base, ks_base, s_kr, s_kg, j0, KROWS, KGROUPS,
                   D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, BN: tl.constexpr):
    """Packed key bytes [BN/PER, D] and their fp16 scales/zeros [max(BN/G, 1), D] for tokens j0 .. j0+BN."""
    PER: tl.constexpr = 8 // BITS
    NG: tl.constexpr = BN // G if BN >= G else 1
    d = tl.arange(0, D)
    rows = j0 // PER + tl.arange(0, BN // PER)
    kp = tl.load(KP + kp_base + rows[:, None] * s_kr + d[None, :], mask=rows[:, None] < KROWS, other=0)
    grp = j0 // G + tl.arange(0, NG)
    gm = grp[:, None] < KGROUPS
    ks = tl.load(KS + ks_base + grp[:, None] * s_kg + d[None, :], mask=gm, other=0)
    kz = tl.load(KZ + ks_base + grp[:, None] * s_kg + d[None, :], mask=gm, other=0)
    return kp, ks, kz


@triton.jit
def _dequant_keys(kp, ks, kz, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, BN: tl.constexpr):
    """Keys of a tile from :func:`_load_keys_raw` (float32 [BN, D]): codes by bit pattern, then scale and zero."""
    PER: tl.constexpr = 8 // BITS
    if PER == 1:
        codes = kp.to(tl.float32)
    else:
        sh = tl.arange(0, PER) * BITS
        c3 = (kp[:, None, :].to(tl.int32) >> sh[None, :, None]) & ((1 << BITS) - 1)
        codes = _u2f(tl.reshape(c3, (BN, D)))
    ks = ks.to(tl.float32)
    kz = kz.to(tl.float32)
    if BN >= G:  # one scale row per group of G tokens; below that the single row broadcasts
        ks = tl.reshape(tl.broadcast_to(ks[:, None, :], (BN // G, G, D)), (BN, D))
        kz = tl.reshape(tl.broadcast_to(kz[:, None, :], (BN // G, G, D)), (BN, D))
    return codes * ks + kz


@triton.jit
def _load_values_raw(VP, VS, VZ, vp_base, vs_base, s_vr, s_vs, j0, VROWS,
                     D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, BN: tl.constexpr):
    """Packed value bytes [BN, D/PER] and their per-token fp16 scales/zeros [BN, D/G]; rows past storage read 0."""
    PER: tl.constexpr = 8 // BITS
    rows = j0 + tl.arange(0, BN)
    rm = rows[:, None] < VROWS
    cols = tl.arange(0, D // PER)
    vp = tl.load(VP + vp_base + rows[:, None] * s_vr + cols[None, :], mask=rm, other=0)
    gcols = tl.arange(0, D // G)
    vs = tl.load(VS + vs_base + rows[:, None] * s_vs + gcols[None, :], mask=rm, other=0)
    vz = tl.load(VZ + vs_base + rows[:, None] * s_vs + gcols[None, :], mask=rm, other=0)
    return vp, vs, vz


@triton.jit
def _dequant_values(vp, vs, vz, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, BN: tl.constexpr):
    """Values of a tile from :func:`_load_values_raw` (float32 [BN, D])."""
    PER: tl.constexpr = 8 // BITS
    if PER == 1:
        codes = vp.to(tl.float32)
    else:
        sh = tl.arange(0, PER) * BITS
        c3 = (vp[:, :, None].to(tl.int32) >> sh[None, None, :]) & ((1 << BITS) - 1)
        codes = _u2f(tl.reshape(c3, (BN, D)))
    vs = tl.reshape(tl.broadcast_to(vs.to(tl.float32)[:, :, None], (BN, D // G, G)), (BN, D))
    vz = tl.reshape(tl.broadcast_to(vz.to(tl.float32)[:, :, None], (BN, D // G, G)), (BN, D))
    return codes * vs + vz


@triton.jit
def _quant_keys(KP, KS, KZ, kp_base, ks_base, s_kr, s_kg, j0, KROWS, KGROUPS,
                D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, BN: tl.constexpr):
    """Dequantized keys of quantized tokens j0 .. j0+BN (float32 [BN, D]); rows past storage read 0."""
    kp, ks, kz = _load_keys_raw(KP, KS, KZ, kp_base, ks_base, s_kr, s_kg, j0, KROWS, KGROUPS, D, BITS, G, BN)
    return _dequant_keys(kp, ks, kz, D, BITS, G, BN)


@triton.jit
def _quant_values(VP, VS, VZ, vp_base, vs_base, s_vr, s_vs, j0, VROWS,
                  D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, BN: tl.constexpr):
    """Dequantized values of quantized tokens j0 .. j0+BN (float32 [BN, D]); rows past storage read 0."""
    vp, vs, vz = _load_values_raw(VP, VS, VZ, vp_base, vs_base, s_vr, s_vs, j0, VROWS, D, BITS, G, BN)
    return _dequant_values(vp, vs, vz, D, BITS, G, BN)


@triton.jit
def _attend(q, k, v, valid, m_i, l_i, acc, qk_scale):
    """One online-softmax step (base 2) over a tile; `valid` [ROWS, BN] masks scores."""
    s = tl.dot(q, tl.trans(k.to(q.dtype))) * qk_scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return m_new, l_i, acc



@triton.jit
def _kivi_decode_split_kernel(
    Q, s_qb, s_qh, s_qn,
    SK, s_skb, s_skh, s_skt, SV, s_svb, s_svh, s_svt,
    KP, s_kpb, s_kph, s_kpr, KS, KZ, s_ksb, s_ksh, s_ksg,
    VP, s_vpb, s_vph, s_vpr, VS, VZ, s_vsb, s_vsh, s_vsr,
    RK, s_rkb, s_rkh, s_rkt, RV, s_rvb, s_rvh, s_rvt,
    START, MBUF, LBUF, ABUF,
    NS, NQK, NQV, NRK, NC, T, KROWS, KGROUPS, VROWS, S, TPS, qk_scale,
    HKV: tl.constexpr, GQA: tl.constexpr, NQ: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
    BITS: tl.constexpr, G: tl.constexpr, BN: tl.constexpr, HAS_START: tl.constexpr, CAUSAL: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    sid = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)  # int64: a cache can exceed 2**31 bytes
    h = pid_bh % HKV
    RV_: tl.constexpr = GQA * NQ
    r = tl.arange(0, ROWS)
    rvalid = r < RV_
    g = r // NQ
    qi = r % NQ
    d = tl.arange(0, D)
    q = tl.load(Q + b * s_qb + (h * GQA + g)[:, None] * s_qh + qi[:, None] * s_qn + d[None, :], mask=rvalid[:, None], other=0)
    qpos = T - NQ + qi
    if HAS_START:
        st = tl.load(START + b)
    else:
        st = 0

    m_i = tl.full((ROWS,), -1.0e30, tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, D), tl.float32)
    offs = tl.arange(0, BN)

    kp_base = b * s_kpb + h * s_kph
    ks_base = b * s_ksb + h * s_ksh
    vp_base = b * s_vpb + h * s_vph
    vs_base = b * s_vsb + h * s_vsh
    if sid < S:
        # ---- quantized tokens j in [sid * TPS * BN, ...) below NC: keys and values both packed
        j_begin = sid * TPS * BN
        j_end = tl.minimum(j_begin + TPS * BN, NC)
        if PREFETCH:  # registers hold the next tile's packed bytes while this tile is dequantized
            kp_n, ks_n, kz_n = _load_keys_raw(KP, KS, KZ, kp_base, ks_base, s_kpr, s_ksg, j_begin, KROWS, KGROUPS, D, BITS, G, BN)
            vp_n, vs_n, vz_n = _load_values_raw(VP, VS, VZ, vp_base, vs_base, s_vpr, s_vsr, j_begin, VROWS, D, BITS, G, BN)
        for j0 in range(j_begin, j_end, BN):
            if PREFETCH:
                kp, ks, kz = kp_n, ks_n, kz_n
                vp, vs, vz = vp_n, vs_n, vz_n
                kp_n, ks_n, kz_n = _load_keys_raw(KP, KS, KZ, kp_base, ks_base, s_kpr, s_ksg, j0 + BN, KROWS, KGROUPS, D, BITS, G, BN)
                vp_n, vs_n, vz_n = _load_values_raw(VP, VS, VZ, vp_base, vs_base, s_vpr, s_vsr, j0 + BN, VROWS, D, BITS, G, BN)
                k = _dequant_keys(kp, ks, kz, D, BITS, G, BN)
                v = _dequant_values(vp, vs, vz, D, BITS, G, BN)
            else:
                k = _quant_keys(KP, KS, KZ, kp_base, ks_base, s_kpr, s_ksg, j0, KROWS, KGROUPS, D, BITS, G, BN)
                v = _quant_values(VP, VS, VZ, vp_base, vs_base, s_vpr, s_vsr, j0, VROWS, D, BITS, G, BN)
            j = j0 + offs
            pos = NS + j
            valid = (j < NC)[None, :] & (pos >= st)[None, :]
            if CAUSAL:
                valid = valid & (pos[None, :] <= qpos[:, None])
            m_i, l_i, acc = _attend(q, k, v, valid, m_i, l_i, acc, qk_scale)
    else:
        # ---- full-precision sinks
        for p0 in range(0, NS, BN):
            p = p0 + offs
            pm = p < NS
            k = tl.load(SK + b * s_skb + h * s_skh + p[:, None] * s_skt + d[None, :], mask=pm[:, None], other=0).to(tl.float32)
            v = tl.load(SV + b * s_svb + h * s_svh + p[:, None] * s_svt + d[None, :], mask=pm[:, None], other=0).to(tl.float32)
            valid = pm[None, :] & (p >= st)[None, :] & (p[None, :] <= qpos[:, None])
            m_i, l_i, acc = _attend(q, k, v, valid, m_i, l_i, acc, qk_scale)
        # ---- the tail: j >= NC, keys/values each quantized or residual
        n_rest = T - NS
        for j0 in range((NC // BN) * BN, n_rest, BN):
            j = j0 + offs
            kq = _quant_keys(KP, KS, KZ, kp_base, ks_base, s_kpr, s_ksg, j0, KROWS, KGROUPS, D, BITS, G, BN)
            jr = j - NQK
            rkm = (jr >= 0) & (jr < NRK)
            kr = tl.load(RK + b * s_rkb + h * s_rkh + jr[:, None] * s_rkt + d[None, :], mask=rkm[:, None], other=0).to(tl.float32)
            k = tl.where((j < NQK)[:, None], kq, kr)
            vq = _quant_values(VP, VS, VZ, vp_base, vs_base, s_vpr, s_vsr, j0, VROWS, D, BITS, G, BN)
            jv = j - NQV
            rvm = (jv >= 0) & (jv < n_rest - NQV)
            vr = tl.load(RV + b * s_rvb + h * s_rvh + jv[:, None] * s_rvt + d[None, :], mask=rvm[:, None], other=0).to(tl.float32)
            v = tl.where((j < NQV)[:, None], vq, vr)
            pos = NS + j
            valid = ((j >= NC) & (j < n_rest) & (pos >= st))[None, :] & (pos[None, :] <= qpos[:, None])
            m_i, l_i, acc = _attend(q, k, v, valid, m_i, l_i, acc, qk_scale)

    row_off = (pid_bh * (S + 1) + sid) * RV_ + r
    tl.store(MBUF + row_off, m_i, mask=rvalid)
    tl.store(LBUF + row_off, l_i, mask=rvalid)
    tl.store(ABUF + row_off[:, None] * D + d[None, :], acc, mask=rvalid[:, None])


@triton.jit
def _kivi_decode_reduce_kernel(MBUF, LBUF, ABUF, OUT, S1,
                               HKV: tl.constexpr, GQA: tl.constexpr, NQ: tl.constexpr, ROWS: tl.constexpr,
                               D: tl.constexpr):
    pid_bh = tl.program_id(0)
    b = (pid_bh // HKV).to(tl.int64)
    h = pid_bh % HKV
    RV_: tl.constexpr = GQA * NQ
    r = tl.arange(0, ROWS)
    rvalid = r < RV_
    d = tl.arange(0, D)
    m_run = tl.full((ROWS,), -1.0e30, tl.float32)
    l_run = tl.zeros((ROWS,), tl.float32)
    o = tl.zeros((ROWS, D), tl.float32)
    for s in range(0, S1):
        row_off = (pid_bh * S1 + s) * RV_ + r
        m_s = tl.load(MBUF + row_off, mask=rvalid, other=-1.0e30)
        l_s = tl.load(LBUF + row_off, mask=rvalid, other=0.0)
        a_s = tl.load(ABUF + row_off[:, None] * D + d[None, :], mask=rvalid[:, None], other=0.0)
        m_new = tl.maximum(m_run, m_s)
        c_old = tl.exp2(m_run - m_new)
        c_s = tl.exp2(m_s - m_new)
        l_run = l_run * c_old + l_s * c_s
        o = o * c_old[:, None] + a_s * c_s[:, None]
        m_run = m_new
    l_run = tl.where(l_run > 0, l_run, 1.0)
    o = o / l_run[:, None]
    g = r // NQ
    qi = r % NQ
    hq = h * GQA + g
    out_off = ((b * NQ + qi) * (HKV * GQA) + hq) * D
    tl.store(OUT + out_off[:, None] + d[None, :], o.to(OUT.dtype.element_ty), mask=rvalid[:, None])


def _sm_count(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _strides3(t: torch.Tensor | None, dummy: torch.Tensor):
    """(tensor, stride_b, stride_h, stride_t) for a [B, H, T, X] tensor with unit last stride."""
    if t is None:
        return dummy, 0, 0, 0
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, t.stride(0), t.stride(1), t.stride(2)


def kivi_decode_attention_parts(
    query: torch.Tensor,
    parts: KiviParts,
    scale: float | None = None,
    start: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    block_n: int = 32,
    num_warps: int = 2,
    num_stages: int = 2,
    num_splits: int | None = None,
    target_programs: int | None = None,
    prefetch: bool = True,
) -> torch.Tensor:
    """Triton decode attention of ``query [B, H_q, n_q, D]`` over the KIVI `parts`.

    Returns ``out`` of shape ``[B, n_q, H_q, D]`` (the layout a transformers attention function returns;
    ``.transpose(1, 2)`` gives ``[B, H_q, n_q, D]``), in the query's dtype. ``start [B]`` int: first
    valid token of each sequence (left padding). Queries sit at positions ``T - n_q .. T - 1``.
    ``prefetch``: load the next tile's packed bytes before dequantizing the current one (register double
    buffering of the quantized loop).
    """
    parts.check()
    bsz, hq, nq, d = query.shape
    ref = parts.any_tensor()
    hkv = ref.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    gqa = hq // hkv
    bits, g = parts.bits, parts.group
    if d & (d - 1) or d < 16:
        raise ValueError(f"head dim {d} must be a power of two >= 16")
    if d % g or (block_n % g and g % block_n) or block_n % (8 // bits) or g < 16 or g & (g - 1):
        raise ValueError(f"group size {g} (a power of two >= 16) must divide head dim {d} and divide or be a multiple "
                         f"of block_n {block_n}")
    if query.stride(-1) != 1:
        query = query.contiguous()
    ns, nqk, nqv, nrk = parts.n_sink, parts.n_qk, parts.n_qv, parts.n_res_k
    total = parts.total
    nc = min(nqk, nqv)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dummy = query
    sk, *s_sk = _strides3(parts.sink_k, dummy)
    sv, *s_sv = _strides3(parts.sink_v, dummy)
    kp, *s_kp = _strides3(parts.qk_packed if nqk else None, dummy)
    ks, *s_ks = _strides3(parts.qk_scale if nqk else None, dummy)
    kz, *s_kz = _strides3(parts.qk_zero if nqk else None, dummy)
    vp, *s_vp = _strides3(parts.qv_packed if nqv else None, dummy)
    vs, *s_vs = _strides3(parts.qv_scale if nqv else None, dummy)
    vz, *s_vz = _strides3(parts.qv_zero if nqv else None, dummy)
    if s_ks != s_kz:
        ks, kz = ks.contiguous(), kz.contiguous()
        s_ks = [ks.stride(0), ks.stride(1), ks.stride(2)]
    if s_vs != s_vz:
        vs, vz = vs.contiguous(), vz.contiguous()
        s_vs = [vs.stride(0), vs.stride(1), vs.stride(2)]
    rk, *s_rk = _strides3(parts.res_k, dummy)
    rv, *s_rv = _strides3(parts.res_v, dummy)
    krows = parts.qk_packed.shape[-2] if nqk else 0
    kgroups = parts.qk_scale.shape[-2] if nqk else 0
    vrows = parts.qv_packed.shape[-2] if nqv else 0

    n_tiles = cdiv(nc, block_n)
    if n_tiles == 0:
        splits, tps = 0, 1
    else:
        if num_splits is None:
            target = target_programs or 16 * _sm_count(query.device)
            num_splits = max(1, cdiv(target, bsz * hkv))
        splits = max(1, min(num_splits, n_tiles))
        tps = cdiv(n_tiles, splits)
        splits = cdiv(n_tiles, tps)
    rows = max(16, next_pow2(gqa * nq))
    nrows = gqa * nq
    if nq & (nq - 1):
        raise ValueError(f"{nq} query tokens: use a power of two")
    dev = query.device
    mbuf = torch.empty(bsz * hkv * (splits + 1) * nrows, device=dev, dtype=torch.float32)
    lbuf = torch.empty_like(mbuf)
    abuf = torch.empty(bsz * hkv * (splits + 1) * nrows * d, device=dev, dtype=torch.float32)
    if out is None:
        out = torch.empty(bsz, nq, hq, d, device=dev, dtype=query.dtype)
    has_start = start is not None
    st = start.to(device=dev, dtype=torch.int32).contiguous() if has_start else mbuf
    _kivi_decode_split_kernel[(bsz * hkv, splits + 1)](
        query, query.stride(0), query.stride(1), query.stride(2),
        sk, *s_sk, sv, *s_sv,
        kp, *s_kp, ks, kz, *s_ks,
        vp, *s_vp, vs, vz, *s_vs,
        rk, *s_rk, rv, *s_rv,
        st, mbuf, lbuf, abuf,
        ns, nqk, nqv, nrk, nc, total, krows, kgroups, vrows, splits, tps, scale * LOG2E,
        HKV=hkv, GQA=gqa, NQ=nq, ROWS=rows, D=d, BITS=bits, G=g, BN=block_n,
        HAS_START=has_start, CAUSAL=nq > 1, PREFETCH=prefetch, num_warps=num_warps, num_stages=num_stages,
    )
    _kivi_decode_reduce_kernel[(bsz * hkv,)](
        mbuf, lbuf, abuf, out, splits + 1, HKV=hkv, GQA=gqa, NQ=nq, ROWS=rows, D=d, num_warps=4,
    )
    return out
