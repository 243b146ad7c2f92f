"""``lowbit bench soak``: a bounded loopback soak of the server under mixed, partly hostile traffic.

It starts the server in-process on 127.0.0.1 (a free port, an API key), computes the greedy reference
outputs one request at a time, then sends `requests` requests from `concurrency` threads, each drawn
(seeded) from :data:`CATEGORIES`: valid completions and chat, streaming and not, through the real
``openai`` client; and over raw HTTP invalid JSON, wrong types, bad ranges, unsupported parameters, lone
surrogates, unknown models, over-context and over-budget prompts, bad keys, wrong paths and methods, a
400 then a 200 on one kept-alive connection, clients dropping mid-stream and mid-body, and an induced
model fault (a forward hook raises on a sentinel prompt, standing for CUDA out of memory: that request
gets a 500 with ``Connection: close``, every other one is served). Every request has a timeout.

Checks (:attr:`SoakReport.checks`): every category answered as expected; no 5xx but the induced ones;
nothing hung; KV bytes in use and reserved, running and queued back to 0; no request object left alive;
RSS after the run within `rss_tolerance_mb` of RSS after warm-up; every greedy output equal to its
one-at-a-time reference.
"""

from __future__ import annotations

import gc
import json
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from lowbit.bench.soak_cases import CATEGORIES, FAULT, PROMPTS, Outcome, Soak, run_one


@dataclass
class SoakReport:
    rows: list[dict]
    checks: dict[str, dict]
    requests: int
    concurrency: int
    wall_s: float
    meta: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c["ok"] for c in self.checks.values())


def rss_bytes() -> int | None:
    """This process's resident set size (Linux /proc, else psutil when installed, else None)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except ImportError:
            return None


def _fault_hook(sentinel: list[int]):
    """A forward pre-hook raising on a prefill whose input holds `sentinel` (the induced model fault)."""
    pattern = ",".join(map(str, sentinel))

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] >= len(sentinel) and pattern in ",".join(map(str, ids[0].tolist())):
            raise RuntimeError(FAULT)

    return hook


def _wait_drained(url_metrics: Callable[[], dict], timeout: float) -> dict:
    keys = ("lowbit_queue_depth", "lowbit_running_sequences", "lowbit_kv_bytes_in_use", "lowbit_kv_bytes_reserved")
    deadline = time.monotonic() + timeout
    while True:
        m = url_metrics()
        final = {k.removeprefix("lowbit_"): m.get(k, -1) for k in keys}
        if all(v == 0 for v in final.values()) or time.monotonic() > deadline:
            return final
        time.sleep(0.1)


def _live_requests() -> int:
    from lowbit.serve.request import Request

    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Request)  # type(): no __class__ lookups (deprecation shims)


def run_soak(model, tokenizer, kv: str = "kivi:bits=2", kv_budget_mb: float = 64.0, requests: int = 200,
             concurrency: int = 8, max_tokens: int = 8, seed: int = 0, timeout: float = 120.0,
             rss_tolerance_mb: float = 64.0, max_batch: int = 32, max_queue: int = 256, model_name: str = "smollm2",
             log: Callable[[str], None] = print) -> SoakReport:
    """Run the soak (module docstring) against an in-process server on 127.0.0.1; returns its report."""
    from lowbit.serve.api import create_app
    from lowbit.serve.engine import Engine
    from lowbit.serve.metrics import parse_exposition
    from lowbit.serve.server import BackgroundServer

    api_key = f"soak-{random.Random(seed).getrandbits(64):016x}"
    engine = Engine(model, tokenizer, kv=kv, kv_budget_mb=kv_budget_mb, max_batch=max_batch, max_queue=max_queue,
                    model_name=model_name)
    srv = BackgroundServer(create_app(engine, api_key=api_key)).start()
    s = Soak(srv, engine, api_key, max_tokens, timeout)
    handle = model.register_forward_pre_hook(_fault_hook(s.sentinel), with_kwargs=True)

    def metrics() -> dict:
        return parse_exposition(s.raw("GET", "/metrics")[2].decode())

    try:
        for kind in ("completion", "chat"):  # the one-at-a-time references
            for i in range(len(PROMPTS)):
                s.refs[(kind, i)] = s.greedy(kind, i, stream=False)
        log(f"soak: {requests} requests, {concurrency} clients, kv={kv}, budget {kv_budget_mb:g} MB, on {srv.url}")
        rng = random.Random(seed)
        plan = rng.choices(CATEGORIES, weights=[c.weight for c in CATEGORIES], k=requests)
        seeds = [rng.getrandbits(32) for _ in plan]
        outcomes: list[Outcome] = []
        lock, nxt = threading.Lock(), [0]
        warm_at, rss = max(concurrency, requests // 5), {}

        def worker():
            while True:
                with lock:
                    i = nxt[0]
                    if i >= len(plan):
                        return
                    nxt[0] += 1
                out = run_one(s, plan[i], random.Random(seeds[i]))
                with lock:
                    outcomes.append(out)
                    if len(outcomes) == warm_at:
                        rss["warm"] = rss_bytes()
                    if len(outcomes) % max(1, requests // 10) == 0:
                        rss.setdefault("samples", []).append(rss_bytes())

        start = time.monotonic()
        threads = [threading.Thread(target=worker, name=f"soak-{k}", daemon=True) for k in range(concurrency)]
        for t in threads:
            t.start()
        deadline = start + timeout * (requests / concurrency + 2)
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        stuck = sum(t.is_alive() for t in threads)
        wall = time.monotonic() - start
        drained = _wait_drained(metrics, timeout=30.0)
        rss["end"] = rss_bytes()
        m = metrics()
        live = _live_requests()
    finally:
        handle.remove()
        srv.stop(timeout=60)
    report = _report(outcomes, requests, concurrency, wall, stuck, drained, live, rss, rss_tolerance_mb)
    report.meta = {"kv": kv, "kv_budget_mb": kv_budget_mb, "max_tokens": max_tokens, "seed": seed,
                   "rss_mb_every_tenth": [round(x / (1 << 20)) for x in rss.get("samples", []) if x],
                   "peak_running": int(m.get("lowbit_running_sequences_peak", 0)),
                   "model_faults": int(m.get("lowbit_model_faults_total", 0)),
                   "cancelled": int(m.get('lowbit_sequences_finished_total{reason="cancelled"}', 0))}
    return report


def _report(outcomes, requests, concurrency, wall, stuck, drained, live, rss, tolerance_mb) -> SoakReport:
    by = {c.name: [o for o in outcomes if o.category == c.name] for c in CATEGORIES}
    rows = []
    for c in CATEGORIES:
        outs = by[c.name]
        statuses: dict[str, int] = {}
        for o in outs:
            key = "skipped" if o.skipped else "-" if o.status is None else str(o.status)
            statuses[key] = statuses.get(key, 0) + 1
        rows.append({"category": c.name, "expected": c.expect, "sent": len(outs),
                     "statuses": " ".join(f"{k}x{v}" for k, v in sorted(statuses.items())),
                     "ok": sum(o.ok for o in outs), "failed": sum(not o.ok for o in outs),
                     "example": next((o.detail for o in outs if not o.ok), "")})
    induced = {c.name for c in CATEGORIES if c.induced}
    unexpected = [o for o in outcomes if o.status is not None and o.status >= 500 and o.category not in induced]
    greedy = [o.greedy for o in outcomes if o.greedy is not None]
    hung = sum(o.hung for o in outcomes) + stuck
    mb = 1 << 20
    growth = (rss["end"] - rss["warm"]) / mb if rss.get("warm") and rss.get("end") else None
    checks = {
        "answered as expected": {"ok": all(r["failed"] == 0 for r in rows) and len(outcomes) == requests,
                                 "value": f"{sum(r['ok'] for r in rows)}/{requests}"},
        "no 5xx but induced": {"ok": not unexpected, "value": len(unexpected)},
        "nothing hung": {"ok": hung == 0, "value": hung},
        "drained to 0": {"ok": all(v == 0 for v in drained.values()), "value": drained},
        "no request left alive": {"ok": live == 0, "value": live},
        "RSS flat after warm-up": {"ok": growth is None or growth <= tolerance_mb,
                                   "value": "n/a" if growth is None else
                                   f"{rss['warm'] / mb:.0f} -> {rss['end'] / mb:.0f} MB ({growth:+.1f}, limit {tolerance_mb:g})"},
        "greedy = one-at-a-time": {"ok": all(greedy), "value": f"{sum(greedy)}/{len(greedy)}"},
    }
    return SoakReport(rows, checks, requests, concurrency, round(wall, 1))


def format_report(report: SoakReport) -> str:
    """The categories table and the checks, as markdown."""
    lines = ["| category | expected | sent | statuses | ok | failed |", "|---|---|---|---|---|---|"]
    for r in report.rows:
        lines.append(f"| {r['category']} | {r['expected']} | {r['sent']} | {r['statuses']} | {r['ok']} | {r['failed']} |")
    lines.append("")
    for name, c in report.checks.items():
        lines.append(f"{'PASS' if c['ok'] else 'FAIL'}  {name}: {c['value']}")
    for r in report.rows:
        if r["failed"]:
            lines.append(f"  {r['category']}: e.g. {r['example']}")
    meta = report.meta
    lines.append(f"{report.requests} requests, {report.concurrency} clients in {report.wall_s} s; peak running "
                 f"{meta.get('peak_running')}, decode-step faults recovered {meta.get('model_faults')}, cancelled {meta.get('cancelled')}")
    return "\n".join(lines)


def soak_main(model: str = "smollm2", kv: str = "kivi:bits=2", kv_budget_mb: float = 64.0, requests: int = 200,
              concurrency: int = 8, max_tokens: int = 8, seed: int = 0, timeout: float = 120.0,
              rss_tolerance_mb: float = 64.0, json_out=None) -> SoakReport:
    """Load the model, run the soak, print the table and checks (and write JSON); returns the report."""
    from lowbit.serve.launch import check_limits, load_for_serving

    check_limits(kv, kv_budget_mb, 0, 1)
    try:
        import openai  # noqa: F401
    except ImportError:
        from lowbit.spec import SpecError

        raise SpecError("the soak drives the server with the `openai` client: pip install openai") from None
    m, tok = load_for_serving(model)
    report = run_soak(m, tok, kv=kv, kv_budget_mb=kv_budget_mb, requests=requests, concurrency=concurrency,
                      max_tokens=max_tokens, seed=seed, timeout=timeout, rss_tolerance_mb=rss_tolerance_mb,
                      model_name=model)
    print(format_report(report))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(asdict(report) | {"passed": report.passed}, indent=2))
    return report
