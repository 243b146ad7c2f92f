"""The KIVI storage format, in one place: its parts, when tokens move between them, how they are
quantized and packed, how they are read back, and how many bytes they take.

Per sequence, layer and KV head, a KIVI cache holds up to three parts, always in token order::

    sinks | quantized | residual

* **sinks** (``sinks=N``): the first N tokens, full precision;
* **quantized**: keys per channel (each channel's ``group`` consecutive tokens share one fp16 scale and
  zero, codes packed along tokens), values per token (each token's ``group`` consecutive channels share
  them, codes packed along channels), 2/4/8-bit codes;
* **residual**: the newest tokens in full precision.

Flush schedule (:meth:`KiviFormat.key_flush`, :meth:`KiviFormat.value_flush`): keys leave the residual
``residual`` (R) at a time once R are held; values leave it one token at a time, oldest first, once more
than R are held. The split after ``n`` tokens therefore depends on ``n`` only (:meth:`KiviFormat.counts`),
so the bytes do too (:meth:`KiviFormat.nbytes`). Quantized tokens are never re-quantized.

Everything that stores, reads or sizes KIVI data -- the transformers cache (:mod:`lowbit.kv.kivi`), the
GPU kernels and their references (:mod:`lowbit.kernels`), the server's admission -- goes through here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.quant.affine import dequantize_codes, quantize_codes
from lowbit.quant.packing import PACKABLE_BITS, pack, unpack

SCALE_BYTES = 2  # scale and zero are stored in fp16


@dataclass(frozen=True)
class KiviCounts:
    """How the first ``n`` tokens of a sequence are split between the parts."""

    sinks: int
    quantized_keys: int
    quantized_values: int
    residual_keys: int
    residual_values: int


@dataclass(frozen=True)
class KiviFormat:
    """KIVI options (validated) and the operations that define the format."""

    bits: int = 2
    group: int = 32
    residual: int = 128
    sinks: int = 0

    def __post_init__(self) -> None:
        if self.bits not in PACKABLE_BITS:
            raise ValueError(f"KIVI bits={self.bits} is not supported: allowed bit-widths are {PACKABLE_BITS}")
        per_byte = 8 // self.bits
        if self.group <= 0 or self.group % per_byte:
            raise ValueError(f"KIVI group={self.group} must be a positive multiple of {per_byte} for {self.bits}-bit packing")
        if self.residual <= 0 or self.residual % self.group:
            raise ValueError(f"KIVI residual={self.residual} must be a positive multiple of group={self.group}")
        if self.sinks < 0:
            raise ValueError(f"KIVI sinks={self.sinks} must be >= 0")

    # ------------------------------------------------------------------ flush schedule
    def key_flush(self, residual_keys: int) -> int:
        """Keys to move from a residual of `residual_keys` into the quantized part (whole multiples of R)."""
        return (residual_keys // self.residual) * self.residual

    def value_flush(self, residual_values: int) -> int:
        """Values to move from a residual of `residual_values` into the quantized part (all beyond R)."""
        return max(0, residual_values - self.residual)

    def counts(self, n_tokens: int) -> KiviCounts:
        """The split of `n_tokens` tokens between sinks, quantized and residual keys and values."""
        n_sink = min(self.sinks, n_tokens)
        rest = n_tokens - n_sink
        n_qk, n_qv = self.key_flush(rest), self.value_flush(rest)
        return KiviCounts(n_sink, n_qk, n_qv, rest - n_qk, rest - n_qv)

    # ------------------------------------------------------------------ bytes
    def nbytes(self, n_tokens: int, kv_heads: int, head_dim: int, store_bytes: int = 2, batch: int = 1) -> int:
        """Bytes one layer holds after `n_tokens` tokens: packed codes, fp16 scales/zeros, residual and sinks.

        `store_bytes` is the element size of the full-precision parts (2 for fp16/bf16).
        """
        if head_dim % self.group:
            raise ValueError(f"KIVI group={self.group} must divide the head dimension {head_dim}")
        c = self.counts(max(0, int(n_tokens)))
        row = kv_heads * head_dim  # elements per token of K (or V)
        full = (2 * c.sinks + c.residual_keys + c.residual_values) * row * store_bytes
        keys = c.quantized_keys * row * self.bits // 8 + 2 * SCALE_BYTES * (c.quantized_keys // self.group) * row
        values = c.quantized_values * row * self.bits // 8 + 2 * SCALE_BYTES * c.quantized_values * row // self.group
        return batch * (full + keys + values)

    def peak_nbytes(self, n_tokens: int, kv_heads: int, head_dim: int, store_bytes: int = 2, batch: int = 1) -> int:
        """The most bytes held at any length up to `n_tokens`.

        The size drops when a block of R keys is quantized, so the peak lies at `n_tokens` or within the
        R tokens before it.
        """
        n = max(0, int(n_tokens))
        return max(self.nbytes(m, kv_heads, head_dim, store_bytes, batch) for m in range(max(0, n - self.residual - 1), n + 1))

    def paged_nbytes(self, n_tokens: int, kv_heads: int, head_dim: int, store_bytes: int = 2, batch: int = 1) -> int:
        """Bytes one layer holds after `n_tokens` tokens in the paged layout (:class:`PageLayout`): whole pages
        for the quantized tokens (scales included), plus sinks and residual."""
        c = self.counts(max(0, int(n_tokens)))
        pages = -(-max(c.quantized_keys, c.quantized_values) // PAGE_TOKENS)
        full = (2 * c.sinks + c.residual_keys + c.residual_values) * kv_heads * head_dim * store_bytes
        return batch * (pages * kv_heads * PageLayout(self.bits, head_dim).nbytes + full)

    def bits_per_element(self, n_tokens: int, head_dim: int, store_bytes: int = 2) -> float:
        """Average stored bits per K/V element after `n_tokens` tokens, every overhead counted."""
        if n_tokens <= 0:
            return math.nan
        return 8 * self.nbytes(n_tokens, 1, head_dim, store_bytes) / (2 * n_tokens * head_dim)


# ---------------------------------------------------------------------- quantize + pack, dequantize


def quantize_keys(k: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys ``[B, H, n, D]`` (n a multiple of group) -> codes packed along tokens ``[B, H, n*bits/8, D]``,
    fp16 scale and zero ``[B, H, n/group, D]`` (per channel, groups of tokens)."""
    codes, scale, zero = quantize_codes(k, bits, group, dim=-2)
    return pack(codes, bits, dim=-2), scale, zero


def quantize_values(v: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values ``[B, H, n, D]`` -> codes packed along channels ``[B, H, n, D*bits/8]``, fp16 scale and zero
    ``[B, H, n, D/group]`` (per token, groups of channels)."""
    codes, scale, zero = quantize_codes(v, bits, group, dim=-1)
    return pack(codes, bits, dim=-1), scale, zero


def dequantize_keys(packed, scale, zero, n: int, bits: int, group: int, dtype: torch.dtype,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """The first `n` quantized keys in `dtype`; `out` (n a multiple of group) receives them without a copy."""
    n_groups = -(-n // group)
    codes = unpack(packed[..., : n_groups * group * bits // 8, :].contiguous(), bits, dim=-2)
    keys = dequantize_codes(codes, scale[..., :n_groups, :], zero[..., :n_groups, :], group, -2, dtype, out=out)
    return keys[..., :n, :]


def dequantize_values(packed, scale, zero, n: int, bits: int, group: int, dtype: torch.dtype,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """The first `n` quantized values in `dtype` (`out`: see :func:`dequantize_keys`)."""
    codes = unpack(packed[..., :n, :].contiguous(), bits, dim=-1)
    return dequantize_codes(codes, scale[..., :n, :], zero[..., :n, :], group, -1, dtype, out=out)


@dataclass
class KiviParts:
    """The tensors of one layer's KIVI cache (shapes ``[B, H_kv, tokens, ...]``), as kernels read them.

    Token order is ``sinks | quantized | residual`` for keys and for values alike; the quantized and
    residual counts differ between keys and values, the totals agree. ``n_qk`` / ``n_qv`` are the
    numbers of quantized tokens to *use* (``n_qk`` may be one less than stored, when the newest key was
    just flushed and attends with its exact state instead).
    """

    bits: int
    group: int
    sink_k: torch.Tensor | None
    sink_v: torch.Tensor | None
    qk_packed: torch.Tensor | None  # uint8 [B, H, n_qk * bits / 8, D], packed along tokens
    qk_scale: torch.Tensor | None  # fp16 [B, H, n_qk / group, D]
    qk_zero: torch.Tensor | None
    n_qk: int
    qv_packed: torch.Tensor | None  # uint8 [B, H, n_qv, D * bits / 8], packed along channels
    qv_scale: torch.Tensor | None  # fp16 [B, H, n_qv, D / group]
    qv_zero: torch.Tensor | None
    n_qv: int
    res_k: torch.Tensor | None
    res_v: torch.Tensor | None

    @property
    def n_sink(self) -> int:
        return 0 if self.sink_k is None else self.sink_k.shape[-2]

    @property
    def n_res_k(self) -> int:
        return 0 if self.res_k is None else self.res_k.shape[-2]

    @property
    def n_res_v(self) -> int:
        return 0 if self.res_v is None else self.res_v.shape[-2]

    @property
    def total(self) -> int:
        return self.n_sink + self.n_qk + self.n_res_k

    def check(self) -> None:
        """Raise if key and value token counts disagree or exceed what is stored."""
        tk = self.n_sink + self.n_qk + self.n_res_k
        tv = self.n_sink + self.n_qv + self.n_res_v
        if tk != tv:
            raise ValueError(f"KIVI parts disagree: {tk} key tokens but {tv} value tokens")
        if self.qk_packed is not None and self.n_qk > self.qk_packed.shape[-2] * 8 // self.bits:
            raise ValueError(f"n_qk={self.n_qk} exceeds the {self.qk_packed.shape[-2] * 8 // self.bits} stored quantized keys")
        if self.qv_packed is not None and self.n_qv > self.qv_packed.shape[-2]:
            raise ValueError(f"n_qv={self.n_qv} exceeds the {self.qv_packed.shape[-2]} stored quantized values")

    def any_tensor(self) -> torch.Tensor:
        return next(t for t in (self.res_v, self.res_k, self.qv_packed, self.qk_packed, self.sink_k) if t is not None)


def dequantized_kv(parts: KiviParts, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """All keys and values of `parts` in token order, dequantized to `dtype` (``[B, H, T, D]`` each)."""
    bits, group = parts.bits, parts.group
    ks, vs = [], []
    if parts.sink_k is not None:
        ks.append(parts.sink_k.to(dtype))
        vs.append(parts.sink_v.to(dtype))
    if parts.n_qk:
        ks.append(dequantize_keys(parts.qk_packed, parts.qk_scale, parts.qk_zero, parts.n_qk, bits, group, dtype))
    if parts.n_qv:
        vs.append(dequantize_values(parts.qv_packed, parts.qv_scale, parts.qv_zero, parts.n_qv, bits, group, dtype))
    if parts.res_k is not None:
        ks.append(parts.res_k.to(dtype))
    if parts.res_v is not None:
        vs.append(parts.res_v.to(dtype))
    return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)


# ---------------------------------------------------------------------- paged layout (the paged decode kernel's contract)

PAGE_TOKENS = 128  # tokens per page: one key flush block at the default residual
PAGE_GROUP = 32  # the paged layout holds KIVI with group 32: one key group = one warp's 32-token slab


@dataclass(frozen=True)
class PageLayout:
    """Byte layout of one page (``PAGE_TOKENS`` tokens of one sequence and KV head) of KIVI-2/4 storage.

    ``[key codes | value codes | key scale | key zero | value scale | value zero]``: codes in the order the
    tensor-core fragments of the decode kernel read them (:func:`fragment_index`), key scale/zero ``[P/32, D]``
    fp16 (per channel, per 32-token group), value scale/zero ``[D/32, P]`` fp16 (per token, per 32-channel
    group; stored group-major so a thread reads a token pair's scales as one half2).
    """

    bits: int
    head_dim: int = 128

    def __post_init__(self) -> None:
        if self.bits not in (2, 4):
            raise ValueError(f"paged KIVI stores 2- or 4-bit codes, got bits={self.bits}")
        if self.head_dim % PAGE_GROUP:
            raise ValueError(f"paged KIVI needs a head dim that is a multiple of {PAGE_GROUP}, got {self.head_dim}")

    @property
    def code_bytes(self) -> int:
        return PAGE_TOKENS * self.head_dim * self.bits // 8

    @property
    def key_scale(self) -> int:
        return 2 * self.code_bytes

    @property
    def key_zero(self) -> int:
        return self.key_scale + (PAGE_TOKENS // PAGE_GROUP) * self.head_dim * 2

    @property
    def value_scale(self) -> int:
        return self.key_zero + (PAGE_TOKENS // PAGE_GROUP) * self.head_dim * 2

    @property
    def value_zero(self) -> int:
        return self.value_scale + (self.head_dim // PAGE_GROUP) * PAGE_TOKENS * 2

    @property
    def nbytes(self) -> int:
        return self.value_zero + (self.head_dim // PAGE_GROUP) * PAGE_TOKENS * 2


_FRAGMENT_CACHE: dict = {}


def fragment_index(bits: int, head_dim: int, values: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """For each code of a page's ``[P, D]`` tile, its 32-bit word (within the code area) and bit shift.

    The decode kernel's warp ``w`` owns tokens ``32w .. 32w+31``; lane ``l`` reads 16-byte vectors at
    ``(w * vectors_per_lane + v) * 32 + l`` and finds in them, as half2 pairs (bits ``b*i`` and ``16 + b*i``
    of a word), exactly its ``mma.m16n8k16`` operands: keys as the B fragments of ``S = Q K^T``
    (``[16 channels x 8 tokens]``, pairs of adjacent channels), values as the A fragments of
    ``O^T = V^T P^T`` (``[16 channels x 16 tokens]``, pairs of adjacent tokens).
    """
    key = (bits, head_dim, values)
    if key not in _FRAGMENT_CACHE:
        t = torch.arange(PAGE_TOKENS).view(-1, 1).expand(PAGE_TOKENS, head_dim)
        c = torch.arange(head_dim).view(1, -1).expand(PAGE_TOKENS, head_dim)
        w = t // 32
        if values:  # O^T = V^T P^T: A = V^T [16 channels x 16 tokens], pairs of adjacent tokens
            kt, tt, cc = (t % 32) // 16, t % 16, c % 16
            q, e = (tt % 8) // 2, tt % 2
            lane = (cc % 8) * 4 + q
            pair = (kt * (head_dim // 16) + c // 16) * 4 + cc // 8 + 2 * (tt // 8)
        else:  # S = Q K^T: B = K^T [16 channels (k) x 8 tokens (n)], pairs of adjacent channels
            j, r = (t % 32) // 8, t % 8
            cc = c % 16
            h, q, e = cc // 8, (cc % 8) // 2, cc % 2
            lane = r * 4 + q
            pair = (j * (head_dim // 16) + c // 16) * 2 + h
        per_word = 16 // bits
        words = (head_dim // 2) // per_word  # words per lane per slab (head_dim / 2 pairs per lane)
        wd, i = pair // per_word, pair % per_word
        word = w * (32 * words) + (wd // 4) * 128 + lane * 4 + (wd % 4)
        shift = bits * i + 16 * e
        _FRAGMENT_CACHE[key] = (word.reshape(-1), shift.reshape(-1))
    return _FRAGMENT_CACHE[key]


def pack_page_codes(codes: torch.Tensor, bits: int, values: bool) -> torch.Tensor:
    """Codes ``[..., P, D]`` (uint8, < 2**bits) -> the page's code area ``[..., P*D*bits/8]`` (uint8)."""
    *lead, n, d = codes.shape
    if n != PAGE_TOKENS:
        raise ValueError(f"a page holds {PAGE_TOKENS} tokens, got {n}")
    word, shift = fragment_index(bits, d, values)
    word, shift = word.to(codes.device), shift.to(codes.device)
    flat = codes.reshape(-1, n * d).to(torch.int64) << shift
    out = torch.zeros(flat.shape[0], n * d * bits // 32, dtype=torch.int64, device=codes.device)
    out.scatter_add_(1, word.expand_as(flat), flat)
    return out.to(torch.int32).view(torch.uint8).reshape(*lead, n * d * bits // 8)


def unpack_page_codes(area: torch.Tensor, bits: int, head_dim: int, values: bool) -> torch.Tensor:
    """Inverse of :func:`pack_page_codes`: ``[..., P*D*bits/8]`` uint8 -> codes ``[..., P, D]`` uint8."""
    word, shift = fragment_index(bits, head_dim, values)
    words = area.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    codes = (words[..., word.to(area.device)] >> shift.to(area.device)) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(*area.shape[:-1], PAGE_TOKENS, head_dim)


def build_pages(key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, bits: int) -> torch.Tensor:
    """Whole pages from unpacked KIVI parts of ``n = pages * P`` tokens (keys ``[B, H, n, D]`` codes with
    ``[B, H, n/32, D]`` scale/zero; values ``[B, H, n, D]`` codes with ``[B, H, n, D/32]`` scale/zero):
    ``[B, pages, H, page bytes]`` uint8."""
    b, h, n, d = key_codes.shape
    pages, layout = n // PAGE_TOKENS, PageLayout(bits, d)

    def per_page(x):  # [B, H, pages*X, Y] -> [B, pages, H, X, Y]
        return x.reshape(b, h, pages, -1, x.shape[-1]).transpose(1, 2)

    def as_bytes(x):
        return x.contiguous().view(torch.uint8).reshape(b, pages, h, -1)

    kc = pack_page_codes(per_page(key_codes), bits, values=False)
    vc = pack_page_codes(per_page(value_codes), bits, values=True)
    vs = per_page(value_scale).transpose(-1, -2)  # [B, pages, H, D/32, P]
    vz = per_page(value_zero).transpose(-1, -2)
    out = torch.cat([kc, vc, as_bytes(per_page(key_scale).half()), as_bytes(per_page(key_zero).half()),
                     as_bytes(vs.half()), as_bytes(vz.half())], dim=-1)
    assert out.shape[-1] == layout.nbytes
    return out


def read_pages(pages: torch.Tensor, bits: int, head_dim: int):
    """Inverse of :func:`build_pages`: ``[B, pages, H, bytes]`` -> the six unpacked parts, ``[B, H, pages*P, ...]``."""
    b, n_pages, h, _ = pages.shape
    lay = PageLayout(bits, head_dim)
    ng = PAGE_TOKENS // PAGE_GROUP
    kc = unpack_page_codes(pages[..., : lay.code_bytes], bits, head_dim, values=False)
    vc = unpack_page_codes(pages[..., lay.code_bytes : lay.key_scale], bits, head_dim, values=True)

    def halves(lo, hi, shape):
        return pages[..., lo:hi].contiguous().view(torch.float16).reshape(b, n_pages, h, *shape)

    ks = halves(lay.key_scale, lay.key_zero, (ng, head_dim))
    kz = halves(lay.key_zero, lay.value_scale, (ng, head_dim))
    vs = halves(lay.value_scale, lay.value_zero, (head_dim // PAGE_GROUP, PAGE_TOKENS)).transpose(-1, -2)
    vz = halves(lay.value_zero, lay.nbytes, (head_dim // PAGE_GROUP, PAGE_TOKENS)).transpose(-1, -2)

    def joined(x):  # [B, pages, H, X, Y] -> [B, H, pages*X, Y]
        return x.transpose(1, 2).reshape(b, h, -1, x.shape[-1])

    return joined(kc), joined(ks), joined(kz), joined(vc), joined(vs), joined(vz)
