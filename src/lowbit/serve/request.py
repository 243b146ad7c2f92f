"""What the engine serves: one :class:`Request` (a sequence and where its events go), its result
(:class:`Completion`), and the refusals the API turns into HTTP errors (:class:`EngineError` and subclasses)."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import torch

from lowbit.serve.sampling import SamplingParams, TextTracker

RETRY_AFTER_QUEUE_FULL_S = 1  # the Retry-After of a 429: a slot frees when any request finishes
RETRY_AFTER_DRAINING_S = 5  # the Retry-After of a 503 while shutting down: for a restarted server or another replica


class EngineError(Exception):
    """A request the engine refuses; `status`, `code`, `param` and `retry_after` say how the API answers."""

    status = 400
    code = "invalid_request"
    type = "invalid_request_error"
    retry_after: int | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFullError(EngineError):
    status, code, type, retry_after = 429, "queue_full", "rate_limit_error", RETRY_AFTER_QUEUE_FULL_S


class EngineClosedError(EngineError):
    status, code, type, retry_after = 503, "shutting_down", "server_error", RETRY_AFTER_DRAINING_S


class BudgetError(EngineError):
    code = "kv_budget_exceeded"


class ContextLengthError(EngineError):
    code = "context_length_exceeded"


_ids = itertools.count()


class Request:
    """One sequence: its prompt ids, sampling parameters, and where its events go."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[dict], None] | None = None,
                 request_id: str | None = None):
        if not prompt_ids:
            raise ContextLengthError("the prompt is empty: give at least one token", param="prompt")
        self.id = request_id or f"req-{next(_ids)}-{uuid.uuid4().hex[:8]}"
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.params = params
        self.sink = sink or (lambda event: None)
        self.arrival = time.perf_counter()
        self.status = "new"  # waiting -> running -> finished
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.cache = None
        self.cache_factory: Callable[[], object] | None = None  # default: the engine's KV method
        self.reserved = 0
        self.admitted = False
        self.generator: torch.Generator | None = None
        self.tracker: TextTracker | None = None
        self.next_token: int | None = None
        self.n_generated = 0
        self.faults = 0  # model faults this request was part of (each one recomputes its cache)
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._wake: Callable[[], None] | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def cache_length(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None else 0

    def cancel(self) -> None:
        """Ask the engine to drop this request (its cache is freed at the next loop iteration)."""
        if not self.done.is_set():
            self.cancelled.set()
            if self._wake:
                self._wake()


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    deltas: list[str]
    error: str | None = None
    token_ids: list[int] | None = None
