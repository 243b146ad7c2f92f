"""Weight storage of W/A quantization (no nn.Module here); integer primitives live in :mod:`lowbit.quant`.

Conventions shared by every function:

* A linear layer computes ``y = x @ W.T`` with ``W`` of shape ``[out, in]``; quantization runs along
  the *input* axis (the reduction axis of the matmul).
* Weights are quantized in groups of ``group`` consecutive input channels, one scale per (row, group)
  (:func:`lowbit.quant.affine.quantize_integer`). Symmetric: ``w ≈ q * s`` with ``q`` in
  ``[-2**(b-1), 2**(b-1) - 1]``, stored as ``q + 2**(b-1)`` (unsigned codes, packed with
  :func:`lowbit.quant.pack`). Asymmetric: ``w ≈ (q - z) * s`` with ``q`` in ``[0, 2**b - 1]`` and an
  *integer* zero point ``z`` (so the partial products stay integers).
* Activations are quantized per token, in blocks of ``block`` input channels, symmetrically
  (:func:`lowbit.quant.integer.quantize_activation`); the bit-width is chosen per block (4 or 8 bits,
  from a boolean INT8-block mask). The exact blocked integer matmul is
  :func:`lowbit.quant.integer.int_matmul`.
* Weight scales are stored as float16 (what a kernel reads); activation scales are computed in float32.
"""

from __future__ import annotations

import math

import torch

from lowbit.kernels.layout import pack_tiles, unpack_tiles
from lowbit.quant.affine import ZeroPoint, quantize_integer
from lowbit.quant.packing import pack, unpack


def quantize_weight(w: torch.Tensor, bits: int, group: int, sym: bool = True):
    """Group-wise quantization of ``w [out, in]`` along ``in``: ``(q int16, scale fp16, zero uint8 | None)``."""
    return quantize_integer(w, bits, group, ZeroPoint.NONE if sym else ZeroPoint.INT)


def weight_codes(q: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """Unsigned uint8 storage codes for integer values `q` (sym values are offset by 2**(b-1))."""
    offset = (1 << (bits - 1)) if sym else 0
    return (q.to(torch.int16) + offset).to(torch.uint8)


def pack_weight(q: torch.Tensor, bits: int, sym: bool, tile: int | None = None) -> torch.Tensor:
    """Pack integer weight values ``[out, in]`` along ``in`` (two 4-bit codes per byte).

    ``tile`` None: the plain layout of :func:`lowbit.quant.pack` (channel ``2i`` in the low nibble of byte
    ``i``); a tile (4-bit only): the GEMM kernel's tile-split layout (:func:`lowbit.kernels.layout.pack_tiles`:
    inside each tile, byte ``j`` holds channels ``j`` and ``j + tile/2``), which QuantLinear stores."""
    codes = weight_codes(q, bits, sym)
    if tile is not None and bits == 4:
        return pack_tiles(codes, tile)
    return pack(codes, bits, dim=1)


def weight_codes_unpacked(packed: torch.Tensor, bits: int, tile: int | None = None) -> torch.Tensor:
    """Unsigned codes ``[out, in]`` in channel order from either layout of :func:`pack_weight`."""
    if tile is not None and bits == 4:
        return unpack_tiles(packed, tile)
    return unpack(packed, bits, dim=1)


def unpack_weight(packed: torch.Tensor, bits: int, sym: bool, tile: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_weight`: int16 integer values (signed for sym, unsigned for asym)."""
    codes = weight_codes_unpacked(packed, bits, tile).to(torch.int16)
    return codes - (1 << (bits - 1)) if sym else codes


def weight_int(packed: torch.Tensor, zero: torch.Tensor | None, bits: int, sym: bool, group: int,
               tile: int | None = None) -> torch.Tensor:
    """The signed integers that multiply the weight scale: ``q`` (sym) or ``q - z`` (asym), int16."""
    codes = weight_codes_unpacked(packed, bits, tile).to(torch.int16)
    if sym:
        return codes - (1 << (bits - 1))
    return codes - zero.to(torch.int16).repeat_interleave(group, dim=1)


def dequantize_weight(packed, scale, zero, bits: int, sym: bool, group: int, dtype=torch.float32,
                      tile: int | None = None) -> torch.Tensor:
    """Float weight ``[out, in_padded]`` the quantized storage stands for."""
    wi = weight_int(packed, zero, bits, sym, group, tile).float()
    return (wi * scale.float().repeat_interleave(group, dim=1)).to(dtype)


def ceil_blocks(frac: float, n_blocks: int) -> int:
    """Number of INT8 blocks for a fraction: ``ceil(frac * n_blocks)`` (robust to float fuzz), 0 for 0."""
    if frac <= 0:
        return 0
    return min(n_blocks, math.ceil(frac * n_blocks - 1e-9))
