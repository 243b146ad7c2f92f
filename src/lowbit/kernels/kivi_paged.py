"""Paged KIVI-2/4 decode attention (CUDA C++, tensor cores): the launcher and its PyTorch reference.

Storage is :class:`lowbit.quant.kivi.PageLayout` pages of 128 tokens per sequence and KV head, addressed by
a block table (the serving engine) or laid out ``[B, max_pages, H_kv, page bytes]`` without one (one
sequence batch, as the transformers cache holds it), plus each sequence's full-precision sinks and
residual. Two launches per call: the split-K kernel (page programs that each take an equal slice of all sequences'
pages, stream-K style, in tensor-core tiles, then one program per sequence and head for the sinks and the tail),
and the log-sum-exp merge.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from dataclasses import dataclass

import torch

from lowbit.quant.kivi import PAGE_GROUP, PAGE_TOKENS, PageLayout, read_pages

LOG2E = 1.4426950408889634
VARIANTS = {"dequant": 0, "fold": 1}  # fold: key scales into Q and codes straight into the MMA (zeros as a bias)
DEFAULT_VARIANT = "fold"
MAX_ROWS = 8  # query heads per KV head x query tokens: the n8 side of the P V tensor-core product


@dataclass
class PagedKivi:
    """One layer's paged KIVI cache as the kernel reads it (counts are the same for every sequence unless
    ``seq`` is given: int32 ``[B, 5]`` = sinks, quantized keys, quantized values, total tokens, first position)."""

    bits: int
    pool: torch.Tensor  # uint8 [blocks, H, page bytes], or [B, max_pages, H, page bytes] without a table
    n_sink: int
    n_qk: int  # quantized keys to use (pages hold at least this many)
    n_qv: int
    total: int
    sink_k: torch.Tensor | None  # [B, H, n_sink, D]
    sink_v: torch.Tensor | None
    res_k: torch.Tensor | None  # [B, H, total - n_sink - n_qk, D]
    res_v: torch.Tensor | None  # [B, H, total - n_sink - n_qv, D]
    table: torch.Tensor | None = None  # int32 [B, max_pages]
    seq: torch.Tensor | None = None

    @property
    def key_pages(self) -> int:
        """Pages holding quantized keys (the kernel's split-K range; the last may be partial)."""
        return -(-self.n_qk // PAGE_TOKENS)


def supported(query: torch.Tensor, bits: int, head_dim: int, group: int, hkv: int) -> bool:
    """Whether the paged kernel handles this shape (else use the Triton kernel)."""
    rows = query.shape[1] // hkv * query.shape[2]
    return (query.is_cuda and bits in (2, 4) and head_dim == 128 and group == PAGE_GROUP and rows <= MAX_ROWS
            and query.dtype in (torch.float16, torch.bfloat16))


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


@functools.lru_cache(maxsize=16)
def _sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_I, _L, _P, _F = ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_float
_ARGTYPES = [_I, _I, _I, _I, _P, _L, _L, _P, _I, _P, _L, _L, _L, _I, _I, _I, _I, _F, _P, _I, _I, _I, _I, _P,
             _P, _P, _L, _L, _P, _L, _L, _P, _L, _L, _P, _P, _I, _I, _I, _I, _P, _L, _L, _L, _P, _P]
TIMELINE: torch.Tensor | None = None  # tools/paged_timeline.py: int64 buffer for its debug build's records


@functools.lru_cache(maxsize=1)
def _launcher():
    """The C entry point, with its argument types declared once (plain ints convert fast)."""
    from lowbit.kernels.cuda_build import load

    fn = load("kivi_paged").lowbit_kivi_paged_decode
    fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
    return fn


def _rows16(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` with every row on a 16-byte boundary (the kernel copies sink and residual rows 16 bytes at a time); a
    copy only for an unusual view."""
    if t is None or (t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:-1])):
        return t
    return t.contiguous() if not t.is_contiguous() else t.clone()


def _strides(t: torch.Tensor | None) -> tuple[int, int]:
    if t is None:
        return 0, 0
    if t.stride(-1) != 1 or t.stride(-2) != t.shape[-1]:
        raise ValueError("sinks and residuals must be contiguous over tokens and channels ([..., tokens, D])")
    return t.stride(0), t.stride(1)


@functools.cache
def _split_model() -> tuple[int, int]:
    """(page slices per SM, fewest pages per slice) of the split plan; ``$LOWBIT_PAGED_SPLIT=per_sm,min_pages``
    overrides the defaults (4, 4) for experiments (read once per process)."""
    raw = os.environ.get("LOWBIT_PAGED_SPLIT", "")
    if not raw:
        return 4, 4
    try:
        per_sm, min_pages = raw.split(",")
        return max(int(per_sm), 1), max(int(min_pages), 1)
    except ValueError:
        raise ValueError(f"$LOWBIT_PAGED_SPLIT must be 'slices_per_sm,min_pages' (e.g. 4,4), got {raw!r}") from None


@dataclass(frozen=True)
class SplitPlan:
    """How the page programs share the pages: (sequence x head) ``bh`` owns virtual pages ``[bh*V, (bh+1)*V)``
    (``V = bh_pages``), page program ``c`` takes ``[c*chunk, (c+1)*chunk)``; ``parts`` partial slots per (sequence x
    head) hold every page program that touches it."""

    bh_pages: int
    chunk: int
    chunks: int
    parts: int

    def partials(self, bh: int) -> int:
        """Page programs whose slices touch `bh` (as the kernel's ``page_partials``)."""
        v, c = self.bh_pages, self.chunk
        return ((bh + 1) * v - 1) // c - bh * v // c + 1 if v else 0


@functools.lru_cache(maxsize=4096)
def plan_split(batch_heads: int, pages: int, sms: int, per_sm: int = 4, min_pages: int = 4,
               chunk: int | None = None) -> SplitPlan:
    """Equal slices of all ``batch_heads * pages`` pages, one program each: one wave of ``per_sm`` per SM (the
    kernel's resident programs; the short tail programs follow them), none under ``min_pages`` pages; ``chunk``
    forces the slice (tests)."""
    total = batch_heads * pages
    if total == 0:
        return SplitPlan(pages, 1, 0, 0)
    if chunk is None:
        n = max(1, min(sms * per_sm, total // min_pages))
        chunk = -(-total // n)
    chunks = -(-total // chunk)
    return SplitPlan(pages, chunk, chunks, min(chunks, (pages - 1) // chunk + 2))


def paged_decode_attention(query: torch.Tensor, cache: PagedKivi, scale: float | None = None,
                           start: torch.Tensor | None = None, chunk: int | None = None, stages: int | None = None,
                           out: torch.Tensor | None = None, variant: str = DEFAULT_VARIANT, ring: bool = False,
                           key_pages: int | None = None) -> torch.Tensor:
    """Attention of ``query [B, H_q, n_q, D]`` (the newest n_q tokens) over a paged KIVI cache: ``[B, n_q, H_q, D]``.

    ``start [B]`` (int32, optional): the first unpadded position of each sequence (left padding).
    ``ring``: the residuals are rings of ``R`` rows (their length: a power of two up to ``PAGE_TOKENS``), quantized
    index k at row ``k % R`` (the serving engine's layout) instead of rows from the quantized count on.
    ``key_pages``: the most key pages any sequence holds (plans the split without reading ``seq`` back to the host,
    as a CUDA graph needs). ``chunk``: pages per page program (default: :func:`plan_split`'s one wave).
    """
    launch = _launcher()
    b, hq, nq, d = query.shape
    pool = cache.pool
    hkv = pool.shape[-2]
    if hq % hkv or hq // hkv * nq > MAX_ROWS or d != 128:
        raise ValueError(f"the paged kernel takes head dim 128 and at most {MAX_ROWS} rows (query heads per KV head x "
                         f"query tokens), got head dim {d} and {hq // max(hkv, 1)} x {nq} rows")
    for t in (cache.sink_k, cache.sink_v, cache.res_k, cache.res_v):
        if t is not None and t.dtype != query.dtype:
            raise ValueError(f"sinks and residuals must have the query's dtype {query.dtype}, got {t.dtype}")
    if query.stride(-1) != 1:
        query = query.contiguous()
    table = cache.table
    if table is not None:
        table = table.to(device=query.device, dtype=torch.int32).contiguous()
        max_pages = table.shape[1]
    else:
        max_pages = pool.shape[1]
    if key_pages is not None:
        pages = key_pages
    else:
        pages = cache.key_pages if cache.seq is None else -(-int(cache.seq[:, 1].max()) // PAGE_TOKENS)
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk (pages per page program) must be at least 1, got {chunk}")
    plan = plan_split(b * hkv, pages, _sms(query.device.index or 0), *_split_model(), chunk=chunk)
    rows = hq // hkv * nq
    n_part = b * hkv * (plan.parts + 1) * rows
    work = torch.empty(n_part * (d + 2), dtype=torch.float32, device=query.device)  # partial outputs, then (max, sum)
    part_acc, part_ml = work[: n_part * d], work[n_part * d :]
    if out is None:
        out = torch.empty(b, nq, hq, d, dtype=query.dtype, device=query.device)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    sink_k, sink_v, res_k, res_v = (_rows16(t) for t in (cache.sink_k, cache.sink_v, cache.res_k, cache.res_v))
    if sink_k is not None and sink_v.stride()[:2] != sink_k.stride()[:2]:
        sink_v = sink_v.clone(memory_format=torch.contiguous_format)
        sink_k = sink_k.clone(memory_format=torch.contiguous_format)
    sk_sb, sk_sh = _strides(sink_k)
    rk_sb, rk_sh = _strides(res_k)
    rv_sb, rv_sh = _strides(res_v)
    seq = None if cache.seq is None else cache.seq.to(device=query.device, dtype=torch.int32).contiguous()
    start = None if start is None else start.to(device=query.device, dtype=torch.int32).contiguous()
    stages = stages or (3 if cache.bits == 2 else 2)
    if variant not in VARIANTS:
        raise ValueError(f"unknown paged kernel variant '{variant}': allowed are {', '.join(VARIANTS)}")
    ring_rows = 0
    if ring:
        ring_rows = max((t.shape[-2] for t in (res_k, res_v) if t is not None), default=0)
        if res_k is not None and res_v is not None and res_k.shape[-2] != res_v.shape[-2]:
            raise ValueError(f"ring residuals must have as many rows for keys as for values, got {res_k.shape[-2]} "
                             f"and {res_v.shape[-2]}")
        if ring_rows & (ring_rows - 1) or ring_rows > PAGE_TOKENS:
            raise ValueError(f"a residual ring must hold a power of two of rows up to {PAGE_TOKENS}, got {ring_rows}")
    rc = launch(
        cache.bits, int(query.dtype == torch.bfloat16), stages, VARIANTS[variant] | (ring_rows << 8),
        _ptr(pool), pool.stride(-3), pool.stride(-2), _ptr(table), max_pages,
        _ptr(query), query.stride(0), query.stride(1), query.stride(2),
        b, hq, hkv, nq, scale * LOG2E,
        _ptr(seq), cache.n_sink, cache.n_qk, cache.n_qv, cache.total, _ptr(start),
        _ptr(sink_k), _ptr(sink_v), sk_sb, sk_sh,
        _ptr(res_k), rk_sb, rk_sh, _ptr(res_v), rv_sb, rv_sh,
        _ptr(part_acc), _ptr(part_ml), plan.parts, plan.bh_pages, plan.chunk, plan.chunks,
        _ptr(out), out.stride(0), out.stride(1), out.stride(2),
        torch.cuda.current_stream(query.device).cuda_stream, _ptr(TIMELINE),
    )
    if rc != 0:
        raise RuntimeError(f"paged KIVI decode kernel failed to launch (code {rc})")
    return out


def dequantized_paged_kv(cache: PagedKivi, head_dim: int, batch_index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All keys and values (float32 ``[B, H, total, D]``) a paged cache holds, in token order (reference path)."""
    pool = cache.pool
    if cache.table is not None:
        pool = pool[cache.table.long()]  # [B, max_pages, H, bytes]
    kc, ks, kz, vc, vs, vz = read_pages(pool, cache.bits, head_dim)
    g = PAGE_GROUP
    keys = (kc.float().unflatten(-2, (-1, g)) * ks.float().unsqueeze(-2) + kz.float().unsqueeze(-2)).flatten(-3, -2)
    values = (vc.float().unflatten(-1, (-1, g)) * vs.float().unsqueeze(-1) + vz.float().unsqueeze(-1)).flatten(-2)
    ks_, vs_ = [keys[..., : cache.n_qk, :]], [values[..., : cache.n_qv, :]]
    if cache.res_k is not None:
        ks_.append(cache.res_k.float())
    if cache.res_v is not None:
        vs_.append(cache.res_v.float())
    if cache.sink_k is not None:
        ks_.insert(0, cache.sink_k.float())
        vs_.insert(0, cache.sink_v.float())
    return torch.cat(ks_, dim=-2), torch.cat(vs_, dim=-2)


def paged_decode_attention_ref(query: torch.Tensor, cache: PagedKivi, scale: float | None = None,
                               start: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 specification of :func:`paged_decode_attention` (uniform counts): ``[B, n_q, H_q, D]``."""
    from lowbit.kernels.reference import attention_ref

    k, v = dequantized_paged_kv(cache, query.shape[-1])
    return attention_ref(query, k, v, scale=scale, start=start).transpose(1, 2)


def layout_for(bits: int, head_dim: int = 128) -> PageLayout:
    """The page layout the kernel reads for `bits` and `head_dim`."""
    return PageLayout(bits, head_dim)


def _pad_rows(x: torch.Tensor | None, rows: int, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """`x` ``[..., r, C]`` zero-padded to ``rows`` along dim -2 (zeros of `shape` ``[..., C]`` when None)."""
    out = torch.zeros(*shape[:-1], rows, shape[-1], dtype=dtype, device=device)
    if x is not None:
        out[..., : x.shape[-2], :] = x
    return out


def paged_from_parts(parts, pages: int | None = None) -> PagedKivi:
    """The paged form ``[B, pages, H, bytes]`` of a contiguous :class:`~lowbit.quant.kivi.KiviParts` (group 32)."""
    from lowbit.quant.kivi import build_pages
    from lowbit.quant.packing import unpack

    if parts.group != PAGE_GROUP:
        raise ValueError(f"paged KIVI holds group {PAGE_GROUP}, got group {parts.group}")
    ref = parts.any_tensor()
    b, h = ref.shape[0], ref.shape[1]
    d = next(t for t in (parts.sink_k, parts.res_k, parts.qk_scale, parts.res_v) if t is not None).shape[-1]
    n_k = 0 if parts.qk_packed is None else parts.qk_packed.shape[-2] * 8 // parts.bits
    n_v = 0 if parts.qv_packed is None else parts.qv_packed.shape[-2]
    pages = max(-(-n_k // PAGE_TOKENS), -(-n_v // PAGE_TOKENS), 1) if pages is None else pages
    n, dev, u8, f16 = pages * PAGE_TOKENS, ref.device, torch.uint8, torch.float16
    kc = _pad_rows(None if parts.qk_packed is None else unpack(parts.qk_packed, parts.bits, dim=-2), n, (b, h, d), u8, dev)
    ks = _pad_rows(parts.qk_scale, n // PAGE_GROUP, (b, h, d), f16, dev)
    kz = _pad_rows(parts.qk_zero, n // PAGE_GROUP, (b, h, d), f16, dev)
    vc = _pad_rows(None if parts.qv_packed is None else unpack(parts.qv_packed, parts.bits, dim=-1), n, (b, h, d), u8, dev)
    vs = _pad_rows(parts.qv_scale, n, (b, h, d // PAGE_GROUP), f16, dev)
    vz = _pad_rows(parts.qv_zero, n, (b, h, d // PAGE_GROUP), f16, dev)
    pool = build_pages(kc, ks, kz, vc, vs, vz, parts.bits)
    return PagedKivi(parts.bits, pool, parts.n_sink, parts.n_qk, parts.n_qv, parts.total, parts.sink_k, parts.sink_v,
                     parts.res_k, parts.res_v)
