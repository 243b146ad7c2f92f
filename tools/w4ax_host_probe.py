"""Where an eager W4Ax call's time goes on this host (GPU): per shape, the Python time to issue calls back to back,
their wall time until the GPU is done, CUDA events around each synced call, the bench's eager (do_bench) and graph
timings, for the layer's prepared launch, the fused one-launch linear, the two-launch path and cuBLAS bf16; the GPU ops one call launches; and a
cProfile of the fused call's Python.

    python tools/w4ax_host_probe.py [--profile-calls 1000]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch
import torch.nn.functional as F

from lowbit.bench.timing import bench_sets, per_call_ms
from lowbit.kernels import gemm, w4ax_fused
from lowbit.kernels.layout import repack_weight

SHAPES = ((1, 6144, 4096), (1, 4096, 4096), (1, 28672, 4096), (1, 4096, 14336), (16, 4096, 14336))


def calls_for(m: int, n: int, k: int) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    qw = repack_weight(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8), 128).cuda()
    ws = (torch.rand(n, k // 128) * 0.05 + 0.001).half().cuda()
    mask = (torch.rand(k // 128) < 0.1).to(torch.int8).cuda()
    perm = torch.randperm(k).int().cuda()
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    # what a QuantLinear calls (folded FMPQ: no gather): its prepared launches, two (the default) or fused
    two_prepared = w4ax_fused.PreparedLinear(128, qw, ws, 128, int8_mask=mask, launches="two")
    prepared = w4ax_fused.PreparedLinear(128, qw, ws, 128, int8_mask=mask)
    return {
        "two_prepared": lambda: two_prepared(x),
        "prepared": lambda: prepared(x),
        "fused": lambda: w4ax_fused.w4ax_linear(x, 128, qw, ws, 128, int8_mask=mask, perm=perm),
        "fused_noperm": lambda: w4ax_fused.w4ax_linear(x, 128, qw, ws, 128, int8_mask=mask),
        "two": lambda: gemm.w4a8_gemm(*gemm.quantize_activation(x, 128, mask, 4, perm=perm, padded_in=k), 128, qw, ws,
                                      128),
        "cublas": lambda: F.linear(x, w),
    }


def host_us(fn, calls: int = 300, repeats: int = 5) -> tuple[float, float]:
    """(Python µs per call issued back to back, wall µs per call until the GPU is done), medians."""
    host, wall = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host.append((t1 - t0) / calls * 1e6)
        wall.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(host), statistics.median(wall)


def main(profile_calls: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    for m, n, k in SHAPES:
        calls = calls_for(m, n, k)
        for name, fn in calls.items():
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            host, wall = host_us(fn)
            synced = per_call_ms(fn, 200) * 1e3
            eager = bench_sets(lambda _: fn(), [0], graph=False) * 1e3
            graph = bench_sets(lambda _: fn(), [0], graph=True) * 1e3
            print(f"M={m:2d} {n}x{k} {name:12s}: host {host:6.1f} us/call, back-to-back {wall:6.1f}, per-call synced "
                  f"{synced:6.1f}, do_bench eager {eager:6.1f}, graph {graph:6.1f}", flush=True)
        if (m, n, k) == SHAPES[0]:
            for name in ("fused", "two", "cublas"):
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        calls[name]()
                    torch.cuda.synchronize()
                ops = [e for e in prof.events() if e.device_type.name == "CUDA"]
                print(f"  {name}: {len(ops) / 3:.1f} GPU ops per call: {sorted({e.name[:60] for e in ops})}", flush=True)
    fn = calls_for(1, 4096, 4096)["fused"]
    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(profile_calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile-calls", type=int, default=1000)
    main(ap.parse_args().profile_calls)
