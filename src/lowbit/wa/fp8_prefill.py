"""FP8 prefill for W4Ax layers (opt-in: ``prefill=fp8`` in the ``--wa`` spec of fmpq, w4a8 and w4a4).

A prefill-sized call (``tokens >= FP8_MIN_TOKENS``) runs one FP8 e4m3 GEMM instead of the integer W4Ax one:

* **weights**: the stored INT4 codes times their group scale, divided by a per-row scale
  ``r_n = max_g s_ng * WMAX / 448`` (``WMAX``: the largest ``|q|``, 8 symmetric, 15 asymmetric), rounded to e4m3
  (nearest even). Every group factor ``s_ng / r_n`` is computed once in float32, so the GPU kernel and this
  reference round the same float32 products;
* **activations**: per token, divided by ``max |x| / 448`` and rounded to e4m3;
* ``y = (x8 @ w8^T) * s_x * r + bias``: on CUDA ``torch._scaled_mm`` with row-wise scales (FP8 tensor cores), the
  weight converted from the stored layout by one Triton launch into a transient e4m3 ``[N, K]`` (no second
  weight copy is kept); elsewhere the same products in float32.

This is not the integer W4A4/W4A8 function: both operands take e4m3 rounding (3 mantissa bits), and the activations
lose FMPQ's INT4/INT8 blocks for a per-token FP8 scale. Decode-sized calls keep the integer path, so a generation's
prefill and decode use different activation quantizers. Its quality cost is measured in BENCHMARKS/QUALITY.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
FP8_MIN_TOKENS = 512  # calls with at least this many tokens take the FP8 GEMM (prefill); fewer keep the integer path


def weight_factors(w_scale: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(group factors s_ng / r_n [N, G], row scales r_n [N])`` in float32 (see the module docstring)."""
    wmax = float(1 << (bits - 1)) if sym else float((1 << bits) - 1)
    s = w_scale.float()
    r = (s.amax(dim=1) * (wmax / E4M3_MAX)).clamp(min=torch.finfo(torch.float32).tiny)
    return s / r[:, None], r


def fp8_weight_ref(w_int: torch.Tensor, factors: torch.Tensor, group: int) -> torch.Tensor:
    """e4m3 ``[N, K]`` of the signed weight integers ``w_int [N, K]`` times their group factor."""
    return (w_int.float() * factors.repeat_interleave(group, dim=1)).to(torch.float8_e4m3fn)


def fp8_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e4m3 [T, K], per-token scale [T] float32)`` of ``x [T, K]``."""
    xf = x.float()
    amax = xf.abs().amax(dim=1)
    # a tensor divisor: CUDA divides by a Python scalar as a multiply by its reciprocal, which can differ in the
    # last bit from the correctly rounded quotient the kernel (and the CPU) computes
    s = (amax / torch.full_like(amax, E4M3_MAX)).clamp(min=torch.finfo(torch.float32).tiny)
    return (xf / s[:, None]).to(torch.float8_e4m3fn), s


def fp8_matmul_ref(x8: torch.Tensor, sx: torch.Tensor, w8: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """float32 ``(x8 @ w8^T) * sx * r`` (the GEMM's exact products, float32 sums)."""
    return (x8.float() @ w8.float().t()) * sx[:, None] * r[None, :]


def uses_fp8(ql, tokens: int) -> bool:
    """Whether a call of `tokens` tokens through QuantLinear `ql` takes the FP8 GEMM."""
    return ql.cfg.prefill == "fp8" and tokens >= FP8_MIN_TOKENS and ql.quantizes_activations \
        and ql.cfg.w_bits == 4


def fp8_forward(ql, x: torch.Tensor) -> torch.Tensor:
    """``ql(x)`` through the FP8 GEMM: ``[..., out]`` in ``x``'s dtype."""
    lead = x.shape[:-1]
    factors, r = ql._cached_fp8_factors()
    if x.is_cuda and _cuda_fp8_ok(x):
        from lowbit.kernels import fp8_weight as kern

        plain = ql.cfg.rotate == "none" and not ql.gathers_input and ql.padded_in == ql.in_features
        # as the layer's input arrives (no rotation, gather or padding to apply), else prepared in float32
        xp = x.reshape(-1, ql.in_features) if plain else ql.prepare_input(x, arrives_permuted=ql.input_permuted)
        x8, sx = kern.fp8_activation(xp)
        w8 = kern.fp8_weight(ql.qweight, factors, ql.w_zero, ql.group, ql.tile, ql.cfg.sym)
        y = torch._scaled_mm(x8, w8.t(), scale_a=sx[:, None], scale_b=r[None, :], out_dtype=torch.bfloat16).float()
    else:
        x8, sx = fp8_activation(ql.prepare_input(x, arrives_permuted=ql.input_permuted))  # rotated, permuted, padded
        y = fp8_matmul_ref(x8, sx, fp8_weight_ref(ql.weight_int(), factors, ql.group), r)
    if ql.bias is not None:
        y = y + ql.bias.float()
    return y.reshape(*lead, ql.out_features).to(x.dtype)


def _cuda_fp8_ok(x: torch.Tensor) -> bool:
    """FP8 tensor cores (sm_89+) and Triton for the conversions, for CUDA tensor `x`."""
    from lowbit.kernels import triton_ready

    return torch.cuda.get_device_capability(x.device) >= (8, 9) and triton_ready(x)
