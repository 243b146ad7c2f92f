"""``lowbit bench``: time the Triton kernels beside their baselines, measured in the same run.

* ``attention``: KIVI-2/4 decode attention vs torch SDPA on bf16 KV (the fastest of the SDPA
  backends that accept the case, GQA via ``enable_gqa`` or pre-expanded heads), Llama-3-8B heads.
* ``gemm``: W4A8 and FMPQ-W4A4 GEMM (and the activation quantizer) vs cuBLAS bf16 (``F.linear``)
  and ``torch._int_mm``, Llama-3-8B linear shapes.
* ``e2e``: decode tokens/s of a randomly initialised Llama-3-8B-shaped model (optionally fewer
  layers): HF bf16 DynamicCache vs lowbit KIVI-2/4 through the kernels (and W4A8 linears).

Every timing is ``triton.testing.do_bench``'s median (warm-up first), inputs are fresh random
tensors rotated across enough copies to exceed the L2 cache, and each kernel is checked against
its PyTorch reference before it is timed.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Benchmark the lowbit GPU kernels against PyTorch baselines.", no_args_is_help=True)

HQ, HKV, HEAD_DIM = 32, 8, 128  # Llama-3-8B attention
LINEAR_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # (K, N): qkv, o, gate+up, down
ROTATE_BYTES = 256 << 20  # rotate inputs across >= 256 MiB (H100 L2 is 50 MB)


def _env() -> dict:
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


def _bench(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of `fn` (triton.testing.do_bench, CUDA events)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _bench_sets(call, sets, graph: bool = True) -> float:
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
            ms = _bench(g.replay) / len(sets)
            del g
            return ms
        except Exception:  # not capturable: time eager launches instead
            torch.cuda.synchronize()
    it = {"i": 0}

    def timed():
        it["i"] = (it["i"] + 1) % len(sets)
        return call(sets[it["i"]])

    return _bench(timed)


def _rotating(make, bytes_per_set: int, min_sets: int = 2, max_sets: int = 32):
    """`n` input sets (``make()`` each) so that together they exceed the L2 cache; returns (sets, next)."""
    n = max(min_sets, min(max_sets, math.ceil(ROTATE_BYTES / max(bytes_per_set, 1))))
    sets = [make() for _ in range(n)]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % n
        return sets[state["i"]]

    return sets, nxt


def _copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), 2 GiB buffer."""
    import torch

    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = _bench(lambda: b.copy_(a))
    del a, b
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def _write_json(path: Optional[Path], payload: dict, quiet: bool = False) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1))
        if not quiet:
            typer.echo(f"wrote {path}")


def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    for r in rows:
        lines.append("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- attention


def random_kivi_parts(b: int, t: int, bits: int, group: int = 32, residual: int = 128, hkv: int = HKV, d: int = HEAD_DIM,
                      sinks: int = 0, device="cuda", dtype=None):
    """Random KIVI cache parts for `t` tokens as a KiviLayer holds them after decoding (uniform codes)."""
    import torch

    from lowbit.kernels.reference import KiviParts

    dtype = dtype or torch.bfloat16
    rest = t - sinks
    n_res_k = min(rest, residual // 2 + 3)  # keys: between 0 and R-1 in the residual
    n_qk = rest - n_res_k
    n_qk -= n_qk % group
    n_res_k = rest - n_qk
    n_res_v = min(rest, residual)
    n_qv = rest - n_res_v
    per = 8 // bits
    f16 = torch.float16

    def scales(*shape):
        return (torch.rand(*shape, device=device) * 0.05 + 0.01).to(f16)

    def zeros(*shape):
        return (torch.randn(*shape, device=device) * 0.5).to(f16)

    def rnd(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    u8 = dict(dtype=torch.uint8, device=device)
    return KiviParts(
        bits=bits, group_size=group,
        sink_k=rnd(b, hkv, sinks, d) if sinks else None, sink_v=rnd(b, hkv, sinks, d) if sinks else None,
        qk_packed=torch.randint(0, 256, (b, hkv, n_qk // per, d), **u8) if n_qk else None,
        qk_scale=scales(b, hkv, n_qk // group, d) if n_qk else None,
        qk_zero=zeros(b, hkv, n_qk // group, d) if n_qk else None, n_qk=n_qk,
        qv_packed=torch.randint(0, 256, (b, hkv, n_qv, d // per), **u8) if n_qv else None,
        qv_scale=scales(b, hkv, n_qv, d // group) if n_qv else None,
        qv_zero=zeros(b, hkv, n_qv, d // group) if n_qv else None, n_qv=n_qv,
        res_k=rnd(b, hkv, n_res_k, d) if n_res_k else None, res_v=rnd(b, hkv, n_res_v, d) if n_res_v else None,
    )


def parts_nbytes(parts) -> int:
    names = ("sink_k", "sink_v", "qk_packed", "qk_scale", "qk_zero", "qv_packed", "qv_scale", "qv_zero", "res_k", "res_v")
    return sum(getattr(parts, n).numel() * getattr(parts, n).element_size() for n in names if getattr(parts, n) is not None)


def _sdpa_baseline(b: int, t: int, check_against=None):
    """Fastest torch SDPA variant on bf16 KV of the same shape: returns (ms, label, bytes)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kv_bytes = 2 * b * HKV * t * HEAD_DIM * 2

    def make():
        return (
            torch.randn(b, HQ, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16),
            torch.randn(b, HKV, t, HEAD_DIM, device="cuda", dtype=torch.bfloat16),
            torch.randn(b, HKV, t, HEAD_DIM, device="cuda", dtype=torch.bfloat16),
        )

    sets, nxt = _rotating(make, kv_bytes, min_sets=2, max_sets=4)
    results = []
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)]
    for name, be in backends:
        for mode in ("gqa", "expanded"):
            if mode == "expanded" and kv_bytes * 4 * len(sets) > 24e9:
                continue
            try:
                if mode == "gqa":
                    fn_sets = sets

                    def call(s, be=be):
                        with sdpa_kernel([be]):
                            return F.scaled_dot_product_attention(s[0], s[1], s[2], enable_gqa=True)
                else:
                    fn_sets = [(q, k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)) for q, k, v in sets]

                    def call(s, be=be):
                        with sdpa_kernel([be]):
                            return F.scaled_dot_product_attention(s[0], s[1], s[2])

                call(fn_sets[0])
                torch.cuda.synchronize()
                if name == "math" and kv_bytes > 2e9:
                    continue
                ms = _bench_sets(call, fn_sets, graph=name != "math")
                results.append((ms, f"{name}/{mode}"))
                if mode == "expanded":
                    del fn_sets
            except Exception:  # backend refuses the case
                continue
    del sets
    torch.cuda.empty_cache()
    best = min(results)
    return best[0], best[1], kv_bytes, {label: ms for ms, label in results}


ATTN_CONFIGS = [  # (block_n, num_warps, num_stages, programs per SM, prefetch); the first is the first version's best
    (64, 4, 2, 8, False), (32, 2, 2, 16, False), (32, 2, 2, 16, True), (32, 2, 2, 24, True), (64, 4, 2, 8, True),
    (16, 1, 2, 32, True), (16, 1, 2, 48, True), (16, 1, 2, 64, True), (32, 2, 3, 16, True), (16, 2, 2, 24, True),
]


def _attn_opts(cfg, sm: int) -> dict:
    bn, nw, ns, pps, pf = cfg
    return dict(block_n=bn, num_warps=nw, num_stages=ns, target_programs=pps * sm, prefetch=pf)


@app.command()
def attention(
    json_out: Optional[Path] = typer.Option(None, "--json", help="write all results here"),
    contexts: str = typer.Option("4096,16384,32768,131072", help="comma-separated context lengths"),
    batches: str = typer.Option("1,8,32", help="comma-separated batch sizes"),
    bits: str = typer.Option("2,4", help="KIVI bit-widths"),
    group_size: int = typer.Option(32),
    residual: int = typer.Option(128),
    tune: bool = typer.Option(True, help="sweep kernel configs at batch 8 / context 32K first"),
    max_kv_gb: float = typer.Option(20.0, help="skip points whose bf16 KV exceeds this many GB"),
):
    """KIVI decode attention (Triton, packed cache) vs torch SDPA on bf16 KV; Llama-3-8B heads."""
    import torch

    from lowbit.kernels.kivi_attention import kivi_decode_attention_parts
    from lowbit.kernels.reference import decode_attention_ref

    env = _env()
    bw = _copy_bandwidth()
    typer.echo(f"{env['device']}: copy bandwidth {bw:.0f} GB/s (read + write)")
    ctxs = [int(c) for c in contexts.split(",")]
    bs = [int(b) for b in batches.split(",")]
    bit_list = [int(b) for b in bits.split(",")]
    sm = env["sms"]
    torch.manual_seed(0)

    def check(parts, q, **opts):
        out = kivi_decode_attention_parts(q, parts, **opts).transpose(1, 2).float()
        ref = decode_attention_ref(q, parts)
        err = ((out - ref).norm() / ref.norm()).item()
        if not err < 2e-2:
            raise RuntimeError(f"KIVI attention mismatch: rel err {err:.3g}")
        return err

    # ---- config sweep at the headline point
    best_cfg = {}
    sweep = []
    for nb in bit_list:
        best_cfg[nb] = ATTN_CONFIGS[0]
        if not tune:
            continue
        b, t = 8, 32768
        parts = random_kivi_parts(b, t, nb, group_size, residual)
        q = torch.randn(b, HQ, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        best = None
        for cfg in ATTN_CONFIGS:
            opts = _attn_opts(cfg, sm)
            try:
                err = check(random_kivi_parts(2, 4096 + 77, nb, group_size, residual), torch.randn(2, HQ, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16), **opts)
                ms = _bench_sets(lambda st: kivi_decode_attention_parts(st[0], st[1], **opts), [(q, parts)])
            except Exception as exc:  # a config that fails to compile or verify is skipped, and said so
                sweep.append({"bits": nb, "config": list(cfg), "error": repr(exc)[:200]})
                continue
            sweep.append({"bits": nb, "config": list(cfg), "ms": ms, "rel_err": err})
            typer.echo(f"  sweep KIVI-{nb} B8 T32K {cfg}: {ms * 1e3:.1f} us")
            if best is None or ms < best[0]:
                best = (ms, cfg)
        if best:
            best_cfg[nb] = best[1]
        del parts
        torch.cuda.empty_cache()

    rows = []
    for t in ctxs:
        for b in bs:
            kv_bytes = 2 * b * HKV * t * HEAD_DIM * 2
            if kv_bytes > max_kv_gb * 1e9:
                continue
            base_ms, base_label, _, all_base = _sdpa_baseline(b, t)
            for nb in bit_list:
                opts = _attn_opts(best_cfg[nb], sm)
                probe = random_kivi_parts(b, t, nb, group_size, residual)
                nbytes = parts_nbytes(probe) + b * HQ * HEAD_DIM * 2 * 2
                q0 = torch.randn(b, HQ, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                err = check(probe, q0, **opts) if b * t <= 8 * 32768 else float("nan")
                del probe
                sets, nxt = _rotating(
                    lambda: (torch.randn(b, HQ, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16),
                             random_kivi_parts(b, t, nb, group_size, residual)), nbytes, max_sets=8)
                ms = _bench_sets(lambda st: kivi_decode_attention_parts(st[0], st[1], **opts), sets)
                del sets
                torch.cuda.empty_cache()
                row = {
                    "batch": b, "context": t, "bits": nb, "kivi_us": ms * 1e3, "sdpa_bf16_us": base_ms * 1e3,
                    "speedup": base_ms / ms, "kivi_GBps": nbytes / (ms * 1e-3) / 1e9,
                    "kivi_pct_copy_bw": 100 * nbytes / (ms * 1e-3) / 1e9 / bw,
                    "sdpa_GBps": kv_bytes / (base_ms * 1e-3) / 1e9, "kivi_bytes": nbytes, "bf16_kv_bytes": kv_bytes,
                    "rel_err": err, "baseline": base_label, "baselines_us": {k: v * 1e3 for k, v in all_base.items()},
                    "config": list(best_cfg[nb]),
                }
                rows.append(row)
                _write_json(json_out, {"env": env, "copy_GBps": bw, "partial": True, "sweep": sweep, "rows": rows}, quiet=True)
                typer.echo(f"B={b:3d} T={t:6d} KIVI-{nb}: {ms * 1e3:8.1f} us  SDPA({base_label}) {base_ms * 1e3:8.1f} us  "
                           f"x{base_ms / ms:5.2f}  {row['kivi_GBps']:.0f} GB/s ({row['kivi_pct_copy_bw']:.0f}% of copy)")
    typer.echo(_table(rows, ["batch", "context", "bits", "kivi_us", "sdpa_bf16_us", "speedup", "kivi_GBps", "kivi_pct_copy_bw", "baseline"]))
    _write_json(json_out, {"env": env, "copy_GBps": bw, "group_size": group_size, "residual": residual,
                           "heads": [HQ, HKV, HEAD_DIM], "sweep": sweep, "best_config": {str(k): v for k, v in best_cfg.items()},
                           "rows": rows})


# ------------------------------------------------------------------------------------------ GEMM


def _gemm_candidates(bucket: str):
    """Block configs tried per M bucket; each bucket includes the previous kernel (``-noasm-i2f``) for comparison."""
    from lowbit.kernels.layout import GemmConfig as C

    return {
        "small": [C(16, 64, 4, 4), C(16, 128, 4, 4), C(16, 32, 4, 4), C(16, 128, 8, 4), C(16, 64, 4, 6),
                  C(16, 32, 4, 4, asm=False, fast_cvt=False), C(16, 128, 4, 4, asm=False, fast_cvt=False)],
        "mid": [C(64, 128, 4, 4), C(128, 64, 4, 4), C(64, 128, 4, 4, 1, unpacked=True, tma=True),
                C(64, 64, 4, 4, 1, unpacked=True, tma=True), C(64, 128, 4, 4, asm=False, fast_cvt=False)],
        "large": [C(64, 128, 4, 4, 1, unpacked=True, tma=True), C(64, 128, 4, 3, 1, unpacked=True, tma=True),
                  C(64, 128, 4, 5, 1, unpacked=True, tma=True), C(64, 128, 4, 4, 1, group_m=16, unpacked=True, tma=True),
                  C(128, 64, 4, 4, 1, unpacked=True, tma=True), C(128, 128, 8, 4, 1, unpacked=True, tma=True),
                  C(64, 128, 4, 4, 1, unpacked=True), C(128, 128, 8, 4, 1), C(128, 128, 8, 4, 1, asm=False, fast_cvt=False)],
    }[bucket]


_PROBE: dict = {}


def _int8_probe_kernel():
    """The probe's Triton kernel, built once (bench.py imports Triton lazily)."""
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


def _int8_probe(a, w, bm=128, bn=128, bk=128, warps=8, stages=4):
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


def _bucket(m: int) -> str:
    return "small" if m <= 16 else ("mid" if m <= 512 else "large")


@app.command()
def gemm(
    json_out: Optional[Path] = typer.Option(None, "--json", help="write all results here"),
    ms_list: str = typer.Option("1,16,256,4096", "--m", help="comma-separated token counts M"),
    shapes: str = typer.Option("", help="K x N list like 4096x6144,14336x4096 (default: Llama-3-8B)"),
    block: int = typer.Option(128),
    group: int = typer.Option(128),
    int8_frac: float = typer.Option(0.1, help="FMPQ W4A4: fraction of INT8 activation blocks"),
    tune: bool = typer.Option(True, help="try a few block configs per point and keep the fastest"),
):
    """W4A8 / FMPQ-W4A4 GEMM (INT8 tensor cores) vs cuBLAS bf16 and torch._int_mm; Llama-3-8B shapes."""
    import torch
    import torch.nn.functional as F

    from lowbit.kernels.gemm import GemmConfig, default_config, quantize_activation, repack_weight, w4a8_gemm
    from lowbit.kernels.reference import quantize_activation_ref, w4a8_gemm_ref

    env = _env()
    typer.echo(f"{env['device']}")
    shape_list = [tuple(int(v) for v in s.split("x")) for s in shapes.split(",")] if shapes else LINEAR_SHAPES
    m_list = [int(m) for m in ms_list.split(",")]
    tile = min(block, group)
    torch.manual_seed(0)
    rows = []
    for k, n in shape_list:
        nb = k // block
        w_bytes = n * k // 2 + n * (k // group) * 2

        def make_w():
            qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
            ws = (torch.rand(n, k // group, device="cuda") * 0.02 + 0.001).half()
            return qw, repack_weight(qw, tile), ws

        wsets, next_w = _rotating(make_w, w_bytes, max_sets=16)
        bsets, next_b = _rotating(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16), n * k * 2, max_sets=8)
        isets, next_i = _rotating(lambda: torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8), n * k, max_sets=8)
        for m in m_list:
            try:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 2
                mask8 = torch.ones(nb, dtype=torch.bool, device="cuda")
                maskf = torch.zeros(nb, dtype=torch.bool, device="cuda")
                maskf[: math.ceil(int8_frac * nb)] = True
                perm = torch.randperm(k, device="cuda").int()
                # correctness: activation quantizer bit-exact, GEMM vs exact-integer reference (rows subset)
                c8, s8 = quantize_activation(x, block, mask8, 8)
                c4, s4 = quantize_activation(x, block, maskf, 4, perm=perm)
                r8 = quantize_activation_ref(x, block, mask8, 8)
                r4 = quantize_activation_ref(x, block, maskf, 4, perm=perm)
                act_exact = bool((c8 == r8[0]).all() and (s8 == r8[1]).all() and (c4 == r4[0]).all() and (s4 == r4[1]).all())
                qw, wk, ws = wsets[0]
                sub = slice(0, min(m, 64))
                errs = {}
                for label, (c, s) in (("w4a8", (c8, s8)), ("fmpq_w4a4", (c4, s4))):
                    y = w4a8_gemm(c[sub], s[sub], block, wk, ws, group, out_dtype=torch.float32)
                    yr = w4a8_gemm_ref(c[sub], s[sub], block, qw, ws, group)
                    errs[label] = ((y - yr).norm() / yr.norm()).item()
                    if not errs[label] < 1e-4:
                        raise RuntimeError(f"GEMM mismatch {label} K={k} N={n} M={m}: rel err {errs[label]:.3g}")
                # configs
                cands = [default_config(m, n, k)]
                if tune:
                    cands += _gemm_candidates(_bucket(m))
                timings = {}
                y0 = w4a8_gemm(c8, s8, block, wk, ws, group, out_dtype=torch.float32)
                for cfg in dict.fromkeys(cands):
                    try:
                        e = ((w4a8_gemm(c8, s8, block, wk, ws, group, config=cfg, out_dtype=torch.float32) - y0).norm() / y0.norm()).item()
                        if not e < 1e-5:
                            raise RuntimeError(f"config disagrees with the default: rel err {e:.3g}")

                        timings[cfg.label()] = (
                            _bench_sets(lambda st, cfg=cfg: w4a8_gemm(c8, s8, block, st[1], st[2], group, config=cfg), wsets), cfg)
                    except Exception as exc:
                        timings[cfg.label()] = (float("inf"), cfg)
                        typer.echo(f"  config {cfg.label()} failed: {repr(exc)[:160]}")
                best_label = min(timings, key=lambda lab: timings[lab][0])
                best_ms, best = timings[best_label]
                default_ms = timings[cands[0].label()][0]

                fmpq_ms = _bench_sets(lambda st: w4a8_gemm(c4, s4, block, st[1], st[2], group, config=best), wsets)
                aq8_ms = _bench_sets(lambda st: quantize_activation(x, block, mask8, 8), [None])
                aq4_ms = _bench_sets(lambda st: quantize_activation(x, block, maskf, 4, perm=perm), [None])
                bf16_ms = _bench_sets(lambda w: F.linear(x, w), bsets)
                # torch._int_mm needs M > 16: time it at max(M, 32) rows
                mi = max(m, 32)
                xa = torch.randint(-128, 128, (mi, k), device="cuda", dtype=torch.int8)
                try:
                    int_ms = _bench_sets(lambda w: torch._int_mm(xa, w.t()), isets)
                except Exception:
                    int_ms = float("nan")
                probe_us = float("nan")
                if m >= 1024:
                    try:
                        ai = torch.randint(-128, 128, (m, k), device="cuda", dtype=torch.int8)
                        ref_p = (ai[:8].float() @ isets[0][:64].float().T)
                        got_p = _int8_probe(ai, isets[0])[:8, :64].float()
                        if ((got_p - ref_p).norm() / ref_p.norm()).item() < 1e-2:
                            probe_us = _bench_sets(lambda w: _int8_probe(ai, w), isets) * 1e3
                    except Exception as exc:
                        typer.echo(f"  int8 probe failed: {repr(exc)[:160]}")
                row = {
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
                rows.append(row)
                _write_json(json_out, {"env": env, "partial": True, "rows": rows}, quiet=True)
                typer.echo(f"K={k:5d} N={n:5d} M={m:4d}: W4A8 {best_ms * 1e3:8.1f} us ({best.label()}), FMPQ {fmpq_ms * 1e3:8.1f} us, "
                           f"bf16 {bf16_ms * 1e3:8.1f} us, int_mm {int_ms * 1e3:8.1f} us  x{bf16_ms / best_ms:4.2f} / x{bf16_ms / fmpq_ms:4.2f}")
            except Exception as exc:  # report the failing point and go on with the others
                typer.echo(f"K={k} N={n} M={m}: FAILED {repr(exc)[:300]}")
                rows.append({"K": k, "N": n, "M": m, "error": repr(exc)[:300]})
        del wsets, bsets, isets
        torch.cuda.empty_cache()
    typer.echo(_table(rows, ["K", "N", "M", "w4a8_us", "fmpq_w4a4_us", "cublas_bf16_us", "int_mm_us", "w4a8_speedup", "fmpq_speedup",
                             "w4a8_total_speedup", "best_config"]))
    _write_json(json_out, {"env": env, "block": block, "group": group, "int8_frac": int8_frac, "rows": rows})


# ------------------------------------------------------------------------------------------- e2e


def _llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=HEAD_DIM, max_position_embeddings=131072,
        rope_theta=500000.0, torch_dtype="bfloat16",
    )


def _fill_dynamic(cache, cfg, b: int, t: int):
    import torch

    for i in range(cfg.num_hidden_layers):
        k = torch.randn(b, HKV, t, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, HKV, t, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        cache.update(k, v, i)


def _fill_kivi(cache, b: int, t: int, steps: int):
    """Set every FusedKiviLayer to a random decoded state of `t` tokens, with room for `steps` more."""
    import torch

    for layer in cache.layers:
        parts = random_kivi_parts(b, t, layer.bits, layer.group_size, layer.residual_length)
        k0 = torch.zeros(b, HKV, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        layer.lazy_initialization(k0, k0)
        for name in ("qk_packed", "qk_scale", "qk_zero", "qv_packed", "qv_scale", "qv_zero", "res_k", "res_v"):
            setattr(layer, name, getattr(parts, name))
        layer.n_qk, layer.n_qv = parts.n_qk, parts.n_qv
        layer.reserve(t + steps + layer.residual_length)
        del parts


def _decode_tps(model, cache, b: int, t: int, steps: int) -> float:
    import torch

    tok = torch.randint(0, 1000, (b, 1), device="cuda")
    with torch.no_grad():
        for i in range(2):  # warm-up (compiles kernels)
            model(tok, past_key_values=cache, use_cache=True, position_ids=torch.full((b, 1), t + i, device="cuda"))
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(steps):
            model(tok, past_key_values=cache, use_cache=True, position_ids=torch.full((b, 1), t + 2 + i, device="cuda"),
                  logits_to_keep=1)
        end.record()
        torch.cuda.synchronize()
    return b * steps / (start.elapsed_time(end) * 1e-3)


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
):
    """Decode tokens/s of a random-weight Llama-3-8B-shaped model: HF bf16 DynamicCache vs KIVI kernels and W4Ax."""
    import gc

    import torch
    from transformers import DynamicCache, LlamaForCausalLM

    from lowbit.kernels.integration import FusedKiviCache, use_kivi_kernels

    env = _env()
    cfg = _llama_config(layers)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    model.config._attn_implementation = "sdpa"
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    typer.echo(f"model: {layers} layers, {weights / 1e9:.1f} GB bf16 weights")
    per_tok_bf16 = layers * 2 * HKV * HEAD_DIM * 2

    def per_seq_bytes(kind: str) -> float:
        if kind == "bf16":
            return per_tok_bf16 * context
        nb = int(kind[-1])
        per_tok = layers * HKV * (2 * HEAD_DIM * nb / 8 + 2 * 2 * HEAD_DIM / 32 + 2 * 2 * HEAD_DIM / 32)
        return per_tok * context + layers * 2 * HKV * HEAD_DIM * 2 * 2 * 128

    wa_specs = {"w4a8kv4": "fmpq:w=4,a=8", "fmpq4kv4": "fmpq:w=4,a=4,int8_frac=0.1"}
    wa_models: dict = {}

    def model_for(kind: str):
        """The bf16 model, or (built once, the previous one freed) a copy with QuantLinear layers (int mode:
        the Triton activation quantizer + W4A8 GEMM on CUDA). Channel statistics are random, as the weights are."""
        if kind not in wa_specs:
            return model
        if kind not in wa_models:
            import copy

            from lowbit.wa.model import quantize_model, select_linears

            wa_models.clear()
            gc.collect()
            torch.cuda.empty_cache()
            qm = copy.deepcopy(model)
            names = select_linears(qm)
            stats = {n: torch.rand(qm.get_submodule(n).in_features, device="cuda") + 0.1 for n in names}
            quantize_model(qm, wa_specs[kind], mode="int", stats=stats)
            wa_models[kind] = qm
        return wa_models[kind]

    def run(kind: str, b: int):
        gc.collect()
        torch.cuda.empty_cache()
        m = model_for(kind)
        if kind == "bf16":
            model.config._attn_implementation = "sdpa"
            try:
                cache = DynamicCache(config=model.config)
            except TypeError:
                cache = DynamicCache()
            _fill_dynamic(cache, cfg, b, context)
        else:
            use_kivi_kernels(m)
            cache = FusedKiviCache(m.config, bits=int(kind[-1]))
            _fill_kivi(cache, b, context, steps + 4)
        tps = _decode_tps(m, cache, b, context, steps)
        peak = torch.cuda.max_memory_allocated() / 1e9
        del cache
        return tps, peak

    rows = []
    kinds = [m.strip() for m in methods.split(",") if m.strip()]
    free_total = torch.cuda.mem_get_info()[1]

    def record(kind: str, b: int, label: str | None = None) -> bool:
        """Run one point; False (and stop) on anything but a clean out-of-memory."""
        try:
            torch.cuda.reset_peak_memory_stats()
            tps, peak = run(kind, b)
        except torch.cuda.OutOfMemoryError:
            typer.echo(f"{label or kind} B={b}: out of memory")
            gc.collect()
            torch.cuda.empty_cache()
            return True
        except Exception as exc:  # a CUDA error poisons the context: report and stop measuring
            typer.echo(f"{label or kind} B={b}: FAILED {repr(exc)[:300]}")
            rows.append({"method": label or kind, "batch": b, "context": context, "layers": layers, "error": repr(exc)[:300]})
            return False
        rows.append({"method": label or kind, "batch": b, "context": context, "layers": layers, "tokens_per_s": tps,
                     "peak_GB": peak, "max_batch_row": b != batch})
        typer.echo(f"{label or kind:10s} B={b:4d} T={context}: {tps:9.1f} tok/s  peak {peak:.1f} GB")
        _write_json(json_out, {"env": env, "rows": rows, "partial": True}, quiet=True)
        return True

    ok = all(record(kind, batch) for kind in kinds)
    if ok and max_batch:
        for kind in kinds:
            budget = free_total * 0.85 - weights - 8e9
            b = max(batch, int(budget / per_seq_bytes(kind)))
            if not record(kind, b):
                ok = False
                break
    typer.echo(_table(rows, ["method", "batch", "context", "layers", "tokens_per_s", "peak_GB"]))
    _write_json(json_out, {"env": env, "rows": rows, "weights_GB": weights / 1e9})


if __name__ == "__main__":
    app()
