"""The W4Ax linear of a few decode tokens in one launch on the CUDA cores (``cuda/w4ax_gemv.cu``): the activation
quantizer fused in front of a weight-streaming GEMV with dp4a. The function of the Triton two-launch path
(:func:`lowbit.kernels.gemm.linear_two_launch`): the same activation codes bit for bit and exact int32 partials per
tile, their scaled float32 sum taken in another order (so outputs may differ from it in the last bit).

A persistent grid of one wave: every CTA quantizes the tokens into shared memory once, while its first weight loads are
on the way, then takes sets of 16 output rows in turn (two per warp), reading each row 16 bytes per lane at a time. Up to four tokens, symmetric
weights, bf16/fp16 activations and outputs, blocks of 32-256 channels, K a multiple of 1024; other calls take the
Triton path (:func:`gemv_supported`). Built with the machine's nvcc at first use (:mod:`lowbit.kernels.cuda_build`).
:func:`gemv_reference` is the PyTorch statement of what it computes.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

GEMV_ENV = "LOWBIT_W4AX_GEMV"
KERNEL_MAX_M = 4  # tokens one launch takes (the kernel's limit)
SMEM_LIMIT = 200 * 1024  # the tokens' codes and scales live in shared memory


def gemv_policy(raw: str | None) -> tuple[int, int]:
    """``$LOWBIT_W4AX_GEMV`` checked: ``(most tokens, fewest output rows)`` of a call for the GEMV to take it.
    Unset or ``auto``: :data:`AUTO`; ``0``: never; ``1``..``4``: calls of up to that many tokens, any width."""
    value = (raw or "").strip() or "auto"
    if value == "auto":
        return AUTO
    if value.isdigit() and int(value) <= KERNEL_MAX_M:
        return int(value), 1
    raise ValueError(f"${GEMV_ENV} must be 'auto' or a token count 0..{KERNEL_MAX_M} (0: off), got {raw!r}")


# One token, and layers of 16384 output rows or more. On the H200 (stop 32, graph / eager, with its quantizer) the GEMV
# beat the Triton two launches only on the widest Llama-3-8B layer: 28672x4096 29.7 / 35.2 against 30.2 / 37.8 us. On
# 4096- and 6144-row layers it was 1.1-1.7x slower: every CTA of its one-wave grid quantizes the whole activation, a
# fixed cost that only many rows per CTA pay off.
AUTO = (1, 16384)
GEMV_M, GEMV_MIN_N = gemv_policy(os.environ.get(GEMV_ENV))  # read once at import


def gemv_supported(m: int, k: int, block: int, group: int, w_zero, x_dtype: torch.dtype,
                   out_dtype: torch.dtype) -> bool:
    """Whether the kernel takes this call (shape and dtypes; not whether it is built here)."""
    def pow2(v: int) -> bool:
        return v > 0 and v & (v - 1) == 0

    return (1 <= m <= KERNEL_MAX_M and w_zero is None and x_dtype in (torch.bfloat16, torch.float16)
            and out_dtype in (torch.bfloat16, torch.float16) and pow2(block) and pow2(group) and 32 <= block <= 256
            and group >= 32 and k % 1024 == 0 and k % group == 0 and _smem(m, k, block) <= SMEM_LIMIT)


def _smem(m: int, k: int, block: int) -> int:
    return -(-m * k // 16) * 16 + 4 * m * (k // block) + 4 * m * (k // 32)


_I, _L, _P, _F = ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_float
_ARGTYPES = [_P, _L, _I, _I, _P, _P, _F, _P, _L, _P, _L, _P, _P, _L, _I, _I, _I, _I, _I, _I, _P]


@functools.lru_cache(maxsize=1)
def _launcher():
    from lowbit.kernels.cuda_build import load

    fn = load("w4ax_gemv").lowbit_w4ax_gemv
    fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
    return fn


@functools.lru_cache(maxsize=1)
def built() -> bool:
    """Whether the kernel builds and loads here (tried once)."""
    from lowbit.kernels.cuda_build import CudaKernelUnavailable

    try:
        _launcher()
        return True
    except CudaKernelUnavailable:
        return False


class GemvLinear:
    """One layer's GEMV with its constant operands resolved once: ``gemv(x, out=None)`` for ``x [M, K_in]``."""

    def __init__(self, block: int, w_kernel: torch.Tensor, w_scale: torch.Tensor, group: int,
                 int8_mask: torch.Tensor | None, low_bits: int, perm: torch.Tensor | None,
                 bias: torch.Tensor | None, out_dtype: torch.dtype):
        dev = w_kernel.device
        self.n, self.k = w_kernel.shape[0], 2 * w_kernel.shape[1]
        self.block, self.group, self.out_dtype = block, group, out_dtype
        # constant operands, kept alive here: the kernel reads their addresses
        self.w, self.ws = w_kernel.contiguous(), w_scale.to(torch.float16).contiguous()
        self.perm = None if perm is None else perm.to(device=dev, dtype=torch.int32).contiguous()
        self.mask = None if int8_mask is None else int8_mask.to(device=dev, dtype=torch.int8).contiguous()
        self.bias = None if bias is None else bias.to(device=dev, dtype=torch.float32).contiguous()
        self.low_hi = float((1 << (low_bits - 1)) - 1)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        from lowbit.kernels.gemm import output_buffer, stream_key

        m, k_in = x.shape if x.dim() == 2 else (0, 0)
        if x.dim() != 2 or x.stride(-1) != 1 or (k_in != self.perm.numel() if self.perm is not None else k_in > self.k):
            width = self.perm.numel() if self.perm is not None else f"<= {self.k}"
            raise ValueError(f"x must be a row-contiguous [M, {width}] tensor, got {tuple(x.shape)}")
        out = output_buffer(out, m, self.n, self.out_dtype, x.device)
        err = _launcher()(
            x.data_ptr(), x.stride(0), m, x.dtype == torch.bfloat16, _ptr(self.perm), _ptr(self.mask), self.low_hi,
            self.w.data_ptr(), self.w.stride(0), self.ws.data_ptr(), self.ws.stride(0), _ptr(self.bias),
            out.data_ptr(), out.stride(0), self.out_dtype == torch.bfloat16, self.n, k_in, self.k, self.block,
            self.group, stream_key(x.device))
        if err:
            raise RuntimeError(f"w4ax_gemv launch failed: CUDA error {err}")
        return out


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def w4ax_gemv(x: torch.Tensor, block: int, w_kernel: torch.Tensor, w_scale: torch.Tensor, group: int,
              int8_mask: torch.Tensor | None = None, low_bits: int = 4, perm: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``y [M, N]`` of ``x [M, K_in]`` (M <= 4) in one launch; arguments as
    :func:`lowbit.kernels.gemm.linear_two_launch` (symmetric weights only)."""
    k = 2 * w_kernel.shape[1]
    if not gemv_supported(x.shape[0], k, block, group, None, x.dtype, out_dtype):
        raise ValueError(f"w4ax_gemv takes 1..{KERNEL_MAX_M} bf16/fp16 tokens, blocks of 32..256 channels and groups "
                         f"of 32 or more (powers of two) and a padded width K that is a multiple of 1024; got x "
                         f"{x.dtype} {tuple(x.shape)}, K {k}, block {block}, group {group}, out {out_dtype}")
    return GemvLinear(block, w_kernel, w_scale, group, int8_mask, low_bits, perm, bias, out_dtype)(x, out)


def gemv_reference(x: torch.Tensor, block: int, w_kernel: torch.Tensor, w_scale: torch.Tensor, group: int,
                   int8_mask: torch.Tensor | None = None, low_bits: int = 4, perm: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """What the kernel computes, in PyTorch: the reference quantizer, exact partials per tile, the scaled sum in
    float64 (the kernel's float32 sum is within its rounding of this), + bias, cast to `out_dtype`."""
    from lowbit.kernels.layout import unrepack_weight
    from lowbit.kernels.reference import quantize_activation_ref, w4a8_gemm_ref

    k = 2 * w_kernel.shape[1]
    codes, a_scale = quantize_activation_ref(x, block, int8_mask, low_bits, perm=perm, padded_in=k)
    qweight = unrepack_weight(w_kernel, min(block, group))
    return w4a8_gemm_ref(codes, a_scale, block, qweight, w_scale, group, bias=bias).to(out_dtype)
