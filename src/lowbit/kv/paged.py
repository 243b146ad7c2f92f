"""KIVI-2/4 with its quantized tokens in pages, read on CUDA by the paged decode kernel (tensor cores).

:class:`PagedKiviLayer` keeps KIVI's format and flush schedule (:mod:`lowbit.quant.kivi`) but stores quantized
keys and values in :class:`~lowbit.quant.kivi.PageLayout` pages of 128 tokens, ``pages [B, capacity, H_kv,
page bytes]`` (one sequence batch, contiguous pages: block ``b * capacity + p``): keys enter a page 128 at a
time (one flush at residual 128), values one token at a time. Sinks and the full-precision residual stay in
buffers as in :class:`~lowbit.kv.fused.FusedKiviLayer`. On a decode step on CUDA the layer attends with
:func:`lowbit.kernels.kivi_paged.paged_decode_attention`; elsewhere (and for prefill) it reads its pages back
(:func:`lowbit.quant.kivi.read_pages`). Needs bits 2 or 4, group 32, head dim 128 and a residual that is a
multiple of 128 (:func:`paged_supported`).
"""

from __future__ import annotations

import torch

from lowbit.kv.attention import attach
from lowbit.kv.fused import FusedKiviLayer, _start_from_mask, decode_split
from lowbit.kv.kivi import KiviCache
from lowbit.quant.affine import quantize_codes
from lowbit.quant.kivi import PAGE_GROUP, PAGE_TOKENS, KiviParts, PageLayout, fragment_index, pack_page_codes, read_pages
from lowbit.quant.packing import pack


def paged_supported(bits: int, group: int, residual: int, head_dim: int | None = None) -> bool:
    """Whether the paged layout holds this KIVI configuration."""
    return bits in (2, 4) and group == PAGE_GROUP and residual % PAGE_TOKENS == 0 and head_dim in (None, 128)


class PagedKiviLayer(FusedKiviLayer):
    """A KIVI layer whose quantized tokens live in pages (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not paged_supported(self.bits, self.group, self.residual):
            raise ValueError(f"paged KIVI needs bits 2 or 4, group {PAGE_GROUP} and a residual multiple of {PAGE_TOKENS}; "
                             f"got bits={self.bits}, group={self.group}, residual={self.residual}")

    def _clear(self) -> None:
        super()._clear()
        self.pages = None  # uint8 [B, capacity, H, page bytes]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[-1] != 128:
            raise ValueError(f"paged KIVI holds head dim 128, got {key_states.shape[-1]}: use kernel=triton or reference")
        super().lazy_initialization(key_states, value_states)
        self.layout = PageLayout(self.bits, self.head_dim)

    # ------------------------------------------------------------------ pages
    def _ensure_pages(self, n_pages: int, like: torch.Tensor) -> None:
        b, h = like.shape[0], like.shape[1]
        cap = 0 if self.pages is None else self.pages.shape[1]
        if n_pages <= cap:
            return
        grown = torch.zeros(b, max(n_pages, int(cap * self.growth) + 1), h, self.layout.nbytes, dtype=torch.uint8,
                            device=like.device)
        if cap:
            grown[:, :cap] = self.pages
        self.pages = grown

    def _halves(self, lo: int, hi: int) -> torch.Tensor:
        return self.pages[..., lo:hi].view(torch.float16)

    def _flush_keys(self, k: torch.Tensor) -> None:
        b, h, n, d = k.shape
        p0, np_ = self.n_qk // PAGE_TOKENS, n // PAGE_TOKENS
        self._ensure_pages(p0 + np_, k)
        codes, scale, zero = quantize_codes(k, self.bits, self.group, dim=-2)  # [B,H,n,D], [B,H,n/32,D]

        def per_page(x):  # [B, H, np*X, Y] -> [B, np, H, X, Y]
            return x.reshape(b, h, np_, -1, x.shape[-1]).transpose(1, 2)

        lay, dst = self.layout, self.pages[:, p0 : p0 + np_]
        dst[..., : lay.code_bytes] = pack_page_codes(per_page(codes), self.bits, values=False)
        dst[..., lay.key_scale : lay.key_zero] = per_page(scale).reshape(b, np_, h, -1).view(torch.uint8)
        dst[..., lay.key_zero : lay.value_scale] = per_page(zero).reshape(b, np_, h, -1).view(torch.uint8)

    def _flush_values(self, v: torch.Tensor) -> None:
        b, h, n, d = v.shape
        lay = self.layout
        codes, scale, zero = quantize_codes(v, self.bits, self.group, dim=-1)  # [B,H,n,D], [B,H,n,D/32]
        t = torch.arange(self.n_qv, self.n_qv + n, device=v.device)
        page, slot = t // PAGE_TOKENS, t % PAGE_TOKENS
        word, shift = (x.to(v.device) for x in fragment_index(self.bits, d, values=True))
        elem = slot[:, None] * d + torch.arange(d, device=v.device)[None, :]  # [n, D] element of the page tile
        vals = (codes.to(torch.int32) << shift[elem].to(torch.int32)).transpose(1, 2)  # [B, n, H, D]
        per_head = lay.nbytes // 4  # int32 words of one page of one head
        idx = ((page[:, None, None] * h + torch.arange(h, device=v.device)[None, :, None]) * per_head
               + lay.code_bytes // 4 + word[elem][:, None, :])  # [n, H, D]
        flat = self.pages.view(torch.int32).view(b, -1)  # in place; the code bits are still zero: add == or
        flat.scatter_add_(1, idx.reshape(1, -1).expand(b, -1), vals.reshape(b, -1))
        vs, vz = self._halves(lay.value_scale, lay.value_zero), self._halves(lay.value_zero, lay.nbytes)  # [B,cap,H,(D/32)*P]
        g = torch.arange(d // PAGE_GROUP, device=v.device)
        pos = g[None, :] * PAGE_TOKENS + slot[:, None]  # [n, D/32]
        for halves, x in ((vs, scale), (vz, zero)):
            halves[:, page[:, None], :, pos] = x.permute(2, 3, 0, 1).to(torch.float16)  # [n, D/32, B, H]

    # ------------------------------------------------------------------ reading (prefill, crop, reference)
    def _read(self) -> tuple[torch.Tensor, ...]:
        n_pages = -(-max(self.n_qk, self.n_qv, 1) // PAGE_TOKENS)
        return read_pages(self.pages[:, :n_pages], self.bits, self.head_dim)

    def parts(self, n_qk: int | None = None, res_k: torch.Tensor | None = None) -> KiviParts:
        """Contiguous :class:`KiviParts` rebuilt from the pages (for the reference path and the Triton kernel)."""
        if self.pages is None:
            return super().parts(n_qk, res_k)
        kc, ks, kz, vc, vs, vz = self._read()
        nk, nv = self.n_qk, self.n_qv
        return KiviParts(
            bits=self.bits, group=self.group, sink_k=self.sink_k, sink_v=self.sink_v,
            qk_packed=pack(kc[..., :nk, :].contiguous(), self.bits, dim=-2) if nk else None,
            qk_scale=ks[..., : nk // self.group, :].contiguous() if nk else None,
            qk_zero=kz[..., : nk // self.group, :].contiguous() if nk else None,
            n_qk=nk if n_qk is None else n_qk,
            qv_packed=pack(vc[..., :nv, :].contiguous(), self.bits, dim=-1) if nv else None,
            qv_scale=vs[..., :nv, :].contiguous() if nv else None, qv_zero=vz[..., :nv, :].contiguous() if nv else None,
            n_qv=nv, res_k=self.res_k if res_k is None else res_k, res_v=self.res_v,
        )

    def full_keys(self) -> torch.Tensor:
        return self._full(values=False)

    def full_values(self) -> torch.Tensor:
        return self._full(values=True)

    def _full(self, values: bool) -> torch.Tensor:
        from lowbit.quant.kivi import dequantized_kv

        k, v = dequantized_kv(self.parts(), self.dtype)
        return v if values else k

    # ------------------------------------------------------------------ decode
    def attend(self, query, key, value, attention_mask, scaling) -> torch.Tensor:
        """Decode attention of ``query [B, H_q, 1, D]`` over the pages: ``[B, 1, H_q, D]``."""
        from lowbit.kernels.kivi_paged import PagedKivi, paged_decode_attention

        n_qk, res_k, res_v = decode_split(self, key, value)
        cache = PagedKivi(self.bits, self.pages, self.n_sink, n_qk, self.n_qv, self.get_seq_length(),
                          self.sink_k, self.sink_v, res_k, res_v)
        start = _start_from_mask(attention_mask, self.get_seq_length())
        return paged_decode_attention(query, cache, scale=scaling, start=start)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not (self.fused and key_states.shape[-2] == 1 and key_states.is_cuda):
            return super(FusedKiviLayer, self).update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._store(key_states, value_states)
        return attach(key_states.detach(), self), value_states.detach()

    def nbytes(self) -> int:
        """Bytes held: the pages in use (whole pages), scales included, plus sinks and residual."""
        used = -(-max(self.n_qk, self.n_qv) // PAGE_TOKENS) if self.pages is not None else 0
        pages = 0 if not used else self.pages[:, :used].numel()
        rest = sum(t.numel() * t.element_size() for t in (self.sink_k, self.sink_v, self.res_k, self.res_v) if t is not None)
        return pages + rest


class PagedKiviCache(KiviCache):
    """:class:`~lowbit.kv.kivi.KiviCache` whose layers are :class:`PagedKiviLayer`."""

    layer_class = PagedKiviLayer
