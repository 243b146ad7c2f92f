"""The engine loop: admission into the paged pool, prefill, batched decode steps, sampling on the device.

:meth:`PagedEngine.step` admits waiting requests (FIFO) while a row is free and the pool has the pages for the
request's longest length (exact: :meth:`KVStore.pages_for`), prefills at most ``prefill_per_step`` of them, then
runs one decode step over every running row (a CUDA graph on CUDA) and samples all rows' tokens at once; the
only host sync per step reads the sampled tokens back. Finished rows free their pages and the last running row
moves into the hole, so running sequences stay in rows ``0..B-1``.

Sampling (:meth:`PagedEngine._sample`) is greedy, or temperature with an optional top-p nucleus, for all rows at
once. Its randomness is a counter-based hash of (the request's seed, the sampled token's position, the token id)
-- an exponential race, as :func:`lowbit.serve.sampling.sample_token` -- so a seeded request draws the same
tokens whatever else is in the batch; requests without a seed get one from the engine's own seeded stream.
A request whose prefill raises is finished alone with ``error`` set; the step goes on.

Chunked prefill (``prefill_chunk=c``): a prompt longer than ``c`` tokens is prefilled ``c`` tokens per step in
the last row while the running rows keep decoding (bounded prefill memory and no long decode stall); each chunk
attends to the stored tokens (dequantized for KIVI) and to itself in full precision, then is stored. When the
prompt is done the row moves next to the running ones. One prompt is chunked at a time; FIFO order holds.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from lowbit.engine.runner import DecodeGraphs, LlamaRunner
from lowbit.engine.store import KVStore, PoolFullError, make_store


@dataclass
class EngineRequest:
    """One generation: prompt token ids, how many tokens to generate, sampling, and what came out."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    eos: frozenset[int] = frozenset()
    id: int = 0
    top_p: float = 1.0
    seed: int = 0
    error: str | None = None
    output: list[int] = field(default_factory=list)
    row: int = -1
    finished: bool = False
    t_arrive: float = 0.0
    t_first: float | None = None
    t_done: float | None = None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)


@dataclass
class StepStats:
    """What one :meth:`PagedEngine.step` did."""

    prefilled: int
    batch: int
    step_s: float
    pages_used: int
    pages_free: int
    admit_s: float = 0.0  # of step_s, admission and prefill (a whole prompt syncs on its first token; a chunk does not)


class PagedEngine:
    """Continuous batching over a paged KV pool (see the module docstring)."""

    def __init__(self, model, kv: str = "kivi2", kv_budget_mb: float = 1024, max_batch: int = 64,
                 max_tokens: int = 4096, graphs: bool = True, prefill_per_step: int = 1, prefill_chunk: int | None = None):
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 token (or None: whole prompts), got {prefill_chunk}")
        cfg = model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        world = getattr(model, "lowbit_tp", (0, 1))[1]  # a tensor-parallel shard holds its KV heads only
        param = next(model.parameters())
        self.store: KVStore = make_store(
            kv, layers=cfg.num_hidden_layers, kv_heads=(getattr(cfg, "num_key_value_heads", None) or heads) // world,
            head_dim=head_dim, rows=max_batch, max_tokens=max_tokens, budget_bytes=int(kv_budget_mb * 2**20),
            dtype=param.dtype if param.dtype in (torch.float16, torch.bfloat16) else torch.float32,
            device=param.device)
        self.runner = LlamaRunner(model, self.store)
        self.graphs = DecodeGraphs(self.runner, graphs=graphs)
        self.graphs.capture()
        self.device = self.store.device
        self.prefill_per_step = prefill_per_step
        self.prefill_chunk = prefill_chunk
        self.prefilling: EngineRequest | None = None  # the prompt being prefilled in chunks (in the last row)
        self._chunked = 0  # its tokens stored so far
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self._ids = itertools.count()
        self.pos_host = torch.zeros(self.store.rows, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self.temps = torch.zeros(self.store.rows, device=self.device)
        self.top_ps = torch.ones(self.store.rows, device=self.device)
        self.seeds = torch.zeros(self.store.rows, dtype=torch.long, device=self.device)
        self._seed_stream = random.Random(0)
        self.history: list[StepStats] = []

    # ------------------------------------------------------------------ requests
    def add(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, eos=(), *, top_p: float = 1.0,
            seed: int | None = None) -> EngineRequest:
        """Queue a request; raises :class:`PoolFullError` when it could never fit. Without a `seed`, the engine's
        seeded stream gives one (reproducible for a given order of :meth:`add` calls)."""
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.store.check_admissible(len(prompt) + max_new_tokens)
        seed = self._seed_stream.getrandbits(63) if seed is None else int(seed) & ((1 << 63) - 1)
        req = EngineRequest(list(prompt), max_new_tokens, float(temperature), frozenset(eos), next(self._ids),
                            top_p=float(top_p), seed=seed, t_arrive=time.perf_counter())
        self.waiting.append(req)
        return req

    def cancel(self, req: EngineRequest) -> None:
        """Drop a waiting or running request; a running one frees its pages now."""
        if req in self.waiting:
            self.waiting.remove(req)
        elif req is self.prefilling:
            self.store.release(req.row)
            self.prefilling, req.row = None, -1
        elif req in self.running:
            self._finish(req)
        req.finished = True

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running and self.prefilling is None

    # ------------------------------------------------------------------ loop
    def step(self) -> StepStats:
        """Admit and prefill, then one decode step over all running rows (see the module docstring)."""
        t0 = time.perf_counter()
        prefilled = 0
        if self.prefilling is not None:
            self._next_chunk()
            prefilled = 1
        while (self.prefilling is None and self.waiting and prefilled < self.prefill_per_step
               and len(self.running) < self.store.rows
               and self.store.fits(self.waiting[0].prompt.__len__() + self.waiting[0].max_new_tokens)):
            req = self.waiting.popleft()
            prefilled += 1
            if self.prefill_chunk and len(req.prompt) > self.prefill_chunk:
                self._start_chunked(req)
                break
            try:
                self._prefill(req)
            except Exception as exc:  # noqa: BLE001 - this request fails alone: its pages go back
                self._fail(req, exc)
        t_admitted = time.perf_counter()
        b = len(self.running)
        if b:
            self.graphs.pos[:b].copy_(self.pos_host[:b], non_blocking=True)
            logits = self.graphs.step(b, limit=self.store.rows - 1 if self.prefilling is not None else None)
            tokens = self._sample(logits, b, self.graphs.pos[:b] + 1)
            self.graphs.tokens[:b] = tokens
            emitted = tokens.tolist()  # the step's one host sync
            # only now may the host change pos_host: the upload above is asynchronous (pinned memory), and
            # incrementing before the sync raced it (a step behind a busy stream read the next step's positions)
            self.pos_host[:b] += 1
            for r, tok in zip(list(self.running), emitted):
                self._emit(r, tok)
        stats = StepStats(prefilled, b, time.perf_counter() - t0, self.store.used_blocks, len(self.store.free_blocks),
                          t_admitted - t0)
        self.history.append(stats)
        return stats

    def run(self) -> list[StepStats]:
        """Step until every queued request has finished."""
        out = []
        while not self.idle:
            out.append(self.step())
        return out

    # ------------------------------------------------------------------ internals
    def _fail(self, req: EngineRequest, exc: Exception) -> None:
        req.error = f"prefill failed: {exc!r}"
        if req in self.running:
            self._finish(req)
        elif req is self.prefilling:
            self.store.release(req.row)
            self.prefilling, req.row = None, -1
        req.finished = True

    def _prefill(self, req: EngineRequest) -> None:
        row = len(self.running)
        self.store.reserve(row, len(req.prompt) + req.max_new_tokens)
        req.row = row
        self.running.append(req)
        ids = torch.tensor(req.prompt, dtype=torch.long, device=self.device)
        self._first_token(req, self.runner.prefill(row, ids))

    def _start_chunked(self, req: EngineRequest) -> None:
        """Reserve the last row for `req` (free: fewer rows than all are running) and store its first chunk."""
        row = self.store.rows - 1
        try:
            self.store.reserve(row, len(req.prompt) + req.max_new_tokens)
        except Exception as exc:  # noqa: BLE001
            req.error, req.finished = f"prefill failed: {exc!r}", True
            return
        req.row, self.prefilling, self._chunked = row, req, 0
        self._next_chunk()

    def _next_chunk(self) -> None:
        """Store the next chunk of the prompt being prefilled; after its last, the request joins the running rows."""
        req, start = self.prefilling, self._chunked
        end = min(start + self.prefill_chunk, len(req.prompt))
        try:
            ids = torch.tensor(req.prompt[start:end], dtype=torch.long, device=self.device)
            logits = self.runner.prefill_chunk(req.row, ids, start)
        except Exception as exc:  # noqa: BLE001 - this request fails alone
            self._fail(req, exc)
            return
        self._chunked = end
        if end < len(req.prompt):
            return
        self.prefilling, row = None, len(self.running)
        if req.row != row:
            self.store.move_row(req.row, row)
            req.row = row
        self.running.append(req)
        self._first_token(req, logits)

    def _first_token(self, req: EngineRequest, logits: torch.Tensor) -> None:
        """Set the row's sampling state from `req` and emit the token sampled from its prompt's last `logits`."""
        row = req.row
        self.temps[row], self.top_ps[row], self.seeds[row] = req.temperature, req.top_p, req.seed
        self.pos_host[row] = len(req.prompt)  # where the first generated token goes in
        at = torch.full((1,), len(req.prompt), dtype=torch.long, device=self.device)
        tok = int(self._sample(logits[None], 1, at, row)[0])
        self.graphs.tokens[row] = tok
        self._emit(req, tok)

    def _sample(self, logits: torch.Tensor, b: int, at: torch.Tensor, row: int = 0) -> torch.Tensor:
        """Tokens of rows ``row..row+b-1`` from ``logits [b, V]``; ``at [b]``: the positions they will take."""
        greedy = logits.argmax(-1)
        live = self.running[row : row + b]
        if not any(r.temperature > 0 for r in live):
            return greedy
        temps, top_ps = self.temps[row : row + b], self.top_ps[row : row + b]
        z = logits.double()
        z = (z - z.max(-1, keepdim=True).values) / torch.where(temps > 0, temps, 1.0).double()[:, None]
        if any(r.top_p < 1 for r in live):  # the smallest prefix of the sorted softmax reaching top_p
            probs, order = torch.sort(torch.softmax(z, -1), dim=-1, descending=True, stable=True)
            keep = (torch.cumsum(probs, -1) - probs) < top_ps.double()[:, None]
            z = z.masked_fill(~torch.zeros_like(keep).scatter_(1, order, keep), float("-inf"))
        noise = _exponential(self.seeds[row : row + b], at, z.shape[-1])  # Exp(1) per (row, token id)
        drawn = (z - noise.log()).argmax(-1)  # argmax p_i / E_i: distributed as softmax(z)
        return torch.where(temps > 0, drawn, greedy)

    def _emit(self, req: EngineRequest, tok: int) -> None:
        if req.finished:
            return
        req.output.append(tok)
        if req.t_first is None:
            req.t_first = time.perf_counter()
        if tok in req.eos or len(req.output) >= req.max_new_tokens:
            self._finish(req)

    def _finish(self, req: EngineRequest) -> None:
        req.finished, req.t_done = True, time.perf_counter()
        row = req.row
        self.store.release(row)
        last = self.running[-1]
        self.running.remove(req)
        if last is not req:  # keep rows compact: the last running row moves into the hole
            self.store.move_row(last.row, row)
            self.graphs.tokens[row] = self.graphs.tokens[last.row]
            self.temps[row] = self.temps[last.row]
            self.top_ps[row], self.seeds[row] = self.top_ps[last.row], self.seeds[last.row]
            self.pos_host[row] = self.pos_host[last.row]
            last.row = row
            self.running.remove(last)
            self.running.insert(row, last)
        req.row = -1


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of ``x`` (int64 holding values < 2**32; products stay below 2**63)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def _exponential(seeds: torch.Tensor, at: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) draws ``[b, vocab]`` (float64) keyed by (seed, position, token id) only."""
    h = _mix32((seeds & _M32) ^ _mix32((seeds >> 32) ^ _mix32(at & _M32)))[:, None]
    v = torch.arange(vocab, device=seeds.device)[None, :]
    a = _mix32((h + v * 0x9E3779B1) & _M32)
    c = _mix32(a ^ 0x5BD1E995)
    u = ((a >> 11) * 4294967296 + c).double().add_(0.5).mul_(2.0**-53)  # uniform in (0, 1), 53 bits
    return -torch.log(u)


__all__ = ["PagedEngine", "EngineRequest", "StepStats", "PoolFullError"]
