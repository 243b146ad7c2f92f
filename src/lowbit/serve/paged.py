"""``lowbit serve --engine paged``: the server's requests over :class:`lowbit.engine.PagedEngine`.

:class:`PagedServeEngine` keeps the classic :class:`~lowbit.serve.engine.Engine`'s interface and request
handling -- submit (400/429/503), the event sink (``delta``, then ``done`` or ``error``), stop strings and EOS
through :class:`~lowbit.serve.sampling.TextTracker`, cancellation, shutdown -- and replaces its loop. One
background thread owns the paged engine; HTTP threads only queue requests (under the engine's lock). Every
iteration:

1. requests cancelled by their client, or finished (stop string, error), leave; a running one is cancelled in
   the paged engine, which frees its pages at once;
2. admission: the oldest waiting requests are handed to the paged engine while it has a free row and the free
   pages for each one's longest length (prompt + ``max_tokens``), at most ``prefill_per_step`` per step, so
   the paged engine admits exactly what it is given (a request still waiting here is what ``queue_depth``
   counts);
3. one :meth:`PagedEngine.step` (prefills, then one decode step over every running row, sampled on the
   device: greedy, temperature, top-p, per-request seeds); each request's new tokens go through its text
   tracker and sink. A request whose prefill raises fails alone; when the decode step itself raises (a model
   fault, e.g. CUDA out of memory) the requests of that step fail with the fault's message, their pages are
   freed, and the server goes on serving.

Metrics beyond the classic engine's: ``kv_pages_used``/``kv_pages_free``/``kv_pages_total`` (gauges),
``step_batch_size`` and ``step_seconds`` (histograms, one observation per step); :meth:`stats` (and
``/health``) carries the pages and the last step's batch and time.

:func:`choose_engine` is ``--engine auto|paged|classic``; :func:`engine_store_kind` maps a ``--kv`` spec to
the paged store (``fp16``; ``kivi:bits=2|4`` with group 32 and residual 128, optionally sinks).
"""

from __future__ import annotations

import logging
import secrets
import threading

from lowbit.engine import PagedEngine, PoolFullError
from lowbit.engine.runner import SUPPORTED
from lowbit.kv.registry import parse_kv_spec
from lowbit.serve.engine import MB, Engine
from lowbit.serve.request import BudgetError, Request
from lowbit.serve.sampling import TextTracker
from lowbit.spec import SpecError

log = logging.getLogger("lowbit.serve")
ENGINES = ("auto", "paged", "classic")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def engine_store_kind(kv: str) -> str:
    """The paged engine's store for a ``--kv`` spec (``fp16``, ``kivi2``, ``kivi4:sinks=4``, ...); raises
    :class:`SpecError` naming what the paged engine does not store."""
    parts = parse_kv_spec(kv)
    allowed = "the paged engine stores fp16 or kivi:bits=2|4 with group=32 and residual=128 (sinks allowed)"
    if len(parts) != 1:
        raise SpecError(f"'{kv}': {allowed}; compositions ('+') run on the classic engine (--engine classic)")
    name, opts = parts[0].name, parts[0].options
    if name == "fp16":
        return "fp16"
    if name != "kivi":
        raise SpecError(f"'{kv}': {allowed}; {name} runs on the classic engine (--engine classic)")
    wrong = [f"{k}={opts[k]}" for k, want in (("group", 32), ("residual", 128)) if opts[k] != want]
    if opts["bits"] not in (2, 4):
        wrong.insert(0, f"bits={opts['bits']}")
    if wrong:
        raise SpecError(f"'{kv}': {allowed}; got {', '.join(wrong)} (use --engine classic for it)")
    return f"kivi{opts['bits']}" + (f":sinks={opts['sinks']}" if opts["sinks"] else "")


def choose_engine(choice: str, model, kv: str) -> tuple[str, str]:
    """``(engine, why)`` for ``--engine choice``: ``auto`` is ``paged`` on CUDA for a Llama-family model whose
    KV spec maps to a paged store, else ``classic``; ``paged`` raises :class:`SpecError` when it cannot run."""
    if choice not in ENGINES:
        raise SpecError(f"--engine must be one of {', '.join(ENGINES)}, got '{choice}'")
    if choice == "classic":
        return "classic", "asked for (--engine classic)"
    problems = []
    try:
        store = engine_store_kind(kv)
    except SpecError as exc:
        problems.append(str(exc))
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        problems.append(f"the paged engine runs {', '.join(SUPPORTED)} models, not model_type='{model_type}'")
    if choice == "paged":
        if problems:
            raise SpecError("--engine paged: " + "; ".join(problems))
        return "paged", f"asked for (--engine paged): {model_type}, KV {kv} in the {store} paged store"
    device = next(model.parameters()).device
    if device.type != "cuda":
        problems.insert(0, f"the model is on {device.type}, not CUDA")
    if problems:
        return "classic", "auto: " + "; ".join(problems)
    return "paged", f"auto: CUDA, {model_type}, KV {kv} in the {store} paged store"


class PagedServeEngine(Engine):
    """The classic engine's interface over a :class:`PagedEngine` (see the module docstring).

    `max_context` caps the model's context (prompt + completion; the paged block tables are sized for it);
    `graphs` captures the decode step in CUDA graphs on CUDA; `wrap` (optional) wraps the :class:`PagedEngine`
    in an object with its interface (:class:`lowbit.engine.parallel.TensorParallelEngine`)."""

    backend = "paged"

    def __init__(self, model, tokenizer, kv: str = "fp16", kv_budget_mb: float = 512, max_batch: int = 32,
                 max_queue: int = 64, prefill_per_step: int = 1, metrics=None, model_name: str | None = None,
                 max_context: int | None = None, graphs: bool = True, wrap=None, prefill_chunk: int | None = None):
        self.store_kind = engine_store_kind(kv)  # before any work: a spec the paged engine cannot store fails here
        super().__init__(model, tokenizer, kv=kv, kv_budget_mb=kv_budget_mb, max_batch=max_batch, max_queue=max_queue,
                         prefill_per_step=prefill_per_step, metrics=metrics, model_name=model_name)
        if max_context is not None:
            self.max_context = min(self.max_context, int(max_context))
        try:
            self.paged = PagedEngine(model, kv=self.store_kind, kv_budget_mb=kv_budget_mb, max_batch=max_batch,
                                     max_tokens=self.max_context, graphs=graphs, prefill_per_step=prefill_per_step,
                                     prefill_chunk=prefill_chunk)
        except (PoolFullError, ValueError) as exc:  # budget too small for the rows, a model the runner refuses
            raise SpecError(f"the paged engine cannot serve this: {exc}") from None
        if wrap is not None:  # e.g. tensor parallelism: the same interface, steps broadcast to the other ranks
            self.paged = wrap(self.paged)
        self.store = self.paged.store
        self._active: dict[int, tuple[Request, object]] = {}  # engine request id -> (request, engine request)
        self._last_step = {"batch": 0, "seconds": 0.0}
        m = self.metrics
        m.define("kv_pages_used", "gauge", "KV pages held by running sequences (paged engine; reserved at admission)")
        m.define("kv_pages_free", "gauge", "KV pages free in the paged pool")
        m.define("kv_pages_total", "gauge", "KV pages in the paged pool (its scratch page not counted)")
        m.define("step_batch_size", "histogram", "Sequences in each paged engine step's decode batch", BATCH_BUCKETS)
        m.define("step_seconds", "histogram", "Wall time of each paged engine step (prefills and one decode)",
                 STEP_BUCKETS)
        m.set("kv_pages_total", self.store.blocks - 1)
        self._update_gauges()

    # ------------------------------------------------------------------ admission checks (HTTP threads)
    def reserve_for(self, prompt_tokens: int, max_tokens: int) -> int:
        """KV bytes a request holds while running: its pages (for its longest length) and its row's buffers."""
        return self.store.pages_for(prompt_tokens + max_tokens) * self.store.block_bytes() + self.store.row_bytes()

    def check_request(self, prompt_tokens: int, max_tokens: int) -> int:
        self.check_context(prompt_tokens, max_tokens)
        try:
            self.store.check_admissible(prompt_tokens + max_tokens)
        except PoolFullError:
            alone = self.store.pages_for(prompt_tokens + 1) > self.store.blocks - 1
            raise BudgetError(
                f"this request needs {self.store.pages_for(prompt_tokens + max_tokens)} KV pages ({self.kv}, "
                f"{prompt_tokens} prompt + {max_tokens} completion tokens) but the server's whole pool holds "
                f"{self.store.blocks - 1} pages ({self.budget / MB:.2f} MB): "
                + ("the prompt alone does not fit, shorten it" if alone else "lower max_tokens"),
                param="prompt" if alone else "max_tokens") from None
        return self.reserve_for(prompt_tokens, max_tokens)

    def stats(self) -> dict:
        with self._cond:
            waiting, running = len(self._waiting), len(self._running)
        used, free = self.store.used_blocks, len(self.store.free_blocks)
        return {"waiting": waiting, "running": running, "kv_bytes_reserved": self._bytes_held(),
                "kv_budget_bytes": self.budget, "kv_store": self.store_kind, "pages_used": used, "pages_free": free,
                "last_step_batch": self._last_step["batch"], "last_step_seconds": self._last_step["seconds"]}

    # ------------------------------------------------------------------ engine thread
    def _iteration(self) -> bool:
        with self._cond:
            while not self._stop and not self._waiting and not self._running:
                self._cond.wait(timeout=1.0)
            stopping = self._stop and (self._abort or not (self._waiting or self._running))
            if stopping:
                leftovers = list(self._waiting) + list(self._running)
                self._waiting.clear()
            else:
                cancelled = [r for r in self._waiting if r.cancelled.is_set()]
                for r in cancelled:
                    self._waiting.remove(r)
        if stopping:  # whatever is left fails
            for r in leftovers:
                self._finish(r, "error", error="the server shut down before this request finished", code="shutting_down")
            self._sync()
            self._update_gauges()
            return False
        for r in cancelled:
            self._finish(r, "cancelled")
        for r in list(self._running):
            if r.cancelled.is_set():
                self._finish(r, "cancelled")
        self._sync()
        for r in self._admit():
            self._start(r)
        if not self.paged.idle:
            try:
                stats = self.paged.step()
            except Exception as exc:  # noqa: BLE001 - a model fault: this step's requests fail, the loop goes on
                self._step_fault(exc)
            else:
                self._after_step(stats)
        self._sync()
        self._update_gauges()
        return True

    def _admit(self) -> list[Request]:
        """Pop the waiting requests the paged engine admits in its next step (same rule: FIFO, a free row, the
        pages for the longest length), at most ``prefill_per_step``."""
        if self.paged.waiting or self.paged.prefilling is not None:  # the engine takes nothing new meanwhile
            return []
        store, taken = self.store, []
        free, rows = len(store.free_blocks), store.rows - len(self.paged.running)
        with self._cond:
            while self._waiting and len(taken) < min(self.prefill_per_step, rows):
                head = self._waiting[0]
                need = store.pages_for(head.prompt_tokens + head.params.max_tokens)
                if need > free:
                    break
                free -= need
                self._waiting.popleft()
                head.status = "running"
                self._running.append(head)
                taken.append(head)
            self.metrics.set("queue_depth", len(self._waiting))
        return taken

    def _start(self, r: Request) -> None:
        """Hand `r` to the paged engine; a failure here fails `r` alone."""
        try:
            if r.cancelled.is_set():
                self._finish(r, "cancelled")
                return
            r.tracker = TextTracker(self.tokenizer, r.params.stop)
            p = r.params
            er = self.paged.add(r.prompt_ids, p.max_tokens, p.temperature, () if p.ignore_eos else self.eos_ids,
                                top_p=p.top_p, seed=p.seed if p.seed is not None else secrets.randbits(63))
            self._active[er.id] = (r, er)
            r.engine_req = er
        except Exception as exc:  # noqa: BLE001 - this request only
            log.error("request %s could not start: %s", r.id, repr(exc))
            self._finish(r, "error", error=f"the engine could not take this request: {exc!r}")

    def _after_step(self, stats) -> None:
        m = self.metrics
        self._last_step = {"batch": stats.batch, "seconds": stats.step_s}
        m.observe("step_seconds", stats.step_s)
        if stats.batch:
            m.observe("step_batch_size", stats.batch)
            m.inc("decode_steps_total")
            m.inc("decode_step_sequences_total", stats.batch)
            m.set_max("running_sequences_peak", stats.batch)
        for r, er in list(self._active.values()):
            if r.status == "finished":
                continue
            try:
                if er.error is not None:
                    log.error("request %s failed in prefill (%d prompt tokens): %s", r.id, r.prompt_tokens, er.error)
                    self._finish(r, "error", error=er.error)
                    continue
                new = er.output[r.n_generated :]
                if new and r.n_generated == 0:
                    m.inc("prompt_tokens_total", r.prompt_tokens)
                for tok in new:
                    self._take(r, tok)
                    if r.status == "finished":
                        break
                if er.finished and r.status != "finished":  # the engine's limit and the server's agree; be safe
                    self._finish(r, "length")
            except Exception as exc:  # noqa: BLE001 - this request only
                log.error("request %s failed while handling its tokens: %s", r.id, repr(exc))
                self._finish(r, "error", error=f"handling this request's tokens failed: {exc!r}")

    def _step_fault(self, exc: Exception) -> None:
        """The step raised: every request in the paged engine fails with the fault's message, pages freed."""
        victims = [(r, er) for r, er in self._active.values() if not er.finished]
        self.metrics.inc("model_faults_total")
        log.error("engine step over %d requests raised %s; failing them (the server goes on)", len(victims), repr(exc))
        for r, er in victims:
            self._finish(r, "error", error=f"the model failed in a decode step over {len(victims)} requests: {exc!r}")
        self._sync()
        self._release_memory()

    def _finish(self, r: Request, reason: str, error: str | None = None, code: str | None = None) -> None:
        """As the classic engine's; on the engine thread the request's pages are freed before its last event."""
        er = getattr(r, "engine_req", None)
        if er is not None and not er.finished and threading.current_thread() is self._thread:
            try:
                self.paged.cancel(er)
            except Exception:  # noqa: BLE001 - its row is lost to the pool rather than the loop
                log.exception("cancelling request %s in the paged engine raised", r.id)
        super()._finish(r, reason, error, code)

    def _sync(self) -> None:
        """Requests finished here leave the paged engine (their pages are freed now)."""
        for key, (r, er) in list(self._active.items()):
            if r.status != "finished":
                continue
            del self._active[key]
            if not er.finished:
                try:
                    self.paged.cancel(er)
                except Exception:  # noqa: BLE001 - its row is lost to the pool rather than the loop
                    log.exception("cancelling request %s in the paged engine raised", r.id)

    def _bytes_held(self) -> int:
        return self.store.used_blocks * self.store.block_bytes() + len(self.paged.running) * self.store.row_bytes()

    def _update_gauges(self) -> None:
        with self._cond:
            running, waiting = len(self._running), len(self._waiting)
        held = self._bytes_held()
        m = self.metrics
        m.set("running_sequences", running)
        m.set_max("running_sequences_peak", running)
        m.set("kv_bytes_in_use", held)
        m.set("kv_bytes_reserved", held)
        m.set("queue_depth", waiting)
        m.set("kv_pages_used", self.store.used_blocks)
        m.set("kv_pages_free", len(self.store.free_blocks))
