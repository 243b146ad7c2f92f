"""Pure-PyTorch layout helpers of the GEMM kernel (importable without Triton): the weight layout, configs,
the per-shape launch plan and the reusable buffers of the call path.

Weight layout (*tile-split*, what :class:`~lowbit.wa.linear.QuantLinear` stores and the kernel reads): INT4
codes ``[N, K]`` packed two per byte along K, inside each tile of ``tile`` channels byte ``j`` holding
channel ``j`` (low nibble) and channel ``j + tile/2`` (high nibble). :func:`pack_tiles` /
:func:`unpack_tiles` convert codes; :func:`repack_weight` / :func:`unrepack_weight` convert from / to the
plain layout of :func:`lowbit.quant.pack` (channel ``2i`` low nibble of byte ``i``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _check_tile(k: int, tile: int) -> None:
    if tile <= 0 or tile % 2 or k % tile:
        raise ValueError(f"tile {tile} must be a positive even number dividing K={k}")


def pack_tiles(codes: torch.Tensor, tile: int) -> torch.Tensor:
    """4-bit codes ``[N, K]`` (uint8 in [0, 15]) -> tile-split bytes ``[N, K/2]``."""
    n, k = codes.shape
    _check_tile(k, tile)
    c = codes.to(torch.uint8).reshape(n, k // tile, 2, tile // 2)  # [N, tiles, half, j]
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(n, k // 2).contiguous()


def unpack_tiles(packed: torch.Tensor, tile: int) -> torch.Tensor:
    """Inverse of :func:`pack_tiles`: uint8 codes ``[N, K]`` in channel order."""
    n, kh = packed.shape
    k = kh * 2
    _check_tile(k, tile)
    b = packed.reshape(n, k // tile, 1, tile // 2)
    return torch.cat([b & 0xF, b >> 4], dim=2).reshape(n, k)


def repack_weight(qweight: torch.Tensor, tile: int) -> torch.Tensor:
    """Plain-packed ``[N, K/2]`` (channel 2i low nibble) -> the kernel's tile-split layout."""
    n, kh = qweight.shape
    if (2 * kh) % tile or tile % 32:
        raise ValueError(f"tile {tile} must be a multiple of 32 dividing K={2 * kh}")
    codes = torch.stack([qweight & 0xF, qweight >> 4], dim=-1).reshape(n, 2 * kh)
    return pack_tiles(codes, tile)


def unrepack_weight(w_kernel: torch.Tensor, tile: int) -> torch.Tensor:
    """Inverse of :func:`repack_weight`."""
    codes = unpack_tiles(w_kernel, tile)
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


MAX_DECODE_M = 16  # the decode bucket: weight-streaming configs (split-K), the layers' prepared launches


def default_config(m: int, n: int, k: int) -> GemmConfig:
    """Block shapes per token count: the fastest candidates measured on an H100 (BENCHMARKS.md)."""
    if m <= MAX_DECODE_M:  # weight streaming; split-K fills the GPU
        return GemmConfig(16, 64, 4, 4)
    if m <= 512:
        return GemmConfig(64, 128, 4, 4)
    return GemmConfig(64, 128, 4, 4, split_k=1, unpacked=True, tma=True)  # compute-bound: transient int8 W, TMA loads


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host-side launch math (``triton.cdiv`` is a constexpr function: µs per call from Python)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1), for host-side launch math (as ``triton.next_power_of_2``)."""
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class GemmPlan:
    """Everything a GEMM launch derives from its shape, computed once (:func:`plan_gemm`) and cached."""

    config: GemmConfig
    tiles_mn: int  # output tiles (grid dim 0)
    split: int  # K splits (grid dim 1; 1 = no split-K partials)
    tiles_per_split: int


def plan_gemm(m: int, n: int, k: int, tile: int, sm_count: int, config: GemmConfig | None = None) -> GemmPlan:
    """The launch plan of an ``[m, k] x [n, k]^T`` GEMM cut into K tiles of `tile` channels: the config
    (:func:`default_config` unless given) and, for the packed kernel, the split-K that fills ``2 * sm_count``
    programs when the output alone has fewer tiles."""
    if m < 0 or n <= 0 or k <= 0 or tile <= 0 or k % tile:
        raise ValueError(f"bad GEMM shape m={m}, n={n}, k={k}, tile={tile}")
    cfg = config or default_config(m, n, k)
    n_mn = cdiv(max(m, 1), cfg.bm) * cdiv(n, cfg.bn)
    if cfg.unpacked:
        return GemmPlan(cfg, n_mn, 1, k // tile)
    nt = k // tile
    split = cfg.split_k
    if split == 0:
        split = 1
        target = 2 * sm_count
        if n_mn < target:
            split = min(cdiv(target, n_mn), max(1, nt // 2))
    tps = cdiv(nt, split)
    return GemmPlan(cfg, n_mn, cdiv(nt, tps), tps)


class PlanCache:
    """Plans keyed by everything they depend on: ``(m, n, k, tile, device, config)``; one computation per key."""

    def __init__(self):
        self._plans: dict[tuple, GemmPlan] = {}

    def get(self, m: int, n: int, k: int, tile: int, device: torch.device, sm_count, config: GemmConfig | None = None) -> GemmPlan:
        """`sm_count` is a callable ``device -> int``, only called on a miss."""
        key = (m, n, k, tile, str(device), config)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = plan_gemm(m, n, k, tile, sm_count(device), config)
        return plan

    def __len__(self) -> int:
        return len(self._plans)


class BufferPool:
    """Reusable buffers: one flat tensor per ``(name, dtype, device, stream)``, grown to the largest request
    and handed out as a view of its prefix with the requested shape. The call path allocates nothing once
    the largest shape has been seen (addresses stay fixed for CUDA graphs: warm up with the largest shape
    before capturing), and memory stays bounded by the largest request whatever mix of shapes comes.

    A request overwrites what the previous one with the same name held, so a pool holds *workspace*
    (consumed within one call, in stream order) or the outputs of *one* owner (a layer) whose caller is
    done with an output before calling again."""

    def __init__(self):
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, stream: int = 0) -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"buffer '{name}': negative shape {shape}")
        numel = 1
        for s in shape:
            numel *= s
        key = (name, dtype, str(device), stream)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._bufs[key] = torch.empty(max(numel, 1), dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())

    def clear(self) -> None:
        self._bufs.clear()

    def __len__(self) -> int:
        return len(self._bufs)
