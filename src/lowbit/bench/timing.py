"""Shared benchmark helpers: environment, CUDA-event timing, rotating inputs, copy bandwidth, JSON and tables."""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
from pathlib import Path
from typing import Optional

HQ, HKV, HEAD_DIM = 32, 8, 128  # Llama-3-8B attention
LINEAR_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # (K, N): qkv, o, gate+up, down
ROTATE_BYTES = 256 << 20  # rotate inputs across >= 256 MiB (H100 L2 is 50 MB)


class Points:
    """A benchmark's progress: :meth:`start` once the number of points is known, :meth:`advance` after each.
    This one does nothing; ``lowbit bench`` passes one that draws a bar (:func:`lowbit.cli.progress.bench_points`)."""

    def start(self, total: int) -> None:
        pass

    def advance(self) -> None:
        pass


def env_info() -> dict:
    """Device, versions and date of this run."""
    import torch
    import triton

    dev = torch.cuda.get_device_properties(0)
    return {
        "device": dev.name,
        "sms": dev.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }


def bench(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of `fn` (triton.testing.do_bench, CUDA events)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def per_call_ms(fn, calls: int) -> float:
    """Median ms of `fn()` over `calls` calls, each between two CUDA events and synced (launch gaps included)."""
    import statistics

    import torch

    times = []
    for _ in range(calls):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def bench_sets(call, sets, graph: bool = True) -> float:
    """Median milliseconds of one ``call(set)``, cycling through `sets` (so the L2 cache cannot serve repeats).

    With `graph`, one CUDA graph launches ``call`` on every set in turn and its replay time is divided by
    the number of sets: kernel time without Python/launch overhead, for the kernel and its baseline alike
    (as when decoding under CUDA graphs). Falls back to timing eager calls if capture fails.
    """
    import torch

    for st in sets:
        call(st)
    torch.cuda.synchronize()
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for st in sets:
                    call(st)
            g.replay()
            torch.cuda.synchronize()
            ms = bench(g.replay) / len(sets)
            del g
            return ms
        except Exception:  # not capturable: time eager launches instead
            torch.cuda.synchronize()
    it = {"i": 0}

    def timed():
        it["i"] = (it["i"] + 1) % len(sets)
        return call(sets[it["i"]])

    return bench(timed)


def rotating(make, bytes_per_set: int, min_sets: int = 2, max_sets: int = 32):
    """`n` input sets (``make()`` each) so that together they exceed the L2 cache; returns (sets, next)."""
    n = max(min_sets, min(max_sets, math.ceil(ROTATE_BYTES / max(bytes_per_set, 1))))
    sets = [make() for _ in range(n)]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % n
        return sets[state["i"]]

    return sets, nxt


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), 2 GiB buffer."""
    import torch

    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    del a, b
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def write_json(path: Optional[Path], payload: dict) -> bool:
    """Write `payload` to `path` (parents created) when a path is given; returns whether it wrote."""
    if not path:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    return True


def format_table(rows: list[dict], cols: list[str]) -> str:
    """A plain-text table of `cols` from `rows` (floats to 4 significant digits)."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    for r in rows:
        lines.append("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))
    return "\n".join(lines)
