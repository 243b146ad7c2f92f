"""One-launch W4Ax linear for decode-sized M: activation quantization in the GEMM's prologue, split-K reduced in-kernel.

``y = W4Ax(x)`` as :func:`lowbit.kernels.gemm.quantize_activation` followed by
:func:`lowbit.kernels.gemm.w4a8_gemm` computes it, in one launch instead of two:

* **prologue** -- each program quantizes the activation tiles it multiplies, straight from ``x`` (through FMPQ's
  permutation when the input is not folded): per token and per block of ``block`` channels, symmetric, 8 bits in the
  blocks ``int8_mask`` marks and ``low_bits`` elsewhere. The same operations as the standalone quantizer, so the
  codes and scales are bit-identical. Programs that share an activation tile recompute it (cheap at M <= 16, where
  the weights dominate the bytes). Needs ``block <= group`` (one activation block per weight tile);
* **split-K in-kernel** -- each split writes its partial tile, then takes a ticket on the tile's counter; the last
  split to arrive sums the partials in split order (the two-launch path's order: the results are bit-identical),
  adds the bias, writes the output and resets the counter to zero for the next call (CUDA-graph safe).

Counters and partials come from persistent buffers, so a warm call allocates nothing.
:func:`lowbit.wa.linear.kernel_forward` takes this path with ``$LOWBIT_W4AX_FUSED=1`` (off by default until its
speed is measured on a GPU; both paths give the same bits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.gemm import (
    MAX_FAST_TILE,
    PLANS,
    WORKSPACE,
    _i32_to_f32,
    _interpreting,
    _launch,
    _rint,
    _sm_count,
    _split_tile,
    output_buffer,
    _w4_tile_product,
    stream_key,
)
from lowbit.kernels.launch import FastLaunch, hooked
from lowbit.kernels.splitk import COUNTERS, _store_or_reduce
from lowbit.kernels.layout import MAX_DECODE_M, BufferPool, GemmConfig

MAX_FUSED_M = MAX_DECODE_M  # default_config's weight-streaming bucket; larger M quantizes once, separately
# Every N tile re-quantizes its activation slice, so wider tiles pay off more than for the two-launch GEMM: BN 128 was
# 1.1-1.7x faster than BN 64 at every Llama-3-8B shape, M 1 and 16 (H200, tools/fused_sweep.py, 2026-12-02).
FUSED_CONFIG = GemmConfig(16, 128, 4, 4)


@triton.jit
def _quantized_half(X, s_xm, PERM, rm, mm, k, K_IN, HAS_PERM: tl.constexpr):
    """Activation values ``x [BM, HALF]`` of permuted channels `k` (zero past the input width)."""
    valid = k < K_IN
    if HAS_PERM:
        src = tl.load(PERM + k, mask=valid, other=0)
    else:
        src = k
    return tl.load(X + rm[:, None] * s_xm + src[None, :], mask=mm[:, None] & valid[None, :], other=0).to(tl.float32)


@triton.jit
def _quantized_vec(X, PERM, k, K_IN, HAS_PERM: tl.constexpr):
    """The one token's values ``x [HALF]`` of permuted channels `k` (M = 1)."""
    valid = k < K_IN
    if HAS_PERM:
        src = tl.load(PERM + k, mask=valid, other=0)
    else:
        src = k
    return tl.load(X + src, mask=valid, other=0).to(tl.float32)


@triton.jit
def _codes(x, scale, hi, USE_LIBDEVICE: tl.constexpr):
    c = _rint(tl.div_rn(x, scale[:, None]), USE_LIBDEVICE)
    return tl.minimum(tl.maximum(c, -hi[:, None] - 1.0), hi[:, None]).to(tl.int8)


@triton.jit
def _token_codes(X, PERM, MASK, t, rk, K_IN, TILE: tl.constexpr, LOW_HI: tl.constexpr, HAS_PERM: tl.constexpr,
                 HAS_MASK: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """K tile `t` of the one token (M = 1) quantized as the standalone quantizer does: int8 codes of its two halves
    ``[1, TILE/2]`` and their scale ``[1]``."""
    HALF: tl.constexpr = TILE // 2
    v_lo = _quantized_vec(X, PERM, t * TILE + rk, K_IN, HAS_PERM)
    v_hi = _quantized_vec(X, PERM, t * TILE + HALF + rk, K_IN, HAS_PERM)
    amax = tl.maximum(tl.max(tl.abs(v_lo), 0), tl.max(tl.abs(v_hi), 0))
    one = tl.zeros((1,), tl.float32)
    hi = one + LOW_HI
    if HAS_MASK:
        hi = tl.where(tl.load(MASK + t) != 0, 127.0, hi)
    scale = tl.div_rn(amax + one, hi)
    scale = tl.where(scale > 0, scale, 1.0)
    return _codes(v_lo[None, :], scale, hi, USE_LIBDEVICE), _codes(v_hi[None, :], scale, hi, USE_LIBDEVICE), scale


@triton.jit
def _w4ax_fused_kernel(X, s_xm, PERM, MASK, W, s_wn, WS, s_wsn, WZ, s_wzn, BIAS, C, s_cm, PART, COUNT,
                       M, N, K, K_IN, TPS, SPLITS,
                       GROUP: tl.constexpr, TILE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       GROUP_M: tl.constexpr, LOW_HI: tl.constexpr, HAS_PERM: tl.constexpr, HAS_MASK: tl.constexpr,
                       HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, ONE_ROW: tl.constexpr,
                       USE_ASM: tl.constexpr, FAST_CVT: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    tile_id = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm, rn, mm, nm, t0, t1 = _split_tile(tile_id, pid_k, M, N, K, TPS, BM, BN, GROUP_M, TILE)
    HALF: tl.constexpr = TILE // 2
    rk = tl.arange(0, HALF)
    w_ptr = W + rn[:, None] * s_wn + rk[None, :]
    acc = tl.zeros((BM, BN), tl.float32)
    for t in range(t0, t1):
        # prologue: this tile's activation block (block == TILE) quantized per token
        if ONE_ROW:  # M = 1: quantize the one token once, not once per row of the BM-row tile (15 of 16 masked)
            c_lo, c_hi, s1 = _token_codes(X, PERM, MASK, t, rk, K_IN, TILE, LOW_HI, HAS_PERM, HAS_MASK,
                                          USE_LIBDEVICE)
            a_lo = tl.broadcast_to(c_lo, (BM, HALF))
            a_hi = tl.broadcast_to(c_hi, (BM, HALF))
            scale = tl.broadcast_to(s1, (BM,))
        else:
            x_lo = _quantized_half(X, s_xm, PERM, rm, mm, t * TILE + rk, K_IN, HAS_PERM)
            x_hi = _quantized_half(X, s_xm, PERM, rm, mm, t * TILE + HALF + rk, K_IN, HAS_PERM)
            amax = tl.maximum(tl.max(tl.abs(x_lo), 1), tl.max(tl.abs(x_hi), 1))
            hi = tl.zeros((BM,), tl.float32) + LOW_HI
            if HAS_MASK:
                hi = tl.where(tl.load(MASK + t) != 0, 127.0, hi)
            scale = tl.div_rn(amax, hi)
            scale = tl.where(scale > 0, scale, 1.0)
            a_lo = _codes(x_lo, scale, hi, USE_LIBDEVICE)
            a_hi = _codes(x_hi, scale, hi, USE_LIBDEVICE)
        acc += _w4_tile_product(a_lo, a_hi, scale, w_ptr, WS, s_wsn, WZ, s_wzn, rn, nm, t, TILE, GROUP, HAS_ZERO,
                                USE_ASM, FAST_CVT)  # the two-launch kernel's loop body
    _store_or_reduce(acc, rm, rn, mm, nm, tile_id, pid_k, BIAS, C, s_cm, PART, COUNT, M, N, SPLITS, BM, BN,
                     HAS_BIAS, SPLIT)


_LAUNCH = FastLaunch(_w4ax_fused_kernel)  # repeated calls skip the JIT's per-call binding (kernels/launch.py)


def fused_supported(m: int, block: int, group: int) -> bool:
    """Whether :func:`w4ax_linear` takes this call: decode-sized M and one activation block per weight tile."""
    return 0 < m <= MAX_FUSED_M and block <= group


def _fused_call(x, block, w_kernel, w_scale, group, int8_mask, low_bits, perm, w_zero, bias, out_dtype, config, out,
                workspace) -> tuple:
    """:func:`w4ax_linear`'s checks and arguments: ``(grid, positional args, keyword args, out)`` of its launch."""
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K_in], got shape {tuple(x.shape)}")
    m, k_in = x.shape
    n, kh = w_kernel.shape
    k = 2 * kh
    if not fused_supported(m, block, group):
        raise ValueError(f"the fused W4Ax linear takes 1 <= M <= {MAX_FUSED_M} and block <= group, got M={m}, "
                         f"block={block}, group={group}")
    if block % 32 or k % block or k_in > k:
        raise ValueError(f"block {block} must be a multiple of 32 dividing the padded width {k} >= K_in {k_in}")
    if int8_mask is not None and int8_mask.numel() != k // block:
        raise ValueError(f"int8_mask has {int8_mask.numel()} entries, the padded width holds {k // block} blocks")
    if perm is not None and perm.numel() != k_in:
        raise ValueError(f"perm has {perm.numel()} entries, x has {k_in} channels")
    x = x if x.stride(-1) == 1 else x.contiguous()
    dev = x.device
    tile = block  # = min(block, group)
    plan = PLANS.get(m, n, k, tile, dev, _sm_count, config or FUSED_CONFIG)
    cfg = plan.config
    if cfg.unpacked:
        raise ValueError(f"config {cfg.label()} is the unpacked large-M path; the fused linear streams packed weights")
    out = output_buffer(out, m, n, out_dtype, dev)
    split, sk = plan.split, stream_key(dev)
    if split > 1:
        shape = (split, m, n)
        part = workspace.get("splitk", shape, torch.float32, dev, sk) if workspace is not None else \
            torch.empty(shape, dtype=torch.float32, device=dev)
        count = COUNTERS.get(plan.tiles_mn, dev, sk)
    else:
        part = count = out
    has_perm, has_mask = perm is not None, int8_mask is not None
    perm_t = perm if not has_perm or (perm.dtype == torch.int32 and perm.device == dev) else perm.to(dev, torch.int32)
    mask_t = int8_mask if not has_mask or (int8_mask.dtype == torch.int8 and int8_mask.device == dev) \
        else int8_mask.to(dev, torch.int8)
    has_zero, has_bias = w_zero is not None, bias is not None
    low_hi, fast = float((1 << (low_bits - 1)) - 1), cfg.fast_cvt and tile <= MAX_FAST_TILE
    args = (
        x, x.stride(0), perm_t.contiguous() if has_perm else x, mask_t.contiguous() if has_mask else x,
        w_kernel, w_kernel.stride(0), w_scale, w_scale.stride(0),
        w_zero if has_zero else w_scale, w_zero.stride(0) if has_zero else 0,
        bias if has_bias else w_scale, out, out.stride(0), part, count,
        m, n, k, k_in, plan.tiles_per_split, split,
    )
    kwargs = dict(
        GROUP=group, TILE=tile, BM=cfg.bm, BN=cfg.bn, GROUP_M=cfg.group_m, LOW_HI=low_hi,
        HAS_PERM=has_perm, HAS_MASK=has_mask, HAS_ZERO=has_zero, HAS_BIAS=has_bias, SPLIT=split > 1, ONE_ROW=m == 1,
        USE_ASM=cfg.asm and not _interpreting(), FAST_CVT=fast,
        USE_LIBDEVICE=not _interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return (plan.tiles_mn, split), args, kwargs, out


def w4ax_linear(
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
    """``y [M, N]`` of activations ``x [M, K_in]`` (float) through a W4 weight, in one launch.

    Equal, bit for bit, to ``w4a8_gemm(*quantize_activation(x, block, int8_mask, low_bits, perm, K), block, ...)``
    with the same config (see the module docstring). ``perm`` int32 ``[K_in]`` (permuted channel j = original
    ``perm[j]``), ``int8_mask`` ``[K / block]`` (nonzero: 8-bit block); ``w_kernel``/``w_scale``/``w_zero`` as for
    :func:`~lowbit.kernels.gemm.w4a8_gemm`. Raises ``ValueError`` where :func:`fused_supported` is false.
    """
    grid, args, kwargs, out = _fused_call(x, block, w_kernel, w_scale, group, int8_mask, low_bits, perm, w_zero, bias,
                                          out_dtype, config, out, workspace)
    _launch(_LAUNCH, grid)(*args, **kwargs)
    return out


class PreparedLinear:
    """A W4Ax linear with everything but the activations fixed (a layer's weights, scales, mask, permutation, bias
    and options): ``prepared(x, out=None)``, through :func:`w4ax_linear` (``launches="fused"``, one launch) or
    :func:`lowbit.kernels.gemm.linear_two_launch` (``"two"``: the quantizer, then the GEMM).

    The first call of each (shape, dtype, strides, alignment, device, stream, output) runs that function and records
    its launches (:func:`lowbit.kernels.launch.recording`); later calls relaunch the same compiled kernels with the
    same arguments but ``x`` and the output swapped in, skipping the checks, plan lookup, workspace and launch-key
    work (most of an eager call's 60-150 µs of host time on the H200's host, stop 29). Same kernels, same arguments:
    the same bits. Under Triton's interpreter, with an active launch hook, for inputs whose last dimension is
    strided, and for calls with a launch outside :class:`~lowbit.kernels.launch.FastLaunch` (the two-launch path's
    large-M TMA GEMM: :func:`~lowbit.kernels.launch.unrecorded`), every call takes the function itself. The recorded
    launches hold the workspace views of their first call: calls on one stream are ordered by it, as for the
    functions themselves.

    With ``launches="two"`` on CUDA, calls of at most :attr:`gemv_m` bf16/fp16 tokens take the one-launch CUDA GEMV
    instead (:mod:`lowbit.kernels.w4ax_gemv`; ``$LOWBIT_W4AX_GEMV``'s policy: by default one-token calls of layers of
    16384 rows or more): the same function, its float32 sums in another order.
    """

    MAX_CALLS = 64  # recorded calls per layer (M values x streams); past it, start over
    LAUNCHES = ("fused", "two")

    def __init__(self, block: int, w_kernel: torch.Tensor, w_scale: torch.Tensor, group: int,
                 int8_mask: torch.Tensor | None = None, low_bits: int = 4, perm: torch.Tensor | None = None,
                 w_zero: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.bfloat16, config: GemmConfig | None = None,
                 workspace: BufferPool | None = WORKSPACE, launches: str = "fused"):
        from lowbit.kernels.gemm import linear_two_launch

        if launches not in self.LAUNCHES:
            raise ValueError(f"launches must be one of {self.LAUNCHES}, got {launches!r}")
        # the function's arguments between x and out, in its order
        self.ops = (block, w_kernel, w_scale, group, int8_mask, low_bits, perm, w_zero, bias, out_dtype, config)
        self.fn = {"fused": w4ax_linear, "two": linear_two_launch}[launches]
        self.out_dtype, self.workspace, self.n = out_dtype, workspace, w_kernel.shape[0]
        self._calls: dict[tuple, tuple | None] = {}  # key -> recorded launches, or None: not recordable
        self.gemv_m = _gemv_tokens(launches, block, w_kernel, group, w_zero, out_dtype)
        self._gemv = None  # the CUDA GEMV (lowbit.kernels.w4ax_gemv) of calls of <= gemv_m tokens, made at first use

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if _interpreting() or not isinstance(x, torch.Tensor) or x.dim() != 2 or x.stride(-1) != 1:
            return self.fn(x, *self.ops, out, self.workspace)
        if 0 < x.shape[0] <= self.gemv_m and x.dtype in _GEMV_DTYPES and x.is_cuda:
            gemv = self._gemv if self._gemv is not None else self._make_gemv()
            if gemv:
                return gemv(x, out)
        key = (x.shape, x.dtype, x.stride(0), x.data_ptr() % 16 == 0, x.device, stream_key(x.device),
               None if out is None else (out.stride(0), out.data_ptr() % 16 == 0))
        hit = self._calls.get(key, False)
        if hit is False or hooked():
            return self._record(key, x, out)
        if hit is None:
            return self.fn(x, *self.ops, out, self.workspace)
        if out is None:
            out = torch.empty(x.shape[0], self.n, dtype=self.out_dtype, device=x.device)
        else:
            output_buffer(out, x.shape[0], self.n, self.out_dtype, x.device)
        for run, head, argv, x_slots, out_slots in hit:
            for i in x_slots:
                argv[i] = x
            for i in out_slots:
                argv[i] = out
            run(*head, *argv)
        return out

    def _make_gemv(self):
        """The layer's GEMV, or False (and no more tries) where the CUDA kernel does not build."""
        from lowbit.kernels.w4ax_gemv import GemvLinear, built

        if not built():
            self.gemv_m, self._gemv = 0, False
            return False
        block, w_kernel, w_scale, group, int8_mask, low_bits, perm, _, bias, out_dtype, _ = self.ops
        self._gemv = GemvLinear(block, w_kernel, w_scale, group, int8_mask, low_bits, perm, bias, out_dtype)
        return self._gemv

    def _record(self, key, x, out):
        from lowbit.kernels.launch import recording

        with recording() as rec:
            out = self.fn(x, *self.ops, out, self.workspace)
        if hooked():
            return out
        steps, ok = [], rec.complete
        for run, head, argv in rec.launches:
            x_slots, out_slots = [i for i, a in enumerate(argv) if _aliases(a, x)], \
                [i for i, a in enumerate(argv) if _aliases(a, out)]
            # any other argument in x's or the output's memory (a slice of it) would not be swapped: not recordable
            ok = ok and not any(isinstance(a, torch.Tensor) and i not in x_slots + out_slots and
                                _shares_storage(a, (x, out)) for i, a in enumerate(argv))
            steps.append((run, head, argv, x_slots, out_slots))
        if len(self._calls) >= self.MAX_CALLS:
            self._calls.clear()
        # usable when every launch was recorded, x was read as given and the output written where returned
        ok = ok and steps and any(s[3] for s in steps) and any(s[4] for s in steps)
        self._calls[key] = steps if ok else None
        return out


_GEMV_DTYPES = (torch.bfloat16, torch.float16)


def _gemv_tokens(launches: str, block: int, w_kernel: torch.Tensor, group: int, w_zero, out_dtype) -> int:
    """The most tokens a call of this layer may have to take the CUDA GEMV in place of the two launches on CUDA (the
    same function, float32 sums in another order): ``$LOWBIT_W4AX_GEMV``'s policy
    (:func:`lowbit.kernels.w4ax_gemv.gemv_policy`), 0 for none."""
    from lowbit.kernels.w4ax_gemv import GEMV_M, GEMV_MIN_N, gemv_supported

    if launches != "two" or not w_kernel.is_cuda or w_kernel.shape[0] < GEMV_MIN_N:
        return 0
    k = 2 * w_kernel.shape[1]
    return max((m for m in range(1, GEMV_M + 1) if gemv_supported(m, k, block, group, w_zero, torch.bfloat16, out_dtype)),
               default=0)


def _aliases(a, t: torch.Tensor) -> bool:
    """Whether launch argument `a` is `t` or a view of all of it (same address, shape, strides and dtype)."""
    return a is t or (isinstance(a, torch.Tensor) and a.data_ptr() == t.data_ptr() and a.dtype == t.dtype
                      and a.shape == t.shape and a.stride() == t.stride())


def _shares_storage(a: torch.Tensor, ts) -> bool:
    return any(a.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in ts)
