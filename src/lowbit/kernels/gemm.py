"""W4A8 / FMPQ-W4A4 GEMM on INT8 tensor cores, and the per-token activation quantization that feeds it.

Hopper has no INT4 tensor-core instruction, so both formats run the INT8 MMA (``tl.dot`` on int8
operands, int32 accumulation): 4-bit weights are unpacked to int8 in registers, 4-bit activation
codes simply live in int8 containers (values in [-8, 7]). FMPQ's INT4/INT8 block mix therefore only
changes the activation quantizer (a per-block bit-width from the INT8-block mask); the GEMM is the
same for W4A8 and W4A4, and matches :func:`lowbit.quant.integer.int_matmul`: per reduction tile of
``min(block, group)`` channels an exact int32 partial product, scaled by ``a_scale * w_scale`` and
summed in float32 (dequantizing epilogue inside the K loop), + bias, cast to bf16.

Weight layout. The kernel reads the *tile-split* layout that :class:`~lowbit.wa.linear.QuantLinear` stores
(one copy, saved and loaded as is; :mod:`lowbit.kernels.layout`): inside each tile of ``TILE`` channels,
byte ``j`` holds channel ``j`` (low nibble) and channel ``j + TILE/2`` (high nibble); :func:`repack_weight`
converts plain-packed weights (channel ``2i`` in the low nibble of byte ``i``). Each K step loads the weight bytes once,
masks/shifts them into two int8 halves without moving data between lanes, and issues two MMAs
against the two contiguous halves of the activation tile. Codes keep their storage convention
(symmetric: ``q + 8``; asymmetric: ``q`` with an integer zero point per group).

Call path. Launch plans (config, grid, split-K) are computed once per shape and device (:data:`PLANS`);
with a :class:`~lowbit.kernels.layout.BufferPool` (``workspace=``, e.g. :data:`WORKSPACE`) the split-K
partials and the transient int8 weight come from reused buffers, and ``out=`` takes a preallocated output:
no allocation, no host synchronisation in the call path (CUDA-graph capturable once warmed up). Split-K is reduced
inside the GEMM launch: each split writes its partial tile and takes a ticket on the tile's counter
(:data:`lowbit.kernels.splitk.COUNTERS`); the last one sums the partials in split order, adds the bias and resets the counter.
"""

from __future__ import annotations

from functools import partial

import torch
import triton
import triton.language as tl

from lowbit.kernels.kivi_quant import _INTERPRET, _rint
from lowbit.kernels.launch import FastLaunch, _raw_stream, unrecorded
from lowbit.kernels.layout import (  # noqa: F401
    BufferPool,
    GemmConfig,
    PlanCache,
    cdiv,
    default_config,
    next_pow2,
    repack_weight,
    unrepack_weight,
)
from lowbit.kernels.splitk import COUNTERS, _store_or_reduce

PLANS = PlanCache()  # launch plans, one per (M, N, K, tile, device, config)
WORKSPACE = BufferPool()  # shared workspace of the layers' call path (activation codes, split-K partials, int8 W)


def stream_key(device: torch.device) -> int:
    """Identifies the current stream of `device` (workspace is private to a stream): its raw handle, as
    ``torch.cuda.current_stream(device).cuda_stream`` gives it without building a Stream object (8 µs a call on the
    H200's host, stop 29)."""
    if device.type != "cuda":
        return 0
    return _raw_stream(device.index if device.index is not None else torch.cuda.current_device())


def _interpreting() -> bool:
    return _INTERPRET


# ------------------------------------------------------------------------------ activation quantization


@triton.jit
def _act_quant_kernel(X, s_xm, PERM, MASK, C, s_cm, SC, s_sm, K_IN, NB,
                      BLOCK: tl.constexpr, BPP: tl.constexpr, LOW_HI: tl.constexpr,
                      HAS_PERM: tl.constexpr, HAS_MASK: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    m = tl.program_id(0)
    bb = tl.program_id(1) * BPP + tl.arange(0, BPP)
    bm = bb < NB
    k = bb[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    valid = (k < K_IN) & bm[:, None]
    if HAS_PERM:
        src = tl.load(PERM + k, mask=valid, other=0)
    else:
        src = k
    x = tl.load(X + m * s_xm + src, mask=valid, other=0).to(tl.float32)
    amax = tl.max(tl.abs(x), 1)
    if HAS_MASK:
        is8 = tl.load(MASK + bb, mask=bm, other=0) != 0
        hi = tl.where(is8, 127.0, LOW_HI)
    else:
        hi = tl.full((BPP,), LOW_HI, tl.float32)
    scale = tl.div_rn(amax, hi)
    scale = tl.where(scale > 0, scale, 1.0)
    c = _rint(tl.div_rn(x, scale[:, None]), USE_LIBDEVICE)
    c = tl.minimum(tl.maximum(c, -hi[:, None] - 1.0), hi[:, None])
    tl.store(C + m * s_cm + k, c.to(tl.int8), mask=bm[:, None])
    tl.store(SC + m * s_sm + bb, scale, mask=bm)


def quantize_activation(
    x: torch.Tensor,
    block: int,
    int8_mask: torch.Tensor | None = None,
    low_bits: int = 4,
    perm: torch.Tensor | None = None,
    padded_in: int | None = None,
    blocks_per_program: int = 8,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-block symmetric quantization of ``x [..., K_in]`` (FMPQ / W4A8 activations).

    Optional ``perm`` (int32 ``[K_in]``, permuted channel j = original ``perm[j]``) is gathered and the
    result zero-padded to ``padded_in``, all in the same pass. Blocks where ``int8_mask`` is set get
    8 bits, the others `low_bits`. Returns int8 codes ``[M, padded_in]`` and float32 scales
    ``[M, padded_in / block]``, equal to :func:`lowbit.quant.integer.quantize_activation` bit for bit.
    ``out``: preallocated ``(codes, scale)`` of those shapes and dtypes, written and returned.
    """
    k_in = x.shape[-1]
    x2 = x.reshape(-1, k_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    kp = padded_in or k_in
    if kp % block:
        raise ValueError(f"padded width {kp} is not a multiple of the block size {block}")
    if block & (block - 1):
        raise ValueError(f"block {block} must be a power of two")
    nb = kp // block
    if out is not None:
        codes, scale = out
        if codes.shape != (m, kp) or codes.dtype != torch.int8 or scale.shape != (m, nb) or scale.dtype != torch.float32:
            raise ValueError(f"out buffers must be int8 [{m}, {kp}] and float32 [{m}, {nb}], got "
                             f"{codes.dtype} {tuple(codes.shape)} and {scale.dtype} {tuple(scale.shape)}")
    else:
        codes = torch.empty(m, kp, dtype=torch.int8, device=x.device)
        scale = torch.empty(m, nb, dtype=torch.float32, device=x.device)
    if m == 0:
        return codes, scale
    bpp = min(blocks_per_program, next_pow2(nb))
    has_perm, has_mask = perm is not None, int8_mask is not None
    perm_t = perm.to(device=x.device, dtype=torch.int32).contiguous() if has_perm else codes
    mask_t = int8_mask.to(device=x.device, dtype=torch.int8).contiguous() if has_mask else codes
    _launch(_ACT_QUANT, (m, cdiv(nb, bpp)))(
        x2, x2.stride(0), perm_t, mask_t, codes, codes.stride(0), scale, scale.stride(0), k_in, nb,
        BLOCK=block, BPP=bpp, LOW_HI=float((1 << (low_bits - 1)) - 1), HAS_PERM=has_perm, HAS_MASK=has_mask,
        USE_LIBDEVICE=not _interpreting(), num_warps=4,
    )
    return codes, scale


# ------------------------------------------------------------------------------------------- GEMM


@triton.jit
def _i32_to_f32(x, FAST: tl.constexpr):
    """int32 -> float32. FAST (|x| < 2**22): bit pattern of 1.5 * 2**23 + x, minus 1.5 * 2**23 (an integer
    add and a float subtract at full rate, instead of the quarter-rate I2F conversion)."""
    if FAST:
        return (x + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    else:
        return x.to(tl.float32)


@triton.jit
def _unpack_sym(wp, USE_ASM: tl.constexpr):
    """Half-split weight bytes (codes q + 8 in both nibbles) -> the two int8 halves ``q`` (in [-8, 7]).

    USE_ASM: four bytes per 32-bit register, ``((nibbles + 0x78) ^ 0x80)`` byte-wise (no carries cross
    bytes), seven instructions for eight weights."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t;
            and.b32 t, $2, 0x0F0F0F0F;
            add.u32 t, t, 0x78787878;
            xor.b32 $0, t, 0x80808080;
            shr.u32 t, $2, 4;
            and.b32 t, t, 0x0F0F0F0F;
            add.u32 t, t, 0x78787878;
            xor.b32 $1, t, 0x80808080;
            }""",
            constraints="=r,=r,r",
            args=[wp],
            dtype=(tl.int8, tl.int8),
            is_pure=True,
            pack=4,
        )
    else:
        return (wp & 15).to(tl.int8) - 8, (wp >> 4).to(tl.int8) - 8


@triton.jit
def _tile_ids(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Output tile (pid_m, pid_n) of program `pid`, grouped GROUP_M tiles down M for L2 reuse of the weights."""
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    gsize = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % width) % gsize, (pid % width) // gsize


@triton.jit
def _weight_halves(wp, WZ, s_wzn, rn, nm, t, TILE: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                   USE_ASM: tl.constexpr):
    """Tile ``t`` of half-split weight bytes ``wp [BN, TILE/2]`` -> int8 (low, high) halves minus the zero point."""
    if HAS_ZERO:
        z = tl.load(WZ + rn * s_wzn + (t * TILE) // GROUP, mask=nm, other=0).to(tl.int8)
        return (wp & 15).to(tl.int8) - z[:, None], (wp >> 4).to(tl.int8) - z[:, None]
    else:
        return _unpack_sym(wp, USE_ASM)


@triton.jit
def _split_tile(tile_id, pid_k, M, N, K, TPS, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr,
                TILE: tl.constexpr):
    """Output rows/columns (and their masks) of program (`tile_id`, `pid_k`) and its range of K tiles [t0, t1)."""
    pid_m, pid_n = _tile_ids(tile_id, M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    t0 = pid_k * TPS
    return rm, rn, rm < M, rn < N, t0, tl.minimum(t0 + TPS, K // TILE)


@triton.jit
def _w4_tile_product(a_lo, a_hi, a_scale, w_ptr, WS, s_wsn, WZ, s_wzn, rn, nm, t, TILE: tl.constexpr,
                     GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, USE_ASM: tl.constexpr, FAST_CVT: tl.constexpr):
    """K tile `t` of the product: int8 activation halves ``[BM, TILE/2]`` times the packed weights on INT8 tensor
    cores, scaled by the activation (``[BM]``) and weight-group scales -> float32 ``[BM, BN]``."""
    HALF: tl.constexpr = TILE // 2
    wp = tl.load(w_ptr + t * HALF, mask=nm[:, None], other=0)
    w_lo, w_hi = _weight_halves(wp, WZ, s_wzn, rn, nm, t, TILE, GROUP, HAS_ZERO, USE_ASM)
    if HALF < 32:  # INT8 tensor cores take K >= 32: one dot over both halves, interleaved alike on both sides
        a_all = tl.reshape(tl.join(a_lo, a_hi), (a_lo.shape[0], TILE))
        w_all = tl.reshape(tl.join(w_lo, w_hi), (w_lo.shape[0], TILE))
        acc_i = tl.dot(a_all, tl.trans(w_all), out_dtype=tl.int32)
    else:
        acc_i = tl.dot(a_lo, tl.trans(w_lo), out_dtype=tl.int32)
        acc_i = tl.dot(a_hi, tl.trans(w_hi), acc=acc_i, out_dtype=tl.int32)
    wsc = tl.load(WS + rn * s_wsn + (t * TILE) // GROUP, mask=nm, other=0).to(tl.float32)
    return _i32_to_f32(acc_i, FAST_CVT) * (a_scale[:, None] * wsc[None, :])


@triton.jit
def _w4a8_gemm_kernel(A, s_am, AS, s_asm, W, s_wn, WS, s_wsn, WZ, s_wzn, BIAS, C, s_cm, PART, COUNT,
                      M, N, K, TPS, SPLITS,
                      BLOCK_A: tl.constexpr, GROUP: tl.constexpr, TILE: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr,
                      HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                      USE_ASM: tl.constexpr, FAST_CVT: tl.constexpr):
    pid_k = tl.program_id(1)
    rm, rn, mm, nm, t0, t1 = _split_tile(tl.program_id(0), pid_k, M, N, K, TPS, BM, BN, GROUP_M, TILE)
    HALF: tl.constexpr = TILE // 2
    rk = tl.arange(0, HALF)
    a_ptr = A + rm[:, None] * s_am + rk[None, :]
    w_ptr = W + rn[:, None] * s_wn + rk[None, :]
    acc = tl.zeros((BM, BN), tl.float32)
    for t in range(t0, t1):
        a_lo = tl.load(a_ptr + t * TILE, mask=mm[:, None], other=0)
        a_hi = tl.load(a_ptr + t * TILE + HALF, mask=mm[:, None], other=0)
        asc = tl.load(AS + rm * s_asm + (t * TILE) // BLOCK_A, mask=mm, other=0)
        acc += _w4_tile_product(a_lo, a_hi, asc, w_ptr, WS, s_wsn, WZ, s_wzn, rn, nm, t, TILE, GROUP, HAS_ZERO,
                                USE_ASM, FAST_CVT)
    _store_or_reduce(acc, rm, rn, mm, nm, tl.program_id(0), pid_k, BIAS, C, s_cm, PART, COUNT, M, N, SPLITS, BM, BN,
                     HAS_BIAS, SPLIT)


@triton.jit
def _program_weight_tile(W, s_wn, WZ, s_wzn, N, GROUP: tl.constexpr, TILE: tl.constexpr, BN: tl.constexpr,
                         HAS_ZERO: tl.constexpr, USE_ASM: tl.constexpr):
    """This program's BN weight rows (grid dim 0) and K tile (grid dim 1) of half-split packed weights: the int8
    halves minus the zero point, the rows, their mask, the tile index and a half's channel offsets."""
    HALF: tl.constexpr = TILE // 2
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    t = tl.program_id(1)
    nm = rn < N
    j = tl.arange(0, HALF)
    wp = tl.load(W + rn[:, None] * s_wn + t * HALF + j[None, :], mask=nm[:, None], other=0)
    w_lo, w_hi = _weight_halves(wp, WZ, s_wzn, rn, nm, t, TILE, GROUP, HAS_ZERO, USE_ASM)
    return w_lo, w_hi, rn, nm, t, j


@triton.jit
def _unpack_weight_kernel(W, s_wn, WZ, s_wzn, OUT, s_on, N, K,
                          GROUP: tl.constexpr, TILE: tl.constexpr, BN: tl.constexpr, HAS_ZERO: tl.constexpr,
                          USE_ASM: tl.constexpr):
    """Half-split packed weights -> int8 ``[N, K]`` in channel order (weight minus its zero point)."""
    HALF: tl.constexpr = TILE // 2
    w_lo, w_hi, rn, nm, t, j = _program_weight_tile(W, s_wn, WZ, s_wzn, N, GROUP, TILE, BN, HAS_ZERO, USE_ASM)
    o = OUT + rn[:, None] * s_on + t * TILE + j[None, :]
    tl.store(o, w_lo, mask=nm[:, None])
    tl.store(o + HALF, w_hi, mask=nm[:, None])


@triton.jit
def _i8_gemm_kernel(A, s_am, AS, s_asm, B, s_bn, WS, s_wsn, BIAS, C, s_cm, M, N, K,
                    BLOCK_A: tl.constexpr, GROUP: tl.constexpr, TILE: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr,
                    HAS_BIAS: tl.constexpr, FAST_CVT: tl.constexpr, TMA: tl.constexpr):
    """INT8 x INT8 GEMM with a per-``TILE`` dequantizing step, both operands straight from memory: ``A``/``B``
    are TMA tensor descriptors when ``TMA``, else pointers (with row strides ``s_am``/``s_bn``)."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mm = rm < M
    nm = rn < N
    if not TMA:
        rk = tl.arange(0, TILE)
        a_ptr = A + (rm % M)[:, None] * s_am + rk[None, :]
        b_ptr = B + (rn % N)[:, None] * s_bn + rk[None, :]
    acc = tl.zeros((BM, BN), tl.float32)
    for t in range(0, K // TILE):
        if TMA:
            a = A.load([pid_m * BM, t * TILE])
            b = B.load([pid_n * BN, t * TILE])
        else:
            a = tl.load(a_ptr + t * TILE)
            b = tl.load(b_ptr + t * TILE)
        acc_i = tl.dot(a, tl.trans(b), out_dtype=tl.int32)
        asc = tl.load(AS + (rm % M) * s_asm + (t * TILE) // BLOCK_A)
        wsc = tl.load(WS + (rn % N) * s_wsn + (t * TILE) // GROUP).to(tl.float32)
        acc += _i32_to_f32(acc_i, FAST_CVT) * (asc[:, None] * wsc[None, :])
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=nm, other=0).to(tl.float32)[None, :]
    tl.store(C + rm[:, None] * s_cm + rn[None, :], acc.to(C.dtype.element_ty), mask=mm[:, None] & nm[None, :])


def unpack_weight_int8(w_kernel: torch.Tensor, tile: int, group: int, w_zero: torch.Tensor | None = None,
                       use_asm: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """Half-split packed INT4 weights ``[N, K/2]`` -> int8 ``[N, K]`` (code minus zero point), one launch."""
    n, kh = w_kernel.shape
    k = kh * 2
    if out is None:
        out = torch.empty(n, k, dtype=torch.int8, device=w_kernel.device)
    bn = 64
    has_zero = w_zero is not None
    unrecorded()
    _unpack_weight_kernel[(cdiv(n, bn), k // tile)](
        w_kernel, w_kernel.stride(0), w_zero if has_zero else w_kernel, w_zero.stride(0) if has_zero else 0,
        out, out.stride(0), n, k, GROUP=group, TILE=tile, BN=bn, HAS_ZERO=has_zero,
        USE_ASM=use_asm and not _interpreting(), num_warps=4,
    )
    return out


MAX_FAST_TILE = 2048  # |int32 partial| <= TILE * 128 * 15 < 2**22 keeps the fast int32 -> float32 exact


def _has_tma(device) -> bool:
    """TMA tensor descriptors need Hopper or newer (the interpreter emulates them)."""
    if device.type != "cuda":
        return _interpreting()
    return torch.cuda.get_device_capability(device) >= (9, 0)


def _sm_count(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _launch(fast: FastLaunch, grid):
    """The launcher of one call: the compiled kernel's own (:mod:`lowbit.kernels.launch`), or the JIT's under
    Triton's interpreter."""
    return fast.fn[grid] if _interpreting() else partial(fast, grid)


_ACT_QUANT = FastLaunch(_act_quant_kernel)
_W4A8_GEMM = FastLaunch(_w4a8_gemm_kernel)


def output_buffer(out: torch.Tensor | None, m: int, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """`out` checked as a row-contiguous `dtype` ``[m, n]`` tensor on `device`, or a fresh one when None."""
    if out is None:
        return torch.empty(m, n, dtype=dtype, device=device)
    if out.shape != (m, n) or out.dtype != dtype or out.device != device or out.stride(-1) != 1:
        raise ValueError(f"out must be a row-contiguous {dtype} [{m}, {n}] tensor on {device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out


def w4a8_gemm(
    a_codes: torch.Tensor,
    a_scale: torch.Tensor,
    block: int,
    w_kernel: torch.Tensor,
    w_scale: torch.Tensor,
    group: int,
    w_zero: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: GemmConfig | None = None,
    out: torch.Tensor | None = None,
    workspace: BufferPool | None = None,
) -> torch.Tensor:
    """``y [M, N] = sum_tiles (A_t @ W_t.T) * a_scale * w_scale (+ bias)`` on INT8 tensor cores.

    ``a_codes`` int8 ``[M, K]`` (INT4 blocks hold values in [-8, 7]), ``a_scale`` fp32 ``[M, K/block]``,
    ``w_kernel`` uint8 ``[N, K/2]`` from :func:`repack_weight` with ``tile = min(block, group)``,
    ``w_scale`` fp16 ``[N, K/group]``, ``w_zero`` uint8 (asymmetric weights) or None (symmetric).
    ``out``: a preallocated ``[M, N]`` output of `out_dtype`; ``workspace``: a buffer pool for the split-K
    partials and the transient int8 weight (fresh allocations without one). The launch plan is cached.
    """
    m, k = a_codes.shape
    n = w_kernel.shape[0]
    tile = min(block, group)
    if w_kernel.shape[1] * 2 != k:
        raise ValueError(f"weight holds {w_kernel.shape[1] * 2} input channels, activations {k}")
    if k % tile or max(block, group) % tile or tile % 32:
        raise ValueError(f"K={k}, block={block}, group={group}: need a tile (min of the two) multiple of 32 dividing K")
    if a_codes.dtype != torch.int8:
        raise ValueError(f"activation codes must be int8, got {a_codes.dtype}")
    dev = a_codes.device
    plan = PLANS.get(m, n, k, tile, dev, _sm_count, config)
    cfg = plan.config
    out = output_buffer(out, m, n, out_dtype, dev)
    if m == 0:
        return out
    a_codes = a_codes if a_codes.stride(-1) == 1 else a_codes.contiguous()
    has_zero, has_bias = w_zero is not None, bias is not None
    fast = cfg.fast_cvt and tile <= MAX_FAST_TILE
    sk = stream_key(dev) if workspace is not None else 0

    def buffer(name, shape, dtype):
        return workspace.get(name, shape, dtype, dev, sk) if workspace is not None else torch.empty(shape, dtype=dtype, device=dev)

    if cfg.unpacked:  # compute-bound: a transient int8 copy of W lets both operands stream straight into the MMA
        w8 = unpack_weight_int8(w_kernel, tile, group, w_zero, cfg.asm, out=buffer("w8", (n, k), torch.int8))
        a_op, b_op = a_codes, w8
        tma = cfg.tma and _has_tma(dev)
        if tma:
            from triton.tools.tensor_descriptor import TensorDescriptor

            a_op, b_op = TensorDescriptor.from_tensor(a_codes, [cfg.bm, tile]), TensorDescriptor.from_tensor(w8, [cfg.bn, tile])
        unrecorded()  # its descriptors are new objects each call: no FastLaunch, no replay
        _i8_gemm_kernel[(plan.tiles_mn,)](
            a_op, a_codes.stride(0), a_scale, a_scale.stride(0), b_op, w8.stride(0), w_scale, w_scale.stride(0),
            bias if has_bias else w_scale, out, out.stride(0), m, n, k,
            BLOCK_A=block, GROUP=group, TILE=tile, BM=cfg.bm, BN=cfg.bn, GROUP_M=cfg.group_m,
            HAS_BIAS=has_bias, FAST_CVT=fast, TMA=tma, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return out
    split = plan.split
    part = buffer("splitk", (split, m, n), torch.float32) if split > 1 else out
    count = COUNTERS.get(plan.tiles_mn, dev, stream_key(dev)) if split > 1 else out
    _launch(_W4A8_GEMM, (plan.tiles_mn, split))(
        a_codes, a_codes.stride(0), a_scale, a_scale.stride(0), w_kernel, w_kernel.stride(0),
        w_scale, w_scale.stride(0), w_zero if has_zero else w_scale, w_zero.stride(0) if has_zero else 0,
        bias if has_bias else w_scale, out, out.stride(0), part, count,
        m, n, k, plan.tiles_per_split, split,
        BLOCK_A=block, GROUP=group, TILE=tile, BM=cfg.bm, BN=cfg.bn, GROUP_M=cfg.group_m,
        HAS_ZERO=has_zero, HAS_BIAS=has_bias, SPLIT=split > 1, USE_ASM=cfg.asm and not _interpreting(),
        FAST_CVT=fast, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def linear_two_launch(
    x: torch.Tensor,
    block: int,
    w_kernel: torch.Tensor,
    w_scale: torch.Tensor,
    group: int,
    int8_mask: torch.Tensor | None = None,
    low_bits: int = 4,
    perm: torch.Tensor | None = None,
    w_zero: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: GemmConfig | None = None,
    out: torch.Tensor | None = None,
    workspace: BufferPool | None = WORKSPACE,
) -> torch.Tensor:
    """``y [M, N]`` of activations ``x [M, K_in]`` through a W4 weight: :func:`quantize_activation` (gathered by
    ``perm``, zero-padded to the weight's width) into the workspace, then :func:`w4a8_gemm` (the QuantLinear call
    path; arguments as :func:`lowbit.kernels.w4ax_fused.w4ax_linear`'s)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K_in], got shape {tuple(x.shape)}")
    m, k = x.shape[0], 2 * w_kernel.shape[1]
    if k % block:
        raise ValueError(f"block {block} does not divide the weight's padded width {k}")
    dev = x.device
    if workspace is not None:
        sk = stream_key(dev)
        bufs = (workspace.get("a_codes", (m, k), torch.int8, dev, sk),
                workspace.get("a_scale", (m, k // block), torch.float32, dev, sk))
    else:
        bufs = None
    codes, scale = quantize_activation(x, block, int8_mask, low_bits, perm=perm, padded_in=k, out=bufs)
    return w4a8_gemm(codes, scale, block, w_kernel, w_scale, group, w_zero=w_zero, bias=bias, out_dtype=out_dtype,
                     config=config, out=out, workspace=workspace)

