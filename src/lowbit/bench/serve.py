"""``lowbit bench serve``: a bounded load generator against the server, one run per KV method.

For each ``--kv`` method the bench starts the server in-process on 127.0.0.1 (a free port), with the
same model, ``--kv-budget-mb`` and batch limits, and runs ``clients`` concurrent streaming clients
over a fixed request mix of ``requests`` completions (prompts are WikiText token windows of three
lengths, outputs of three lengths, greedy, ``ignore_eos`` so every method generates the same number
of tokens). Clients stop taking work after ``time_limit_s``; every request is bounded by its
``max_tokens``. It reports requests/s, output tokens/s, p50/p99 time-to-first-token and inter-token
latency (measured by the client), and the peak number of sequences the engine ran at once.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from lowbit.bench.timing import Points

MIX_PROMPT = (1.0, 0.5, 1.5)  # x prompt_tokens
MIX_OUTPUT = (1.0, 1.5, 0.5)  # x max_tokens


@dataclass
class BenchResult:
    kv: str
    kv_budget_mb: float
    clients: int
    requests_ok: int
    errors: int
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_s: float
    itl_p99_s: float
    peak_running: int
    mean_reserved_mb: float
    max_admissible: int  # budget // reservation of the mean request
    decode_batch_mean: float
    error_samples: list[str] = field(default_factory=list)


def request_mix(tokenizer, n: int, prompt_tokens: int, max_tokens: int) -> list[tuple[list[int], int]]:
    """The fixed mix: (prompt token ids, max_tokens) for request i, deterministic."""
    from lowbit.eval import DEFAULT_TEXT, load_tokens

    longest = int(prompt_tokens * max(MIX_PROMPT))
    ids = load_tokens(tokenizer, DEFAULT_TEXT, longest + 64 * n).reshape(-1).tolist()
    mix = []
    for i in range(n):
        p = max(1, int(prompt_tokens * MIX_PROMPT[i % 3]))
        o = max(1, int(max_tokens * MIX_OUTPUT[i % 3]))
        start = 64 * i
        mix.append((ids[start : start + p], o))
    return mix


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _one_request(url: str, model: str, prompt: list[int], max_tokens: int, timeout: float, api_key: str | None) -> dict:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True, "stream_options": {"include_usage": True}})
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    t0 = time.perf_counter()
    times: list[float] = []
    tokens = 0
    try:
        conn.request("POST", "/v1/completions", body=body, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            return {"ok": False, "error": f"HTTP {resp.status}: {resp.read()[:200]!r}"}
        while True:
            line = resp.readline()
            if not line:
                return {"ok": False, "error": "stream ended without [DONE]"}
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                break
            ev = json.loads(data)
            if "error" in ev:
                return {"ok": False, "error": ev["error"]["message"]}
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
            if ev.get("choices") and ev["choices"][0].get("text"):
                times.append(time.perf_counter())
    except OSError as exc:
        return {"ok": False, "error": repr(exc)}
    finally:
        conn.close()
    return {"ok": True, "t0": t0, "times": times, "tokens": tokens, "end": time.perf_counter()}


def run_load(url: str, model: str, mix: list[tuple[list[int], int]], clients: int, time_limit_s: float,
             api_key: str | None = None, request_timeout: float = 600.0) -> tuple[list[dict], float]:
    """Drive `clients` threads over `mix` (each item once); returns per-request records and wall time."""
    lock = threading.Lock()
    next_i = [0]
    records: list[dict] = []
    start = time.perf_counter()
    deadline = start + time_limit_s

    def worker():
        while True:
            with lock:
                i = next_i[0]
                if i >= len(mix) or time.perf_counter() > deadline:
                    return
                next_i[0] += 1
            rec = _one_request(url, model, mix[i][0], mix[i][1], request_timeout, api_key)
            with lock:
                records.append(rec)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=time_limit_s + request_timeout)
    return records, time.perf_counter() - start


def summarize(kv: str, budget_mb: float, clients: int, records: list[dict], wall: float, metrics: dict,
              mean_reserved: float) -> BenchResult:
    ok = [r for r in records if r["ok"]]
    ttft = [r["times"][0] - r["t0"] for r in ok if r["times"]]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(r["tokens"] for r in ok)
    steps = metrics.get("lowbit_decode_steps_total", 0.0)
    return BenchResult(
        kv=kv, kv_budget_mb=budget_mb, clients=clients, requests_ok=len(ok), errors=len(records) - len(ok),
        wall_s=round(wall, 2), requests_per_s=round(len(ok) / wall, 4), output_tokens_per_s=round(tokens / wall, 2),
        ttft_p50_s=round(_percentile(ttft, 50), 3), ttft_p99_s=round(_percentile(ttft, 99), 3),
        itl_p50_s=round(_percentile(itl, 50), 4), itl_p99_s=round(_percentile(itl, 99), 4),
        peak_running=int(metrics.get("lowbit_running_sequences_peak", 0)),
        mean_reserved_mb=round(mean_reserved / (1 << 20), 3),
        max_admissible=int(budget_mb * (1 << 20) // max(1, mean_reserved)),
        decode_batch_mean=round(metrics.get("lowbit_decode_step_sequences_total", 0.0) / steps, 2) if steps else 0.0,
        error_samples=[r["error"] for r in records if not r["ok"]][:3],
    )


def bench_serve(
    model: str = "smollm2",
    kv: list[str] | tuple[str, ...] = ("fp16", "kivi:bits=2"),
    wa: str | None = None,
    kv_budget_mb: float = 16.0,
    clients: int = 8,
    requests: int = 24,
    prompt_tokens: int = 256,
    max_tokens: int = 32,
    max_batch: int = 32,
    max_queue: int = 256,
    time_limit_s: float = 600.0,
    loaded=None,
    log=print,
    points=None,
) -> list[BenchResult]:
    """Run the load once per KV method against an in-process server on loopback; see the module docstring."""
    from lowbit.serve.api import create_app
    from lowbit.serve.launch import load_for_serving
    from lowbit.serve.engine import Engine
    from lowbit.serve.metrics import parse_exposition
    from lowbit.serve.server import BackgroundServer

    m, tok = loaded if loaded is not None else load_for_serving(model, wa)
    mix = request_mix(tok, requests, prompt_tokens, max_tokens)
    results = []
    points = points or Points()
    points.start(len(kv))
    for spec in kv:
        engine = Engine(m, tok, kv=spec, kv_budget_mb=kv_budget_mb, max_batch=max_batch, max_queue=max_queue, model_name=model)
        reserved = [engine.reserve_for(len(p), o) for p, o in mix]
        mean_reserved = sum(reserved) / len(reserved)
        log(f"[{spec}] {len(mix)} requests, {clients} clients, budget {kv_budget_mb} MB, "
            f"mean reservation {mean_reserved / (1 << 20):.2f} MB")
        with BackgroundServer(create_app(engine)) as srv:
            records, wall = run_load(srv.url, model, mix, clients, time_limit_s)
            metrics = parse_exposition(http_get(srv.url + "/metrics"))
        res = summarize(spec, kv_budget_mb, clients, records, wall, metrics, mean_reserved)
        log(f"[{spec}] {res.requests_ok} ok, {res.errors} errors in {res.wall_s} s: {res.output_tokens_per_s} tok/s, "
            f"peak {res.peak_running} running")
        results.append(res)
        points.advance()
    return results


def http_get(url: str, timeout: float = 30.0) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def results_table(results: list[BenchResult]):
    from rich.table import Table

    t = Table(title="lowbit bench serve (client-side latencies)")
    for col in ("kv", "budget MB", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
                "peak seqs", "resv MB/req", "ok/err"):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(r.kv, f"{r.kv_budget_mb:g}", f"{r.requests_per_s:.3f}", f"{r.output_tokens_per_s:.1f}",
                  f"{r.ttft_p50_s:.2f}s", f"{r.ttft_p99_s:.2f}s", f"{r.itl_p50_s * 1000:.0f}ms",
                  f"{r.itl_p99_s * 1000:.0f}ms", str(r.peak_running), f"{r.mean_reserved_mb:.2f}",
                  f"{r.requests_ok}/{r.errors}")
    return t


def to_json(results: list[BenchResult], meta: dict) -> str:
    return json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2)


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
    points=None,
):
    """Run the serving benchmark and print the table (and write JSON); returns the results."""
    from rich.console import Console

    from lowbit.serve.launch import check_limits

    kv = list(kv or ["fp16", "kivi:bits=2"])
    check_limits(kv, kv_budget_mb, 0, max_batch)
    err = Console(stderr=True)
    results = bench_serve(model=model, kv=kv, wa=wa, kv_budget_mb=kv_budget_mb, clients=clients, requests=requests,
                          prompt_tokens=prompt_tokens, max_tokens=max_tokens, max_batch=max_batch,
                          time_limit_s=time_limit_s, log=points.log if getattr(points, "live", False) else (lambda s: err.print(s, markup=False)),
                          points=points)
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
