"""KIVI+: KIVI's storage plus the techniques that measurably help at 2 bits, each one a spec option.

A :class:`KiviPlusLayer` is a :class:`~lowbit.kv.kivi.KiviLayer` (sinks | quantized | residual, flushed on
:class:`~lowbit.quant.kivi.KiviFormat`'s schedule) whose quantized part may differ in five ways:

* ``sinks=N`` are *sink-aware and aligned*: the first N tokens stay in fp16 as in KIVI, and they also hold
  the first N rows of the first key block (filled with a copy of the next token, so they never widen a
  group's range). Key blocks thus start at absolute multiples of ``residual``, as without sinks; KIVI
  instead shifts its key schedule by N tokens, which leaves up to ``residual - 1`` more fp16 keys.

* ``kbits``/``vbits``, ``kgroup``/``vgroup``: keys and values each get their own width and group size.
* ``rotate=k|v|kv``: a quantized block is multiplied by the orthonormal Hadamard matrix ``H`` over the
  head dimension before quantization and by ``H^T`` after dequantization. Scores are unchanged by an
  orthogonal rotation of both operands, ``q·k = (qH)·(kH)``, so undoing it on read is the same as rotating
  the query (what a fused kernel would do); for values ``P(VH)H^T = PV``. The rotation spreads the few
  wide channels (RoPE's low frequencies, outliers) over all channels before the scale is chosen.
* ``hi_channels=N``: per head and per block of ``residual`` keys, the N key channels with the widest
  range are stored at ``hi_bits`` (their indices as one uint8 each per block).
* ``hi_layers=0/29``: these layers store keys and values at ``hi_bits`` (``/``-separated, negative counts
  from the end).

Every stored tensor is counted by :meth:`KiviPlusLayer.nbytes`, and :func:`layer_nbytes` gives the same
number in closed form (tested against real caches). Presets ``2bit`` and ``4bit`` expand to full specs
(docs/QUALITY.md has the measurements behind them). Runs the PyTorch path on every device.
"""

from __future__ import annotations

import re

import torch
from transformers.cache_utils import Cache

from lowbit.kv.kivi import KiviLayer
from lowbit.kv.registry import CacheContext, KVMethod, KVShape, register_kv_method, register_kv_preset
from lowbit.quant.kivi import SCALE_BYTES, KiviFormat, dequantize_keys, dequantize_values, quantize_keys, quantize_values
from lowbit.quant.packing import PACKABLE_BITS
from lowbit.spec import MethodSpec, Param, ParsedSpec, SpecError

ROTATIONS = ("none", "k", "v", "kv")
_LAYERS = re.compile(r"^(none|-?\d+(/-?\d+)*)$")


def hadamard(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix of order `n` (a power of two): ``H @ H.T == I``."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"rotate needs a power-of-two head dimension for its Hadamard matrix, got {n}: use rotate=none")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(dtype=dtype, device=device)


def _complement(idx: torch.Tensor, d: int) -> torch.Tensor:
    """The channels of ``0..d-1`` not in `idx` (``[..., k]``), ascending: ``[..., d - k]``."""
    keep = torch.ones(*idx.shape[:-1], d, dtype=torch.int8, device=idx.device).scatter_(-1, idx, 0)
    return torch.sort(keep, dim=-1, descending=True, stable=True).indices[..., : d - idx.shape[-1]]


class KiviPlusLayer(KiviLayer):
    """One decoder layer of KIVI+. Tensors are ``[batch, kv_heads, tokens, head_dim]``."""

    def __init__(self, kbits: int = 2, vbits: int = 2, kgroup: int = 32, vgroup: int = 32, residual: int = 128,
                 sinks: int = 0, rotate: str = "none", hi_channels: int = 0, hi_bits: int = 4,
                 storage_dtype: torch.dtype | None = None):
        super().__init__(kbits, kgroup, residual, sinks, storage_dtype)
        self.kbits, self.vbits, self.kgroup, self.vgroup = kbits, vbits, kgroup, vgroup
        self.rotate, self.hi_channels, self.hi_bits = rotate, hi_channels, hi_bits

    def _clear(self) -> None:
        super()._clear()
        self.hk_packed = self.hk_scale = self.hk_zero = self.hk_index = None  # the hi_channels keys
        self._deq_k = self._deq_v = None  # dequantized (and un-rotated) quantized parts, a compute buffer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        d = key_states.shape[-1]
        self.vgroup = min(self.vgroup, d)  # a group wider than the head is the whole head
        if d % self.vgroup:
            raise ValueError(f"KIVI+ vgroup={self.vgroup} must divide the head dimension {d}")
        if not 0 <= self.hi_channels < d or d > 256:
            raise ValueError(f"KIVI+ hi_channels={self.hi_channels} must be in 0..{d - 1} (head dims up to 256)")
        self.head_dim = d  # the base class checks `group` against it: keys are grouped along tokens here
        self.dtype, self.device = key_states.dtype, key_states.device
        self.storage_dtype = self.requested_storage_dtype or (torch.float16 if self.dtype == torch.float32 else self.dtype)
        self._h = hadamard(d, torch.float32, key_states.device) if self.rotate != "none" else None
        self.is_initialized = True

    # ----------------------------------------------------------------- quantize (called by KiviLayer._store)
    def _rot(self, x: torch.Tensor, which: str, inverse: bool = False) -> torch.Tensor:
        x = x.float()
        if which not in self.rotate or self._h is None:
            return x
        return x @ (self._h.t() if inverse else self._h)

    def _pack_keys(self, k: torch.Tensor):
        x = self._rot(k, "k")
        if self.hi_channels:
            n, r = x.shape[-2], self.residual
            blocks = x.unflatten(-2, (n // r, r))
            spread = blocks.amax(-2) - blocks.amin(-2)  # [B, H, blocks, D]
            idx = spread.topk(self.hi_channels, dim=-1).indices.sort(-1).values
            hi = x.gather(-1, idx.repeat_interleave(r, dim=-2))
            for name, t in zip(("hk_packed", "hk_scale", "hk_zero"), quantize_keys(hi, self.hi_bits, self.kgroup)):
                self._append(name, t)
            self._append("hk_index", idx.to(torch.uint8))
            x = x.gather(-1, _complement(idx, x.shape[-1]).repeat_interleave(r, dim=-2))
        return quantize_keys(x, self.kbits, self.kgroup)

    def _pack_values(self, v: torch.Tensor):
        return quantize_values(self._rot(v, "v"), self.vbits, self.vgroup)

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """KIVI's storage with key blocks aligned to absolute positions (the sinks' rows are placeholders)."""
        k = key_states.detach().to(self.storage_dtype)
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
        lead = self.sinks if self.n_qk == 0 else 0  # placeholder rows that open the first key block
        n_flush = self.format.key_flush(lead + self.res_k.shape[-2]) - lead
        if n_flush > 0:
            block = self.res_k[..., :n_flush, :]
            if lead:
                block = torch.cat([block[..., :1, :].expand(*block.shape[:-2], lead, block.shape[-1]), block], dim=-2)
            for name, t in zip(("qk_packed", "qk_scale", "qk_zero"), self._pack_keys(block)):
                self._append(name, t)
            self.n_qk += n_flush
            self._drop_front("res_k", n_flush)
        n_flush = self.format.value_flush(self.res_v.shape[-2])
        if n_flush:
            for name, t in zip(("qv_packed", "qv_scale", "qv_zero"), self._pack_values(self.res_v[..., :n_flush, :])):
                self._append(name, t)
            self.n_qv += n_flush
            self._drop_front("res_v", n_flush)

    # ----------------------------------------------------------------- read back
    def _dequantized_keys(self) -> torch.Tensor:
        if self._deq_k is None or self._deq_k.shape[-2] != self.n_qk:
            n = self.n_qk + self.sinks  # stored rows: the sinks' placeholders open the first block
            lo = dequantize_keys(self.qk_packed, self.qk_scale, self.qk_zero, n, self.kbits, self.kgroup, torch.float32)
            if self.hi_channels:
                hi = dequantize_keys(self.hk_packed, self.hk_scale, self.hk_zero, n, self.hi_bits, self.kgroup, torch.float32)
                idx = self.hk_index.long()
                x = torch.empty(*lo.shape[:-1], self.head_dim, device=lo.device)
                x.scatter_(-1, idx.repeat_interleave(self.residual, dim=-2), hi)
                x.scatter_(-1, _complement(idx, self.head_dim).repeat_interleave(self.residual, dim=-2), lo)
                lo = x
            self._deq_k = self._rot(lo[..., self.sinks :, :], "k", inverse=True).to(self.dtype)
        return self._deq_k

    def _dequantized_values(self) -> torch.Tensor:
        have = 0 if self._deq_v is None else self._deq_v.shape[-2]
        if have < self.n_qv:  # values are quantized per token: only the new rows need dequantizing
            rows = [t[..., have : self.n_qv, :] for t in (self.qv_packed, self.qv_scale, self.qv_zero)]
            new = dequantize_values(*rows, self.n_qv - have, self.vbits, self.vgroup, torch.float32)
            new = self._rot(new, "v", inverse=True).to(self.dtype)
            self._deq_v = new if self._deq_v is None else torch.cat([self._deq_v, new], dim=-2)
        return self._deq_v

    def full_keys(self) -> torch.Tensor:
        def deq(n, out):
            out.copy_(self._dequantized_keys())
        return self._assemble(self.sink_k, self.n_qk, deq, self.res_k, self.qk_scale)

    def full_values(self) -> torch.Tensor:
        def deq(n, out):
            out.copy_(self._dequantized_values())
        return self._assemble(self.sink_v, self.n_qv, deq, self.res_v, self.qv_scale)

    # ----------------------------------------------------------------- bookkeeping
    def _tensor_names(self) -> tuple[str, ...]:
        return super()._tensor_names() + ("hk_packed", "hk_scale", "hk_zero", "hk_index")

    def _map_batch(self, fn) -> None:
        super()._map_batch(fn)
        self._deq_k = self._deq_v = None

    def parts(self, *args, **kwargs):
        raise NotImplementedError("KIVI+ has no KiviParts view: its blocks may be rotated or split by channel")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a KIVI+ cache cannot be cropped (quantized states cannot be rolled back)")


# ------------------------------------------------------------------------------ plans and bytes


def _hi_layers(text: str, n_layers: int) -> set[int]:
    if text == "none":
        return set()
    out = set()
    for item in text.split("/"):
        i = int(item)
        if not -n_layers <= i < n_layers:
            raise ValueError(f"KIVI+ hi_layers names layer {i}, but the model has {n_layers} layers")
        out.add(i % n_layers)
    return out


def layer_plans(o: dict, n_layers: int) -> list[dict]:
    """The :class:`KiviPlusLayer` arguments of each layer (``hi_layers`` at ``hi_bits``, without hi channels)."""
    hi = _hi_layers(o["hi_layers"], n_layers)
    plans = []
    for i in range(n_layers):
        p = dict(kbits=o["kbits"], vbits=o["vbits"], kgroup=o["kgroup"], vgroup=o["vgroup"], residual=o["residual"],
                 sinks=o["sinks"], rotate=o["rotate"], hi_channels=o["hi_channels"], hi_bits=o["hi_bits"])
        if i in hi:
            p.update(kbits=o["hi_bits"], vbits=o["hi_bits"], hi_channels=0)
        plans.append(p)
    return plans


def layer_nbytes(p: dict, n: int, kv_heads: int, head_dim: int, store_bytes: int = 2) -> int:
    """Bytes one layer planned as `p` holds after `n` tokens (what :meth:`KiviPlusLayer.nbytes` counts)."""
    fmt = KiviFormat(p["kbits"], p["kgroup"], p["residual"], p["sinks"])
    c = fmt.counts(n)
    rows = fmt.key_flush(n) if n >= p["sinks"] else 0  # stored key rows, aligned; the sinks' placeholders included
    d, hc = head_dim, p["hi_channels"]
    full = (2 * c.sinks + n - c.sinks - max(0, rows - p["sinks"]) + c.residual_values) * d * store_bytes
    keys = rows * ((d - hc) * p["kbits"] + hc * p["hi_bits"]) // 8
    keys += 2 * SCALE_BYTES * (rows // p["kgroup"]) * d + (rows // p["residual"]) * hc
    values = c.quantized_values * d * p["vbits"] // 8 + 2 * SCALE_BYTES * c.quantized_values * (d // min(d, p["vgroup"]))
    return kv_heads * (full + keys + values)


class KiviPlusCache(Cache):
    """A KIVI+ cache: ``KiviPlusCache(model.config, kbits=2, rotate="kv", ...)`` (options as the spec's)."""

    def __init__(self, config=None, num_layers: int | None = None, storage_dtype: torch.dtype | None = None, **options):
        if num_layers is None:
            if config is None:
                raise ValueError("KiviPlusCache needs the model config (or num_layers)")
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        o = {name: p.default for name, p in KIVI_PLUS.spec.params.items()} | options
        super().__init__(layers=[KiviPlusLayer(**p, storage_dtype=storage_dtype) for p in layer_plans(o, num_layers)])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def nbytes_fp16(self) -> int:
        return sum(layer.nbytes_fp16() for layer in self.layers)


def _make(part: ParsedSpec, ctx: CacheContext, store) -> KiviPlusCache:
    return KiviPlusCache(ctx.config, **part.options)


def _nbytes(o: dict, shape: KVShape, n: int, store) -> int:
    return sum(layer_nbytes(p, n, shape.kv_heads, shape.head_dim, shape.store_bytes) for p in layer_plans(o, shape.layers))


def _peak_nbytes(o: dict, shape: KVShape, n: int, store) -> int:
    """The size drops when a block of keys is quantized: the peak is at `n` or within the block before it."""
    return max(_nbytes(o, shape, m, store) for m in range(max(0, n - o["residual"] - 1), n + 1))


def _validate(part: ParsedSpec) -> None:
    o = part.options
    if o["sinks"] >= o["residual"]:
        raise SpecError(f"'{part.text}': sinks ({o['sinks']}) must be fewer than residual ({o['residual']})")
    for bits in {o["kbits"], o["hi_bits"]} if (o["hi_channels"] or o["hi_layers"] != "none") else {o["kbits"]}:
        if o["residual"] % o["kgroup"] or o["kgroup"] % (8 // bits):
            raise SpecError(f"'{part.text}': residual ({o['residual']}) must be a multiple of kgroup ({o['kgroup']}), "
                            f"and kgroup a multiple of {8 // bits} for {bits}-bit packing")
    if o["vgroup"] % (8 // min(o["vbits"], o["hi_bits"])):
        raise SpecError(f"'{part.text}': vgroup ({o['vgroup']}) must be a multiple of {8 // o['vbits']} for {o['vbits']}-bit packing")


_BITS = dict(check=lambda b: b in PACKABLE_BITS, allowed=f"one of {PACKABLE_BITS}")
_POS = dict(check=lambda g: g > 0, allowed="a positive integer")
KIVI_PLUS = register_kv_method(KVMethod(
    MethodSpec(
        "kiviplus",
        {
            "kbits": Param(int, 2, **_BITS, help="key bits"),
            "vbits": Param(int, 2, **_BITS, help="value bits"),
            "kgroup": Param(int, 32, **_POS, help="tokens per key scale (per channel)"),
            "vgroup": Param(int, 32, **_POS, help="channels per value scale (per token; at most the head)"),
            "residual": Param(int, 128, aliases=("r",), **_POS),
            "sinks": Param(int, 0, check=lambda s: s >= 0, allowed="an integer >= 0"),
            "rotate": Param(str, "none", check=lambda r: r in ROTATIONS, allowed=f"one of {ROTATIONS}"),
            "hi_channels": Param(int, 0, check=lambda c: c >= 0, allowed="an integer >= 0", help="key channels at hi_bits"),
            "hi_bits": Param(int, 4, **_BITS),
            "hi_layers": Param(str, "none", check=lambda s: bool(_LAYERS.match(s)),
                               allowed="'none' or layer indices joined by '/', e.g. 0/1/-1"),
        },
        "KIVI plus Hadamard rotation, separate K/V bits and groups, wide key channels and layers at hi_bits",
    ),
    _make, _nbytes, peak_nbytes=_peak_nbytes, validate=_validate,
))

# Presets (docs/QUALITY.md: chosen on the first half of WikiText-2 test, reported on the second half).
PRESETS = {
    "2bit": "kiviplus:kbits=2,vbits=2,kgroup=32,vgroup=64,residual=128,sinks=4,rotate=v,hi_channels=16,hi_bits=4",
    "4bit": "kiviplus:kbits=4,vbits=4,kgroup=32,vgroup=64,residual=128,sinks=4,rotate=v,hi_channels=6,hi_bits=8",
}
for _name, _spec in PRESETS.items():
    register_kv_preset(_name, _spec)
