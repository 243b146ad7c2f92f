"""Decode attention over paged KIVI-2/4 (CUDA kernel) against cuDNN/flash SDPA on bf16 KV, both timing methods.

Every point is timed two ways, kernel and baseline alike, over input sets rotated past the L2 cache:
**graph** (one CUDA graph replays the call on every set; its time over the number of sets) and **eager**
(each call launched from Python as a user's decode loop does, with CUDA events around it, launches and
allocations included). The contiguous Triton kernel (the previous default) is timed beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lowbit.bench.timing import Points, HEAD_DIM, HKV, HQ, bench_sets, copy_bandwidth, env_info, rotating, write_json

TABLE_COLUMNS = ["batch", "context", "bits", "graph_us", "eager_us", "sdpa_graph_us", "sdpa_eager_us", "graph_speedup",
                 "eager_speedup", "pct_copy_bw", "triton_graph_us", "rel_err"]


def random_paged(b: int, t: int, bits: int, residual: int = 128):
    """A paged KIVI cache of `t` tokens (batch `b`, Llama-3-8B heads) with random codes, scales and residual."""
    import torch

    from lowbit.kernels.kivi_paged import PagedKivi
    from lowbit.quant.kivi import PAGE_TOKENS, KiviFormat, PageLayout

    c = KiviFormat(bits, 32, residual).counts(t)
    lay = PageLayout(bits, HEAD_DIM)
    pages = -(-c.quantized_keys // PAGE_TOKENS)
    pool = torch.randint(0, 256, (b, max(pages, 1), HKV, lay.nbytes), dtype=torch.uint8, device="cuda")
    halves = pool[..., lay.key_scale :].view(torch.float16)  # scales and zeros: small positive / signed values
    halves.copy_(torch.rand_like(halves, dtype=torch.float32).mul_(0.05).add_(0.01).to(torch.float16))

    def res(n):
        return torch.randn(b, HKV, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16) if n else None

    return PagedKivi(bits, pool, 0, c.quantized_keys, c.quantized_values, t, None, None,
                     res(c.residual_keys), res(c.residual_values))


def paged_nbytes(cache) -> int:
    """Bytes the kernel reads: the pages holding quantized tokens, the residual and sinks."""
    from lowbit.quant.kivi import PAGE_TOKENS

    b, h, page_bytes = cache.pool.shape[0], cache.pool.shape[2], cache.pool.shape[3]
    n = b * h * page_bytes * -(-max(cache.n_qk, cache.n_qv) // PAGE_TOKENS)
    for t in (cache.res_k, cache.res_v, cache.sink_k, cache.sink_v):
        n += 0 if t is None else t.numel() * t.element_size()
    return n


def _query(b: int):
    import torch

    return torch.randn(b, HQ, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)


def sdpa_times(b: int, t: int) -> tuple[float, float, str]:
    """(graph ms, eager ms, backend) of the fastest SDPA backend on bf16 KV with GQA (by graph time)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kv_bytes = 2 * b * HKV * t * HEAD_DIM * 2
    sets, _ = rotating(lambda: (_query(b), torch.randn(b, HKV, t, HEAD_DIM, device="cuda", dtype=torch.bfloat16),
                                torch.randn(b, HKV, t, HEAD_DIM, device="cuda", dtype=torch.bfloat16)),
                       kv_bytes, min_sets=2, max_sets=4)
    best = None
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def call(s, be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(s[0], s[1], s[2], enable_gqa=True)

        try:
            call(sets[0])
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - backend refuses the case
            continue
        g, e = bench_sets(call, sets, graph=True), bench_sets(call, sets, graph=False)
        if best is None or g < best[0]:
            best = (g, e, name)
    del sets
    torch.cuda.empty_cache()
    return best


def triton_times(b: int, t: int, bits: int) -> tuple[float, float]:
    """(graph ms, eager ms) of the contiguous Triton kernel on the same state."""
    import torch

    from lowbit.bench.attention import parts_nbytes, random_kivi_parts
    from lowbit.kernels.kivi_attention import kivi_decode_attention_parts

    probe = random_kivi_parts(b, t, bits)
    nbytes = parts_nbytes(probe)
    del probe
    sets, _ = rotating(lambda: (_query(b), random_kivi_parts(b, t, bits)), nbytes, max_sets=8)
    call = lambda s: kivi_decode_attention_parts(s[0], s[1])  # noqa: E731
    g, e = bench_sets(call, sets, graph=True), bench_sets(call, sets, graph=False)
    del sets
    torch.cuda.empty_cache()
    return g, e


def check(b: int, t: int, bits: int) -> float:
    """Relative error of the kernel against the float32 reference on a random paged cache."""
    from lowbit.kernels.kivi_paged import paged_decode_attention, paged_decode_attention_ref

    cache, q = random_paged(b, t, bits), _query(b)
    ref = paged_decode_attention_ref(q, cache)
    out = paged_decode_attention(q, cache).float()
    return ((out - ref).norm() / ref.norm()).item()


def measure(b: int, t: int, bits: int, bw: float, base, triton: bool, variants: tuple[str, ...] = ()) -> dict:
    """One row: the paged kernel (default variant) at batch `b` / context `t`, beside `base` (sdpa_times);
    `variants` are also timed (CUDA graph) on the same inputs, for before/after comparisons."""
    import torch

    from lowbit.kernels.kivi_paged import DEFAULT_VARIANT, paged_decode_attention

    probe = random_paged(b, t, bits)
    nbytes = paged_nbytes(probe) + b * HQ * HEAD_DIM * 2 * 2
    del probe
    sets, _ = rotating(lambda: (_query(b), random_paged(b, t, bits)), nbytes, max_sets=16)
    call = lambda s: paged_decode_attention(s[0], s[1])  # noqa: E731
    g, e = bench_sets(call, sets, graph=True), bench_sets(call, sets, graph=False)
    variant_us = {DEFAULT_VARIANT: g * 1e3}
    for v in variants:
        if v != DEFAULT_VARIANT:
            variant_us[v] = bench_sets(lambda s, v=v: paged_decode_attention(s[0], s[1], variant=v), sets) * 1e3
    del sets
    torch.cuda.empty_cache()
    row = {"batch": b, "context": t, "bits": bits, "graph_us": g * 1e3, "eager_us": e * 1e3,
           "sdpa_graph_us": base[0] * 1e3, "sdpa_eager_us": base[1] * 1e3, "sdpa_backend": base[2],
           "graph_speedup": base[0] / g, "eager_speedup": base[1] / e, "bytes_read": nbytes,
           "GBps": nbytes / (g * 1e-3) / 1e9, "pct_copy_bw": 100 * nbytes / (g * 1e-3) / 1e9 / bw, "launches": 2,
           "variant_graph_us": variant_us}
    if triton:
        tg, te = triton_times(b, t, bits)
        row.update(triton_graph_us=tg * 1e3, triton_eager_us=te * 1e3)
    return row


def run_paged(contexts: list[int], batches: list[int], bits: list[int], triton: bool = True, max_kv_gb: float = 20.0,
              json_out: Optional[Path] = None, log=print, variants: tuple[str, ...] = (), points=None) -> dict:
    """Every (context, batch, bits) point; rows are written to `json_out` as they come. Returns the payload."""
    import torch

    env = env_info()
    bw = copy_bandwidth()
    log(f"{env['device']}: copy bandwidth {bw:.0f} GB/s (read + write)")
    torch.manual_seed(0)
    rows = []
    errs = {nb: check(2, 4096 + 300, nb) for nb in bits}
    log("rel err vs float32 reference: " + ", ".join(f"KIVI-{k} {v:.2e}" for k, v in errs.items()))
    fits = [(t, b) for t in contexts for b in batches if 2 * b * HKV * t * HEAD_DIM * 2 <= max_kv_gb * 1e9]
    points = points or Points()
    points.start(len(fits) * len(bits))
    for t in contexts:
        for b in batches:
            if (t, b) not in fits:
                continue
            base = sdpa_times(b, t)
            for nb in bits:
                row = measure(b, t, nb, bw, base, triton, variants)
                row["rel_err"] = errs[nb]
                rows.append(row)
                write_json(json_out, {"env": env, "copy_GBps": bw, "partial": True, "rows": rows})
                log(f"B={b:3d} T={t:6d} KIVI-{nb}: graph {row['graph_us']:7.1f} us (x{row['graph_speedup']:.2f}), eager "
                    f"{row['eager_us']:7.1f} us (x{row['eager_speedup']:.2f}) vs SDPA {base[2]} {row['sdpa_graph_us']:.1f} / "
                    f"{row['sdpa_eager_us']:.1f} us; {row['GBps']:.0f} GB/s = {row['pct_copy_bw']:.0f}% of copy"
                    + (f"; Triton {row['triton_graph_us']:.1f} us" if triton else "")
                    + "".join(f"; {k} {v:.1f} us" for k, v in row["variant_graph_us"].items() if len(row["variant_graph_us"]) > 1))
                points.advance()
    return {"env": env, "copy_GBps": bw, "heads": [HQ, HKV, HEAD_DIM], "method": "graph and eager, median, rotated sets",
            "rows": rows}


if __name__ == "__main__":  # quick: python -m lowbit.bench.paged
    import sys

    run_paged([int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "32768").split(",")], [1, 8], [2, 4], triton=False)
