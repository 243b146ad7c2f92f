"""The prepared two-launch W4Ax linear (quantizer + GEMM) at decode M, with and without programmatic dependent
launch (``gemm.PDL``), over the GEMM's tile width, unrolled K loop and L2 prefetch depth; graph and eager timings
beside cuBLAS bf16, Llama-3-8B shapes, each variant checked bit for bit against the plain two-launch call:
`python tools/pdl_sweep.py` on a GPU. ``SWEEP_M`` (default 1,16) narrows the token counts."""

import itertools
import os
import time

import torch

from lowbit.bench.gemm import _weight_sets
from lowbit.bench.timing import LINEAR_SHAPES, bench_sets
from lowbit.kernels import gemm
from lowbit.kernels.layout import GemmConfig
from lowbit.kernels.w4ax_fused import PreparedLinear


def main() -> None:
    block = group = 128
    t0 = time.time()
    variants = [(pdl, bn, unroll, pf) for pdl, bn, unroll, pf in itertools.product(
        (False, True), (64, 128), (1, 2), (0, 4)) if pdl or pf == 0]
    for k, n in LINEAR_SHAPES:
        wsets, bsets, _ = _weight_sets(k, n, group, block, 256 << 20)
        for m in [int(v) for v in os.environ.get("SWEEP_M", "1,16").split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cub = bench_sets(lambda w: torch.nn.functional.linear(x, w), bsets) * 1e3
            cub_e = bench_sets(lambda w: torch.nn.functional.linear(x, w), bsets, graph=False) * 1e3
            res = []
            for pdl, bn, unroll, pf in variants:
                cfg = GemmConfig(16, bn, 4, 4, unroll=unroll)
                gemm.PDL = False
                ref = gemm.linear_two_launch(x, block, wsets[0][1], wsets[0][2], group, low_bits=8, config=cfg)
                gemm.PDL, gemm.PDL_PREFETCH_TILES = pdl, pf
                layers = {id(st): PreparedLinear(block, st[1], st[2], group, low_bits=8, config=cfg, launches="two")
                          for st in wsets}
                exact = torch.equal(layers[id(wsets[0])](x), ref)
                g = bench_sets(lambda st: layers[id(st)](x), wsets) * 1e3
                e = bench_sets(lambda st: layers[id(st)](x), wsets, graph=False) * 1e3
                res.append((g, e, f"{'pdl' if pdl else 'nopdl'}-pf{pf} {cfg.label()}", exact))
            print(f"K={k} N={n} M={m}: cuBLAS graph {cub:.1f} eager {cub_e:.1f} us", flush=True)
            for g, e, lab, ok in sorted(res):
                print(f"   {lab:40s} graph {g:6.1f} (x{cub / g:.2f})  eager {e:6.1f} (x{cub_e / e:.2f})"
                      f"{'' if ok else '  NOT EXACT'}", flush=True)
    gemm.PDL = True
    print(f"sweep {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
