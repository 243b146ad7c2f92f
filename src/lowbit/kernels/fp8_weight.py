"""The FP8 prefill's two conversions (:mod:`lowbit.wa.fp8_prefill`), one launch each, bit-identical to its PyTorch
reference:

* stored INT4 weights -> a transient e4m3 ``[N, K]``: each program unpacks one tile of rows from the kernel layout
  (as :func:`lowbit.kernels.gemm.unpack_weight_int8` does), multiplies the signed integers by their group's float32
  factor and rounds to e4m3 (nearest even);
* activations ``[T, K]`` -> e4m3 with a per-token scale ``max |x| / 448``: one program per token, the division
  IEEE-rounded as PyTorch's."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.gemm import _interpreting, _launch, _program_weight_tile
from lowbit.kernels.launch import FastLaunch
from lowbit.kernels.layout import cdiv


@triton.jit
def _fp8_weight_kernel(W, s_wn, WZ, s_wzn, F, s_fn, OUT, s_on, N,
                       GROUP: tl.constexpr, TILE: tl.constexpr, BN: tl.constexpr, HAS_ZERO: tl.constexpr,
                       USE_ASM: tl.constexpr):
    HALF: tl.constexpr = TILE // 2
    w_lo, w_hi, rn, nm, t, j = _program_weight_tile(W, s_wn, WZ, s_wzn, N, GROUP, TILE, BN, HAS_ZERO, USE_ASM)
    f = tl.load(F + rn * s_fn + (t * TILE) // GROUP, mask=nm, other=0)[:, None]
    o = OUT + rn[:, None] * s_on + t * TILE + j[None, :]
    tl.store(o, (w_lo.to(tl.float32) * f).to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=nm[:, None])
    tl.store(o + HALF, (w_hi.to(tl.float32) * f).to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=nm[:, None])


def fp8_weight(w_kernel: torch.Tensor, factors: torch.Tensor, w_zero: torch.Tensor | None, group: int, tile: int,
               sym: bool = True) -> torch.Tensor:
    """e4m3 ``[N, K]`` of the kernel-layout INT4 weights ``w_kernel [N, K/2]`` times ``factors [N, K/group]``
    (float32: group scale over row scale); ``w_zero`` for asymmetric weights."""
    n, kh = w_kernel.shape
    k = 2 * kh
    if factors.dtype != torch.float32 or factors.shape != (n, k // group):
        raise ValueError(f"factors must be float32 [{n}, {k // group}], got {factors.dtype} {tuple(factors.shape)}")
    if (w_zero is None) != sym:
        raise ValueError("symmetric weights take no zero point; asymmetric ones need one")
    out = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=w_kernel.device)
    bn = 64
    has_zero = w_zero is not None
    factors = factors.contiguous()
    _launch(_WEIGHT, (cdiv(n, bn), k // tile))(
        w_kernel, w_kernel.stride(0), w_zero if has_zero else w_kernel, w_zero.stride(0) if has_zero else 0,
        factors, factors.stride(0), out, out.stride(0), n,
        GROUP=group, TILE=tile, BN=bn, HAS_ZERO=has_zero, USE_ASM=not _interpreting(), num_warps=4,
    )
    return out


@triton.jit
def _fp8_activation_kernel(X, s_xm, OUT, s_om, S, K, TINY, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    amax = tl.zeros((BLOCK,), tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        x = tl.load(X + row * s_xm + k, mask=k < K, other=0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    s = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), 448.0), TINY)
    tl.store(S + row, s)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        x = tl.load(X + row * s_xm + k, mask=k < K, other=0).to(tl.float32)
        q = tl.math.div_rn(x, s)
        tl.store(OUT + row * s_om + k, q.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=k < K)


def fp8_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e4m3 [T, K], per-token scale [T] float32)`` of ``x [T, K]`` (float), one launch."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, K], got shape {tuple(x.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    t, k = x.shape
    out = torch.empty(t, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(t, dtype=torch.float32, device=x.device)
    if t:
        _launch(_ACTIVATION, (t,))(x, x.stride(0), out, out.stride(0), scale, k, torch.finfo(torch.float32).tiny,
                                   BLOCK=2048, num_warps=8)
    return out, scale


# repeated calls skip the JIT's per-call binding (kernels/launch.py): at M = 512 the eager FP8 call was host-bound
_WEIGHT = FastLaunch(_fp8_weight_kernel)
_ACTIVATION = FastLaunch(_fp8_activation_kernel)

