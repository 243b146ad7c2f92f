"""Integer primitives: code ranges, symmetric per-block quantization, and the exact blocked integer matmul.

The integer matmul splits the reduction axis into *tiles* of ``min(group, block)`` channels, inside
which both the weight scale and the activation scale are constant. Each tile's partial product is a
sum of integer products; it is then scaled by ``weight scale * activation scale`` and the tiles are
summed -- the computation an INT4/INT8 tensor-core kernel with a per-tile dequantizing epilogue does.

Exactness on CPU: partial products are computed with a floating-point matmul of integer-valued
tensors. Every partial sum of a tile is an integer of magnitude at most ``tile * max|a| * max|w|``;
below 2**24 (float32) or 2**53 (float64) every such integer is representable and every addition is
exact whatever the summation order, so the result is bit-identical to an int32 accumulator.
:func:`int_partial_dtype` picks float32 when the bound allows it, float64 otherwise.
"""

from __future__ import annotations

import torch

from lowbit.quant.packing import unpack

FP32_EXACT = 2**24
FP64_EXACT = 2**53


def qrange(bits: int, sym: bool = True) -> tuple[int, int]:
    """Integer range of `bits`-bit codes: signed two's complement range, or unsigned for asymmetric."""
    if sym:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def weight_integers(packed: torch.Tensor, bits: int, group: int, zero: torch.Tensor | None = None) -> torch.Tensor:
    """The signed integers ``[N, K]`` (int16) that multiply a weight's scale, from codes packed along K.

    Symmetric (``zero`` None): ``code - 2**(bits-1)``; with an integer zero point per group: ``code - zero``.
    """
    codes = unpack(packed, bits, dim=1).to(torch.int16)
    if zero is None:
        return codes - (1 << (bits - 1))
    return codes - zero.to(torch.int16).repeat_interleave(group, dim=1)


def pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last axis of `x` up to `size` (no copy when already that long)."""
    extra = size - x.shape[-1]
    if extra < 0:
        raise ValueError(f"cannot pad an axis of {x.shape[-1]} down to {size}")
    if extra == 0:
        return x
    return torch.nn.functional.pad(x, (0, extra))



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
    epilogue_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Blocked integer matmul: ``sum_tiles (A_tile @ W_tile.T) * a_scale * w_scale`` in `epilogue_dtype`.

    ``a_codes [T, K]`` integer-valued, ``a_scale [T, K // block]``, ``w_int [N, K]`` integers (or
    already tiled by :func:`tile_weight`: ``[K // tile, tile, N]`` in `partial_dtype`),
    ``w_scale [N, K // group]``. One of `block`/`group` must divide the other; a tile spans
    ``min(block, group)`` channels. Partial products are exact integers (in `partial_dtype`, chosen by
    :func:`int_partial_dtype` when not given); the epilogue scales them in `epilogue_dtype` (float32, or
    float64 for a reference) and sums the tiles.
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
    ws = w_scale.to(epilogue_dtype).repeat_interleave(group // tile, dim=1).t().unsqueeze(1)  # [nt, 1, N]
    out = torch.empty(t, n, dtype=epilogue_dtype, device=a_codes.device)
    for start in range(0, t, chunk):
        a = a_codes[start : start + chunk]
        ti = a.shape[0]
        a_t = a.to(partial_dtype).reshape(ti, nt, tile).permute(1, 0, 2)  # [nt, T, tile]
        partial = torch.bmm(a_t, w_t).to(epilogue_dtype)  # exact integers, [nt, T, N]
        asc = a_scale[start : start + chunk].to(epilogue_dtype).repeat_interleave(block // tile, dim=1).t().unsqueeze(-1)  # [nt, T, 1]
        out[start : start + ti] = (partial * asc * ws).sum(dim=0)
    return out
