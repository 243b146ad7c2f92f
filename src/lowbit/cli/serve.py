"""``lowbit serve``: option parsing for :func:`lowbit.serve.launch.serve`."""

from __future__ import annotations

from typing import Optional

import typer

from lowbit.cli.common import _fail_plain
from lowbit.serve.launch import API_KEY_ENV, serve
from lowbit.spec import SpecError


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
    drain_timeout_s: float = typer.Option(60.0, help="on Ctrl-C/SIGTERM, seconds queued and running requests get to "
                                                     "finish before the rest is answered 503 (a second Ctrl-C: now)"),
    engine: str = typer.Option("auto", help="auto|paged|classic: paged = the paged KV engine (CUDA graphs on CUDA; "
                                            "fp16 or kivi:bits=2|4 group 32 residual 128, Llama-family); auto = paged "
                                            "on CUDA when supported, else classic"),
    prefill_chunk: int = typer.Option(0, help="paged engine: prefill prompts longer than this many tokens in chunks "
                                              "(one per step, running requests keep decoding); 0: whole prompts"),
    tensor_parallel: int = typer.Option(1, help="shard the model over N ranks (one process each, started by "
                                                "`torchrun --nproc-per-node N -m lowbit.cli serve --tensor-parallel N`)"),
):
    """Serve an OpenAI-compatible API (completions, chat, SSE streaming) with continuous batching over compressed KV caches."""
    try:
        serve(model, kv, wa, kv_budget_mb, port, host, api_key, max_queue, max_batch, drain_timeout=drain_timeout_s,
              engine=engine, tensor_parallel=tensor_parallel, prefill_chunk=prefill_chunk)
    except SpecError as exc:
        _fail_plain(str(exc))
    except FileNotFoundError as exc:  # ModelNotFoundError
        _fail_plain(str(exc))
