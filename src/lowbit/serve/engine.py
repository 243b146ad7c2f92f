"""The serving engine: one model, one background thread, continuous batching at decode-step granularity.

Every loop iteration:

1. requests cancelled by their client leave (waiting or running), their caches are dropped;
2. admission: the oldest waiting requests join while the running batch has room (``max_batch``)
   and their reserved KV bytes fit in the budget next to the running ones (strict FIFO, so a large
   request is not starved by small ones behind it); at most ``prefill_per_step`` of them are
   prefilled per iteration, each in its own batch-1 forward into its own fresh cache, which also
   gives its first token;
3. one batched forward over all running requests, one token each, through
   :class:`~lowbit.serve.batching.BatchedCache` (ragged lengths: left padding hidden by the mask,
   true positions);
4. each request samples its token with its own parameters and generator, its text advances
   (stop strings, EOS, ``max_tokens``), and finished requests leave, freeing cache and reservation.

A request's events go to its ``sink`` (a callable, called from the engine thread): ``{"type":
"delta", "text"}``, then one ``{"type": "done", ...}`` or ``{"type": "error", ...}``. An exception
while prefilling, sampling or updating one request's cache fails that request only. When the batched
forward itself raises (a model fault, e.g. CUDA out of memory), memory is released, the decode step
size is halved, and each request of that step has its cache recomputed alone from its prompt and the
tokens it has generated (a request part of more than ``MAX_FAULTS`` faults fails); the others go on.

Shutdown (:meth:`Engine.shutdown`): stop accepting (new requests get :class:`EngineClosedError`), let
queued and running requests finish for up to `timeout` seconds, then fail what is left with code
``shutting_down`` and stop the thread.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections import deque

import torch

from lowbit.kv.hf import cache_kwargs
from lowbit.kv.registry import cache_nbytes, make_cache, parse_kv_spec
from lowbit.serve.batching import BatchedCache, decode_inputs
from lowbit.serve.metrics import Metrics
from lowbit.serve.request import (  # noqa: F401 - re-exported: the engine's public names
    BudgetError,
    Completion,
    ContextLengthError,
    EngineClosedError,
    EngineError,
    QueueFullError,
    Request,
)
from lowbit.serve.sampling import SamplingParams, TextTracker, sample_token
from lowbit.serve.sizing import KVSizer

MB = 1 << 20
MAX_FAULTS = 2  # model faults a request may be part of (each time its cache is recomputed) before it fails
RECOVER_AFTER_STEPS = 20  # fault-free decode forwards before the step size doubles back towards max_batch
log = logging.getLogger("lowbit.serve")


class Engine:
    """Continuous-batching generation over per-request (compressed) KV caches; see the module docstring."""

    backend = "classic"  # ``lowbit serve --engine``; the paged one is :class:`lowbit.serve.paged.PagedServeEngine`

    def __init__(
        self,
        model,
        tokenizer,
        kv: str = "fp16",
        kv_budget_mb: float = 512,
        max_batch: int = 32,
        max_queue: int = 64,
        prefill_per_step: int = 1,
        metrics: Metrics | None = None,
        model_name: str | None = None,
    ):
        if max_batch < 1 or max_queue < 0 or prefill_per_step < 1:
            raise ValueError("max_batch and prefill_per_step must be >= 1, max_queue >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.kv_parts = parse_kv_spec(kv)
        self.kv = kv.strip()
        self.model_name = model_name or getattr(model, "lowbit_name", None) or "model"
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        text = model.config.get_text_config(decoder=True)
        self.num_layers = text.num_hidden_layers
        self.max_context = int(getattr(text, "max_position_embeddings", 0) or 1 << 30)
        self.sizer = KVSizer(self.kv, model.config, self.dtype)
        self.budget = int(kv_budget_mb * MB)
        self.max_batch, self.max_queue, self.prefill_per_step = max_batch, max_queue, prefill_per_step
        self.step_size = max_batch  # sequences per decode forward; halved by a model fault, then regrows
        self._clean_steps = 0
        self.metrics = metrics or Metrics()
        self.metrics.set("kv_budget_bytes", self.budget)
        eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = set(eos)
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._reserved = 0
        self._accepting = True
        self._stop = False
        self._abort = False
        self._thread: threading.Thread | None = None
        self.loop_errors = 0

    # ------------------------------------------------------------------ public API
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lowbit-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._waiting and not self._running

    def reserve_for(self, prompt_tokens: int, max_tokens: int) -> int:
        """KV bytes admission reserves for a request (its cache's peak up to prompt + max_tokens)."""
        return self.sizer.peak_bytes(prompt_tokens + max_tokens)

    def check_context(self, prompt_tokens: int, max_tokens: int) -> None:
        """The 400 ``context_length_exceeded`` a request gets when it does not fit the model's context."""
        total = prompt_tokens + max_tokens
        if prompt_tokens >= self.max_context or total > self.max_context:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_context} tokens, but {total} were requested "
                f"({prompt_tokens} in the prompt, {max_tokens} for the completion)",
                param="prompt" if prompt_tokens >= self.max_context else "max_tokens")

    def check_request(self, prompt_tokens: int, max_tokens: int) -> int:
        """The bytes to reserve for a request, or the 400 it gets (context, KV budget); no engine work."""
        self.check_context(prompt_tokens, max_tokens)
        reserved = self.reserve_for(prompt_tokens, max_tokens)
        if reserved > self.budget:
            prompt_alone = self.reserve_for(prompt_tokens, 1) > self.budget
            raise BudgetError(
                f"this request needs up to {reserved / MB:.2f} MB of KV cache ({self.kv}, {prompt_tokens} prompt + "
                f"{max_tokens} completion tokens) but the server's whole KV budget is {self.budget / MB:.2f} MB: "
                + ("the prompt alone does not fit, shorten it" if prompt_alone else "lower max_tokens"),
                param="prompt" if prompt_alone else "max_tokens")
        return reserved

    def submit(self, req: Request) -> Request:
        """Queue a request; raises an :class:`EngineError` (400/429/503) when it cannot be taken."""
        req.reserved = self.check_request(req.prompt_tokens, req.params.max_tokens)
        with self._cond:
            if not self._accepting:
                raise EngineClosedError("the server is shutting down; retry on a running server")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later")
            req._wake = self._wake
            req.status = "waiting"
            self._waiting.append(req)
            self.metrics.set("queue_depth", len(self._waiting))
            self._cond.notify_all()
        return req

    def generate(self, prompt_ids: list[int], params: SamplingParams, timeout: float = 300.0) -> Completion:
        """Blocking helper: submit one request and wait for it (tests, scripts)."""
        events: queue.Queue = queue.Queue()
        req = self.submit(Request(prompt_ids, params, sink=events.put))
        deltas: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                ev = events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                req.cancel()
                raise TimeoutError(f"request {req.id} did not finish in {timeout} s") from None
            if ev["type"] == "delta":
                deltas.append(ev["text"])
            else:
                req.done.wait(timeout=5)
                ids = list(req.tracker.ids) if req.tracker is not None else []
                return Completion("".join(deltas), ev.get("finish_reason"), req.prompt_tokens, req.n_generated, deltas,
                                  ev.get("message") if ev["type"] == "error" else None, ids)

    def stats(self) -> dict:
        with self._cond:
            return {
                "waiting": len(self._waiting),
                "running": len(self._running),
                "kv_bytes_reserved": self._reserved,
                "kv_budget_bytes": self.budget,
            }

    def stop_accepting(self) -> None:
        """From now on :meth:`submit` raises :class:`EngineClosedError` (503); queued and running requests go on."""
        with self._cond:
            self._accepting = False
            self._cond.notify_all()

    def shutdown(self, drain: bool = True, timeout: float = 60.0, join_timeout: float = 30.0) -> int:
        """Stop taking requests; with `drain`, let queued and running ones finish (up to `timeout` s); then fail
        what is left (code ``shutting_down``) and stop the engine thread. Returns how many requests were failed."""
        self.stop_accepting()
        deadline = time.monotonic() + (timeout if drain else 0.0)
        while self.alive and time.monotonic() < deadline and not self.idle:
            time.sleep(0.02)
        with self._cond:
            left = len(self._waiting) + len(self._running)
            self._stop = True
            self._abort = left > 0
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=join_timeout)
        with self._cond:  # the thread is gone or stuck in a forward: answer the rest from here
            rest = list(self._waiting) + list(self._running)
        for r in rest:
            self._finish(r, "error", error="the server shut down before this request finished", code="shutting_down")
        self._update_gauges()
        return left

    # ------------------------------------------------------------------ engine thread
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                try:
                    if not self._iteration():
                        return
                except Exception as exc:  # noqa: BLE001 - the loop must survive anything
                    self.loop_errors += 1
                    log.exception("internal error in the decode loop; failing the running requests")
                    for r in list(self._running):
                        self._finish(r, "error", error=f"internal error in the decode loop: {exc!r}")
                    time.sleep(0.01)

    def _iteration(self) -> bool:
        with self._cond:
            while not self._stop and not self._waiting and not self._running:
                self._cond.wait(timeout=1.0)
            if self._stop and (self._abort or not (self._waiting or self._running)):
                leftovers = list(self._waiting)
                self._waiting.clear()
            else:
                leftovers = None
            if leftovers is None:
                cancelled = [r for r in self._waiting if r.cancelled.is_set()]
                for r in cancelled:
                    self._waiting.remove(r)
                admitted = []
                while (self._waiting and len(admitted) < self.prefill_per_step
                       and len(self._running) + len(admitted) < self.max_batch):
                    head = self._waiting[0]
                    if self._reserved + head.reserved > self.budget:
                        break
                    self._waiting.popleft()
                    self._reserved += head.reserved
                    head.admitted = True
                    admitted.append(head)
                self.metrics.set("queue_depth", len(self._waiting))
        if leftovers is not None:  # stopping: whatever is left fails
            for r in leftovers + list(self._running):
                self._finish(r, "error", error="the server shut down before this request finished", code="shutting_down")
            self._update_gauges()
            return False
        for r in cancelled:
            self._finish(r, "cancelled")
        for r in list(self._running):
            if r.cancelled.is_set():
                self._finish(r, "cancelled")
        for r in admitted:
            self._prefill(r)
        batch = [r for r in self._running if r.status == "running"]
        for i in range(0, len(batch), self.step_size):
            self._decode(batch[i : i + self.step_size])
        self._update_gauges()
        return True

    def _new_cache(self, r: Request):
        return r.cache_factory() if r.cache_factory else make_cache(self.kv, self.model.config, self.model, kernels=False)

    def _prefill_logits(self, r: Request, ids: list[int]) -> torch.Tensor:
        """A fresh cache for `r` filled with `ids` (batch 1); the logits of the next token."""
        r.cache = self._new_cache(r)
        t = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=t, attention_mask=torch.ones_like(t), **cache_kwargs(self.model, r.cache), use_cache=True,
                         logits_to_keep=1)
        return out.logits[0, -1]

    def _prefill(self, r: Request) -> None:
        try:
            r.status = "running"
            with self._cond:
                self._running.append(r)
            if r.cancelled.is_set():
                self._finish(r, "cancelled")
                return
            r.generator = r.params.make_generator()
            r.tracker = TextTracker(self.tokenizer, r.params.stop)
            logits = self._prefill_logits(r, r.prompt_ids)
            self.metrics.inc("prompt_tokens_total", r.prompt_tokens)
            self._accept(r, logits)
        except Exception as exc:  # noqa: BLE001 - this request only
            self._release_memory()
            log.error("request %s failed in prefill (%d prompt tokens): %s", r.id, r.prompt_tokens, repr(exc))
            self._finish(r, "error", error=f"prefill failed: {exc!r}")

    def _decode(self, batch: list[Request]) -> None:
        batch = [r for r in batch if r.status == "running"]
        if not batch:
            return
        bc = BatchedCache([r.cache for r in batch], self.num_layers)
        inputs = decode_inputs([r.next_token for r in batch], bc.positions, bc.kv_lengths, self.device)
        try:
            out = self.model(**inputs, **cache_kwargs(self.model, bc), use_cache=True)
        except Exception as exc:  # noqa: BLE001 - a model fault: recover these requests, the loop goes on
            self._model_fault(batch, exc)
            return
        self._clean_steps += 1
        if self.step_size < self.max_batch and self._clean_steps >= RECOVER_AFTER_STEPS:
            self.step_size, self._clean_steps = min(self.max_batch, 2 * self.step_size), 0
        self.metrics.inc("decode_steps_total")
        self.metrics.inc("decode_step_sequences_total", len(batch))
        self.metrics.set_max("running_sequences_peak", len(batch))
        logits = out.logits[:, -1, :]
        for b, r in enumerate(batch):
            if r.status == "finished":  # failed from another thread meanwhile (shutdown past its join timeout)
                continue
            if b in bc.failed:
                log.error("request %s failed: its KV cache update raised %s", r.id, repr(bc.failed[b]))
                self._finish(r, "error", error=f"KV cache update failed: {bc.failed[b]!r}")
                continue
            try:
                self._accept(r, logits[b])
            except Exception as exc:  # noqa: BLE001
                log.error("request %s failed in sampling: %s", r.id, repr(exc))
                self._finish(r, "error", error=f"sampling failed: {exc!r}")

    def _model_fault(self, batch: list[Request], exc: Exception) -> None:
        """The batched forward raised: release memory, halve the step size, and recompute each request alone
        (its caches may hold this step's token in some layers only); a request in too many faults fails."""
        self.metrics.inc("model_faults_total")
        self._release_memory()
        self.step_size, self._clean_steps = max(1, min(self.step_size, len(batch)) // 2), 0
        log.error("decode step over %d requests raised %s; recomputing them one at a time (step size now %d)",
                  len(batch), repr(exc), self.step_size)
        for r in batch:
            r.cache = None
            r.faults += 1
            if r.faults > MAX_FAULTS:
                self._finish(r, "error", error=f"the model failed {r.faults} times while decoding this request: {exc!r}")
                continue
            try:  # prompt + every generated token (the last one not fed yet): the logits this step was computing
                logits = self._prefill_logits(r, r.prompt_ids + list(r.tracker.ids))
                self._accept(r, logits)
            except Exception as again:  # noqa: BLE001 - it fails alone: this request only
                self._release_memory()
                log.error("request %s failed: recomputing its cache raised %s", r.id, repr(again))
                self._finish(r, "error", error=f"the model failed on this request: {again!r}")

    def _release_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _accept(self, r: Request, logits: torch.Tensor) -> None:
        """Sample the next token of `r`, advance its text, emit, and finish it when it is done."""
        self._take(r, sample_token(logits, r.params, r.generator))

    def _take(self, r: Request, token: int) -> None:
        """Count `r`'s new `token` (latencies), advance its text, emit, and finish `r` when it is done."""
        now = time.perf_counter()
        if r.first_token_at is None:
            r.first_token_at = now
            self.metrics.observe("time_to_first_token_seconds", now - r.arrival)
        else:
            self.metrics.observe("inter_token_latency_seconds", now - r.last_token_at)
        r.last_token_at = now
        r.n_generated += 1
        self.metrics.inc("completion_tokens_total")
        if token in self.eos_ids and not r.params.ignore_eos:
            self._finish(r, "stop")
            return
        delta = r.tracker.add(token)
        if delta:
            self._emit(r, {"type": "delta", "text": delta})
        if r.tracker.stopped_at is not None:
            self._finish(r, "stop")
        elif r.n_generated >= r.params.max_tokens or r.prompt_tokens + r.n_generated >= self.max_context:
            self._finish(r, "length")
        else:
            r.next_token = token

    def _emit(self, r: Request, event: dict) -> None:
        try:
            r.sink(event)
        except Exception:  # noqa: BLE001 - a broken consumer cancels its own request only
            r.cancelled.set()

    def _finish(self, r: Request, reason: str, error: str | None = None, code: str | None = None) -> None:
        with self._cond:  # claimed once, whichever thread gets here first
            if r.status == "finished":
                return
            r.status = "finished"
        if reason in ("stop", "length") and r.tracker is not None:
            tail = r.tracker.flush()
            if tail:
                self._emit(r, {"type": "delta", "text": tail})
        r.finish_reason, r.error = reason, error
        r.cache = None  # the request's KV cache is freed here
        with self._cond:
            if r in self._running:
                self._running.remove(r)
            if r in self._waiting:
                self._waiting.remove(r)
            if r.admitted:
                self._reserved -= r.reserved
                r.admitted = False
        self.metrics.inc("sequences_finished_total", reason=reason)
        base = {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.n_generated, "finish_reason": reason}
        if reason == "error":
            self._emit(r, {"type": "error", "message": error or "request failed", "code": code or "internal_error", **base})
        else:
            self._emit(r, {"type": "done", "text": r.tracker.final_text if r.tracker else "", **base})
        r.done.set()

    def _update_gauges(self) -> None:
        with self._cond:
            running = list(self._running)
            reserved, waiting = self._reserved, len(self._waiting)
        in_use = 0
        for r in running:
            cache = r.cache
            if cache is not None:
                in_use += cache_nbytes(cache)[0]
        self.metrics.set("running_sequences", len(running))
        self.metrics.set_max("running_sequences_peak", len(running))
        self.metrics.set("kv_bytes_in_use", in_use)
        self.metrics.set("kv_bytes_reserved", reserved)
        self.metrics.set("queue_depth", waiting)
