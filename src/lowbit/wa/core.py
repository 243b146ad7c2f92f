"""Integer building blocks of weight/activation quantization (no nn.Module here).

Conventions shared by every function:

* A linear layer computes ``y = x @ W.T`` with ``W`` of shape ``[out, in]``; quantization runs along
  the *input* axis (the reduction axis of the matmul).
* Weights are quantized in groups of ``group`` consecutive input channels, one scale per (row, group).
  Symmetric: ``w ≈ q * s`` with ``q`` in ``[-2**(b-1), 2**(b-1) - 1]``, stored as ``q + 2**(b-1)``
  (unsigned codes, packed with :func:`lowbit.quant.pack`). Asymmetric: ``w ≈ (q - z) * s`` with
  ``q`` in ``[0, 2**b - 1]`` and an *integer* zero point ``z`` (so the partial products stay integers).
* Activations are quantized per token, in blocks of ``block`` input channels, symmetrically with one
  scale per (token, block): ``x ≈ c * a`` with ``c`` in ``[-2**(b-1), 2**(b-1) - 1]``. The bit-width
  is chosen per block (4 or 8 bits, from a boolean INT8-block mask).
* Weight scales are stored as float16 (what a kernel reads); activation scales are computed in float32.

The integer matmul splits the reduction axis into *tiles* of ``min(group, block)`` channels, inside
which both the weight scale and the activation scale are constant. Each tile's partial product is a
sum of integer products; it is then scaled by ``weight scale * activation scale`` and the tiles are
summed -- the computation an INT4/INT8 tensor-core kernel with a per-tile dequantizing epilogue does.

Exactness of the integer partial products on CPU: they are computed with a floating-point matmul of
integer-valued tensors. Every partial sum of a tile is an integer of magnitude at most
``tile * max|c| * max|q|``; when that bound is below 2**24 (float32) or 2**53 (float64) every such
integer is representable and every addition is exact whatever the summation order, so the result is
bit-identical to an int32 accumulator. :func:`int_partial_dtype` picks float32 when the bound allows
it, float64 otherwise (and refuses beyond 2**53). Tests check this against an int64 matmul.
"""

from __future__ import annotations

import math

import torch

from lowbit.quant.packing import pack, unpack

FP32_EXACT = 2**24
FP64_EXACT = 2**53


def qrange(bits: int, sym: bool = True) -> tuple[int, int]:
    """Integer range of `bits`-bit codes: signed two's complement range, or unsigned for asymmetric."""
    if sym:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last axis of `x` up to `size` (no copy when already that long)."""
    extra = size - x.shape[-1]
    if extra < 0:
        raise ValueError(f"cannot pad an axis of {x.shape[-1]} down to {size}")
    if extra == 0:
        return x
    return torch.nn.functional.pad(x, (0, extra))


# ---------------------------------------------------------------------------------------- weights


def quantize_weight(w: torch.Tensor, bits: int, group: int, sym: bool = True):
    """Group-wise quantization of ``w [out, in]`` along ``in`` (``in`` must be a multiple of `group`).

    Returns ``(q, scale, zero)``: ``q`` int16 integer values (signed for sym, unsigned for asym),
    ``scale`` float16 ``[out, in // group]``, ``zero`` uint8 integer zero points (``None`` for sym).
    Scales are rounded to float16 before the codes are computed, so ``q * scale`` is exactly what a
    kernel holding the stored scale reconstructs.
    """
    out_f, in_f = w.shape
    if in_f % group:
        raise ValueError(f"weight input dim {in_f} is not a multiple of the group size {group}")
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


def weight_codes(q: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """Unsigned uint8 storage codes for integer values `q` (sym values are offset by 2**(b-1))."""
    offset = (1 << (bits - 1)) if sym else 0
    return (q.to(torch.int16) + offset).to(torch.uint8)


def pack_weight(q: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """Pack integer weight values ``[out, in]`` along ``in`` (two 4-bit codes per byte)."""
    return pack(weight_codes(q, bits, sym), bits, dim=1)


def unpack_weight(packed: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """Inverse of :func:`pack_weight`: int16 integer values (signed for sym, unsigned for asym)."""
    codes = unpack(packed, bits, dim=1).to(torch.int16)
    return codes - (1 << (bits - 1)) if sym else codes


def weight_int(packed: torch.Tensor, zero: torch.Tensor | None, bits: int, sym: bool, group: int) -> torch.Tensor:
    """The signed integers that multiply the weight scale: ``q`` (sym) or ``q - z`` (asym), int16."""
    q = unpack_weight(packed, bits, sym)
    if zero is not None:
        q = q - zero.to(torch.int16).repeat_interleave(group, dim=1)
    return q


def dequantize_weight(packed, scale, zero, bits: int, sym: bool, group: int, dtype=torch.float32) -> torch.Tensor:
    """Float weight ``[out, in_padded]`` the quantized storage stands for."""
    wi = weight_int(packed, zero, bits, sym, group).float()
    return (wi * scale.float().repeat_interleave(group, dim=1)).to(dtype)


# ------------------------------------------------------------------------------------ activations


def quantize_activation(x: torch.Tensor, block: int, int8_mask: torch.Tensor | None, low_bits: int = 4):
    """Per-token, per-block symmetric quantization of ``x [tokens, in]`` (``in`` a multiple of `block`).

    Blocks where ``int8_mask`` is true get 8 bits, the others `low_bits` (``None``: all `low_bits`).
    Returns ``(codes, scale)``: float32 integer-valued codes ``[tokens, in]`` and float32 scales
    ``[tokens, in // block]``. The scale maps the block's max |x| to the largest positive code; an
    all-zero block gets scale 1 (its codes are 0 anyway).
    """
    t, k = x.shape
    nb = k // block
    if nb * block != k:
        raise ValueError(f"activation width {k} is not a multiple of the block size {block}")
    xb = x.float().reshape(t, nb, block)
    hi_low = float((1 << (low_bits - 1)) - 1)
    if int8_mask is None:
        hi = torch.full((nb,), hi_low, dtype=torch.float32, device=x.device)
    else:
        hi = torch.where(int8_mask.to(x.device), torch.tensor(127.0, device=x.device), torch.tensor(hi_low, device=x.device))
    amax = xb.abs().amax(dim=-1)
    scale = amax / hi
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(xb / scale.unsqueeze(-1))
    # |x| <= amax so codes already lie in [-hi, hi] up to float noise; clamp to the code range anyway
    hb = hi.view(1, nb, 1)
    codes = torch.maximum(torch.minimum(codes, hb), -hb - 1)
    return codes.reshape(t, k), scale


def dequantize_activation(codes: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """``codes * scale`` with scales broadcast over their blocks (float32)."""
    t, k = codes.shape
    return (codes.reshape(t, k // block, block) * scale.unsqueeze(-1)).reshape(t, k)


# ---------------------------------------------------------------------------------- integer matmul


def int_partial_dtype(tile: int, a_max: int, w_max: int) -> torch.dtype:
    """Float dtype in which a tile's integer dot products are exact (see the module docstring)."""
    bound = tile * a_max * w_max
    if bound < FP32_EXACT:
        return torch.float32
    if bound < FP64_EXACT:
        return torch.float64
    raise ValueError(f"tile of {tile} channels with |a|<={a_max}, |w|<={w_max} overflows exact float64 accumulation")


def tile_weight(w_int: torch.Tensor, tile: int, dtype: torch.dtype) -> torch.Tensor:
    """Integer weights ``[N, K]`` laid out as ``[K // tile, tile, N]`` (contiguous) in float `dtype`."""
    n, k = w_int.shape
    return w_int.to(dtype).reshape(n, k // tile, tile).permute(1, 2, 0).contiguous()


def int_matmul(
    a_codes: torch.Tensor,
    a_scale: torch.Tensor,
    block: int,
    w_int: torch.Tensor,
    w_scale: torch.Tensor,
    group: int,
    partial_dtype: torch.dtype | None = None,
    chunk: int = 2048,
) -> torch.Tensor:
    """Blocked integer matmul: ``sum_tiles (A_tile @ W_tile.T) * a_scale * w_scale`` in float32.

    ``a_codes [T, K]`` integer-valued, ``a_scale [T, K // block]``, ``w_int [N, K]`` integers (or
    already tiled by :func:`tile_weight`: ``[K // tile, tile, N]`` in `partial_dtype`),
    ``w_scale [N, K // group]``. One of `block`/`group` must divide the other; a tile spans
    ``min(block, group)`` channels. Partial products are exact integers (in `partial_dtype`, chosen by
    :func:`int_partial_dtype` when not given); the epilogue scales them in float32 and sums the tiles.
    Tokens are processed `chunk` at a time to bound the ``[tiles, T, N]`` intermediate.
    """
    t, k = a_codes.shape
    if max(block, group) % min(block, group):
        raise ValueError(f"block {block} and group {group}: one must be a multiple of the other")
    tile = min(block, group)
    nt = k // tile
    if partial_dtype is None:
        a_max = int(a_codes.abs().max().item()) if a_codes.numel() else 0
        w_max = int(w_int.abs().max().item()) if w_int.numel() else 0
        partial_dtype = int_partial_dtype(tile, max(a_max, 1), max(w_max, 1))
    if w_int.dim() == 3:
        w_t = w_int.to(partial_dtype)  # pre-tiled [nt, tile, N]
        if w_t.shape[:2] != (nt, tile):
            raise ValueError(f"tiled weight of shape {tuple(w_t.shape)} does not fit {nt} tiles of {tile}")
    else:
        w_t = tile_weight(w_int, tile, partial_dtype)
    n = w_t.shape[2]
    ws = w_scale.float().repeat_interleave(group // tile, dim=1).t().unsqueeze(1)  # [nt, 1, N]
    out = torch.empty(t, n, dtype=torch.float32, device=a_codes.device)
    for start in range(0, t, chunk):
        a = a_codes[start : start + chunk]
        ti = a.shape[0]
        a_t = a.to(partial_dtype).reshape(ti, nt, tile).permute(1, 0, 2)  # [nt, T, tile]
        partial = torch.bmm(a_t, w_t).float()  # exact integers, [nt, T, N]
        asc = a_scale[start : start + chunk].float().repeat_interleave(block // tile, dim=1).t().unsqueeze(-1)  # [nt, T, 1]
        out[start : start + ti] = (partial * asc * ws).sum(dim=0)
    return out


def ceil_blocks(frac: float, n_blocks: int) -> int:
    """Number of INT8 blocks for a fraction: ``ceil(frac * n_blocks)`` (robust to float fuzz), 0 for 0."""
    if frac <= 0:
        return 0
    return min(n_blocks, math.ceil(frac * n_blocks - 1e-9))
