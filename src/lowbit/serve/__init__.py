"""``lowbit serve``: an OpenAI-compatible server with continuous batching over compressed KV caches.

Quick use::

    model, tok = lowbit.load_model("smollm2")
    engine = Engine(model, tok, kv="kivi:bits=2", kv_budget_mb=64)
    app = create_app(engine)            # FastAPI; run with uvicorn, or BackgroundServer(app).start()

Names are imported lazily so that the CLI (``lowbit.cli``) stays cheap to import.
See docs/SERVE.md for the design, the API and measurements.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BatchedCache": "lowbit.serve.batching",
    "decode_inputs": "lowbit.serve.batching",
    "BudgetError": "lowbit.serve.engine",
    "Completion": "lowbit.serve.engine",
    "ContextLengthError": "lowbit.serve.engine",
    "Engine": "lowbit.serve.engine",
    "EngineClosedError": "lowbit.serve.engine",
    "EngineError": "lowbit.serve.engine",
    "QueueFullError": "lowbit.serve.engine",
    "Request": "lowbit.serve.engine",
    "LowbitServer": "lowbit.serve.server",
    "SamplingParams": "lowbit.serve.sampling",
    "KVSizer": "lowbit.serve.sizing",
    "create_app": "lowbit.serve.api",
    "BackgroundServer": "lowbit.serve.server",
    "bench_serve": "lowbit.bench.serve",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lowbit.serve' has no attribute {name!r}")
