"""W4A8 and FMPQ-W4A4 GEMM (INT8 tensor cores) and the activation quantizer vs cuBLAS bf16 (``F.linear``)
and ``torch._int_mm``, Llama-3-8B linear shapes. Triton and CUDA are imported lazily."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from lowbit.bench.timing import Points, LINEAR_SHAPES, bench_sets, env_info, rotating, write_json

TABLE_COLUMNS = ["K", "N", "M", "w4a8_us", "fmpq_w4a4_us", "cublas_bf16_us", "int_mm_us", "w4a8_speedup", "fmpq_speedup",
                 "w4a8_total_speedup", "cublas_bf16_eager_us", "two_launch_w4a8_eager_us", "two_prepared_w4a8_us",
                 "two_prepared_w4a8_eager_us", "fused_prepared_w4a8_us", "fused_prepared_w4a8_eager_us",
                 "two_prepared_fmpq_eager_us", "fp8_prefill_us", "fp8_prefill_eager_us", "best_config"]


def gemm_candidates(bucket: str):
    """Block configs tried per M bucket; each bucket includes the previous kernel (``-noasm-i2f``) for comparison."""
    from lowbit.kernels.layout import GemmConfig as C

    return {
        # 8 warps at BN 32/64 were tried in stop 31 and won nowhere (BENCHMARKS.md); the kernel's loop is cp.async
        # pipelined at 72 registers (BN 64, 4 warps; tools/triton_offline_regs.py)
        "small": [C(16, 64, 4, 4), C(16, 128, 4, 4), C(16, 32, 4, 4), C(16, 128, 8, 4), C(16, 64, 4, 6),
                  C(16, 32, 4, 4, asm=False, fast_cvt=False)],
        "mid": [C(64, 128, 4, 4), C(128, 64, 4, 4), C(64, 128, 4, 4, 1, unpacked=True, tma=True),
                C(64, 64, 4, 4, 1, unpacked=True, tma=True), C(64, 128, 4, 4, asm=False, fast_cvt=False)],
        "large": [C(64, 128, 4, 4, 1, unpacked=True, tma=True), C(64, 128, 4, 3, 1, unpacked=True, tma=True),
                  C(64, 128, 4, 5, 1, unpacked=True, tma=True), C(64, 128, 4, 4, 1, group_m=16, unpacked=True, tma=True),
                  C(128, 64, 4, 4, 1, unpacked=True, tma=True), C(128, 128, 8, 4, 1, unpacked=True, tma=True),
                  C(64, 128, 4, 4, 1, unpacked=True), C(128, 128, 8, 4, 1), C(128, 128, 8, 4, 1, asm=False, fast_cvt=False)],
    }[bucket]


_PROBE: dict = {}


def _int8_probe_kernel():
    """The probe's Triton kernel, built once (Triton is imported lazily)."""
    if "kernel" not in _PROBE:
        import triton
        import triton.language as tl

        @triton.jit
        def kernel(A, B, C, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
            rm = tl.program_id(0) * BM + tl.arange(0, BM)
            rn = tl.program_id(1) * BN + tl.arange(0, BN)
            rk = tl.arange(0, BK)
            acc = tl.zeros((BM, BN), tl.int32)
            for k0 in range(0, K, BK):
                x = tl.load(A + (rm % M)[:, None] * K + k0 + rk[None, :])
                y = tl.load(B + (rn % N)[:, None] * K + k0 + rk[None, :])
                acc = tl.dot(x, tl.trans(y), acc=acc, out_dtype=tl.int32)
            tl.store(C + rm[:, None] * N + rn[None, :], acc.to(tl.float32).to(tl.bfloat16),
                     mask=(rm < M)[:, None] & (rn < N)[None, :])

        _PROBE["kernel"] = kernel
    return _PROBE["kernel"]


def int8_probe(a, w, bm=128, bn=128, bk=128, warps=8, stages=4):
    """Roofline probe (bench only): Triton INT8 GEMM ``a @ w.T`` with one int32 accumulator over all of K and
    no per-group scales, i.e. what the same compiler reaches without the FMPQ/W4A8 per-tile epilogue."""
    import torch
    import triton

    m, k = a.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    _int8_probe_kernel()[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        a, w, out, m, n, k, BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    return out


def bucket(m: int) -> str:
    return "small" if m <= 16 else ("mid" if m <= 512 else "large")


def _check_point(x, block: int, group: int, mask8, maskf, perm, wset, m: int, k: int, n: int):
    """Quantize `x` both ways and check the GEMM against the exact-integer reference (rows subset).

    Returns ``(c8, s8, c4, s4, act_bit_exact, rel_errs)``; raises on a GEMM mismatch.
    """
    import torch

    from lowbit.kernels.gemm import quantize_activation, w4a8_gemm
    from lowbit.kernels.reference import quantize_activation_ref, w4a8_gemm_ref

    c8, s8 = quantize_activation(x, block, mask8, 8)
    c4, s4 = quantize_activation(x, block, maskf, 4, perm=perm)
    r8 = quantize_activation_ref(x, block, mask8, 8)
    r4 = quantize_activation_ref(x, block, maskf, 4, perm=perm)
    act_exact = bool((c8 == r8[0]).all() and (s8 == r8[1]).all() and (c4 == r4[0]).all() and (s4 == r4[1]).all())
    qw, wk, ws = wset
    sub = slice(0, min(m, 64))
    errs = {}
    for label, (c, s) in (("w4a8", (c8, s8)), ("fmpq_w4a4", (c4, s4))):
        y = w4a8_gemm(c[sub], s[sub], block, wk, ws, group, out_dtype=torch.float32)
        yr = w4a8_gemm_ref(c[sub], s[sub], block, qw, ws, group)
        errs[label] = ((y - yr).norm() / yr.norm()).item()
        if not errs[label] < 1e-4:
            raise RuntimeError(f"GEMM mismatch {label} K={k} N={n} M={m}: rel err {errs[label]:.3g}")
    return c8, s8, c4, s4, act_exact, errs


def _time_configs(c8, s8, block: int, group: int, wsets, cands, log=print) -> dict:
    """``{label: (ms, config)}`` of the W4A8 GEMM for each candidate config (inf when it fails or disagrees)."""
    import torch

    from lowbit.kernels.gemm import w4a8_gemm

    qw, wk, ws = wsets[0]
    timings = {}
    y0 = w4a8_gemm(c8, s8, block, wk, ws, group, out_dtype=torch.float32)
    for cfg in dict.fromkeys(cands):
        try:
            e = ((w4a8_gemm(c8, s8, block, wk, ws, group, config=cfg, out_dtype=torch.float32) - y0).norm() / y0.norm()).item()
            if not e < 1e-5:
                raise RuntimeError(f"config disagrees with the default: rel err {e:.3g}")

            timings[cfg.label()] = (
                bench_sets(lambda st, cfg=cfg: w4a8_gemm(c8, s8, block, st[1], st[2], group, config=cfg), wsets), cfg)
        except Exception as exc:
            timings[cfg.label()] = (float("inf"), cfg)
            log(f"  config {cfg.label()} failed: {repr(exc)[:160]}")
    return timings


def _int_baselines(m: int, k: int, isets, log=print) -> tuple[float, int, float]:
    """``torch._int_mm`` ms (at max(M, 32) rows: it needs M > 16), its row count, and the INT8 probe in us (M >= 1024)."""
    import torch

    mi = max(m, 32)
    xa = torch.randint(-128, 128, (mi, k), device="cuda", dtype=torch.int8)
    try:
        int_ms = bench_sets(lambda w: torch._int_mm(xa, w.t()), isets)
    except Exception:
        int_ms = float("nan")
    probe_us = float("nan")
    if m >= 1024:
        try:
            ai = torch.randint(-128, 128, (m, k), device="cuda", dtype=torch.int8)
            ref_p = (ai[:8].float() @ isets[0][:64].float().T)
            got_p = int8_probe(ai, isets[0])[:8, :64].float()
            if ((got_p - ref_p).norm() / ref_p.norm()).item() < 1e-2:
                probe_us = bench_sets(lambda w: int8_probe(ai, w), isets) * 1e3
        except Exception as exc:
            log(f"  int8 probe failed: {repr(exc)[:160]}")
    return int_ms, mi, probe_us


def measure_point(m: int, k: int, n: int, block: int, group: int, int8_frac: float, tune: bool, w_bytes: int,
                  wsets, bsets, isets, log=print) -> dict:
    """One result row for M = `m` on the K x N shape (weights rotated through `wsets`)."""
    import torch
    import torch.nn.functional as F

    from lowbit.kernels.gemm import default_config, quantize_activation, w4a8_gemm

    nb = k // block
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 2
    mask8 = torch.ones(nb, dtype=torch.bool, device="cuda")
    maskf = torch.zeros(nb, dtype=torch.bool, device="cuda")
    maskf[: math.ceil(int8_frac * nb)] = True
    perm = torch.randperm(k, device="cuda").int()
    c8, s8, c4, s4, act_exact, errs = _check_point(x, block, group, mask8, maskf, perm, wsets[0], m, k, n)
    mask8, maskf = mask8.to(torch.int8), maskf.to(torch.int8)  # as QuantLinear caches them: no cast launch per call
    cands = [default_config(m, n, k)]
    if tune:
        cands += gemm_candidates(bucket(m))
    timings = _time_configs(c8, s8, block, group, wsets, cands, log)
    best_label = min(timings, key=lambda lab: timings[lab][0])
    best_ms, best = timings[best_label]
    default_ms = timings[cands[0].label()][0]

    fmpq_ms = bench_sets(lambda st: w4a8_gemm(c4, s4, block, st[1], st[2], group, config=best), wsets)
    aq8_ms = bench_sets(lambda st: quantize_activation(x, block, mask8, 8), [None] * 16)
    aq4_ms = bench_sets(lambda st: quantize_activation(x, block, maskf, 4, perm=perm), [None] * 16)
    bf16_ms = bench_sets(lambda w: F.linear(x, w), bsets)
    int_ms, mi, probe_us = _int_baselines(m, k, isets, log)
    fused = _fused_point(x, block, group, mask8, maskf, perm, wsets, bsets, best)
    from lowbit.wa.fp8_prefill import FP8_MIN_TOKENS

    if m >= FP8_MIN_TOKENS and torch.cuda.get_device_capability() >= (8, 9):
        try:
            fused.update(_fp8_point(x, block, group, wsets))
        except Exception as exc:  # the integer rows still count
            log(f"  FP8 prefill failed: {repr(exc)[:200]}")
    return {**fused,
        "K": k, "N": n, "M": m, "triton_int8_no_groups_us": probe_us,
        "w4a8_us": best_ms * 1e3, "w4a8_default_cfg_us": default_ms * 1e3, "fmpq_w4a4_us": fmpq_ms * 1e3,
        "actq_w4a8_us": aq8_ms * 1e3, "actq_fmpq_us": aq4_ms * 1e3,
        "cublas_bf16_us": bf16_ms * 1e3, "int_mm_us": int_ms * 1e3, "int_mm_rows": mi,
        "w4a8_speedup": bf16_ms / best_ms, "fmpq_speedup": bf16_ms / fmpq_ms,
        "w4a8_total_speedup": bf16_ms / (best_ms + aq8_ms), "fmpq_total_speedup": bf16_ms / (fmpq_ms + aq4_ms),
        "w4a8_TOPS": 2 * m * n * k / (best_ms * 1e-3) / 1e12, "bf16_TFLOPS": 2 * m * n * k / (bf16_ms * 1e-3) / 1e12,
        "w4a8_weight_GBps": w_bytes / (best_ms * 1e-3) / 1e9,
        "best_config": best.label(), "configs_us": {lab: v[0] * 1e3 for lab, v in timings.items()},
        "rel_err": errs, "act_quant_bit_exact": act_exact,
    }


def _fused_point(x, block: int, group: int, mask8, maskf, perm, wsets, bsets, cfg) -> dict:
    """The W4Ax linear as a user calls it, each path timed eager (launches included) and under a CUDA graph, all with
    the activation quantizer: ``two_launch`` (quantizer, then the GEMM at the tuned config), and in the decode bucket
    what a QuantLinear layer calls, its prepared launches (one PreparedLinear per weight set, as one per layer):
    ``two_prepared`` (the layer's default: quantizer, then GEMM; the one-launch CUDA GEMV where it takes the call,
    ``*_gemv`` says so), ``fused_prepared`` (the one-launch linear), ``fused``
    (:func:`w4ax_linear` called directly); bit-exactness against the two-launch call at the same config. FMPQ runs folded (no input gather:
    ``fmpq:fold=true``, the default) and, as ``fmpq_unfolded``, with the gather."""
    import torch
    import torch.nn.functional as F

    from lowbit.kernels.gemm import linear_two_launch
    from lowbit.kernels.w4ax_fused import (
        FUSED_CONFIG,
        MAX_FUSED_M,
        PreparedLinear,
        fused_supported,
        w4ax_linear,
    )

    m = x.shape[0]
    decode, fused = m <= MAX_FUSED_M, fused_supported(m, block, group)
    out = {"cublas_bf16_eager_us": bench_sets(lambda w: F.linear(x, w), bsets, graph=False) * 1e3}
    for name, mask, bits, p in (("w4a8", mask8, 8, None), ("fmpq", maskf, 4, None), ("fmpq_unfolded", maskf, 4, perm)):
        def two(st, config=cfg, mask=mask, bits=bits, p=p):  # quantizer, then the GEMM (the point's tuned config)
            return linear_two_launch(x, block, st[1], st[2], group, int8_mask=mask, low_bits=bits, perm=p,
                                     config=config, workspace=None)

        def one(st, mask=mask, bits=bits, p=p):
            return w4ax_linear(x, block, st[1], st[2], group, int8_mask=mask, low_bits=bits, perm=p,
                               config=None)  # its own default tile (wider: see w4ax_fused.FUSED_CONFIG)

        paths = [("two_launch", two)]
        prepared = [("two_prepared", "two", None)] if decode else []  # None: the library's default config
        if fused:  # bit-exact at one config (split-K order follows the tile width): the two-launch call at that tile
            out[f"fused_{name}_bit_exact"] = bool(torch.equal(one(wsets[0]), two(wsets[0], FUSED_CONFIG)))
            paths.append(("fused", one))
            prepared.append(("fused_prepared", "fused", FUSED_CONFIG))
        for label, launches, config in prepared:
            layers = {id(st): PreparedLinear(block, st[1], st[2], group, int8_mask=mask, low_bits=bits, perm=p,
                                             launches=launches) for st in wsets}
            paths.append((label, lambda st, ls=layers: ls[id(st)](x)))
            paths[-1][1](wsets[0])  # the first call records the launches, the second relaunches them
            out[f"{label}_{name}_bit_exact"] = bool(torch.equal(paths[-1][1](wsets[0]), two(wsets[0], config)))
            if launches == "two":  # the layer's default path: at M <= $LOWBIT_W4AX_GEMV the CUDA GEMV takes the call
                out[f"{label}_{name}_gemv"] = bool(layers[id(wsets[0])]._gemv) and m <= layers[id(wsets[0])].gemv_m
        for label, fn in paths:
            out[f"{label}_{name}_us"] = bench_sets(fn, wsets) * 1e3
            out[f"{label}_{name}_eager_us"] = bench_sets(fn, wsets, graph=False) * 1e3
            out[f"{label}_{name}_eager_speedup"] = out["cublas_bf16_eager_us"] / out[f"{label}_{name}_eager_us"]
    return out


def _fp8_point(x, block: int, group: int, wsets) -> dict:
    """The opt-in FP8 prefill (:mod:`lowbit.wa.fp8_prefill`) as a layer calls it at prefill: per-token e4m3
    activations, the weight converted from the stored layout to a transient e4m3 (one launch), one FP8 GEMM with
    row-wise scales. Graph and eager, and its error against the float32 reference of the same e4m3 operands."""
    import torch

    from lowbit.kernels.fp8_weight import fp8_activation, fp8_weight
    from lowbit.kernels.gemm import unpack_weight_int8
    from lowbit.wa import fp8_prefill

    tile = min(block, group)
    factors = {id(st): fp8_prefill.weight_factors(st[2], 4, True) for st in wsets}  # cached per layer

    def call(st):
        f, r = factors[id(st)]
        x8, sx = fp8_activation(x)
        w8 = fp8_weight(st[1], f, None, group, tile)
        return torch._scaled_mm(x8, w8.t(), scale_a=sx[:, None], scale_b=r[None, :], out_dtype=torch.bfloat16)

    st = wsets[0]
    f, r = factors[id(st)]
    x8, sx = fp8_prefill.fp8_activation(x)  # the PyTorch reference of both conversions
    w8 = fp8_prefill.fp8_weight_ref(unpack_weight_int8(st[1], tile, group).to(torch.int16), f, group)
    ref = fp8_prefill.fp8_matmul_ref(x8, sx, w8, r)
    err = ((call(st).float() - ref).norm() / ref.norm()).item()
    return {"fp8_prefill_us": bench_sets(call, wsets) * 1e3, "fp8_prefill_eager_us": bench_sets(call, wsets, graph=False) * 1e3,
            "fp8_prefill_rel_err": err}


def method_rows(row: dict) -> list[dict]:
    """The point's per-method rows (issue 14's format): m, n, k, method, graph and eager times with the activation
    quantizer included, and their ratios to cuBLAS bf16 timed the same way."""
    out = []
    for name, method in (("w4a8", "w4a8"), ("fmpq", "fmpq_w4a4"), ("fmpq_unfolded", "fmpq_w4a4_unfolded")):
        for label, suffix in (("two_launch", ""), ("two_prepared", "_two_prepared"), ("fused", "_fused"),
                              ("fused_prepared", "_fused_prepared")):
            if f"{label}_{name}_us" not in row:
                continue
            g, e = row[f"{label}_{name}_us"], row[f"{label}_{name}_eager_us"]
            out.append({"m": row["M"], "n": row["N"], "k": row["K"], "method": method + suffix, "graph_us": g,
                        "eager_us": e, "graph_speedup": row["cublas_bf16_us"] / g,
                        "eager_speedup": row["cublas_bf16_eager_us"] / e,
                        "bit_exact_vs_two_launch": row.get(f"{label}_{name}_bit_exact") if label != "two_launch" else None,
                        "gemv": row.get(f"{label}_{name}_gemv", False)})
    if "fp8_prefill_us" in row:  # the opt-in FP8 prefill (not the integer function: e4m3 operands)
        g, e = row["fp8_prefill_us"], row["fp8_prefill_eager_us"]
        out.append({"m": row["M"], "n": row["N"], "k": row["K"], "method": "fp8_prefill", "graph_us": g, "eager_us": e,
                    "graph_speedup": row["cublas_bf16_us"] / g, "eager_speedup": row["cublas_bf16_eager_us"] / e,
                    "bit_exact_vs_two_launch": None})
    return out


def _weight_sets(k: int, n: int, group: int, tile: int, w_bytes: int):
    """Rotating (packed INT4 weights, kernel layout, scales), bf16 and int8 weight sets for one K x N shape."""
    import torch

    from lowbit.kernels.gemm import repack_weight

    def make_w():
        qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        ws = (torch.rand(n, k // group, device="cuda") * 0.02 + 0.001).half()
        return qw, repack_weight(qw, tile), ws

    wsets, next_w = rotating(make_w, w_bytes, max_sets=16)
    bsets, next_b = rotating(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16), n * k * 2, max_sets=8)
    isets, next_i = rotating(lambda: torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8), n * k, max_sets=8)
    return wsets, bsets, isets


def run_gemm(ms: list[int], shapes: Optional[list[tuple[int, int]]] = None, block: int = 128, group: int = 128,
             int8_frac: float = 0.1, tune: bool = True, json_out: Optional[Path] = None, log=print, points=None) -> dict:
    """Time every (shape, M) point (default shapes: Llama-3-8B); returns the JSON payload.

    A failing point becomes an ``"error"`` row. Rows are written to `json_out` as they come
    (``"partial": True``); the caller writes the final payload.
    """
    import torch

    env = env_info()
    log(f"{env['device']}")
    tile = min(block, group)
    torch.manual_seed(0)
    rows = []
    points = points or Points()
    points.start(len(shapes or LINEAR_SHAPES) * len(ms))
    for k, n in shapes or LINEAR_SHAPES:
        w_bytes = n * k // 2 + n * (k // group) * 2
        wsets, bsets, isets = _weight_sets(k, n, group, tile, w_bytes)
        for m in ms:
            try:
                row = measure_point(m, k, n, block, group, int8_frac, tune, w_bytes, wsets, bsets, isets, log)
                rows.append(row)
                write_json(json_out, {"env": env, "partial": True, "rows": rows})
                log(f"K={k:5d} N={n:5d} M={m:4d}: W4A8 {row['w4a8_us']:8.1f} us ({row['best_config']}), "
                    f"FMPQ {row['fmpq_w4a4_us']:8.1f} us, bf16 {row['cublas_bf16_us']:8.1f} us, "
                    f"int_mm {row['int_mm_us']:8.1f} us  x{row['w4a8_speedup']:4.2f} / x{row['fmpq_speedup']:4.2f}")
            except Exception as exc:  # report the failing point and go on with the others
                log(f"K={k} N={n} M={m}: FAILED {repr(exc)[:300]}")
                rows.append({"K": k, "N": n, "M": m, "error": repr(exc)[:300]})
            points.advance()
        del wsets, bsets, isets
        torch.cuda.empty_cache()
    methods = [r for row in rows if "error" not in row for r in method_rows(row)]
    return {"env": env, "block": block, "group": group, "int8_frac": int8_frac, "rows": rows, "methods": methods}
