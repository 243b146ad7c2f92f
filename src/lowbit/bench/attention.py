"""KIVI decode attention (Triton, packed cache) vs torch SDPA on bf16 KV, Llama-3-8B heads.

The SDPA baseline is the fastest of the backends that accept the case, GQA via ``enable_gqa`` or
pre-expanded heads. Triton and CUDA are imported lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lowbit.bench.timing import Points, HEAD_DIM, HKV, HQ, bench_sets, copy_bandwidth, env_info, rotating, write_json

ATTN_CONFIGS = [  # (block_n, num_warps, num_stages, programs per SM, prefetch); the first is the first version's best
    (64, 4, 2, 8, False), (32, 2, 2, 16, False), (32, 2, 2, 16, True), (32, 2, 2, 24, True), (64, 4, 2, 8, True),
    (16, 1, 2, 32, True), (16, 1, 2, 48, True), (16, 1, 2, 64, True), (32, 2, 3, 16, True), (16, 2, 2, 24, True),
]
TABLE_COLUMNS = ["batch", "context", "bits", "kivi_us", "sdpa_bf16_us", "speedup", "kivi_GBps", "kivi_pct_copy_bw", "baseline"]


def random_kivi_parts(b: int, t: int, bits: int, group: int = 32, residual: int = 128, hkv: int = HKV, d: int = HEAD_DIM,
                      sinks: int = 0, device="cuda", dtype=None):
    """Random KIVI cache parts for `t` tokens as a KiviLayer holds them after decoding (uniform codes)."""
    import torch

    from lowbit.quant.kivi import KiviParts

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
        bits=bits, group=group,
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


def sdpa_baseline(b: int, t: int, check_against=None):
    """Fastest torch SDPA variant on bf16 KV of the same shape: returns (ms, label, bytes, {label: ms})."""
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

    sets, nxt = rotating(make, kv_bytes, min_sets=2, max_sets=4)
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
                ms = bench_sets(call, fn_sets, graph=name != "math")
                results.append((ms, f"{name}/{mode}"))
                if mode == "expanded":
                    del fn_sets
            except Exception:  # backend refuses the case
                continue
    del sets
    torch.cuda.empty_cache()
    best = min(results)
    return best[0], best[1], kv_bytes, {label: ms for ms, label in results}


def attn_opts(cfg, sm: int) -> dict:
    bn, nw, ns, pps, pf = cfg
    return dict(block_n=bn, num_warps=nw, num_stages=ns, target_programs=pps * sm, prefetch=pf)


def check_kivi(parts, q, **opts) -> float:
    """Relative error of the kernel against the PyTorch reference; raises when it is not below 2e-2."""
    from lowbit.kernels.kivi_attention import kivi_decode_attention_parts
    from lowbit.kernels.reference import decode_attention_ref

    out = kivi_decode_attention_parts(q, parts, **opts).transpose(1, 2).float()
    ref = decode_attention_ref(q, parts)
    err = ((out - ref).norm() / ref.norm()).item()
    if not err < 2e-2:
        raise RuntimeError(f"KIVI attention mismatch: rel err {err:.3g}")
    return err


def _query(b: int):
    import torch

    return torch.randn(b, HQ, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)


def sweep_configs(nb: int, group: int, residual: int, sm: int, sweep: list, log=print):
    """Time every ATTN_CONFIGS entry for KIVI-`nb` at batch 8 / context 32K (rows appended to `sweep`);
    returns the fastest config, or None when none ran."""
    import torch

    from lowbit.kernels.kivi_attention import kivi_decode_attention_parts

    b, t = 8, 32768
    parts = random_kivi_parts(b, t, nb, group, residual)
    q = _query(b)
    best = None
    for cfg in ATTN_CONFIGS:
        opts = attn_opts(cfg, sm)
        try:
            err = check_kivi(random_kivi_parts(2, 4096 + 77, nb, group, residual), _query(2), **opts)
            ms = bench_sets(lambda st: kivi_decode_attention_parts(st[0], st[1], **opts), [(q, parts)])
        except Exception as exc:  # a config that fails to compile or verify is skipped, and said so
            sweep.append({"bits": nb, "config": list(cfg), "error": repr(exc)[:200]})
            continue
        sweep.append({"bits": nb, "config": list(cfg), "ms": ms, "rel_err": err})
        log(f"  sweep KIVI-{nb} B8 T32K {cfg}: {ms * 1e3:.1f} us")
        if best is None or ms < best[0]:
            best = (ms, cfg)
    del parts
    torch.cuda.empty_cache()
    return best[1] if best else None


def measure_point(b: int, t: int, nb: int, cfg, sm: int, group: int, residual: int, bw: float, baseline) -> dict:
    """One result row: KIVI-`nb` at batch `b` / context `t` with `cfg`, beside `baseline` (sdpa_baseline's result)."""
    import torch

    from lowbit.kernels.kivi_attention import kivi_decode_attention_parts

    base_ms, base_label, kv_bytes, all_base = baseline
    opts = attn_opts(cfg, sm)
    probe = random_kivi_parts(b, t, nb, group, residual)
    nbytes = parts_nbytes(probe) + b * HQ * HEAD_DIM * 2 * 2
    q0 = _query(b)
    err = check_kivi(probe, q0, **opts) if b * t <= 8 * 32768 else float("nan")
    del probe
    sets, nxt = rotating(lambda: (_query(b), random_kivi_parts(b, t, nb, group, residual)), nbytes, max_sets=8)
    ms = bench_sets(lambda st: kivi_decode_attention_parts(st[0], st[1], **opts), sets)
    del sets
    torch.cuda.empty_cache()
    return {
        "batch": b, "context": t, "bits": nb, "kivi_us": ms * 1e3, "sdpa_bf16_us": base_ms * 1e3,
        "speedup": base_ms / ms, "kivi_GBps": nbytes / (ms * 1e-3) / 1e9,
        "kivi_pct_copy_bw": 100 * nbytes / (ms * 1e-3) / 1e9 / bw,
        "sdpa_GBps": kv_bytes / (base_ms * 1e-3) / 1e9, "kivi_bytes": nbytes, "bf16_kv_bytes": kv_bytes,
        "rel_err": err, "baseline": base_label, "baselines_us": {k: v * 1e3 for k, v in all_base.items()},
        "config": list(cfg),
    }


def run_attention(contexts: list[int], batches: list[int], bits: list[int], group: int = 32, residual: int = 128,
                  tune: bool = True, max_kv_gb: float = 20.0, json_out: Optional[Path] = None, log=print, points=None) -> dict:
    """Sweep configs (with `tune`), then time every (context, batch, bits) point; returns the JSON payload.

    Rows are written to `json_out` as they come (``"partial": True``); the caller writes the final payload.
    """
    import torch

    env = env_info()
    bw = copy_bandwidth()
    log(f"{env['device']}: copy bandwidth {bw:.0f} GB/s (read + write)")
    sm = env["sms"]
    torch.manual_seed(0)
    best_cfg, sweep = {}, []
    points = points or Points()
    fits = [(t, b) for t in contexts for b in batches if 2 * b * HKV * t * HEAD_DIM * 2 <= max_kv_gb * 1e9]
    points.start(len(fits) * len(bits))
    for nb in bits:
        best_cfg[nb] = ATTN_CONFIGS[0]
        if tune:
            best_cfg[nb] = sweep_configs(nb, group, residual, sm, sweep, log) or best_cfg[nb]
    rows = []
    for t in contexts:
        for b in batches:
            kv_bytes = 2 * b * HKV * t * HEAD_DIM * 2
            if kv_bytes > max_kv_gb * 1e9:
                continue
            baseline = sdpa_baseline(b, t)
            for nb in bits:
                row = measure_point(b, t, nb, best_cfg[nb], sm, group, residual, bw, baseline)
                rows.append(row)
                write_json(json_out, {"env": env, "copy_GBps": bw, "partial": True, "sweep": sweep, "rows": rows})
                log(f"B={b:3d} T={t:6d} KIVI-{nb}: {row['kivi_us']:8.1f} us  SDPA({row['baseline']}) {row['sdpa_bf16_us']:8.1f} us  "
                    f"x{row['speedup']:5.2f}  {row['kivi_GBps']:.0f} GB/s ({row['kivi_pct_copy_bw']:.0f}% of copy)")
                points.advance()
    return {"env": env, "copy_GBps": bw, "group": group, "residual": residual,
            "heads": [HQ, HKV, HEAD_DIM], "sweep": sweep, "best_config": {str(k): v for k, v in best_cfg.items()},
            "rows": rows}
