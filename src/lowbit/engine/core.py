"""The engine loop: admission into the paged pool, prefill, batched decode steps, sampling on the device.

:meth:`PagedEngine.step` admits waiting requests (FIFO) while a row is free and the pool has the pages for the
request's longest length (exact: :meth:`KVStore.pages_for`), prefills at most ``prefill_per_step`` of them, then
runs one decode step over every running row (a CUDA graph on CUDA) and samples all rows' tokens at once; the
only host sync per step reads the sampled tokens back. Finished rows free their pages and the last running row
moves into the hole, so running sequences stay in rows ``0..B-1``.
"""

from __future__ import annotations

import itertools
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


class PagedEngine:
    """Continuous batching over a paged KV pool (see the module docstring)."""

    def __init__(self, model, kv: str = "kivi2", kv_budget_mb: float = 1024, max_batch: int = 64,
                 max_tokens: int = 4096, graphs: bool = True, prefill_per_step: int = 1):
        cfg = model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        param = next(model.parameters())
        self.store: KVStore = make_store(
            kv, layers=cfg.num_hidden_layers, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim, rows=max_batch, max_tokens=max_tokens, budget_bytes=int(kv_budget_mb * 2**20),
            dtype=param.dtype if param.dtype in (torch.float16, torch.bfloat16) else torch.float32,
            device=param.device)
        self.runner = LlamaRunner(model, self.store)
        self.graphs = DecodeGraphs(self.runner, graphs=graphs)
        self.graphs.capture()
        self.device = self.store.device
        self.prefill_per_step = prefill_per_step
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self._ids = itertools.count()
        self.pos_host = torch.zeros(self.store.rows, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self.temps = torch.zeros(self.store.rows, device=self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(0)
        self.history: list[StepStats] = []

    # ------------------------------------------------------------------ requests
    def add(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, eos=()) -> EngineRequest:
        """Queue a request; raises :class:`PoolFullError` when it could never fit."""
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.store.check_admissible(len(prompt) + max_new_tokens)
        req = EngineRequest(list(prompt), max_new_tokens, float(temperature), frozenset(eos), next(self._ids),
                            t_arrive=time.perf_counter())
        self.waiting.append(req)
        return req

    def cancel(self, req: EngineRequest) -> None:
        """Drop a waiting or running request; a running one frees its pages now."""
        if req in self.waiting:
            self.waiting.remove(req)
        elif req in self.running:
            self._finish(req)
        req.finished = True

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # ------------------------------------------------------------------ loop
    def step(self) -> StepStats:
        """Admit and prefill, then one decode step over all running rows (see the module docstring)."""
        t0 = time.perf_counter()
        prefilled = 0
        while (self.waiting and prefilled < self.prefill_per_step and len(self.running) < self.store.rows
               and self.store.fits(self.waiting[0].prompt.__len__() + self.waiting[0].max_new_tokens)):
            self._prefill(self.waiting.popleft())
            prefilled += 1
        b = len(self.running)
        if b:
            self.graphs.pos[:b].copy_(self.pos_host[:b], non_blocking=True)
            logits = self.graphs.step(b)
            tokens = self._sample(logits, self.temps[:b], any(r.temperature > 0 for r in self.running))
            self.graphs.tokens[:b] = tokens
            self.pos_host[:b] += 1
            for r, tok in zip(list(self.running), tokens.tolist()):  # the step's one host sync
                self._emit(r, tok)
        stats = StepStats(prefilled, b, time.perf_counter() - t0, self.store.used_blocks, len(self.store.free_blocks))
        self.history.append(stats)
        return stats

    def run(self) -> list[StepStats]:
        """Step until every queued request has finished."""
        out = []
        while not self.idle:
            out.append(self.step())
        return out

    # ------------------------------------------------------------------ internals
    def _prefill(self, req: EngineRequest) -> None:
        row = len(self.running)
        self.store.reserve(row, len(req.prompt) + req.max_new_tokens)
        req.row = row
        self.running.append(req)
        ids = torch.tensor(req.prompt, dtype=torch.long, device=self.device)
        logits = self.runner.prefill(row, ids)
        self.temps[row] = req.temperature
        self.pos_host[row] = len(req.prompt)  # where the first generated token goes in
        tok = int(self._sample(logits[None], self.temps[row : row + 1], req.temperature > 0)[0])
        self.graphs.tokens[row] = tok
        self._emit(req, tok)

    def _sample(self, logits: torch.Tensor, temps: torch.Tensor, any_random: bool) -> torch.Tensor:
        greedy = logits.argmax(-1)
        if not any_random:
            return greedy
        probs = torch.softmax(logits.float() / temps.clamp(min=1e-5)[:, None], dim=-1)
        drawn = torch.multinomial(probs, 1, generator=self.generator)[:, 0]
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
            self.pos_host[row] = self.pos_host[last.row]
            last.row = row
            self.running.remove(last)
            self.running.insert(row, last)
        req.row = -1


__all__ = ["PagedEngine", "EngineRequest", "StepStats", "PoolFullError"]
