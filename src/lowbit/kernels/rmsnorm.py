"""The permuted RMSNorm of a folded FMPQ layer (:class:`lowbit.wa.fold.PermutedRMSNorm`) in one launch.

``y[..., j] = weight[perm[j]] * (x[..., perm[j]] * rsqrt(mean(x ** 2) + eps))``, the product in the output dtype
as the module computes it. PyTorch's eager module runs it as about eight kernels (cast, square, mean, add, rsqrt,
multiply, gather, multiply); this is one program per token. The mean is summed in another order than PyTorch's, so
outputs may differ from the module's in the last bit (the module's own path stays bit-exact to the plain norm).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.gemm import _interpreting, _launch
from lowbit.kernels.launch import FastLaunch
from lowbit.kernels.layout import next_pow2


@triton.jit
def _permuted_rmsnorm_kernel(X, s_xm, PERM, W, OUT, s_om, K, eps, KB: tl.constexpr, APPROX: tl.constexpr):
    m = tl.program_id(0)
    j = tl.arange(0, KB)
    valid = j < K
    x = tl.load(X + m * s_xm + j, mask=valid, other=0).to(tl.float32)
    var = tl.sum(x * x, 0) / K
    if APPROX:
        r = tl.math.rsqrt(var + eps)
    else:  # the interpreter: numpy's
        r = 1.0 / tl.sqrt(var + eps)
    src = tl.load(PERM + j, mask=valid, other=0)
    h = (tl.load(X + m * s_xm + src, mask=valid, other=0).to(tl.float32) * r).to(X.dtype.element_ty)
    w = tl.load(W + j, mask=valid, other=0)
    y = w.to(tl.float32) * h.to(tl.float32)
    tl.store(OUT + m * s_om + j, y.to(OUT.dtype.element_ty), mask=valid)


_LAUNCH = FastLaunch(_permuted_rmsnorm_kernel)


def permuted_rmsnorm(x: torch.Tensor, perm: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x**2, -1) + eps))[..., perm]`` in one launch: `weight` already in `perm` order
    (``[K]``), `perm` int32 or int64 ``[K]``; the output dtype is that of ``weight * x`` (PyTorch's promotion)."""
    k = x.shape[-1]
    if perm.shape != (k,) or weight.shape != (k,):
        raise ValueError(f"perm and weight must have shape ({k},), got {tuple(perm.shape)} and {tuple(weight.shape)}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
    if x2.shape[0]:
        _launch(_LAUNCH, (x2.shape[0],))(x2, x2.stride(0), perm, weight, out, out.stride(0), k, float(eps),
                                         KB=next_pow2(k), APPROX=not _interpreting(), num_warps=8 if k >= 2048 else 4)
    return out.view(*x.shape[:-1], k)
