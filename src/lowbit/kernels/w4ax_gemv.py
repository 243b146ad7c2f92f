"""The W4Ax linear of a few decode tokens in one launch on the CUDA cores (``cuda/w4ax_gemv.cu``): the activation
quantizer fused in front of a weight-streaming GEMV with dp4a, the same bits as the Triton two-launch path
(:func:`lowbit.kernels.gemm.linear_two_launch`) at the same split-K plan (its float32 sums are taken in that order).

A warp takes two output rows and reads them 16 bytes per lane at a time, four such loads per lane and row in flight;
every CTA quantizes the tokens into shared memory while its first loads are on the way. Up to four tokens, symmetric
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


def gemv_tokens(raw: str | None) -> int:
    """``$LOWBIT_W4AX_GEMV`` checked: the most tokens a call may have to take the GEMV (0: never). Unset or
    ``auto``: :data:`AUTO_M`."""
    value = (raw or "").strip() or "auto"
    if value == "auto":
        return AUTO_M
    if value.isdigit() and int(value) <= KERNEL_MAX_M:
        return int(value)
    raise ValueError(f"${GEMV_ENV} must be 'auto' or a token count 0..{KERNEL_MAX_M} (0: off), got {raw!r}")


AUTO_M = 1  # fastest on the H200 at M = 1 (BENCHMARKS.md); larger M take the tensor-core GEMM
GEMV_M = gemv_tokens(os.environ.get(GEMV_ENV))  # read once at import


def gemv_supported(m: int, k: int, block: int, group: int, w_zero, x_dtype: torch.dtype,
                   out_dtype: torch.dtype) -> bool:
    """Whether the kernel takes this call (shape and dtypes; not whether it is built here)."""
    def pow2(v: int) -> bool:
        return v > 0 and v & (v - 1) == 0

    return (1 <= m <= KERNEL_MAX_M and w_zero is None and x_dtype in (torch.bfloat16, torch.float16)
            and out_dtype in (torch.bfloat16, torch.float16) and pow2(block) and pow2(group) and 32 <= block <= 256
            and group >= 32 and k % 1024 == 0 and k % group == 0 and _smem(m, k, block) <= SMEM_LIMIT)


def _smem(m: int, k: int, block: int) -> int:
    return -(-m * k // 16) * 16 + 4 * m * (k // block)


_I, _L, _P, _F = ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_float
_ARGTYPES = [_P, _L, _I, _I, _P, _P, _F, _P, _L, _P, _L, _P, _P, _L, _I, _I, _I, _I, _I, _I, _I, _P]


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
    """One layer's GEMV with its constant operands resolved once: ``gemv(x, out=None)`` for ``x [M, K_in]``.

    ``tps(m)`` gives the K tiles per split of the two-launch plan at that M (so the sums follow its order)."""

    def __init__(self, block: int, w_kernel: torch.Tensor, w_scale: torch.Tensor, group: int,
                 int8_mask: torch.Tensor | None, low_bits: int, perm: torch.Tensor | None,
                 bias: torch.Tensor | None, out_dtype: torch.dtype, tps):
        dev = w_kernel.device
        self.n, self.k = w_kernel.shape[0], 2 * w_kernel.shape[1]
        self.block, self.group, self.out_dtype, self.tps = block, group, out_dtype, tps
        # constant operands, kept alive here: the kernel reads their addresses
        self.w, self.ws = w_kernel.contiguous(), w_scale.to(torch.float16).contiguous()
        self.perm = None if perm is None else perm.to(device=dev, dtype=torch.int32).contiguous()
        self.mask = None if int8_mask is None else int8_mask.to(device=dev, dtype=torch.int8).contiguous()
        self.bias = None if bias is None else bias.to(device=dev, dtype=torch.float32).contiguous()
        self.low_hi = float((1 << (low_bits - 1)) - 1)
        self._tps: dict[int, int] = {}

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        from lowbit.kernels.gemm import output_buffer, stream_key

        m, k_in = x.shape if x.dim() == 2 else (0, 0)
        if x.dim() != 2 or x.stride(-1) != 1 or (k_in != self.perm.numel() if self.perm is not None else k_in > self.k):
            width = self.perm.numel() if self.perm is not None else f"<= {self.k}"
            raise ValueError(f"x must be a row-contiguous [M, {width}] tensor, got {tuple(x.shape)}")
        out = output_buffer(out, m, self.n, self.out_dtype, x.device)
        tps = self._tps.get(m)
        if tps is None:
            tps = self._tps[m] = self.tps(m)
        err = _launcher()(
            x.data_ptr(), x.stride(0), m, x.dtype == torch.bfloat16, _ptr(self.perm), _ptr(self.mask), self.low_hi,
            self.w.data_ptr(), self.w.stride(0), self.ws.data_ptr(), self.ws.stride(0), _ptr(self.bias),
            out.data_ptr(), out.stride(0), self.out_dtype == torch.bfloat16, self.n, k_in, self.k, self.block,
            self.group, tps, stream_key(x.device))
        if err:
            raise RuntimeError(f"w4ax_gemv launch failed: CUDA error {err}")
        return out


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def two_launch_tps(m: int, n: int, k: int, block: int, group: int, device, config=None) -> int:
    """K tiles per split of the two-launch GEMM's plan at ``[m, k] x [n, k]^T`` (its summation order)."""
    from lowbit.kernels.gemm import PLANS, _sm_count

    return PLANS.get(m, n, k, min(block, group), device, _sm_count, config).tiles_per_split


def w4ax_gemv(x: torch.Tensor, block: int, w_kernel: torch.Tensor, w_scale: torch.Tensor, group: int,
              int8_mask: torch.Tensor | None = None, low_bits: int = 4, perm: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
              out: torch.Tensor | None = None, config=None) -> torch.Tensor:
    """``y [M, N]`` of ``x [M, K_in]`` (M <= 4) in one launch; arguments as
    :func:`lowbit.kernels.gemm.linear_two_launch` (symmetric weights only). Equal to it bit for bit at `config`."""
    k = 2 * w_kernel.shape[1]
    if not gemv_supported(x.shape[0], k, block, group, None, x.dtype, out_dtype):
        raise ValueError(f"w4ax_gemv takes 1..{KERNEL_MAX_M} bf16/fp16 tokens, blocks of 32..256 channels and groups "
                         f"of 32 or more (powers of two) and a padded width K that is a multiple of 1024; got x "
                         f"{x.dtype} {tuple(x.shape)}, K {k}, block {block}, group {group}, out {out_dtype}")
    dev = w_kernel.device
    n = w_kernel.shape[0]
    lin = GemvLinear(block, w_kernel, w_scale, group, int8_mask, low_bits, perm, bias, out_dtype,
                     lambda m: two_launch_tps(m, n, k, block, group, dev, config))
    return lin(x, out)


def gemv_reference(x: torch.Tensor, block: int, w_kernel: torch.Tensor, w_scale: torch.Tensor, group: int,
                   int8_mask: torch.Tensor | None = None, low_bits: int = 4, perm: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                   tps: int | None = None) -> torch.Tensor:
    """What the kernel computes, in PyTorch: the reference quantizer, exact int32 partials per tile, then per split of
    `tps` tiles (all of them when None) a float32 chain ``acc = partial * scale + acc`` (rounded once: float64 then
    float32), the splits summed in order, + bias, cast to `out_dtype`."""
    from lowbit.kernels.layout import unpack_tiles
    from lowbit.kernels.reference import quantize_activation_ref

    k = 2 * w_kernel.shape[1]
    tile = min(block, group)
    nt = k // tile
    tps = tps or nt
    codes, a_scale = quantize_activation_ref(x, block, int8_mask, low_bits, perm=perm, padded_in=k)
    w = unpack_tiles(w_kernel, tile).to(torch.float64) - 8  # [N, K] codes in channel order
    a = codes.to(torch.float64)  # products and sums of a tile are integers far below 2**53: exact
    total = torch.zeros(a.shape[0], w.shape[0], dtype=torch.float32, device=x.device)
    acc = torch.zeros_like(total)
    for t in range(nt):
        sl = slice(t * tile, (t + 1) * tile)
        part = (a[:, sl] @ w[:, sl].t()).to(torch.float32)
        s = a_scale[:, (t * tile) // block, None] * w_scale[None, :, (t * tile) // group].float()
        acc = (part.double() * s.double() + acc.double()).float()
        if (t + 1) % tps == 0 or t + 1 == nt:
            total, acc = total + acc, torch.zeros_like(acc)
    if bias is not None:
        total = total + bias.float()
    return total.to(out_dtype)
