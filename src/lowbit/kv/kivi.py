"""KIVI: tuning-free asymmetric 2/4-bit KV-cache quantization (Liu et al., 2024) as a transformers Cache.

The storage format -- parts (sinks | quantized | residual), flush schedule, quantize+pack, dequantize,
bytes -- is :mod:`lowbit.quant.kivi`; this module holds it per decoder layer. The tokens of the current
forward attend with their exact states (as in KIVI); what they left in the cache is what later steps
see. Full-precision parts are stored in ``storage_dtype`` (fp16 by default for an fp32 model, else the
model's dtype), so :meth:`KiviCache.nbytes` is the true number of bytes a deployment would hold.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lowbit.kv.registry import CacheContext, KVMethod, KVShape, register_kv_method
from lowbit.quant.kivi import KiviFormat, KiviParts, dequantize_keys, dequantize_values, quantize_keys, quantize_values
from lowbit.quant.packing import PACKABLE_BITS
from lowbit.spec import MethodSpec, Param, ParsedSpec, SpecError


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class KiviLayer(DynamicLayer):
    """One decoder layer's KIVI cache. Tensors are [batch, kv_heads, tokens, head_dim]."""

    def __init__(self, bits: int = 2, group: int = 32, residual: int = 128, sinks: int = 0,
                 storage_dtype: torch.dtype | None = None):
        super().__init__()
        self.format = KiviFormat(bits, group, residual, sinks)
        self.bits, self.group, self.residual, self.sinks = bits, group, residual, sinks
        self.requested_storage_dtype = storage_dtype
        self._clear()

    # ----------------------------------------------------------------- state
    def _clear(self) -> None:
        self.sink_k = self.sink_v = None  # full precision, first `sinks` tokens
        self.qk_packed = self.qk_scale = self.qk_zero = None  # keys: codes packed along tokens
        self.qv_packed = self.qv_scale = self.qv_zero = None  # values: codes packed along channels
        self.res_k = self.res_v = None  # full-precision residuals
        self.n_sink = self.n_qk = self.n_qv = 0
        self.keys = self.values = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = head_dim = key_states.shape[-1]
        if head_dim % self.group:
            raise ValueError(
                f"KIVI group {self.group} must divide the head dimension {head_dim} "
                "(values are quantized per token in groups of channels)"
            )
        if self.requested_storage_dtype is not None:
            self.storage_dtype = self.requested_storage_dtype
        else:
            self.storage_dtype = torch.float16 if self.dtype == torch.float32 else self.dtype
        self.is_initialized = True

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        n_res = 0 if self.res_k is None else self.res_k.shape[-2]
        return self.n_sink + self.n_qk + n_res

    def reset(self) -> None:
        self._clear()
        self.is_initialized = False

    # ----------------------------------------------------------------- storage (overridable)
    def _append(self, name: str, new: torch.Tensor) -> None:
        """``getattr(self, name) = cat(current, new)`` along tokens."""
        cur = getattr(self, name)
        setattr(self, name, new if cur is None else torch.cat([cur, new], dim=-2))

    def _drop_front(self, name: str, n: int) -> None:
        setattr(self, name, getattr(self, name)[..., n:, :].contiguous())

    def _pack_keys(self, k: torch.Tensor):
        return quantize_keys(k, self.bits, self.group)

    def _pack_values(self, v: torch.Tensor):
        return quantize_values(v, self.bits, self.group)

    def _flush_keys(self, k: torch.Tensor) -> None:
        """Quantize and store keys leaving the residual (a whole number of groups)."""
        for name, t in zip(("qk_packed", "qk_scale", "qk_zero"), self._pack_keys(k)):
            self._append(name, t)

    def _flush_values(self, v: torch.Tensor) -> None:
        """Quantize and store values leaving the residual."""
        for name, t in zip(("qv_packed", "qv_scale", "qv_zero"), self._pack_values(v)):
            self._append(name, t)

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Store new tokens: sinks first, then the residual, flushed on the format's schedule."""
        k = key_states.detach().to(self.storage_dtype)  # a cache is for inference: no autograd through codes
        v = value_states.detach().to(self.storage_dtype)
        if self.n_sink < self.sinks:
            take = min(self.sinks - self.n_sink, k.shape[-2])
            self._append("sink_k", k[..., :take, :])
            self._append("sink_v", v[..., :take, :])
            self.n_sink += take
            k, v = k[..., take:, :], v[..., take:, :]
        if not k.shape[-2]:
            return
        self._append("res_k", k)
        self._append("res_v", v)
        n_flush = self.format.key_flush(self.res_k.shape[-2])
        if n_flush:
            self._flush_keys(self.res_k[..., :n_flush, :])
            self.n_qk += n_flush
            self._drop_front("res_k", n_flush)
        n_flush = self.format.value_flush(self.res_v.shape[-2])
        if n_flush:
            self._flush_values(self.res_v[..., :n_flush, :])
            self.n_qv += n_flush
            self._drop_front("res_v", n_flush)

    # ----------------------------------------------------------------- reading
    def _assemble(self, sink, n_quant: int, dequantize, residual, scale) -> torch.Tensor:
        """sinks | dequantized | residual in token order, written once into one [B, H, T, D] tensor."""
        ref = next(t for t in (sink, residual, scale) if t is not None)
        out = torch.empty(ref.shape[0], ref.shape[1], self.get_seq_length(), self.head_dim, dtype=self.dtype, device=ref.device)
        if sink is not None:
            out[..., : self.n_sink, :] = sink
        if n_quant:
            dequantize(n_quant, out[..., self.n_sink : self.n_sink + n_quant, :])
        if residual is not None:
            out[..., self.n_sink + n_quant :, :] = residual
        return out

    def full_keys(self) -> torch.Tensor:
        """All cached keys in token order, dequantized to the model dtype."""
        def deq(n, out):
            return dequantize_keys(self.qk_packed, self.qk_scale, self.qk_zero, n, self.bits, self.group, self.dtype, out=out)
        return self._assemble(self.sink_k, self.n_qk, deq, self.res_k, self.qk_scale)

    def full_values(self) -> torch.Tensor:
        """All cached values in token order, dequantized to the model dtype."""
        def deq(n, out):
            return dequantize_values(self.qv_packed, self.qv_scale, self.qv_zero, n, self.bits, self.group, self.dtype, out=out)
        return self._assemble(self.sink_v, self.n_qv, deq, self.res_v, self.qv_scale)

    def parts(self, n_qk: int | None = None, res_k: torch.Tensor | None = None) -> KiviParts:
        """The stored tensors as a :class:`~lowbit.quant.kivi.KiviParts` (optionally overriding the key split)."""
        return KiviParts(
            bits=self.bits, group=self.group, sink_k=self.sink_k, sink_v=self.sink_v,
            qk_packed=self.qk_packed, qk_scale=self.qk_scale, qk_zero=self.qk_zero, n_qk=self.n_qk if n_qk is None else n_qk,
            qv_packed=self.qv_packed, qv_scale=self.qv_scale, qv_zero=self.qv_zero, n_qv=self.n_qv,
            res_k=self.res_k if res_k is None else res_k, res_v=self.res_v,
        )

    # ----------------------------------------------------------------- Cache API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._store(key_states, value_states)
        # as in KIVI, the tokens of this step attend with their exact states; quantization applies from the next step
        keys, values = self.full_keys(), self.full_values()
        n = key_states.shape[-2]
        keys[..., -n:, :] = key_states
        values[..., -n:, :] = value_states
        return keys, values

    def _tensor_names(self) -> tuple[str, ...]:
        return ("sink_k", "sink_v", "qk_packed", "qk_scale", "qk_zero", "qv_packed", "qv_scale", "qv_zero", "res_k", "res_v")

    def _map_batch(self, fn) -> None:
        for name in self._tensor_names():
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t[indices, ...])

    def crop(self, max_length: int) -> None:
        """Drop the newest tokens: ``crop(-n)`` removes n; ``crop(n >= 0)`` keeps the first n (legacy form).

        Tokens removed from the quantized keys leave whole groups: the surviving tokens of a partially
        removed key group move back to the residual as their dequantized values (never re-quantized
        from their originals, which are gone).
        """
        if not self.is_initialized:
            return
        total = self.get_seq_length()
        keep = total + max_length if max_length < 0 else min(max_length, total)
        if keep >= total:
            return
        keep = max(keep, 0)
        keys, values = self.full_keys().to(self.storage_dtype), self.full_values().to(self.storage_dtype)
        # sinks
        n_sink = min(self.n_sink, keep)
        self.sink_k = keys[..., :n_sink, :] if n_sink else None
        self.sink_v = values[..., :n_sink, :] if n_sink else None
        self.n_sink = n_sink
        rest = keep - n_sink
        # keys: keep whole quantized groups, the rest goes (dequantized) to the residual
        kept_k = min(self.n_qk, (rest // self.group) * self.group)
        if kept_k < self.n_qk:
            rows = kept_k * self.bits // 8
            self.qk_packed = self.qk_packed[..., :rows, :] if kept_k else None
            g = kept_k // self.group
            self.qk_scale = self.qk_scale[..., :g, :] if kept_k else None
            self.qk_zero = self.qk_zero[..., :g, :] if kept_k else None
            self.n_qk = kept_k
        self.res_k = keys[..., n_sink + kept_k : keep, :] if keep > n_sink + kept_k else None
        # values: per-token, so quantized rows are dropped exactly
        kept_v = min(self.n_qv, rest)
        if kept_v < self.n_qv:
            for name in ("qv_packed", "qv_scale", "qv_zero"):
                setattr(self, name, getattr(self, name)[..., :kept_v, :] if kept_v else None)
            self.n_qv = kept_v
        self.res_v = values[..., n_sink + kept_v : keep, :] if keep > n_sink + kept_v else None

    # ----------------------------------------------------------------- accounting
    def nbytes(self) -> int:
        """True bytes held: packed codes, fp16 scales/zeros, residual and sinks."""
        return _nbytes(*(getattr(self, n) for n in self._tensor_names()))

    def nbytes_fp16(self) -> int:
        """Bytes an fp16 cache would hold for the same tokens."""
        if not self.is_initialized or self.get_seq_length() == 0:
            return 0
        ref = next(getattr(self, n) for n in self._tensor_names() if getattr(self, n) is not None)
        return 2 * 2 * ref.shape[0] * ref.shape[1] * self.get_seq_length() * self.head_dim


class KiviCache(Cache):
    """KIVI-quantized KV cache: ``model.generate(..., past_key_values=KiviCache(model.config, bits=2))``."""

    layer_class = KiviLayer

    def __init__(self, config=None, bits: int = 2, group: int = 32, residual: int = 128, sinks: int = 0,
                 storage_dtype: torch.dtype | None = None, num_layers: int | None = None, **layer_options):
        self.format = KiviFormat(bits, group, residual, sinks)
        if num_layers is None:
            if config is None:
                raise ValueError("KiviCache needs the model config (or num_layers) to know how many layers to hold")
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        layers = [self.layer_class(bits, group, residual, sinks, storage_dtype, **layer_options) for _ in range(num_layers)]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """True bytes held by the cache across all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def nbytes_fp16(self) -> int:
        """Bytes an uncompressed fp16 cache would hold for the same tokens."""
        return sum(layer.nbytes_fp16() for layer in self.layers)

    def __repr__(self) -> str:
        f = self.format
        return f"{type(self).__name__}(bits={f.bits}, group={f.group}, residual={f.residual}, sinks={f.sinks}, layers={len(self.layers)})"


# ------------------------------------------------------------------------------ registration


KERNELS = ("triton", "paged", "reference")


def _make_cache(part: ParsedSpec, ctx: CacheContext, store) -> KiviCache:
    """``kernel=triton`` (default): on CUDA with the model, the fused cache and the Triton decode kernel;
    ``kernel=paged``: paged storage (any device), read on CUDA by the paged CUDA kernel; ``kernel=reference``:
    the PyTorch path everywhere."""
    o = part.options
    options = dict(bits=o["bits"], group=o["group"], residual=o["residual"], sinks=o["sinks"])
    model = ctx.model
    on_cuda = model is not None and ctx.kernels and next(model.parameters()).is_cuda
    if o["kernel"] == "paged":
        from lowbit.kv.paged import PagedKiviCache

        if on_cuda:
            from lowbit.kv.attention import use_lowbit_attention

            use_lowbit_attention(model)
        return PagedKiviCache(ctx.config, **options, fused=on_cuda)
    if on_cuda and o["kernel"] == "triton":
        from lowbit.kv.attention import use_lowbit_attention
        from lowbit.kv.fused import FusedKiviCache

        use_lowbit_attention(model)
        return FusedKiviCache(ctx.config, **options)
    return KiviCache(ctx.config, **options)


def _format(o: dict) -> KiviFormat:
    return KiviFormat(o["bits"], o["group"], o["residual"], o["sinks"])


def _method_nbytes(o: dict, shape: KVShape, n: int, store) -> int:
    fmt = _format(o)
    nbytes = fmt.paged_nbytes if o.get("kernel") == "paged" else fmt.nbytes
    return shape.layers * nbytes(n, shape.kv_heads, shape.head_dim, shape.store_bytes)


def _method_peak_nbytes(o: dict, shape: KVShape, n: int, store) -> int:
    if o.get("kernel") == "paged":  # whole pages: the size drops at a key flush as for the plain layout
        return max(_method_nbytes(o, shape, m, store) for m in range(max(0, n - o["residual"] - 1), n + 1))
    return shape.layers * _format(o).peak_nbytes(n, shape.kv_heads, shape.head_dim, shape.store_bytes)


def _validate(part: ParsedSpec) -> None:
    o = part.options
    if o["residual"] % o["group"] or (o["group"] % (8 // o["bits"])):
        raise SpecError(
            f"'{part.text}': residual ({o['residual']}) must be a multiple of group ({o['group']}), "
            f"and group a multiple of {8 // o['bits']} for {o['bits']}-bit packing"
        )
    if o.get("kernel") == "paged" and (o["bits"] not in (2, 4) or o["group"] != 32 or o["residual"] % 128):
        raise SpecError(f"'{part.text}': kernel=paged holds bits 2 or 4 with group 32 and a residual multiple of 128")


KIVI = register_kv_method(KVMethod(
    MethodSpec(
        "kivi",
        {
            "bits": Param(int, 2, check=lambda b: b in PACKABLE_BITS, allowed=f"one of {PACKABLE_BITS}"),
            "group": Param(int, 32, aliases=("group_size", "g"), check=lambda g: g > 0, allowed="a positive integer"),
            "residual": Param(int, 128, aliases=("residual_length", "r"), check=lambda r: r > 0, allowed="a positive multiple of group"),
            "sinks": Param(int, 0, check=lambda s: s >= 0, allowed="an integer >= 0"),
            "kernel": Param(str, "triton", check=lambda k: k in KERNELS, allowed=f"one of {', '.join(KERNELS)}",
                            help="decode path on CUDA: triton (contiguous), paged (CUDA C++ over pages), reference"),
        },
        "KIVI: keys per-channel, values per-token, full-precision residual window",
    ),
    _make_cache, _method_nbytes, peak_nbytes=_method_peak_nbytes, validate=_validate, is_store=True,
))
