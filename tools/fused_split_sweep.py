"""The one-launch W4Ax linear's tile x warps x stages x split-K at M 1/16 (graph timing) beside the two-launch path and
cuBLAS bf16, Llama-3-8B shapes: `python tools/fused_split_sweep.py` on a GPU (the five fastest configs per point, with
each one's largest difference from the default config's output, relative to its largest value)."""

import itertools
import time

import torch

from lowbit.bench.gemm import _weight_sets
from lowbit.bench.timing import LINEAR_SHAPES, bench_sets
from lowbit.kernels import gemm
from lowbit.kernels.layout import GemmConfig
from lowbit.kernels.w4ax_fused import FUSED_CONFIG, w4ax_linear

def main() -> None:
    block = group = 128
    t0 = time.time()
    for k, n in LINEAR_SHAPES:
        wsets, bsets, _ = _weight_sets(k, n, group, block, 256 << 20)
        maskf = torch.zeros(k // block, dtype=torch.int8, device="cuda")
        maskf[: k // block // 10 + 1] = 1
        nt = k // block
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cub = bench_sets(lambda w: torch.nn.functional.linear(x, w), bsets) * 1e3
            two = bench_sets(lambda st: gemm.linear_two_launch(x, block, st[1], st[2], group, low_bits=8), wsets) * 1e3
            res = []
            for name, mask, bits in (("w4a8", None, 8), ("fmpq", maskf, 4)):
                ref = w4ax_linear(x, block, wsets[0][1], wsets[0][2], group, int8_mask=mask, low_bits=bits).float()
                for bn, warps, stages, split in itertools.product((64, 128, 256), (4, 8), (3, 4), (0, 2, 4, 8, 16, nt)):
                    if split > nt:
                        continue
                    cfg = GemmConfig(16, bn, warps, stages, split_k=split)
                    try:
                        fn = lambda s: w4ax_linear(x, block, s[1], s[2], group, int8_mask=mask, low_bits=bits,
                                                   config=cfg)
                        err = ((fn(wsets[0]).float() - ref).abs().max() / ref.abs().max()).item()
                        res.append((bench_sets(fn, wsets) * 1e3, name, cfg.label(), err))
                    except Exception as exc:
                        print(f"  {name} {cfg.label()} failed: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
            for name in ("w4a8", "fmpq"):
                best = sorted(r for r in res if r[1] == name)[:5]
                default = [r[0] for r in res if r[1] == name and r[2] == FUSED_CONFIG.label()]
                print(f"K={k} N={n} M={m} {name}: cuBLAS {cub:.1f} two-launch(w4a8) {two:.1f} default fused "
                      f"{default[0] if default else float('nan'):.1f} | best: "
                      + "; ".join(f"{g:.1f} {lab} err{e:.0e}" for g, _, lab, e in best), flush=True)
    print(f"sweep {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
