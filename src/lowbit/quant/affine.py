"""Affine group-wise quantization with a floating-point zero point (scale + zero), as KIVI stores it.

A group of ``group`` consecutive elements along ``dim`` shares one ``scale`` and one ``zero``;
codes are ``q = clamp(round((x - zero) / scale), 0, 2**bits - 1)`` and ``x ≈ q * scale + zero``
(``zero`` is the group minimum, so the grid spans [min, max] exactly as KIVI does).
Scales and zeros are rounded to ``scale_dtype`` *before* the codes are computed, so the
dequantized value is exactly what a kernel holding the stored scales would reconstruct.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from lowbit.quant.integer import qrange
from lowbit.quant.packing import PACKABLE_BITS, pack, unpack


class ZeroPoint(str, Enum):
    """Where a group's offset lives (the zero-point domain)."""

    FLOAT = "float"  # x = code * scale + zero, zero = the group minimum in fp16, codes unsigned (KIVI)
    INT = "int"  # x = (code - zero) * scale with an integer zero; the grid contains 0 (asymmetric weights)
    NONE = "none"  # x = code * scale, signed codes, max |x| maps to 2**(bits-1) - 1 (symmetric)


@dataclass
class QuantizedTensor:
    """Packed codes plus per-group scale and zero; shapes keep the quantized axis at `dim`."""

    packed: torch.Tensor  # uint8, the quantized axis shrunk by 8 // bits
    scale: torch.Tensor  # one per group: the quantized axis has length n // group
    zero: torch.Tensor
    bits: int
    group: int
    dim: int
    shape: tuple[int, ...]

    def nbytes(self) -> int:
        """True bytes held: packed codes plus scales and zeros."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))


def _validate(x: torch.Tensor, bits: int, group: int, dim: int) -> int:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"unsupported bit-width {bits}: allowed bit-widths are {PACKABLE_BITS}")
    if x.dim() == 0:
        raise ValueError("cannot quantize a scalar: give a tensor with at least one axis")
    if not x.is_floating_point():
        raise ValueError(f"quantize expects a floating-point tensor, got {x.dtype}")
    dim = dim % x.dim()
    n = x.shape[dim]
    if group <= 0 or n % group:
        raise ValueError(
            f"group size {group} does not divide the quantized axis (dim {dim}, length {n}): "
            "use a positive group size that divides it"
        )
    return dim


def _grouped(x: torch.Tensor, group: int, dim: int) -> torch.Tensor:
    """View with the quantized axis split into (n_groups, group), group elements last."""
    moved = x.movedim(dim, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // group, group)


def quantize(
    x: torch.Tensor,
    bits: int,
    group: int,
    dim: int = -1,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedTensor:
    """Quantize `x` asymmetrically to `bits` bits in groups of `group` along `dim`, packed."""
    dim = _validate(x, bits, group, dim)
    codes, scale, zero = quantize_codes(x, bits, group, dim, scale_dtype)
    return QuantizedTensor(pack(codes, bits, dim), scale, zero, bits, group, dim, tuple(x.shape))


def quantize_codes(
    x: torch.Tensor, bits: int, group: int, dim: int = -1, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpacked uint8 codes with their scale and zero (group axis at `dim`, one entry per group)."""
    dim = _validate(x, bits, group, dim)
    g = _grouped(x.float(), group, dim)
    lo = g.amin(dim=-1)
    hi = g.amax(dim=-1)
    qmax = (1 << bits) - 1
    zero = lo.to(scale_dtype)
    tiny = torch.finfo(scale_dtype).tiny
    scale = ((hi - zero.float()) / qmax).clamp_min(tiny).to(scale_dtype)
    codes = torch.round((g - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)).clamp_(0, qmax)
    codes = codes.to(torch.uint8).reshape(*g.shape[:-2], -1).movedim(-1, dim).contiguous()
    return codes, scale.movedim(-1, dim).contiguous(), zero.movedim(-1, dim).contiguous()


def dequantize_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group: int,
    dim: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """codes * scale + zero, with scale/zero broadcast over their groups along `dim`.

    `out` (optional, same shape as `codes`, dtype `dtype`) receives the result without an extra copy.
    """
    dim = dim % codes.dim()
    split = (codes.shape[dim] // group, group)
    compute = dtype if dtype in (torch.float32, torch.float64) else torch.float32  # half types: math in fp32
    grouped = codes.unflatten(dim, split).to(compute)
    z, s = zero.to(compute).unsqueeze(dim + 1), scale.to(compute).unsqueeze(dim + 1)
    if out is None:
        return torch.addcmul(z, grouped, s).flatten(dim, dim + 1).to(dtype)
    if compute == dtype:
        torch.addcmul(z, grouped, s, out=out.unflatten(dim, split))
    else:
        out.copy_(torch.addcmul(z, grouped, s).flatten(dim, dim + 1))
    return out


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct the tensor a :class:`QuantizedTensor` stands for."""
    codes = unpack(q.packed, q.bits, q.dim)
    return dequantize_codes(codes, q.scale, q.zero, q.group, q.dim, dtype)


def fake_quantize(
    x: torch.Tensor, bits: int, group: int, dim: int = -1, scale_dtype: torch.dtype = torch.float16
) -> torch.Tensor:
    """Quantize then dequantize (no packing), in `x`'s dtype."""
    codes, scale, zero = quantize_codes(x, bits, group, dim, scale_dtype)
    return dequantize_codes(codes, scale, zero, group, dim, x.dtype)


def quantize_integer(w: torch.Tensor, bits: int, group: int, zero_point: ZeroPoint = ZeroPoint.NONE):
    """Group-wise quantization of ``w [rows, n]`` along ``n`` to integer values (``n`` a multiple of `group`).

    ``zero_point`` is :attr:`ZeroPoint.NONE` (symmetric) or :attr:`ZeroPoint.INT`. Returns ``(q, scale,
    zero)``: ``q`` int16 values (signed for NONE, unsigned for INT), ``scale`` float16 ``[rows, n // group]``,
    ``zero`` uint8 integer zero points (``None`` for NONE). Scales are rounded to float16 before the codes
    are computed, so ``q * scale`` is exactly what a kernel holding the stored scale reconstructs.
    """
    if zero_point not in (ZeroPoint.NONE, ZeroPoint.INT):
        raise ValueError(f"quantize_integer takes zero_point NONE or INT, got {zero_point}")
    sym = zero_point == ZeroPoint.NONE
    out_f, in_f = w.shape
    if in_f % group:
        raise ValueError(f"input dim {in_f} is not a multiple of the group size {group}")
    g = w.detach().float().reshape(out_f, in_f // group, group)
    lo, hi = qrange(bits, sym)
    tiny = torch.finfo(torch.float16).tiny
    if sym:
        amax = g.abs().amax(dim=-1)
        # map amax to the positive end (2**(b-1) - 1); the extra negative code is rarely used
        scale = (amax / hi).clamp_min(tiny).to(torch.float16)
        q = torch.round(g / scale.float().unsqueeze(-1)).clamp_(lo, hi)
        zero = None
    else:
        gmin = g.amin(dim=-1).clamp(max=0.0)  # the grid always contains 0 (padding stays exact)
        gmax = g.amax(dim=-1).clamp(min=0.0)
        scale = ((gmax - gmin) / hi).clamp_min(tiny).to(torch.float16)
        zero_f = torch.round(-gmin / scale.float()).clamp_(lo, hi)
        q = (torch.round(g / scale.float().unsqueeze(-1)) + zero_f.unsqueeze(-1)).clamp_(lo, hi)
        zero = zero_f.to(torch.uint8)
    return q.reshape(out_f, in_f).to(torch.int16), scale, zero
