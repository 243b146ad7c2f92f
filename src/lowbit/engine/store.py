"""The engine's KV pool: pages preallocated once, block tables per running sequence, exact admission.

Running sequences occupy the first rows ``0 .. n-1`` of every per-sequence tensor (the engine keeps them
compact), so one decode step reads ``[:B]`` views without gathering. A block (block id ``i``) is one page of
``PAGE_TOKENS`` tokens of one sequence across all layers and KV heads; block 0 is scratch: free rows point
at it, so a padded batch row writes there and reads nothing. A request reserves, when admitted, the blocks
its longest length needs (:meth:`KVStore.pages_for`), so a running request never waits for memory.

Two stores share this frame: :class:`PagedFp16Store` (keys and values as they are, ``[blocks, H, P, D]``) and
:class:`PagedKiviStore` (KIVI-2/4 in :class:`~lowbit.quant.kivi.PageLayout` pages, sinks and a residual ring of
``P`` rows per sequence; see :mod:`lowbit.engine.kivi_ops`).
"""

from __future__ import annotations

import torch

from lowbit.quant.kivi import PAGE_TOKENS, KiviFormat, PageLayout

RESIDUALS = (32, 64, PAGE_TOKENS)  # full-precision ring lengths of the paged KIVI store (divisors of a page)


class PoolFullError(RuntimeError):
    """The request needs more pages (or rows) than the pool can ever hold."""


class KVStore:
    """Blocks, tables and rows common to the paged stores (see the module docstring)."""

    kind = "?"

    def __init__(self, layers: int, kv_heads: int, head_dim: int, rows: int, max_tokens: int,
                 budget_bytes: int, dtype: torch.dtype, device):
        if rows < 1 or max_tokens < 1:
            raise ValueError(f"rows ({rows}) and max_tokens ({max_tokens}) must be >= 1")
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.rows, self.max_tokens, self.dtype, self.device = rows, max_tokens, dtype, torch.device(device)
        self.max_pages = max(self.pages_for(max_tokens), 1)
        fixed = rows * self.row_bytes()
        blocks = (int(budget_bytes) - fixed) // self.block_bytes() - 1  # the scratch block counts in the budget
        if blocks < 1:
            raise PoolFullError(f"a KV budget of {budget_bytes / 2**20:.1f} MiB holds no page: {rows} rows take "
                                f"{fixed / 2**20:.1f} MiB and one page {self.block_bytes() / 2**20:.2f} MiB")
        self.blocks = blocks + 1  # + scratch block 0
        self.free_blocks = list(range(self.blocks - 1, 0, -1))
        self.row_blocks: list[list[int]] = [[] for _ in range(rows)]
        self.table = torch.zeros(rows, self.max_pages, dtype=torch.int32, device=self.device)
        self._allocate()

    # ------------------------------------------------------------------ sizes
    def pages_for(self, n_tokens: int) -> int:
        """Pages one sequence needs to hold `n_tokens` tokens (at every length up to it)."""
        raise NotImplementedError

    def block_bytes(self) -> int:
        """Bytes of one block: a page of every layer and KV head."""
        raise NotImplementedError

    def row_bytes(self) -> int:
        """Bytes each row holds outside the pages (sinks, residual ring)."""
        return 0

    def nbytes(self) -> int:
        """Bytes the pool holds (pages, scratch block included, and per-row buffers)."""
        return self.blocks * self.block_bytes() + self.rows * self.row_bytes()

    @property
    def spec(self) -> str:
        """The store as :func:`make_store` names it."""
        return self.kind

    def describe(self) -> str:
        """One line on where the budget went: pages, and what every row holds beside them (rings, sinks); a hint when
        the rows take more than half (each row's share is reserved whether or not it runs)."""
        mib = 2**20
        pages, rows = self.blocks * self.block_bytes(), self.rows * self.row_bytes()
        line = (f"KV pool ({self.spec}): {self.blocks - 1} pages of {self.block_bytes() / mib:.2f} MiB "
                f"({pages / mib:.1f} MiB)")
        if rows:
            line += f" + {self.rows} rows x {self.row_bytes() / mib:.2f} MiB of residual ring and sinks ({rows / mib:.1f} MiB)"
            if rows > pages:
                line += (f"; the rows take {rows / (rows + pages):.0%} of the budget: a smaller max batch leaves "
                         "more of it for pages")
        return line

    @property
    def used_blocks(self) -> int:
        return self.blocks - 1 - len(self.free_blocks)

    # ------------------------------------------------------------------ admission
    def fits(self, n_tokens: int) -> bool:
        """Whether a sequence of up to `n_tokens` tokens fits in the free blocks now."""
        return self.pages_for(n_tokens) <= len(self.free_blocks)

    def check_admissible(self, n_tokens: int) -> None:
        """Raise :class:`PoolFullError` when `n_tokens` could never fit, even in an empty pool."""
        if n_tokens > self.max_tokens:
            raise PoolFullError(f"{n_tokens} tokens exceed the engine's max_tokens={self.max_tokens}")
        if self.pages_for(n_tokens) > self.blocks - 1:
            raise PoolFullError(f"{n_tokens} tokens need {self.pages_for(n_tokens)} pages; the pool holds "
                                f"{self.blocks - 1}")

    def reserve(self, row: int, n_tokens: int) -> None:
        """Give row `row` the blocks for `n_tokens` tokens (zeroed) and write its table."""
        need = self.pages_for(n_tokens)
        if need > len(self.free_blocks):
            raise PoolFullError(f"{need} pages needed, {len(self.free_blocks)} free")
        got = [self.free_blocks.pop() for _ in range(need)]
        self.row_blocks[row] = got
        ids = torch.tensor(got, dtype=torch.long, device=self.device)
        self._zero_blocks(ids)
        self.table[row].zero_()
        self.table[row, :need] = ids.to(torch.int32)

    def release(self, row: int) -> None:
        """Return row `row`'s blocks; its table points at the scratch block again."""
        self.free_blocks.extend(reversed(self.row_blocks[row]))
        self.row_blocks[row] = []
        self.table[row].zero_()

    def move_row(self, src: int, dst: int) -> None:
        """Move a running sequence from row `src` to the free row `dst` (keeps rows compact)."""
        self.row_blocks[dst], self.row_blocks[src] = self.row_blocks[src], []
        self.table[dst] = self.table[src]
        self.table[src].zero_()
        self._move_row_buffers(src, dst)

    # ------------------------------------------------------------------ storage hooks
    def _allocate(self) -> None:
        raise NotImplementedError

    def _zero_blocks(self, ids: torch.Tensor) -> None:
        raise NotImplementedError

    def _move_row_buffers(self, src: int, dst: int) -> None:
        pass

    def write_prompt(self, layer: int, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a prompt's keys and values ``[H, n, D]`` (after RoPE) for `row`."""
        self.write_prompt_layers(layer, row, k[None], v[None])

    def write_prompt_layers(self, first: int, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """:meth:`write_prompt` of layers ``first .. first + L - 1`` from ``k, v [L, H, n, D]``, in one set of
        launches for all L layers (a prefill's per-layer writes are host-bound)."""
        raise NotImplementedError

    def write_tokens(self, layer: int, row: int, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Store keys and values ``[H, c, D]`` of positions ``start..start+c-1`` for `row`, which holds positions
        ``0..start-1`` (a chunk of a prompt); the result is what :meth:`write_prompt` of the whole prompt stores."""
        raise NotImplementedError

    def read_tokens(self, layer: int, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[H, n, D]`` (float32) of `row`'s positions ``0..n-1`` as attention reads them
        (dequantized where stored quantized)."""
        raise NotImplementedError

    def append(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one new token per row ``k, v [B, H, D]`` at positions ``pos [B]`` (rows 0..B-1)."""
        raise NotImplementedError

    def attend(self, layer: int, q: torch.Tensor, pos: torch.Tensor, scale: float) -> torch.Tensor:
        """Decode attention ``q [B, Hq, D]`` of rows 0..B-1 over their tokens ``0..pos``: ``[B, Hq, D]``."""
        raise NotImplementedError

    def begin_step(self, pos: torch.Tensor) -> None:
        """Per-step state shared by the layers (called once per decode step, before layer 0)."""


class PagedFp16Store(KVStore):
    """Keys and values as the model makes them, in pages ``[layers, blocks, H, P, D]``."""

    kind = "fp16"

    def pages_for(self, n_tokens: int) -> int:
        return -(-max(int(n_tokens), 0) // PAGE_TOKENS)

    def block_bytes(self) -> int:
        return self.layers * self.kv_heads * PAGE_TOKENS * self.head_dim * 2 * torch.finfo(self.dtype).bits // 8

    def _allocate(self) -> None:
        shape = (self.layers, self.blocks, self.kv_heads, PAGE_TOKENS, self.head_dim)
        self.k_pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_pool = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _zero_blocks(self, ids: torch.Tensor) -> None:
        pass  # every read is masked by the sequence length

    def write_prompt_layers(self, first, row, k, v):
        n = k.shape[-2]
        pages = self.pages_for(n)
        ids = self.table[row, :pages].long()
        pad = pages * PAGE_TOKENS - n
        layers = slice(first, first + k.shape[0])
        for pool, x in ((self.k_pool, k), (self.v_pool, v)):
            x = torch.nn.functional.pad(x, (0, 0, 0, pad)).to(self.dtype)  # [L, H, pages*P, D]
            pool[layers, ids] = x.unflatten(2, (pages, PAGE_TOKENS)).transpose(1, 2)

    def write_tokens(self, layer, row, k, v, start):
        at = torch.arange(start, start + k.shape[-2], device=k.device)
        blk = self.table[row, at // PAGE_TOKENS].long()
        self.k_pool[layer, blk, :, at % PAGE_TOKENS] = k.transpose(0, 1).to(self.dtype)  # [c, H, D] per (block, slot)
        self.v_pool[layer, blk, :, at % PAGE_TOKENS] = v.transpose(0, 1).to(self.dtype)

    def read_tokens(self, layer, row, n):
        pages = self.pages_for(n)
        ids = self.table[row, :pages].long()
        k, v = (pool[layer, ids].transpose(0, 1).flatten(1, 2)[:, :n].float() for pool in (self.k_pool, self.v_pool))
        return k, v

    def append(self, layer, pos, k, v):
        b = k.shape[0]
        page = (pos // PAGE_TOKENS).long()
        blk = self.table[:b].gather(1, page[:, None]).squeeze(1).long()
        slot = (pos % PAGE_TOKENS).long()
        self.k_pool[layer, blk, :, slot] = k.to(self.dtype)
        self.v_pool[layer, blk, :, slot] = v.to(self.dtype)

    def attend(self, layer, q, pos, scale):
        from lowbit.engine import fp16_ops

        if q.is_cuda and fp16_ops.kernel_ready():
            return fp16_ops.paged_decode(q, self.k_pool[layer], self.v_pool[layer], self.table[: q.shape[0]], pos,
                                         scale, self.max_pages)
        return fp16_ops.paged_decode_ref(q, self.k_pool[layer], self.v_pool[layer], self.table[: q.shape[0]], pos, scale)


class PagedKiviStore(KVStore):
    """KIVI-2/4 (group 32, residual 128, or 64 or 32) in the decode kernel's pages, with sinks and a residual ring
    of `residual` rows per row. A shorter ring holds less per row (so more rows fit a budget) at some quality cost."""

    kind = "kivi"

    def __init__(self, *args, bits: int = 2, sinks: int = 0, residual: int = PAGE_TOKENS, **kwargs):
        head_dim = kwargs.get("head_dim", args[2] if len(args) > 2 else None)
        if head_dim is not None and head_dim % 64:
            raise ValueError(f"paged KIVI stores head dims that are multiples of 64, got {head_dim}: use fp16")
        if residual not in RESIDUALS:
            raise ValueError(f"paged KIVI residual={residual} is not supported: allowed are {', '.join(map(str, RESIDUALS))}")
        self.format = KiviFormat(bits=bits, group=32, residual=residual, sinks=sinks)
        self.bits, self.sinks, self.residual = bits, sinks, residual
        super().__init__(*args, **kwargs)
        self.layout = PageLayout(bits, self.head_dim)

    def pages_for(self, n_tokens: int) -> int:
        c = self.format.counts(max(int(n_tokens), 0))
        return -(-max(c.quantized_keys, c.quantized_values) // PAGE_TOKENS)

    def block_bytes(self) -> int:
        return self.layers * self.kv_heads * PageLayout(self.bits, self.head_dim).nbytes

    def row_bytes(self) -> int:
        return self.layers * self.kv_heads * (self.residual + self.sinks) * self.head_dim * 2 * torch.finfo(self.dtype).bits // 8

    def _allocate(self) -> None:
        from lowbit.engine import kivi_ops

        nbytes = PageLayout(self.bits, self.head_dim).nbytes
        self.pool = torch.zeros(self.layers, self.blocks, self.kv_heads, nbytes, dtype=torch.uint8, device=self.device)
        ring = (self.layers, self.rows, self.kv_heads, self.residual, self.head_dim)
        self.ring_k = torch.zeros(ring, dtype=self.dtype, device=self.device)
        self.ring_v = torch.zeros(ring, dtype=self.dtype, device=self.device)
        sink = (self.layers, self.rows, self.kv_heads, max(self.sinks, 1), self.head_dim)
        self.sink_k = torch.zeros(sink, dtype=self.dtype, device=self.device)
        self.sink_v = torch.zeros(sink, dtype=self.dtype, device=self.device)
        self.seq = torch.zeros(self.rows, 5, dtype=torch.int32, device=self.device)  # the kernel's counts per row
        self.ops = kivi_ops.KiviOps(self.bits, self.head_dim, self.sinks, self.device, self.residual)

    def _zero_blocks(self, ids: torch.Tensor) -> None:
        self.pool[:, ids] = 0  # codes are OR-ed into their words

    def _move_row_buffers(self, src, dst):
        for t in (self.ring_k, self.ring_v, self.sink_k, self.sink_v):
            t[:, dst] = t[:, src]

    def write_prompt_layers(self, first, row, k, v):
        self.ops.write_prompt_layers(self, first, row, k, v)

    def write_tokens(self, layer, row, k, v, start):
        self.ops.write_tokens(self, layer, row, k, v, start)

    @property
    def spec(self) -> str:
        opts = ([f"sinks={self.sinks}"] if self.sinks else []) + ([f"residual={self.residual}"] if self.residual != PAGE_TOKENS else [])
        return f"kivi{self.bits}" + (":" + ",".join(opts) if opts else "")

    def read_tokens(self, layer, row, n):
        return self.ops.read_row(self, layer, row, n)

    def begin_step(self, pos):
        self.ops.counts(pos + 1, out=self.seq[: pos.shape[0]])

    def append(self, layer, pos, k, v):
        self.ops.append(self, layer, pos, k, v)

    def attend(self, layer, q, pos, scale):
        return self.ops.attend(self, layer, q, pos, scale)


def make_store(kind: str, **kwargs) -> KVStore:
    """``fp16``, ``kivi2`` / ``kivi4`` (optionally ``kivi2:sinks=4``, ``kivi2:residual=64``) -> the paged store."""
    name, _, opts = kind.partition(":")
    extra = dict(o.split("=", 1) for o in opts.split(",") if o)
    if name == "fp16" and not extra:
        return PagedFp16Store(**kwargs)
    if name in ("kivi2", "kivi4") and set(extra) <= {"sinks", "residual"}:
        try:
            sinks, residual = int(extra.get("sinks", 0)), int(extra.get("residual", PAGE_TOKENS))
        except ValueError:
            raise ValueError(f"engine KV '{kind}': sinks and residual must be integers") from None
        return PagedKiviStore(**kwargs, bits=int(name[-1]), sinks=sinks, residual=residual)
    raise ValueError(f"engine KV '{kind}' is not supported: allowed are fp16, kivi2, kivi4 (kivi2:sinks=4 adds sinks, "
                     f"kivi2:residual=64 a shorter full-precision ring)")
