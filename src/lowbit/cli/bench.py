"""``lowbit bench``: option parsing and output for the benchmarks of :mod:`lowbit.bench`."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from lowbit.bench.timing import format_table, write_json
from lowbit.cli.common import QUIET_HELP, _fail_plain, _quiet, _steps
from lowbit.cli.progress import BenchPoints
from lowbit.spec import SpecError

app = typer.Typer(help="Benchmark the lowbit GPU kernels against PyTorch baselines.", no_args_is_help=True)


def _finish(payload: dict, columns: list[str], json_out: Optional[Path]) -> None:
    """Print the rows as a table and write the final JSON."""
    typer.echo(format_table(payload["rows"], columns))
    if write_json(json_out, payload):
        typer.echo(f"wrote {json_out}")


@contextmanager
def _points(label: str, quiet: bool) -> Iterator[BenchPoints]:
    """Progress of one benchmark run (its ``points`` and ``log``)."""
    _quiet(quiet)
    with _steps(unit="points") as steps:
        yield BenchPoints(steps, label)


QUIET = typer.Option(False, "--quiet", "-q", help=QUIET_HELP)


@app.command()
def attention(
    json_out: Optional[Path] = typer.Option(None, "--json", help="write all results here"),
    contexts: str = typer.Option("32768,131072", help="comma-separated context lengths"),
    batches: str = typer.Option("1,8,32", help="comma-separated batch sizes"),
    bits: str = typer.Option("2,4", help="KIVI bit-widths"),
    triton: bool = typer.Option(True, help="also time the contiguous Triton kernel (the previous default)"),
    max_kv_gb: float = typer.Option(20.0, help="skip points whose bf16 KV exceeds this many GB"),
    variants: str = typer.Option("", help="also time these kernel variants (comma-separated: fold, dequant)"),
    quiet: bool = QUIET,
):
    """Paged KIVI decode attention (CUDA, tensor cores) vs cuDNN/flash SDPA on bf16 KV, CUDA-graph and eager timings."""
    from lowbit.bench.paged import TABLE_COLUMNS, run_paged

    with _points("bench attention", quiet) as p:
        payload = run_paged([int(c) for c in contexts.split(",")], [int(b) for b in batches.split(",")],
                            [int(b) for b in bits.split(",")], triton, max_kv_gb, json_out=json_out, log=p.log,
                            variants=tuple(v for v in variants.split(",") if v), points=p)
    _finish(payload, TABLE_COLUMNS, json_out)


@app.command("attention-triton")
def attention_triton(
    json_out: Optional[Path] = typer.Option(None, "--json", help="write all results here"),
    contexts: str = typer.Option("4096,16384,32768,131072", help="comma-separated context lengths"),
    batches: str = typer.Option("1,8,32", help="comma-separated batch sizes"),
    bits: str = typer.Option("2,4", help="KIVI bit-widths"),
    group: int = typer.Option(32, help="KIVI group (tokens per key scale, channels per value scale)"),
    residual: int = typer.Option(128),
    tune: bool = typer.Option(True, help="sweep kernel configs at batch 8 / context 32K first"),
    max_kv_gb: float = typer.Option(20.0, help="skip points whose bf16 KV exceeds this many GB"),
    quiet: bool = QUIET,
):
    """The contiguous Triton KIVI decode kernel (config sweep) vs torch SDPA on bf16 KV; Llama-3-8B heads."""
    from lowbit.bench.attention import TABLE_COLUMNS, run_attention

    with _points("bench attention-triton", quiet) as p:
        payload = run_attention([int(c) for c in contexts.split(",")], [int(b) for b in batches.split(",")],
                                [int(b) for b in bits.split(",")], group, residual, tune, max_kv_gb,
                                json_out=json_out, log=p.log, points=p)
    _finish(payload, TABLE_COLUMNS, json_out)


@app.command()
def gemm(
    json_out: Optional[Path] = typer.Option(None, "--json", help="write all results here"),
    ms_list: str = typer.Option("1,16,256,4096", "--m", help="comma-separated token counts M"),
    shapes: str = typer.Option("", help="K x N list like 4096x6144,14336x4096 (default: Llama-3-8B)"),
    block: int = typer.Option(128),
    group: int = typer.Option(128),
    int8_frac: float = typer.Option(0.1, help="FMPQ W4A4: fraction of INT8 activation blocks"),
    tune: bool = typer.Option(True, help="try a few block configs per point and keep the fastest"),
    quiet: bool = QUIET,
):
    """W4A8 / FMPQ-W4A4 GEMM (INT8 tensor cores) vs cuBLAS bf16 and torch._int_mm; Llama-3-8B shapes."""
    from lowbit.bench.gemm import TABLE_COLUMNS, run_gemm

    shape_list = [tuple(int(v) for v in s.split("x")) for s in shapes.split(",")] if shapes else None
    with _points("bench gemm", quiet) as p:
        payload = run_gemm([int(m) for m in ms_list.split(",")], shape_list, block, group, int8_frac, tune,
                           json_out=json_out, log=p.log, points=p)
    _finish(payload, TABLE_COLUMNS, json_out)


@app.command()
def e2e(
    json_out: Optional[Path] = typer.Option(None, "--json", help="write all results here"),
    layers: int = typer.Option(8, help="decoder layers (Llama-3-8B has 32; 8 keeps the run short)"),
    batch: int = typer.Option(16),
    context: int = typer.Option(16384),
    steps: int = typer.Option(16, help="timed decode steps"),
    max_batch: bool = typer.Option(True, help="also run at the largest batch estimated to fit"),
    methods: str = typer.Option("bf16,kivi2,kivi4,w4a8kv4,fmpq4kv4",
                                help="bf16, kivi2, kivi4, w4a8kv4 (FMPQ W4A8 + KIVI-4), fmpq4kv4 (FMPQ W4A4 + KIVI-4)"),
    repeats: int = typer.Option(3, min=1, help="timed repeats per point, interleaved across methods (median kept)"),
    quiet: bool = QUIET,
):
    """Decode tokens/s of a random-weight Llama-3-8B-shaped model: HF bf16 DynamicCache vs KIVI kernels and W4Ax."""
    from lowbit.bench.e2e import TABLE_COLUMNS, run_e2e

    kinds = [m.strip() for m in methods.split(",") if m.strip()]
    with _points("bench e2e", quiet) as p:
        payload = run_e2e(kinds, layers, batch, context, steps, max_batch, json_out=json_out, log=p.log, repeats=repeats,
                          points=p)
    _finish(payload, TABLE_COLUMNS, json_out)


@app.command("engine")
def engine_command(
    json_out: Optional[Path] = typer.Option(None, "--json", help="write all results here"),
    methods: str = typer.Option("fp16,kivi4,kivi2", help="comma-separated engine KV kinds"),
    layers: int = typer.Option(32, help="decoder layers of the Llama-3-8B shape (workload)"),
    requests: int = typer.Option(64, min=0, help="workload: requests, all queued at once (0: skip the workload)"),
    prompt: int = typer.Option(8192, min=1, help="workload: prompt tokens"),
    output: int = typer.Option(256, min=1, help="workload: output tokens"),
    kv_budget_gb: float = typer.Option(16.0, help="workload: the one KV budget (GiB)"),
    max_batch: int = typer.Option(128, min=1, help="workload: engine rows"),
    decode_batch: int = typer.Option(64, min=1),
    decode_context: int = typer.Option(8192, min=1),
    decode_layers: int = typer.Option(0, help="decode comparison layers (0: as --layers)"),
    steps: int = typer.Option(30, min=3, help="decode steps per timing"),
    repeats: int = typer.Option(3, min=1),
    baseline: bool = typer.Option(True, help="time HF bf16 StaticCache + torch.compile(reduce-overhead)"),
    prefill_chunk: int = typer.Option(0, min=0, help="workload: prefill prompts in chunks of this many tokens (0: whole)"),
    quiet: bool = QUIET,
):
    """The paged engine on CUDA: a long-context workload under one KV budget, and decode steps vs HF static+compiled."""
    import torch

    from lowbit.bench.engine import DECODE_COLUMNS, WORKLOAD_COLUMNS, run_engine_bench

    if not torch.cuda.is_available():
        _fail_plain("lowbit bench engine needs a CUDA GPU (the engine's CPU path is for tests, not speed)")
    with _points("bench engine", quiet) as p:
        payload = run_engine_bench([m.strip() for m in methods.split(",") if m.strip()], layers, requests, prompt, output,
                                   kv_budget_gb, max_batch, decode_batch, decode_context, decode_layers or None, steps,
                                   repeats, baseline, json_out=json_out, log=p.log, points=p,
                                   prefill_chunk=prefill_chunk or None)
    for rows, cols in ((payload["rows"], WORKLOAD_COLUMNS), (payload["decode"], DECODE_COLUMNS)):
        if rows:
            typer.echo(format_table(rows, cols))


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
    quiet: bool = QUIET,
):
    """Load-test the server on loopback: req/s, tok/s, TTFT and ITL percentiles, peak concurrency per KV method."""
    from lowbit.bench.serve import bench_serve_main

    try:
        with _points("bench serve", quiet) as p:
            bench_serve_main(model, kv, wa, kv_budget_mb, clients, requests, prompt_tokens, max_tokens, max_batch,
                             time_limit_s, json_out, points=p)
    except SpecError as exc:
        _fail_plain(str(exc))
    except FileNotFoundError as exc:
        _fail_plain(str(exc))


app.command("serve", help="Bounded loopback load test of `lowbit serve`, one row per KV method.")(bench_serve_command)


@app.command("soak")
def soak_command(
    requests: int = typer.Option(200, min=1, help="requests to send (drawn, seeded, from the categories)"),
    concurrency: int = typer.Option(8, min=1, help="client threads sending at once"),
    model: str = typer.Option("smollm2", help="bundled name, local HF dir, .gguf file or hub id"),
    kv: str = typer.Option("kivi:bits=2", help="KV method spec served"),
    kv_budget_mb: float = typer.Option(64.0, help="the server's KV budget, in MiB"),
    max_tokens: int = typer.Option(8, min=1, help="max_tokens of the valid requests"),
    seed: int = typer.Option(0, help="seeds the request mix"),
    timeout_s: float = typer.Option(120.0, help="per-request timeout; a request past it counts as hung"),
    rss_tolerance_mb: float = typer.Option(64.0, help="largest RSS growth from warm-up to the end that passes"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON here"),
):
    """Bounded loopback soak of `lowbit serve` under mixed, partly hostile traffic; exit 1 when a check fails."""
    from lowbit.bench.soak import soak_main

    try:
        report = soak_main(model, kv, kv_budget_mb, requests, concurrency, max_tokens, seed, timeout_s,
                           rss_tolerance_mb, json_out)
    except (SpecError, FileNotFoundError) as exc:
        _fail_plain(str(exc))
    if not report.passed:
        raise typer.Exit(code=1)
