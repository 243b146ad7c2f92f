"""Triton split-K decode attention over fp16/bf16 pages (see :mod:`lowbit.engine.fp16_ops`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.layout import next_pow2


@triton.jit
def _split_kernel(q_ptr, q_sb, q_sh, k_pool, v_pool, p_sb, p_sh, table_ptr, max_pages, pos_ptr, acc_ptr, ml_ptr,
                  scale_log2, HKV: tl.constexpr, GQA: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
                  P: tl.constexpr, PER: tl.constexpr, SPLITS: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    total = tl.load(pos_ptr + b).to(tl.int32) + 1
    n_pages = (total + P - 1) // P
    p0 = split * PER
    p1 = tl.minimum(n_pages, p0 + PER)
    rows = tl.arange(0, ROWS)
    c = tl.arange(0, D)
    t = tl.arange(0, P)
    q = tl.load(q_ptr + b * q_sb + (h * GQA + rows)[:, None] * q_sh + c[None, :], mask=rows[:, None] < GQA, other=0.0)
    m = tl.full((ROWS,), float("-inf"), tl.float32)
    s_sum = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, D), tl.float32)
    for page in range(p0, p1):
        blk = tl.load(table_ptr + b * max_pages + page).to(tl.int64)
        off = blk * p_sb + h * p_sh + t[:, None] * D + c[None, :]
        kt = tl.load(k_pool + off)
        s = tl.dot(q, tl.trans(kt)) * scale_log2
        s = tl.where((page * P + t)[None, :] < total, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        pr = tl.exp2(s - m_new[:, None])
        s_sum = s_sum * alpha + tl.sum(pr, axis=1)
        vt = tl.load(v_pool + off)
        acc = acc * alpha[:, None] + tl.dot(pr.to(vt.dtype), vt)
        m = m_new
    base = (bh * SPLITS + split) * ROWS + rows
    tl.store(acc_ptr + base[:, None] * D + c[None, :], acc)
    tl.store(ml_ptr + base * 2, m)
    tl.store(ml_ptr + base * 2 + 1, s_sum)


@triton.jit
def _merge_kernel(acc_ptr, ml_ptr, out_ptr, o_sb, o_sh, HKV: tl.constexpr, GQA: tl.constexpr, ROWS: tl.constexpr,
                  D: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr):
    bh = tl.program_id(0)
    row = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    sp = tl.arange(0, SPLITS_P2)
    c = tl.arange(0, D)
    base = (bh * SPLITS + sp) * ROWS + row
    ok = sp < SPLITS
    m = tl.load(ml_ptr + base * 2, mask=ok, other=float("-inf"))
    s = tl.load(ml_ptr + base * 2 + 1, mask=ok, other=0.0)
    big = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - big))
    acc = tl.load(acc_ptr + base[:, None] * D + c[None, :], mask=ok[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(s * w, axis=0)
    tl.store(out_ptr + b * o_sb + (h * GQA + row) * o_sh + c, o.to(out_ptr.dtype.element_ty))


def launch(q, k_pool, v_pool, table, pos, scale_log2: float, splits: int, per: int) -> torch.Tensor:
    """``q [B, Hq, D]`` over pages ``k_pool, v_pool [blocks, H, P, D]``: ``[B, Hq, D]``."""
    b, hq, d = q.shape
    hkv, p = k_pool.shape[1], k_pool.shape[2]
    gqa = hq // hkv
    rows = max(16, next_pow2(gqa))
    if q.stride(-1) != 1:
        q = q.contiguous()
    acc = torch.empty(b * hkv * splits * rows * d, dtype=torch.float32, device=q.device)
    ml = torch.empty(b * hkv * splits * rows * 2, dtype=torch.float32, device=q.device)
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    _split_kernel[(b * hkv, splits)](
        q, q.stride(0), q.stride(1), k_pool, v_pool, k_pool.stride(0), k_pool.stride(1), table, table.shape[1], pos,
        acc, ml, scale_log2, HKV=hkv, GQA=gqa, ROWS=rows, D=d, P=p, PER=per, SPLITS=splits, num_warps=4,
        num_stages=2)
    _merge_kernel[(b * hkv, gqa)](acc, ml, out, out.stride(0), out.stride(1), HKV=hkv, GQA=gqa, ROWS=rows, D=d,
                                  SPLITS=splits, SPLITS_P2=next_pow2(splits), num_warps=1)
    return out
