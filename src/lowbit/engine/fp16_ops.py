"""Decode attention over the engine's fp16/bf16 pages ``[blocks, H, P, D]``: a Triton split-K kernel on CUDA
(one program per sequence, KV head and range of pages; the query heads of a KV head share each page load)
and its PyTorch reference."""

from __future__ import annotations

import functools
import math

import torch

from lowbit.quant.kivi import PAGE_TOKENS

LOG2E = 1.4426950408889634


@functools.lru_cache(maxsize=1)
def kernel_ready() -> bool:
    """Whether Triton is importable (the kernel itself compiles at first use)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def paged_decode_ref(q, k_pool, v_pool, table, pos, scale) -> torch.Tensor:
    """Float32 attention of ``q [B, Hq, D]`` over each row's pages (tokens ``0..pos``): ``[B, Hq, D]``."""
    b, hq, d = q.shape
    hkv = k_pool.shape[1]
    keys = k_pool[table.long()].transpose(1, 2).flatten(2, 3).float()  # [B, H, pages*P, D]
    values = v_pool[table.long()].transpose(1, 2).flatten(2, 3).float()
    valid = torch.arange(keys.shape[2], device=q.device)[None, :] <= pos.long()[:, None]
    keys = keys.repeat_interleave(hq // hkv, dim=1)
    values = values.repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("bhd,bhtd->bht", q.float(), keys) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bht,bhtd->bhd", scores.softmax(-1), values).to(q.dtype)


@functools.lru_cache(maxsize=256)
def _plan(batch_heads: int, pages: int, sms: int) -> tuple[int, int]:
    """(splits, pages per split): enough programs to fill the GPU about twice, at least 2 pages each."""
    want = max(1, min(pages // 2, math.ceil(2 * sms / max(batch_heads, 1))))
    per = math.ceil(pages / want)
    return math.ceil(pages / per), per


def paged_decode(q, k_pool, v_pool, table, pos, scale, max_pages: int) -> torch.Tensor:
    """The Triton kernel (graph-capturable: the split plan depends on shapes only)."""
    from lowbit.engine.fp16_triton import launch

    b, hq, d = q.shape
    hkv = k_pool.shape[1]
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    splits, per = _plan(b * hkv, max_pages, sms)
    return launch(q, k_pool, v_pool, table, pos, scale * LOG2E, splits, per)


assert PAGE_TOKENS == 128
