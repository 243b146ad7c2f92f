"""Split-K reduced inside a GEMM launch by tile tickets (the W4Ax kernels of :mod:`lowbit.kernels.gemm` and
:mod:`lowbit.kernels.w4ax_fused`): each split of an output tile writes its partial, then takes a ticket on the tile's
counter; the last split to arrive sums the partials in split order, adds the bias, writes the output and resets the
counter. No second launch, and CUDA-graph safe (the counters are back at zero after every call)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


class _Counters:
    """Zeroed int32 tile counters per (device, stream), grown (zeroed) on demand; kernels leave them at zero (the
    in-kernel split-K reduction's tickets)."""

    def __init__(self):
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, n: int, device: torch.device, stream: int) -> torch.Tensor:
        key = (str(device), stream)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self._bufs[key] = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
        return buf


COUNTERS = _Counters()


@triton.jit
def _store_or_reduce(acc, rm, rn, mm, nm, tile_id, pid_k, BIAS, C, s_cm, PART, COUNT, M, N, SPLITS,
                     BM: tl.constexpr, BN: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """The output tile ``acc [BM, BN]``: stored (+ bias), or with split-K written as this split's partial, the last
    split of the tile to take a ticket summing all partials in split order (the two-launch path's order), adding the
    bias, storing the output and resetting the counter to zero for the next call (CUDA-graph safe)."""
    omask = mm[:, None] & nm[None, :]
    if SPLIT:
        tl.store(PART + (pid_k * M + rm[:, None]) * N + rn[None, :], acc, mask=omask)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken (release at GPU scope)
        ticket = tl.atomic_add(COUNT + tile_id, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLITS - 1:  # the last split of this tile: reduce in split order, then reset the counter
            total = tl.zeros((BM, BN), tl.float32)
            for s in range(0, SPLITS):
                total += tl.load(PART + (s * M + rm[:, None]) * N + rn[None, :], mask=omask, other=0,
                                 cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(BIAS + rn, mask=nm, other=0).to(tl.float32)[None, :]
            tl.store(C + rm[:, None] * s_cm + rn[None, :], total.to(C.dtype.element_ty), mask=omask)
            tl.atomic_xchg(COUNT + tile_id, 0, sem="relaxed", scope="gpu")
    else:
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=nm, other=0).to(tl.float32)[None, :]
        tl.store(C + rm[:, None] * s_cm + rn[None, :], acc.to(C.dtype.element_ty), mask=omask)
