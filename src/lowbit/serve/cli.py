"""Entry points for ``lowbit serve`` and ``lowbit bench serve``.

Plain functions (:func:`serve`, :func:`bench_serve_main`) do the work; :func:`serve_command` and
:func:`bench_serve_command` are typer-compatible command functions (typer reads their defaults) that
the main CLI mounts::

    from lowbit.serve.cli import bench_serve_command, serve_command
    app.command("serve")(serve_command)
    bench_app = typer.Typer(help="Benchmarks.", no_args_is_help=True)
    bench_app.command("serve")(bench_serve_command)
    app.add_typer(bench_app, name="bench")
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

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


def _check(kv: str | list[str], kv_budget_mb: float, max_queue: int, max_batch: int) -> None:
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
) -> None:
    """Load the model and serve the OpenAI-compatible API until interrupted (blocking).

    `api_key` falls back to $LOWBIT_API_KEY; with neither set, no key is required.
    Raises :class:`~lowbit.spec.SpecError` for a bad ``--kv``/``--wa`` spec or limits.
    """
    from lowbit.serve.api import create_app
    from lowbit.serve.engine import Engine
    from lowbit.serve.server import run_server

    _check(kv, kv_budget_mb, max_queue, max_batch)
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    m, tok = load_for_serving(model, wa)
    engine = Engine(m, tok, kv=kv, kv_budget_mb=kv_budget_mb, max_batch=max_batch, max_queue=max_queue,
                    prefill_per_step=prefill_per_step, model_name=model)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {host} without an API key", file=sys.stderr)
    print(f"lowbit serve: {model} kv={engine.kv} budget={kv_budget_mb:g} MB on http://{host}:{port}/v1", file=sys.stderr)
    run_server(create_app(engine, api_key=api_key), host=host, port=port, log_level=log_level)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def serve_command(
    model: str = typer.Option("smollm2", help="bundled name, local HF dir, .gguf file or hub id"),
    kv: str = typer.Option("fp16", help="KV method spec for every request, e.g. kivi:bits=2"),
    wa: Optional[str] = typer.Option(None, help="weight/activation spec (lowbit.wa), e.g. fmpq:w=4,a=8"),
    kv_budget_mb: float = typer.Option(512.0, help="KV-cache bytes admission may reserve, in MiB"),
    port: int = typer.Option(8000, help="TCP port"),
    host: str = typer.Option("127.0.0.1", help="interface to bind (loopback by default)"),
    api_key: Optional[str] = typer.Option(None, envvar=API_KEY_ENV, help="require 'Authorization: Bearer KEY' (all but /health)"),
    max_queue: int = typer.Option(64, help="requests that may wait for admission; more get 429"),
    max_batch: int = typer.Option(32, help="most sequences decoded together"),
):
    """Serve an OpenAI-compatible API (completions, chat, SSE streaming) with continuous batching over compressed KV caches."""
    try:
        serve(model, kv, wa, kv_budget_mb, port, host, api_key, max_queue, max_batch)
    except SpecError as exc:
        _fail(str(exc))
    except FileNotFoundError as exc:  # ModelNotFoundError
        _fail(str(exc))


def bench_serve_main(
    model: str = "smollm2",
    kv: list[str] | None = None,
    wa: str | None = None,
    kv_budget_mb: float = 16.0,
    clients: int = 8,
    requests: int = 24,
    prompt_tokens: int = 256,
    max_tokens: int = 32,
    max_batch: int = 32,
    time_limit_s: float = 600.0,
    json_out: Path | None = None,
):
    """Run the serving benchmark and print the table (and write JSON); returns the results."""
    from rich.console import Console

    from lowbit.serve.bench import bench_serve, results_table, to_json

    kv = list(kv or ["fp16", "kivi:bits=2"])
    _check(kv, kv_budget_mb, 0, max_batch)
    err = Console(stderr=True)
    results = bench_serve(model=model, kv=kv, wa=wa, kv_budget_mb=kv_budget_mb, clients=clients, requests=requests,
                          prompt_tokens=prompt_tokens, max_tokens=max_tokens, max_batch=max_batch,
                          time_limit_s=time_limit_s, log=lambda s: err.print(s, markup=False))
    out = Console()
    if not out.is_terminal:
        out = Console(width=160)
    out.print(results_table(results))
    if json_out:
        meta = {"model": model, "wa": wa, "kv_budget_mb": kv_budget_mb, "clients": clients, "requests": requests,
                "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "max_batch": max_batch}
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(to_json(results, meta))
        err.print(f"wrote {json_out}")
    return results


def bench_serve_command(
    model: str = typer.Option("smollm2", help="bundled name, local HF dir, .gguf file or hub id"),
    kv: list[str] = typer.Option(["fp16", "kivi:bits=2"], help="KV methods to compare (repeat the option)"),
    wa: Optional[str] = typer.Option(None, help="weight/activation spec (lowbit.wa)"),
    kv_budget_mb: float = typer.Option(16.0, help="the same KV budget for every method, in MiB"),
    clients: int = typer.Option(8, min=1, help="concurrent streaming clients"),
    requests: int = typer.Option(24, min=1, help="requests in the fixed mix (each sent once)"),
    prompt_tokens: int = typer.Option(256, min=1, help="middle prompt length of the mix (x0.5, x1, x1.5)"),
    max_tokens: int = typer.Option(32, min=1, help="middle output length of the mix (x0.5, x1, x1.5)"),
    max_batch: int = typer.Option(32, min=1),
    time_limit_s: float = typer.Option(600.0, help="clients stop taking new requests after this"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the results as JSON here"),
):
    """Load-test the server on loopback: req/s, tok/s, TTFT and ITL percentiles, peak concurrency per KV method."""
    try:
        bench_serve_main(model, kv, wa, kv_budget_mb, clients, requests, prompt_tokens, max_tokens, max_batch,
                         time_limit_s, json_out)
    except SpecError as exc:
        _fail(str(exc))
    except FileNotFoundError as exc:
        _fail(str(exc))
