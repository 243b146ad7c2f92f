"""QuantLinear: a drop-in ``nn.Linear`` replacement holding packed low-bit weights.

Storage (all persistent buffers, saved by :func:`lowbit.wa.save_quantized`):

* ``qweight``  uint8 ``[out, padded_in * w_bits / 8]``: weight codes along the *permuted, padded* input
  axis. 4-bit codes are stored in the layout the GEMM kernel reads (one copy, saved as is): two per byte,
  *tile-split* -- inside each tile of ``tile = min(group, block)`` channels, byte ``j`` holds channel ``j``
  (low nibble) and ``j + tile/2`` (high nibble), see :mod:`lowbit.kernels.layout`. 8-bit: one code per byte.
* ``w_scale``  float16 ``[out, padded_in / group]``; ``w_zero`` uint8 (asymmetric weights only).
* ``perm``     int32 ``[in]`` (fmpq only): permuted channel ``j`` is original channel ``perm[j]``.
* ``int8_mask`` bool ``[padded_in / block]`` (quantized activations only): INT8 blocks.
* ``bias``     the original bias, unchanged (when the layer had one).

Under ``rotate=hadamard`` (:mod:`lowbit.wa.rotation`) the layer feeding the MLP output (down_proj) also
applies an online Hadamard rotation to its input first (``in_rotation``, a structured matrix rebuilt from
its order and seed, not stored). With ``gptq=true`` the weight codes come from :func:`lowbit.wa.gptq.gptq_quantize`.

``input_permuted`` (not a buffer; recorded per layer by :func:`lowbit.wa.save_quantized`): the input
already arrives in ``perm`` order, because :mod:`lowbit.wa.fold` made its producer write it so; the layer
then does not gather (``perm`` stays as the record of the order).

Forward: ``x -> x[..., perm] (unless input_permuted) -> zero-pad to padded_in -> per-token per-block quantization -> blocked
integer matmul with the weight codes -> scales -> + bias``. Padded channels are zero in both operands,
so they add nothing. Two execution modes give the same quantized function:

* ``mode="int"`` (reference): integer partial products per tile, exact (see :mod:`lowbit.wa.core`),
  then scaled per (token, tile) and (row, tile) and summed over tiles, as a tensor-core kernel does.
* ``mode="fake"``: dequantize activations and weights to float32 and run one float matmul. Equal to
  the integer path up to float32 rounding of the summation; faster on CPU.
"""

from __future__ import annotations

import os
from functools import partial

import torch
from torch import nn

from lowbit.kernels.layout import MAX_DECODE_M
from lowbit.quant import integer
from lowbit.wa import core, fp8_prefill
from lowbit.wa.gptq import gptq_quantize, rtn_quantize
from lowbit.wa.methods import UNQUANTIZED, WHOLE_ROW, WAConfig

MODES = ("int", "fake")


def layout(in_features: int, cfg: WAConfig) -> tuple[int, int, int]:
    """``(group, block, padded_in)`` for a layer of `in_features` inputs under `cfg`.

    :data:`WHOLE_ROW` resolves to the input dim; the padded input dim is the smallest multiple of
    ``max(group, block)`` holding every input. With ``pad=false`` a non-multiple is rejected.
    """
    group = in_features if cfg.group == WHOLE_ROW else cfg.group
    if not cfg.quantizes_activations:
        block = group  # blocks play no part
    else:
        block = in_features if cfg.block == WHOLE_ROW else cfg.block
    if max(group, block) % min(group, block):
        raise ValueError(f"{cfg.spec}: block {block} and group {group} must divide one another")
    unit = max(group, block)
    padded = -(-in_features // unit) * unit
    if padded != in_features and not cfg.pad:
        raise ValueError(
            f"{cfg.spec}: input dim {in_features} is not a multiple of {unit} (max of block {block} and group {group}); "
            f"pick a block/group dividing {in_features} (e.g. block=64,group=64 for 576) or allow zero padding with pad=true"
        )
    return group, block, padded


class QuantLinear(nn.Module):
    """Low-bit linear layer; build it with :meth:`from_linear` (or :meth:`empty` before loading)."""

    def __init__(self, in_features: int, out_features: int, cfg: WAConfig, has_bias: bool,
                 bias_dtype: torch.dtype = torch.float32, mode: str = "int", rotated_model: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown QuantLinear mode '{mode}': allowed modes are {MODES}")
        if cfg.rotate != "none" and not rotated_model:
            raise ValueError(
                f"{cfg.spec}: a rotate={cfg.rotate} layer only computes the right function inside a model rotated by "
                "lowbit.wa.rotation.rotate_model (rotated norms, embedding and down_proj input); quantize the base "
                "model with quantize_model instead of rebuilding the layers on an unrotated one"
            )
        self.in_rotation: torch.Tensor | None = None  # online input rotation (down_proj under rotate=hadamard)
        self.in_features = in_features
        self.out_features = out_features
        self.cfg = cfg
        self.group, self.block, self.padded_in = layout(in_features, cfg)
        self.tile = min(self.group, self.block)  # reduction tile: scales constant on it; the weight layout's unit
        self.mode = mode
        self.input_permuted = False  # the producer writes the input in perm order: no gather here
        self.reuse_output = False  # kernel path: write into a per-layer buffer reused per shape (see kernel_forward)
        ng = self.padded_in // self.group
        self.register_buffer("qweight", torch.zeros(out_features, self.padded_in * cfg.w_bits // 8, dtype=torch.uint8))
        self.register_buffer("w_scale", torch.ones(out_features, ng, dtype=torch.float16))
        self.register_buffer("w_zero", None if cfg.sym else torch.zeros(out_features, ng, dtype=torch.uint8))
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32) if cfg.permute else None)
        self.register_buffer(
            "int8_mask", torch.zeros(self.padded_in // self.block, dtype=torch.bool) if self.quantizes_activations else None
        )
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype) if has_bias else None)
        self._cache: dict = {}
        self._outputs = None  # BufferPool of the kernel path's outputs (reuse_output)

    # ---------------------------------------------------------------------------------- building

    @property
    def quantizes_activations(self) -> bool:
        return self.cfg.quantizes_activations

    @property
    def n_blocks(self) -> int:
        return self.padded_in // self.block

    @property
    def n_int8_blocks(self) -> int:
        return int(self.int8_mask.sum()) if self.int8_mask is not None else 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: WAConfig, channel_stats: torch.Tensor | None = None,
                    mode: str = "int", hessian: torch.Tensor | None = None, rounded=None,
                    perm: torch.Tensor | None = None) -> "QuantLinear":
        """Quantize `linear` under `cfg`; `channel_stats` ([in], e.g. calibrated max |x|) drive fmpq;
        `hessian` ([in, in], ``E[x^T x]`` of its calibration inputs) is required by ``gptq=true``; `rounded`:
        the weight's ``(q, scale, zero)`` already computed by :func:`gptq_linears` (then not recomputed); `perm`
        (fmpq): the input permutation to use instead of sorting `channel_stats` (:mod:`lowbit.wa.fold` picks
        foldable ones)."""
        w = linear.weight.detach()
        out_f, in_f = w.shape
        has_bias = linear.bias is not None
        if cfg.gptq and (hessian is None or hessian.shape != (in_f, in_f)):
            raise ValueError(f"{cfg.spec}: gptq=true needs the [{in_f}, {in_f}] Hessian of the layer's calibration inputs")
        q = cls(in_f, out_f, cfg, has_bias, linear.bias.dtype if has_bias else torch.float32, mode,
                rotated_model=True).to(w.device)
        q.in_rotation = getattr(linear, "lowbit_in_rotation", None)
        stats = None
        if channel_stats is not None:
            stats = channel_stats.detach().float().to(w.device)
            if stats.shape != (in_f,):
                raise ValueError(f"channel stats of shape {tuple(stats.shape)} for a layer with {in_f} inputs")
        if perm is not None:
            if not cfg.permute:
                raise ValueError(f"{cfg.spec}: this method does not permute input channels; perm must be None")
            perm = check_permutation(perm, in_f).to(w.device)  # `rounded` must come in this order (gptq_linears(perms=))
        if cfg.permute:
            if perm is None:
                perm = outlier_permutation(stats) if stats is not None else torch.arange(in_f, device=w.device)
            q.perm.copy_(perm.to(torch.int32))
            w = w[:, perm]
            if stats is not None:
                stats = stats[perm]
            if hessian is not None:
                hessian = hessian[perm.cpu()][:, perm.cpu()]
        if rounded is not None:
            wq, scale, zero = (t.to(w.device) if t is not None else None for t in rounded)
        elif cfg.gptq:
            h = integer.pad_last(integer.pad_last(hessian.double(), q.padded_in).t(), q.padded_in)  # padding: dead inputs
            wq, scale, zero = gptq_quantize(integer.pad_last(w.double().cpu(), q.padded_in), h, cfg.w_bits, q.group, cfg.sym,
                                            damp=cfg.damp, clip=cfg.clip)
            wq, scale, zero = wq.to(w.device), scale.to(w.device), (zero.to(w.device) if zero is not None else None)
        elif cfg.clip:
            wq, scale, zero = rtn_quantize(integer.pad_last(w.double().cpu(), q.padded_in), cfg.w_bits, q.group, cfg.sym, clip=True)
            wq, scale, zero = wq.to(w.device), scale.to(w.device), (zero.to(w.device) if zero is not None else None)
        else:
            wq, scale, zero = core.quantize_weight(integer.pad_last(w.float(), q.padded_in), cfg.w_bits, q.group, cfg.sym)
        q.qweight.copy_(core.pack_weight(wq, cfg.w_bits, cfg.sym, q.tile))
        q.w_scale.copy_(scale)
        if zero is not None:
            q.w_zero.copy_(zero)
        if q.int8_mask is not None:
            q.int8_mask.copy_(select_int8_blocks(stats, q.block, q.padded_in, cfg))
        if has_bias:
            q.bias.copy_(linear.bias.detach())
        return q

    # ---------------------------------------------------------------------------------- compute

    def _apply(self, fn, recurse=True):
        self._cache, self._outputs = {}, None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache, self._outputs = {}, None
        return super()._load_from_state_dict(*args, **kwargs)

    @property
    def gathers_input(self) -> bool:
        """Whether the forward gathers its input by ``perm`` (False once folded, or without a permutation)."""
        return self.perm is not None and not self.input_permuted

    @torch.no_grad()
    def permute_output_rows(self, rows: torch.Tensor) -> None:
        """Reorder the output features: output ``i`` becomes the old output ``rows[i]`` (weights, scales, zero
        points and bias move together: exact, the rows are independent)."""
        rows = check_permutation(rows, self.out_features).to(self.qweight.device)
        for name in ("qweight", "w_scale", "w_zero", "bias"):
            t = getattr(self, name)
            if t is not None:
                t.copy_(t.index_select(0, rows))
        self._cache, self._outputs = {}, None

    def weight_int(self) -> torch.Tensor:
        """Signed integer weight values ``[out, padded_in]`` (int16) that multiply ``w_scale``."""
        return core.weight_int(self.qweight, self.w_zero, self.cfg.w_bits, self.cfg.sym, self.group, self.tile)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """Float weight ``[out, padded_in]`` in the permuted, padded input order."""
        return core.dequantize_weight(self.qweight, self.w_scale, self.w_zero, self.cfg.w_bits, self.cfg.sym, self.group,
                                      dtype, self.tile)

    def _cached(self, key: str):
        if key not in self._cache:
            if key == "w_deq":
                self._cache[key] = self.dequantized_weight(torch.float32)
            elif key == "w_int":  # [tiles, tile, out], contiguous, as integer.int_matmul wants it
                self._cache[key] = integer.tile_weight(self.weight_int(), self.tile, self.partial_dtype)
            elif key == "perm":
                self._cache[key] = self.perm.long()
        return self._cache[key]

    @property
    def partial_dtype(self) -> torch.dtype:
        """Float dtype in which this layer's integer tile products are exact."""
        a_max = 128 if self.n_int8_blocks else 1 << (self.cfg.a_bits - 1)
        w_max = (1 << (self.cfg.w_bits - 1)) if self.cfg.sym else (1 << self.cfg.w_bits) - 1
        return integer.int_partial_dtype(min(self.group, self.block), a_max, w_max)

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ in_rotation`` when the layer has an online input rotation, else `x`."""
        if self.in_rotation is None:
            return x
        key = ("rot", x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = self.in_rotation.to(x.device, x.dtype)
        return x @ self._cache[key]

    def gather(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 [tokens, in]`` in ``perm`` order (the run-time gather that folding removes)."""
        return x2.index_select(1, self._cached("perm"))

    def prepare_input(self, x: torch.Tensor, arrives_permuted: bool = False) -> torch.Tensor:
        """``[..., in] -> [tokens, padded_in]`` float32: rotated (if so built), permuted and zero-padded.

        `x` is in the layer's original input order (as :meth:`quantize_input` takes it too) unless
        ``arrives_permuted`` (the forward passes ``input_permuted``: a folded producer already wrote it in
        ``perm`` order, so it is not gathered)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input of {x.shape[-1]} features for a layer with {self.in_features} inputs")
        x2 = self.rotate_input(x).reshape(-1, self.in_features).float()
        if self.perm is not None and not arrives_permuted:
            x2 = self.gather(x2)
        return integer.pad_last(x2, self.padded_in)

    def clip_input(self, xp: torch.Tensor) -> torch.Tensor:
        """``aclip < 1``: each token's INT4 blocks of ``xp [tokens, padded_in]`` clamped to ``aclip * max |x|``."""
        ratio = getattr(self.cfg, "aclip", 1.0)
        if ratio >= 1.0 or not self.quantizes_activations:
            return xp
        t = xp.shape[0]
        xb = xp.reshape(t, self.n_blocks, self.block)
        bound = xb.abs().amax(dim=-1, keepdim=True) * ratio
        bound = torch.where(self.int8_mask.to(xp.device)[None, :, None], torch.full_like(bound, float("inf")), bound)
        return torch.maximum(torch.minimum(xb, bound), -bound).reshape(t, -1)

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token per-block activation codes and scales of ``x [..., in]``."""
        return integer.quantize_activation(self.clip_input(self.prepare_input(x)), self.block, self.int8_mask, self.cfg.a_bits)

    def _cached_fp8_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(group factors, row scales)`` of the FP8 prefill (:mod:`lowbit.wa.fp8_prefill`), computed once."""
        if "fp8_factors" not in self._cache:
            self._cache["fp8_factors"] = fp8_prefill.weight_factors(self.w_scale, self.cfg.w_bits, self.cfg.sym)
        return self._cache["fp8_factors"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.mode == "int":  # a decode-sized call made before: straight to its prepared launches
            fast = self._cache.get(("decode", x.dtype, x.device, FUSED_DECODE))
            if fast is not None and 0 < x.numel() <= DECODE_FAST_M * x.shape[-1]:
                return fast(x)
        if fp8_prefill.uses_fp8(self, x.numel() // max(x.shape[-1], 1)):  # opt-in: prefill through one FP8 GEMM
            return fp8_prefill.fp8_forward(self, x)
        if x.is_cuda and self.mode == "int" and self.quantizes_activations and self.cfg.aclip >= 1.0:
            if supports_kernel(self):  # the Triton W4A8/W4A4 GEMM (same integer semantics)
                return kernel_forward(self, self.rotate_input(x))
        lead = x.shape[:-1]
        xp = self.prepare_input(x, arrives_permuted=self.input_permuted)
        if not self.quantizes_activations:
            y = xp @ self._cached("w_deq").t()
        else:
            codes, scale = integer.quantize_activation(self.clip_input(xp), self.block, self.int8_mask, self.cfg.a_bits)
            if self.mode == "fake":
                y = integer.dequantize_activation(codes, scale, self.block) @ self._cached("w_deq").t()
            else:
                y = integer.int_matmul(codes, scale, self.block, self._cached("w_int"), self.w_scale, self.group,
                                    partial_dtype=self.partial_dtype)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        a = f"a{self.cfg.a_bits}" if self.quantizes_activations else f"a{UNQUANTIZED}"
        extra = f", int8 blocks {self.n_int8_blocks}/{self.n_blocks}" if self.quantizes_activations else ""
        perm = "" if self.perm is None else (", input permuted upstream" if self.input_permuted else ", gathers input")
        return (f"in={self.in_features}, out={self.out_features}, {self.cfg.method} w{self.cfg.w_bits}{a}, "
                f"group={self.group}, block={self.block}, padded_in={self.padded_in}{extra}{perm}, mode={self.mode}")


def gptq_linears(linears: list[nn.Linear], cfg: WAConfig, channel_stats: list, hessians: list[torch.Tensor],
                 perms: list | None = None) -> list[tuple]:
    """GPTQ ``(q, scale, zero)`` of several linears, as :meth:`QuantLinear.from_linear` computes them one by one
    (permuted, zero-padded): those with the same padded input width run as one batched :func:`gptq_quantize`
    (rows zero-padded to the widest; every row is rounded on its own), in float64 on the weights' device.
    `perms` (fmpq): per linear, the input permutation to use instead of sorting its statistics (or None)."""
    prepared = []
    for linear, stats, hessian, fixed in zip(linears, channel_stats, hessians, perms or [None] * len(linears)):
        w = linear.weight.detach()
        _, _, padded = layout(w.shape[1], cfg)
        if cfg.permute:
            perm = outlier_permutation(stats.detach().float()) if stats is not None else torch.arange(w.shape[1])
            perm = fixed.long().cpu() if fixed is not None else perm
            w, hessian = w[:, perm.to(w.device)], hessian[perm.cpu()][:, perm.cpu()]
        h = integer.pad_last(integer.pad_last(hessian.double(), padded).t(), padded)
        prepared.append((integer.pad_last(w.double(), padded), h, layout(linear.in_features, cfg)[0]))
    out: list = [None] * len(linears)
    for n, group in sorted({(w.shape[1], g) for w, _, g in prepared}):
        idx = [i for i, (w, _, g) in enumerate(prepared) if (w.shape[1], g) == (n, group)]
        rows = max(prepared[i][0].shape[0] for i in idx)
        W = torch.stack([torch.nn.functional.pad(prepared[i][0], (0, 0, 0, rows - prepared[i][0].shape[0])) for i in idx])
        H = torch.stack([prepared[i][1] for i in idx]).to(W.device)
        q, scale, zero = gptq_quantize(W, H, cfg.w_bits, group, cfg.sym, damp=cfg.damp, clip=cfg.clip)
        for j, i in enumerate(idx):
            r = prepared[i][0].shape[0]
            out[i] = (q[j, :r], scale[j, :r], zero[j, :r] if zero is not None else None)
    return out


def check_permutation(perm: torch.Tensor, n: int) -> torch.Tensor:
    """`perm` as int64 after checking it is a permutation of ``range(n)`` (ValueError naming what is wrong)."""
    if not isinstance(perm, torch.Tensor) or perm.dim() != 1 or perm.numel() != n:
        shape = tuple(perm.shape) if isinstance(perm, torch.Tensor) else type(perm).__name__
        raise ValueError(f"a permutation of {n} channels must be a 1-D tensor of {n} indices, got {shape}")
    if perm.is_floating_point() or perm.is_complex() or perm.dtype == torch.bool:
        raise ValueError(f"a permutation must hold integer indices, got {perm.dtype}")
    p = perm.long()
    if not torch.equal(torch.sort(p.cpu()).values, torch.arange(n)):
        raise ValueError(f"not a permutation of range({n}): indices repeat or fall outside [0, {n})")
    return p


def outlier_permutation(stats: torch.Tensor) -> torch.Tensor:
    """Channel order gathering outliers: channels sorted by descending magnitude (stable, deterministic)."""
    return torch.sort(stats.float(), descending=True, stable=True).indices


def select_int8_blocks(stats: torch.Tensor | None, block: int, padded_in: int, cfg: WAConfig) -> torch.Tensor:
    """INT8-block mask: every block for ``a=8``; else the ``ceil(int8_frac * blocks)`` blocks with the
    largest channel magnitude (`stats` already in permuted order; without stats the first blocks)."""
    nb = padded_in // block
    if cfg.a_bits >= 8:
        return torch.ones(nb, dtype=torch.bool)
    n8 = core.ceil_blocks(cfg.int8_frac, nb)
    mask = torch.zeros(nb, dtype=torch.bool)
    if n8 == 0:
        return mask
    if stats is None:
        mask[:n8] = True
        return mask
    block_mag = integer.pad_last(stats.float().cpu(), padded_in).reshape(nb, block).amax(dim=1)
    top = torch.sort(block_mag, descending=True, stable=True).indices[:n8]
    mask[top] = True
    return mask


def supports_kernel(ql: QuantLinear) -> bool:
    """Whether :func:`kernel_forward` can run this layer (W4 with A4/A8, tiles of 32, CUDA and Triton)."""
    from lowbit.kernels import triton_ready

    return (
        ql.cfg.w_bits == 4 and ql.quantizes_activations and ql.cfg.a_bits in (4, 8) and ql.tile % 32 == 0
        and ql.block & (ql.block - 1) == 0 and triton_ready(ql.qweight)
    )


def kernel_inputs(ql: QuantLinear, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(perm int32 or None, int8 mask)`` on `device` as the kernels read them, converted once and cached;
    ``perm`` is None once the input arrives permuted (folded)."""
    key = ("kernel_in", str(device))
    if key not in ql._cache:
        perm = ql.perm.to(device=device, dtype=torch.int32).contiguous() if ql.gathers_input else None
        ql._cache[key] = (perm, ql.int8_mask.to(device=device, dtype=torch.int8).contiguous())
    return ql._cache[key]


FUSED_ENV = "LOWBIT_W4AX_FUSED"  # which decode-sized calls take the one-launch linear (kernels/w4ax_fused.py)
FUSED_MODES = ("auto", "0", "1", "eager")  # the default (two launches), never, always, only outside CUDA-graph capture
# "auto" takes the two-launch path's prepared launches (quantizer, then the GEMM with split-K reduced inside it) for
# every decode-sized call. With split-K in-kernel they beat the one-launch linear eager as well as under CUDA graphs
# at every Llama-3-8B shape, M 1 and 16 (H200, BENCHMARKS.md, stop 31): the one-launch kernel re-quantizes the
# activation slice in every N tile, which costs more GPU time than the second launch costs host time.


def fused_mode(raw: str | None) -> str:
    """The value of ``$LOWBIT_W4AX_FUSED`` checked: one of :data:`FUSED_MODES` (unset or empty: "auto")."""
    mode = (raw or "").strip() or "auto"
    if mode not in FUSED_MODES:
        raise ValueError(f"${FUSED_ENV} must be one of {', '.join(FUSED_MODES)} (auto and 0: two launches, 1: the "
                         f"one-launch linear for M <= 16, eager: the one-launch linear unless a CUDA graph is being "
                         f"captured), got {raw!r}")
    return mode


FUSED_DECODE = fused_mode(os.environ.get(FUSED_ENV))  # read once at import, not per call


def _fused_now(x: torch.Tensor) -> bool:
    """Whether this decode-sized call (``x [M, K]``) takes the one-launch linear under :data:`FUSED_DECODE`."""
    if FUSED_DECODE == "eager":
        return not (x.is_cuda and torch.cuda.is_current_stream_capturing())
    return FUSED_DECODE == "1"


DECODE_FAST_M = MAX_DECODE_M  # decode-sized calls: the ones through the layer's prepared launches


def _decode_call(prepared, n: int, x: torch.Tensor) -> torch.Tensor:
    """A decode-sized call through the layer's prepared launches, nothing else: what :func:`kernel_forward` does for
    it once the layer has made such a call (same launches, same bits), without its per-call checks and lookups
    (~16 µs of host time per call on a 2-core CPU)."""
    lead = x.shape[:-1]
    return prepared(x.reshape(-1, x.shape[-1])).view(*lead, n)


def kernel_forward(ql: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """CUDA forward of a W4A4/W4A8 QuantLinear: fused (permute+)pad+quantize, then the INT8-tensor-core GEMM.

    Computes the same function as ``mode="int"`` (equal activation codes; float32 epilogue in a
    different summation order, then the output dtype). Reads ``qweight`` as stored (no second copy). The
    call path allocates nothing once warm: the launch plan is cached per shape, the activation codes,
    scales and split-K partials come from the shared workspace (:data:`lowbit.kernels.gemm.WORKSPACE`),
    and with ``ql.reuse_output`` the output is a per-layer buffer reused for every call (the caller must be
    done with one output before the next call: CUDA graphs, decode loops); without it, a fresh tensor.
    Decode-sized calls (M <= 16) go through the layer's prepared launches
    (:class:`lowbit.kernels.w4ax_fused.PreparedLinear`: recorded once, relaunched without the per-call host work):
    the one-launch linear (needs block <= group) or the quantizer then the GEMM, as ``$LOWBIT_W4AX_FUSED`` at import
    says (:data:`FUSED_DECODE`; two launches by default). The same bits
    either way at the same tile.
    """
    from lowbit.kernels.gemm import linear_two_launch, stream_key
    from lowbit.kernels.layout import BufferPool

    dev = x.device
    perm, mask = kernel_inputs(ql, dev)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    out = None
    if ql.reuse_output:
        if ql._outputs is None:
            ql._outputs = BufferPool()
        out = ql._outputs.get("y", (m, ql.out_features), out_dtype, dev, stream_key(dev))
    ops = (ql.block, ql.qweight, ql.w_scale, ql.group, mask, ql.cfg.a_bits, perm, ql.w_zero, ql.bias, out_dtype)
    if 0 < m <= MAX_DECODE_M:  # decode: the layer's prepared launches
        from lowbit.kernels.w4ax_fused import PreparedLinear, fused_supported

        fused = _fused_now(x2) and fused_supported(m, ql.block, ql.group)
        launches = "fused" if fused else "two"
        key = (launches, str(dev), out_dtype)
        prepared = ql._cache.get(key)
        if prepared is None:
            prepared = ql._cache[key] = PreparedLinear(*ops, launches=launches)
        y = prepared(x2, out)
        if out is None and out_dtype == x.dtype and ql.in_rotation is None and FUSED_DECODE != "eager" \
                and fp8_prefill.FP8_MIN_TOKENS > DECODE_FAST_M and ql.cfg.aclip >= 1.0:  # what forward would route here
            ql._cache[("decode", x.dtype, dev, FUSED_DECODE)] = partial(_decode_call, prepared, ql.out_features)
    else:
        y = linear_two_launch(x2, *ops, out=out)
    return y.reshape(*lead, ql.out_features).to(x.dtype)
