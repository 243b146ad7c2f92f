"""Exact bit packing of small unsigned integer codes into uint8 bytes.

2-bit codes are packed 4 per byte, 4-bit codes 2 per byte, 8-bit codes are stored as they are.
The element with the lowest index along the packed axis goes into the lowest bits of its byte.
"""

from __future__ import annotations

import torch

PACKABLE_BITS = (2, 4, 8)


def _check_bits(bits: int) -> int:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes: supported bit-widths are {PACKABLE_BITS}")
    return 8 // bits


def packed_size(n: int, bits: int) -> int:
    """Number of bytes that `n` codes of `bits` bits occupy along the packed axis."""
    per_byte = _check_bits(bits)
    if n % per_byte:
        raise ValueError(f"an axis of {n} {bits}-bit codes cannot be packed: its length must be a multiple of {per_byte}")
    return n // per_byte


def _shifts(bits: int, dim: int, ndim: int, device) -> torch.Tensor:
    """Bit offsets 0, bits, 2*bits, … shaped to broadcast along the axis inserted after `dim`."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=device)
    return shifts.view([-1] + [1] * (ndim - dim - 1))


def pack(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack unsigned `bits`-bit codes (uint8, values < 2**bits) along `dim` into uint8 bytes."""
    per_byte = _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"pack expects uint8 codes, got {codes.dtype}")
    dim = dim % codes.dim()
    packed_size(codes.shape[dim], bits)
    if per_byte == 1:
        return codes.clone()
    grouped = codes.unflatten(dim, (codes.shape[dim] // per_byte, per_byte))
    return (grouped << _shifts(bits, dim + 1, grouped.dim(), codes.device)).sum(dim=dim + 1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack`: expand bytes along `dim` back into uint8 codes."""
    per_byte = _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack expects uint8 bytes, got {packed.dtype}")
    dim = dim % packed.dim()
    if per_byte == 1:
        return packed.clone()
    expanded = packed.unsqueeze(dim + 1) >> _shifts(bits, dim + 1, packed.dim() + 1, packed.device)
    return (expanded & ((1 << bits) - 1)).flatten(dim, dim + 1)
