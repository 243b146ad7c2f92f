"""KIVI storage operations of the engine's paged store: prompt write, per-step append, decode attention.

Per row (sequence) the store holds sinks, pages of ``P`` tokens and a residual ring of ``R`` rows (KIVI's
residual: ``P`` by default, or 32 or 64): the token with quantized index ``k`` (position minus sinks) sits at ring
row ``k % R`` while it is full precision. The flush schedule is KIVI's (:class:`~lowbit.quant.kivi.KiviFormat` with
residual ``R``): after token ``k`` arrives, value ``k - R`` is quantized (per token) into its page, and when
``k + 1`` is a multiple of ``R`` the ring's ``R`` keys are quantized (per channel, groups of 32 tokens) into page
``k // P`` from its token ``(k + 1 - R) % P`` on. Both read ring rows before they are overwritten: value ``k - R``
shares ring row ``k % R`` with the new token, so it is flushed first.

On CUDA the append and the key flush are Triton kernels (:mod:`lowbit.engine.kivi_triton`, one program per
row and head, no host sync, graph-capturable) and attention is the paged CUDA kernel
(:func:`lowbit.kernels.kivi_paged.paged_decode_attention` with the block table and the ring); the PyTorch path here
computes the same codes and the float32 attention anywhere.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from lowbit.quant.affine import dequantize_codes, quantize_codes
from lowbit.quant.kivi import PAGE_GROUP, PAGE_TOKENS, PageLayout, build_pages, fragment_index, read_pages

P = PAGE_TOKENS


class KiviOps:
    """The operations for one (bits, head_dim, sinks) configuration on one device."""

    def __init__(self, bits: int, head_dim: int, sinks: int, device, residual: int = P):
        self.bits, self.head_dim, self.sinks, self.residual = bits, head_dim, sinks, residual
        self.layout = PageLayout(bits, head_dim)
        kw, ks = fragment_index(bits, head_dim, values=False)
        vw, vs = fragment_index(bits, head_dim, values=True)
        dev = torch.device(device)
        self.key_word, self.key_shift = kw.to(dev, torch.int32), ks.to(dev, torch.int32)
        self.value_word, self.value_shift = vw.to(dev, torch.int32), vs.to(dev, torch.int32)
        self.use_triton = dev.type == "cuda" and _triton_ok()
        self.use_kernel = dev.type == "cuda" and head_dim == 128 and _paged_kernel_ok()

    # ------------------------------------------------------------------ counts
    def counts(self, total: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The kernel's per-row counts ``[B, 5]`` (sinks, quantized keys, quantized values, total, start) for
        attention after token ``total - 1`` arrived. That token attends with its exact key and value, as in
        :class:`~lowbit.kv.kivi.KiviLayer`: when it completes a page of keys, the page is read for its first
        ``R - 1`` keys and the newest key comes from the ring (where it still is)."""
        total = total.to(torch.int32)
        r = self.residual
        n_sink = total.clamp(max=self.sinks)
        rest = total - n_sink
        out[:, 0] = n_sink
        out[:, 1] = torch.minimum(rest // r * r, (rest - 1).clamp(min=0))  # the newest key attends exact
        out[:, 2] = (rest - r).clamp(min=0)
        out[:, 3] = total
        out[:, 4] = 0
        return out

    # ------------------------------------------------------------------ prompt
    def write_prompt_layers(self, store, first: int, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Sinks, whole pages and the ring of one row from a prompt's ``k, v [L, H, n, D]`` of layers
        ``first .. first + L - 1``, in one set of launches for all L layers."""
        layers = slice(first, first + k.shape[0])
        n = k.shape[-2]
        c = store.format.counts(n)
        s, rest = c.sinks, n - c.sinks
        if s:
            store.sink_k[layers, row, :, :s] = k[:, :, :s]
            store.sink_v[layers, row, :, :s] = v[:, :, :s]
        kq, vq = k[:, :, s:], v[:, :, s:]
        pages = -(-max(c.quantized_keys, c.quantized_values) // P)
        if pages:
            n_pad = pages * P
            kc, kscale, kzero = quantize_codes(F.pad(kq[:, :, : c.quantized_keys], (0, 0, 0, n_pad - c.quantized_keys)),
                                               self.bits, PAGE_GROUP, dim=-2)
            if c.quantized_values:
                vc, vscale, vzero = quantize_codes(vq[:, :, : c.quantized_values], self.bits, PAGE_GROUP, dim=-1)
            else:  # a prompt of exactly one page of keys: no value is old enough yet
                lh, d = kq.shape[:2], self.head_dim
                vc = torch.zeros(*lh, 0, d, dtype=torch.uint8, device=k.device)
                vscale = vzero = torch.zeros(*lh, 0, d // PAGE_GROUP, dtype=torch.float16, device=k.device)
            m = n_pad - c.quantized_values
            vc, vscale, vzero = (F.pad(x, (0, 0, 0, m)) for x in (vc, vscale, vzero))
            if c.quantized_keys < n_pad:  # keys of a partial page are not quantized yet: no codes, no scales
                kc[:, :, c.quantized_keys :] = 0
                kscale[:, :, c.quantized_keys // PAGE_GROUP :] = 0
                kzero[:, :, c.quantized_keys // PAGE_GROUP :] = 0
            built = build_pages(kc, kscale, kzero, vc, vscale, vzero, self.bits)  # [L, pages, H, bytes]
            store.pool[layers, store.table[row, :pages].long()] = built
        r = self.residual
        lo = max(0, rest - r)  # the ring holds the last R non-sink tokens
        idx = torch.arange(lo, rest, device=k.device) % r
        store.ring_k[layers, row][:, :, idx] = kq[:, :, lo:rest].to(store.dtype)
        store.ring_v[layers, row][:, :, idx] = vq[:, :, lo:rest].to(store.dtype)

    def write_tokens(self, store, layer: int, row: int, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """A prompt chunk ``k, v [H, c, D]`` at positions ``start..start+c-1`` of a row holding ``0..start-1``.

        The tokens the chunk makes due for quantization (key pages that complete, values older than the ring) lie
        in the ring's full-precision tokens plus the chunk; they are quantized as :meth:`write_prompt` would and
        merged into the touched pages (read, changed, rebuilt), so chunked and one-shot prompts store the same
        bytes when the model's dtype is the store's."""
        if start == 0:
            return self.write_prompt_layers(store, layer, row, k[None], v[None])
        s, c = self.sinks, k.shape[-2]
        old, new = store.format.counts(start), store.format.counts(start + c)
        if start < s:  # the chunk begins among the sinks
            m = min(s, start + c) - start
            store.sink_k[layer, row, :, start : start + m] = k[:, :m].to(store.dtype)
            store.sink_v[layer, row, :, start : start + m] = v[:, :m].to(store.dtype)
        skip = max(0, s - start)
        rest_old, rest_new = start - old.sinks, start + c - new.sinks
        r = self.residual
        lo = max(0, rest_old - r)  # full precision from here on: ring [lo, rest_old), then the chunk
        ring = torch.arange(lo, rest_old, device=k.device) % r
        seg_k = torch.cat([store.ring_k[layer, row][:, ring].to(k.dtype), k[:, skip:]], dim=1)
        seg_v = torch.cat([store.ring_v[layer, row][:, ring].to(v.dtype), v[:, skip:]], dim=1)
        qk0, qk1, qv0, qv1 = old.quantized_keys, new.quantized_keys, old.quantized_values, new.quantized_values
        p0, p1 = min(qk0, qv0) // P, -(-max(qk1, qv1) // P)
        if p1 > p0:
            blocks = store.table[row, p0:p1].long()
            kc, ks, kz, vc, vs, vz = read_pages(store.pool[layer, blocks][None], self.bits, self.head_dim)
            base = p0 * P
            if qk1 > qk0:  # whole rings of keys, per channel in groups of 32 tokens
                codes, scale, zero = quantize_codes(seg_k[:, qk0 - lo : qk1 - lo][None], self.bits, PAGE_GROUP, dim=-2)
                kc[:, :, qk0 - base : qk1 - base] = codes
                ks[:, :, (qk0 - base) // PAGE_GROUP : (qk1 - base) // PAGE_GROUP] = scale
                kz[:, :, (qk0 - base) // PAGE_GROUP : (qk1 - base) // PAGE_GROUP] = zero
            if qv1 > qv0:  # values per token, in groups of 32 channels
                codes, scale, zero = quantize_codes(seg_v[:, qv0 - lo : qv1 - lo][None], self.bits, PAGE_GROUP, dim=-1)
                vc[:, :, qv0 - base : qv1 - base] = codes
                vs[:, :, qv0 - base : qv1 - base] = scale
                vz[:, :, qv0 - base : qv1 - base] = zero
            store.pool[layer, blocks] = build_pages(kc, ks, kz, vc, vs, vz, self.bits)[0]
        keep = max(lo, rest_new - r)  # the ring keeps the last R non-sink tokens
        idx = torch.arange(keep, rest_new, device=k.device) % r
        store.ring_k[layer, row][:, idx] = seg_k[:, keep - lo :].to(store.dtype)
        store.ring_v[layer, row][:, idx] = seg_v[:, keep - lo :].to(store.dtype)

    # ------------------------------------------------------------------ decode step
    def append(self, store, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Rows 0..B-1 take their new token ``k, v [B, H, D]`` at positions ``pos [B]``: value flush, ring
        write (or sink), then key flush where a page of keys completes."""
        if self.use_triton and k.is_cuda:
            from lowbit.engine import kivi_triton

            try:
                kivi_triton.append(self, store, layer, pos, k, v)
                return
            except Exception as exc:  # noqa: BLE001 - a Triton build failure must not stop serving
                warnings.warn(f"the engine's Triton KIVI append failed ({type(exc).__name__}: {str(exc)[:300]}); "
                              "using the PyTorch path", RuntimeWarning, stacklevel=2)
                self.use_triton = False
        self._append_ref(store, layer, pos, k, v)

    def _append_ref(self, store, layer, pos, k, v) -> None:
        b = k.shape[0]
        pos = pos.long()
        s = self.sinks
        rows = torch.arange(b, device=k.device)
        sink = pos < s
        if bool(sink.any()):
            r, p = rows[sink], pos[sink]
            store.sink_k[layer, r, :, p] = k[sink].to(store.dtype)
            store.sink_v[layer, r, :, p] = v[sink].to(store.dtype)
        kidx = pos - s
        ring = self.residual
        slot = kidx % ring
        due_v = (~sink) & (kidx >= ring)
        if bool(due_v.any()):
            r, j = rows[due_v], kidx[due_v] - ring
            old = store.ring_v[layer, r, :, slot[due_v]]  # [n, H, D]
            codes, scale, zero = quantize_codes(old, self.bits, PAGE_GROUP, dim=-1)
            t = j % P
            elem = t[:, None] * self.head_dim + torch.arange(self.head_dim, device=k.device)[None, :]  # [n, D]
            at = torch.arange(self.head_dim // PAGE_GROUP, device=k.device)[None, :] * P + t[:, None]  # [n, G]
            lay = self.layout
            self._into_pages(store, layer, store.table[r, j // P].long(), codes, elem, self.value_word,
                             self.value_shift, lay.code_bytes // 4, scale, zero, at, lay.value_scale, lay.value_zero)
        live = ~sink
        if bool(live.any()):
            r = rows[live]
            store.ring_k[layer, r, :, slot[live]] = k[live].to(store.dtype)
            store.ring_v[layer, r, :, slot[live]] = v[live].to(store.dtype)
        due_k = live & ((kidx + 1) % ring == 0)
        if bool(due_k.any()):
            r = rows[due_k]
            keys = store.ring_k[layer, r]  # [n, H, R, D], ring row t = token t of the flushed run
            codes, scale, zero = quantize_codes(keys, self.bits, PAGE_GROUP, dim=-2)  # [n,H,R,D], [n,H,R/32,D]
            first = kidx[due_k] + 1 - ring  # quantized index of the run's first token
            t0, d = first % P, self.head_dim  # its token in the page
            ch = torch.arange(d, device=k.device)[None, None, :]
            elem = (t0[:, None, None] + torch.arange(ring, device=k.device)[None, :, None]) * d + ch  # [n, R, D]
            at = (t0[:, None, None] // PAGE_GROUP + torch.arange(ring // PAGE_GROUP, device=k.device)[None, :, None]) \
                * d + ch  # [n, R/32, D]: group row, channel
            lay = self.layout
            self._into_pages(store, layer, store.table[r, first // P].long(), codes, elem, self.key_word, self.key_shift,
                             0, scale, zero, at, lay.key_scale, lay.key_zero)

    @staticmethod
    def _into_pages(store, layer, blk, codes, elem, word, shift, word0, scale, zero, at, scale_at, zero_at) -> None:
        """OR ``codes [n, H, *E]`` into blocks ``blk [n]`` at page elements ``elem [n, *E]`` (fragment-ordered words
        ``word0 + word[elem]``, bit ``shift[elem]``) and write ``scale``, ``zero [n, H, *G]`` at fp16 offsets ``at
        [n, *G]`` from byte offsets ``scale_at`` / ``zero_at`` of the page. Blocks are zeroed when reserved."""
        n, h = codes.shape[:2]
        heads = torch.arange(h, device=codes.device)
        words = store.pool[layer].view(torch.int32)  # [blocks, H, bytes/4]
        e = codes.dim() - 2
        idx = blk.view(n, 1, *[1] * e) * words.stride(0) + heads.view(1, h, *[1] * e) * words.stride(1) \
            + word0 + word[elem].long().unsqueeze(1)
        vals = codes.to(torch.int32) << shift[elem].unsqueeze(1)
        words.view(-1).scatter_add_(0, idx.reshape(-1), vals.reshape(-1))  # code bits are zero: add == or
        halves = store.pool[layer].view(torch.float16)  # [blocks, H, bytes/2]
        g = scale.dim() - 2
        bs, hs = blk.view(n, 1, *[1] * g), heads.view(1, h, *[1] * g)
        halves[bs, hs, scale_at // 2 + at.unsqueeze(1)] = scale
        halves[bs, hs, zero_at // 2 + at.unsqueeze(1)] = zero

    # ------------------------------------------------------------------ attention
    def attend(self, store, layer: int, q: torch.Tensor, pos: torch.Tensor, scale: float) -> torch.Tensor:
        """Decode attention of rows 0..B-1 (``q [B, Hq, D]``) over sinks, pages and ring: ``[B, Hq, D]``."""
        b = q.shape[0]
        if self.use_kernel and q.dtype in (torch.float16, torch.bfloat16) and q.shape[1] // store.kv_heads <= 8:
            from lowbit.kernels.kivi_paged import PagedKivi, paged_decode_attention

            view = PagedKivi(self.bits, store.pool[layer], 0, 0, 0, 0, store.sink_k[layer, :b], store.sink_v[layer, :b],
                             store.ring_k[layer, :b], store.ring_v[layer, :b], table=store.table[:b], seq=store.seq[:b])
            out = paged_decode_attention(q[:, :, None], view, scale=scale, ring=True, key_pages=store.max_pages)
            return out[:, 0]
        return self.attend_ref(store, layer, q, pos, scale)

    def attend_ref(self, store, layer, q, pos, scale) -> torch.Tensor:
        """Float32 attention over the dequantized tokens of each row (the specification of :meth:`attend`)."""
        keys, values, valid = self.dequantized(store, layer, q.shape[0], pos)
        hq, hkv = q.shape[1], keys.shape[1]
        keys = keys.repeat_interleave(hq // hkv, dim=1)
        values = values.repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("bhd,bhtd->bht", q.float(), keys) * scale
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        return torch.einsum("bht,bhtd->bhd", scores.softmax(-1), values).to(q.dtype)

    def read_row(self, store, layer: int, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[H, n, D]`` (float32) of `row`'s positions ``0..n-1`` as decode attention reads them
        (what :meth:`dequantized` gives at ``pos = n - 1``, selected): counts from the host-side `n`, so no sync
        and only the pages that hold quantized tokens are unpacked (a prompt chunk reads this per layer)."""
        n_sink, r = min(n, self.sinks), self.residual
        rest = n - n_sink
        n_qk, n_qv = min(rest // r * r, max(rest - 1, 0)), max(rest - r, 0)  # as :meth:`dequantized`
        lo = min(n_qk, n_qv)  # tokens lo..rest-1 are read from the ring
        ring = torch.arange(lo, rest, device=store.ring_k.device) % r
        ring_k, ring_v = store.ring_k[layer, row][:, ring].float(), store.ring_v[layer, row][:, ring].float()
        pages = -(-max(n_qk, n_qv) // P)
        if pages:
            kc, ks, kz, vc, vs, vz = read_pages(store.pool[layer][store.table[row, :pages].long()][None], self.bits,
                                                self.head_dim)
            kq = dequantize_codes(kc, ks, kz, PAGE_GROUP, dim=-2, dtype=torch.float32)[0]
            vq = dequantize_codes(vc, vs, vz, PAGE_GROUP, dim=-1, dtype=torch.float32)[0]
            keys = torch.cat([kq[:, :n_qk], ring_k[:, n_qk - lo :]], dim=1)
            values = torch.cat([vq[:, :n_qv], ring_v[:, n_qv - lo :]], dim=1)
        else:
            keys, values = ring_k, ring_v
        sink_k, sink_v = store.sink_k[layer, row, :, :n_sink].float(), store.sink_v[layer, row, :, :n_sink].float()
        return torch.cat([sink_k, keys], dim=1), torch.cat([sink_v, values], dim=1)

    def dequantized(self, store, layer: int, b: int, pos: torch.Tensor, row0: int = 0):
        """Keys, values ``[B, H, S + pages*P, D]`` (float32, token order: sinks then quantized index) and the
        valid mask ``[B, S + pages*P]`` of rows ``row0..row0+B-1`` holding tokens ``0..pos``."""
        total = pos.long() + 1
        rows = slice(row0, row0 + b)
        pages = store.pool[layer][store.table[rows].long()]  # [B, max_pages, H, bytes]
        kc, ks, kz, vc, vs, vz = read_pages(pages, self.bits, self.head_dim)
        kq = dequantize_codes(kc, ks, kz, PAGE_GROUP, dim=-2, dtype=torch.float32)
        vq = dequantize_codes(vc, vs, vz, PAGE_GROUP, dim=-1, dtype=torch.float32)
        kq, vq = F.pad(kq, (0, 0, 0, P)), F.pad(vq, (0, 0, 0, P))  # the last tokens may lie past the pages
        n = kq.shape[-2]
        k_idx = torch.arange(n, device=pos.device)
        n_sink = total.clamp(max=self.sinks)
        rest = total - n_sink
        r = self.residual
        n_qk, n_qv = torch.minimum(rest // r * r, (rest - 1).clamp(min=0)), (rest - r).clamp(min=0)  # as :meth:`counts`
        ring_k = store.ring_k[layer, rows].float()[:, :, k_idx % r]
        ring_v = store.ring_v[layer, rows].float()[:, :, k_idx % r]
        keys = torch.where((k_idx[None, :] < n_qk[:, None])[:, None, :, None], kq, ring_k)
        values = torch.where((k_idx[None, :] < n_qv[:, None])[:, None, :, None], vq, ring_v)
        s = max(self.sinks, 1)
        keys = torch.cat([store.sink_k[layer, rows].float(), keys], dim=2)
        values = torch.cat([store.sink_v[layer, rows].float(), values], dim=2)
        valid = torch.cat([torch.arange(s, device=pos.device)[None, :] < n_sink[:, None],
                           k_idx[None, :] < rest[:, None]], dim=1)
        return keys, values, valid


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _paged_kernel_ok() -> bool:
    from lowbit.kernels.cuda_build import available

    return available("kivi_paged")
