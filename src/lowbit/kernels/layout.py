"""Pure-PyTorch layout helpers of the GEMM kernel (importable without Triton): weight repacking and configs."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def repack_weight(qweight: torch.Tensor, tile: int) -> torch.Tensor:
    """QuantLinear ``qweight`` ``[N, K/2]`` (channel 2i low nibble) -> the kernel's half-split layout."""
    n, kh = qweight.shape
    k = kh * 2
    if k % tile or tile % 32:
        raise ValueError(f"tile {tile} must be a multiple of 32 dividing K={k}")
    lo = qweight & 0xF
    hi = qweight >> 4
    codes = torch.stack([lo, hi], dim=-1).reshape(n, k // tile, 2, tile // 2)  # [N, tiles, half, j]
    return (codes[:, :, 0, :] | (codes[:, :, 1, :] << 4)).reshape(n, kh).contiguous()


def unrepack_weight(w_kernel: torch.Tensor, tile: int) -> torch.Tensor:
    """Inverse of :func:`repack_weight`."""
    n, kh = w_kernel.shape
    k = kh * 2
    b = w_kernel.reshape(n, k // tile, tile // 2)
    codes = torch.stack([b & 0xF, b >> 4], dim=2).reshape(n, k // tile, 2, tile // 2)  # [N, t, half, j]
    codes = codes.reshape(n, k)  # channel order within a tile: half * TILE/2 + j
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


@dataclass(frozen=True)
class GemmConfig:
    bm: int
    bn: int
    num_warps: int
    num_stages: int
    split_k: int = 0  # 0: choose to fill the GPU
    group_m: int = 8
    asm: bool = True  # symmetric weights: unpack nibbles four bytes at a time with inline PTX
    fast_cvt: bool = True  # int32 -> float32 by bit pattern instead of I2F
    unpacked: bool = False  # unpack W to a transient int8 [N, K] first, then a pure INT8 GEMM (large M)
    tma: bool = False  # unpacked path: load operand tiles with TMA tensor descriptors

    def label(self) -> str:
        extra = "".join(f"-{k}" for k, on in (("noasm", not self.asm), ("i2f", not self.fast_cvt), ("unpacked", self.unpacked), ("tma", self.tma)) if on)
        return f"BM{self.bm}-BN{self.bn}-w{self.num_warps}-s{self.num_stages}-k{self.split_k or 'auto'}{extra}"


def default_config(m: int, n: int, k: int) -> GemmConfig:
    """Block shapes per token count: the fastest candidates measured on an H100 (BENCHMARKS.md)."""
    if m <= 16:  # weight streaming; split-K fills the GPU
        return GemmConfig(16, 64, 4, 4)
    if m <= 512:
        return GemmConfig(64, 128, 4, 4)
    return GemmConfig(64, 128, 4, 4, split_k=1, unpacked=True, tma=True)  # compute-bound: transient int8 W, TMA loads
