"""Load a model for serving and run the server (the work behind ``lowbit serve``; no CLI parsing)."""

from __future__ import annotations

import os
import sys

from lowbit.spec import SpecError

API_KEY_ENV = "LOWBIT_API_KEY"


def apply_wa(model, tokenizer, wa: str):
    """Quantize the model's linears with ``lowbit.wa`` (calibrated on the second half of the bundled text
    when the method needs calibration). Raises SpecError with a clear message when unavailable."""
    try:
        from lowbit.wa import parse_wa_spec, quantize_model, resolve_config
    except ImportError as exc:
        raise SpecError(f"--wa needs the weight/activation package lowbit.wa, which cannot be imported here: {exc}") from None
    parse_wa_spec(wa)
    calib = None
    if resolve_config(wa).needs_calibration:
        from lowbit.eval import DEFAULT_TEXT, load_tokens
        from lowbit.wa import calibration_ids

        ids = load_tokens(tokenizer, DEFAULT_TEXT).reshape(-1)
        calib = calibration_ids(ids[ids.numel() // 2 :], n=8, length=256, seed=0)
    quantize_model(model, wa, calib=calib)
    return model


def load_for_serving(model: str = "smollm2", wa: str | None = None):
    """``(model, tokenizer)`` ready to serve: loaded, and W/A-quantized when `wa` is given."""
    from lowbit.models import load_model

    if wa:
        try:
            from lowbit.wa import parse_wa_spec
        except ImportError as exc:
            raise SpecError(f"--wa needs the weight/activation package lowbit.wa, which cannot be imported here: {exc}") from None
        parse_wa_spec(wa)  # fail before the slow load
    m, tok = load_model(model)
    if wa:
        apply_wa(m, tok, wa)
    return m, tok


def check_limits(kv: str | list[str], kv_budget_mb: float, max_queue: int, max_batch: int) -> None:
    """Validate the KV spec(s) and the server limits; raises SpecError."""
    from lowbit.kv import parse_kv_spec

    for spec in [kv] if isinstance(kv, str) else kv:
        parse_kv_spec(spec)
    if kv_budget_mb <= 0:
        raise SpecError(f"--kv-budget-mb must be > 0, got {kv_budget_mb}")
    if max_batch < 1 or max_queue < 0:
        raise SpecError("--max-batch must be >= 1 and --max-queue >= 0")


def serve(
    model: str = "smollm2",
    kv: str = "fp16",
    wa: str | None = None,
    kv_budget_mb: float = 512.0,
    port: int = 8000,
    host: str = "127.0.0.1",
    api_key: str | None = None,
    max_queue: int = 64,
    max_batch: int = 32,
    *,
    prefill_per_step: int = 1,
    log_level: str = "info",
    drain_timeout: float = 60.0,
    engine: str = "auto",
    tensor_parallel: int = 1,
    prefill_chunk: int = 0,
) -> None:
    """Load the model and serve the OpenAI-compatible API until interrupted (blocking).

    `api_key` falls back to $LOWBIT_API_KEY; with neither set, no key is required. On Ctrl-C / SIGTERM,
    queued and running requests get up to `drain_timeout` s to finish (docs/SERVE.md, "Graceful shutdown").
    `engine` (``--engine``): ``paged`` serves through :class:`lowbit.engine.PagedEngine`, ``classic`` through
    per-request caches, ``auto`` picks paged on CUDA when the model and KV spec allow it (printed with why).
    `prefill_chunk` (paged engine): prefill prompts longer than this many tokens in chunks, one per step, while
    the running requests keep decoding (0: whole prompts).
    Raises :class:`~lowbit.spec.SpecError` for a bad ``--kv``/``--wa``/``--engine`` spec or limits.
    """
    from lowbit.serve.api import create_app
    from lowbit.serve.engine import Engine
    from lowbit.serve.paged import ENGINES, PagedServeEngine, choose_engine, engine_store_kind
    from lowbit.serve.server import run_server

    check_limits(kv, kv_budget_mb, max_queue, max_batch)
    if engine not in ENGINES:
        raise SpecError(f"--engine must be one of {', '.join(ENGINES)}, got '{engine}'")
    if engine == "paged":
        engine_store_kind(kv)  # fail before the slow load
    if prefill_chunk < 0:
        raise SpecError(f"--prefill-chunk must be >= 0 tokens (0: whole prompts), got {prefill_chunk}")
    if drain_timeout < 0:
        raise SpecError(f"--drain-timeout-s must be >= 0, got {drain_timeout}")
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    if tensor_parallel > 1:
        _serve_tensor_parallel(model, kv, wa, kv_budget_mb, port, host, api_key, max_queue, max_batch,
                               prefill_per_step, log_level, drain_timeout, engine, tensor_parallel, prefill_chunk)
        return
    if tensor_parallel < 1:
        raise SpecError(f"--tensor-parallel must be >= 1, got {tensor_parallel}")
    m, tok = load_for_serving(model, wa)
    if wa:  # q/k/v and gate/up as one W4Ax GEMM each (tensor-parallel ranks fuse their shards after cutting)
        from lowbit.wa import fuse_projections

        fuse_projections(m)
    backend, why = choose_engine(engine, m, kv)
    print(f"lowbit serve: {backend} engine ({why})", file=sys.stderr)
    extra = {}
    if backend == "paged":
        cls, extra = PagedServeEngine, {"prefill_chunk": prefill_chunk or None}
    else:
        cls = Engine
        if prefill_chunk:
            print("lowbit serve: --prefill-chunk applies to the paged engine; the classic engine prefills whole prompts",
                  file=sys.stderr)
    engine = cls(m, tok, kv=kv, kv_budget_mb=kv_budget_mb, max_batch=max_batch, max_queue=max_queue,
                 prefill_per_step=prefill_per_step, model_name=model, **extra)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {host} without an API key", file=sys.stderr)
    print(f"lowbit serve: {model} kv={engine.kv} budget={kv_budget_mb:g} MB on http://{host}:{port}/v1", file=sys.stderr)
    if backend == "paged":
        print(f"lowbit serve: {engine.store.describe()}", file=sys.stderr)
    run_server(create_app(engine, api_key=api_key, drain_timeout=drain_timeout), host=host, port=port,
               log_level=log_level)


def _serve_tensor_parallel(model, kv, wa, kv_budget_mb, port, host, api_key, max_queue, max_batch, prefill_per_step,
                           log_level, drain_timeout, engine, world, prefill_chunk: int = 0) -> None:
    """``--tensor-parallel N`` under torchrun: rank 0 serves HTTP, the others follow (:mod:`lowbit.serve.tp`)."""
    from lowbit.serve.api import create_app
    from lowbit.serve.paged import engine_store_kind
    from lowbit.serve.server import run_server
    from lowbit.serve.tp import follow, join_group, stop_followers, tensor_parallel_engine

    if engine == "classic":
        raise SpecError("--tensor-parallel runs on the paged engine: use --engine paged (or auto)")
    engine_store_kind(kv)
    rank, world = join_group(world)
    m, tok = load_for_serving(model, wa)  # every rank quantizes the whole model the same way, then cuts its part
    srv = tensor_parallel_engine(m, tok, rank, world, kv=kv, kv_budget_mb=kv_budget_mb, max_batch=max_batch,
                                 max_queue=max_queue, prefill_per_step=prefill_per_step, model_name=model,
                                 prefill_chunk=prefill_chunk or None)
    if rank:
        follow(srv)
        return
    print(f"lowbit serve: {model} kv={srv.kv} tensor-parallel {world}, {kv_budget_mb:g} MB per rank on "
          f"http://{host}:{port}/v1", file=sys.stderr)
    try:
        run_server(create_app(srv, api_key=api_key, drain_timeout=drain_timeout), host=host, port=port,
                   log_level=log_level)
    finally:
        stop_followers(srv)
