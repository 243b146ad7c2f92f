"""The one-token W4Ax GEMV (`w4ax_linear(gemv=True)`) over rows per program, warps, prefetch and split-K, graph timing,
beside the prepared two-launch path and cuBLAS bf16, Llama-3-8B shapes: `python tools/gemv_sweep.py` on a GPU (the
five fastest configs per point, each checked bit for bit against the two-launch path at its config)."""

import itertools
import os
import time

import torch

from lowbit.bench.gemm import _weight_sets
from lowbit.bench.timing import LINEAR_SHAPES, bench_sets
from lowbit.kernels import gemm
from lowbit.kernels.layout import GemmConfig
from lowbit.kernels import w4ax_fused
from lowbit.kernels.w4ax_fused import PreparedLinear, w4ax_linear


def _ints(env: str, default: str) -> list[int]:
    """The sweep's values for one axis: `env` (comma-separated) narrows it, e.g. GEMV_WARPS=4,8."""
    return [int(v) for v in os.environ.get(env, default).split(",")]


def main() -> None:
    block = group = 128
    t0 = time.time()
    for k, n in LINEAR_SHAPES:
        wsets, bsets, _ = _weight_sets(k, n, group, block, 256 << 20)
        maskf = torch.zeros(k // block, dtype=torch.int8, device="cuda")
        maskf[: k // block // 10 + 1] = 1
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        cub = bench_sets(lambda w: torch.nn.functional.linear(x, w), bsets) * 1e3
        for name, mask, bits in (("w4a8", None, 8), ("fmpq", maskf, 4)):
            layers = {id(st): PreparedLinear(block, st[1], st[2], group, int8_mask=mask, low_bits=bits, launches="two")
                      for st in wsets}
            two = bench_sets(lambda st: layers[id(st)](x), wsets) * 1e3
            res = []
            for bn, warps, prefetch, split in itertools.product(_ints("GEMV_BN", "16,32,64"), _ints("GEMV_WARPS", "2,4,8"),
                                                                 [bool(v) for v in _ints("GEMV_PREFETCH", "1,0")],
                                                                 _ints("GEMV_SPLIT", "0,8")):
                w4ax_fused.GEMV_PREFETCH = prefetch  # read per call (a constexpr: each value its own binary)
                cfg = GemmConfig(16, bn, warps, 2, split_k=split)
                try:
                    fn = lambda st: w4ax_linear(x, block, st[1], st[2], group, int8_mask=mask, low_bits=bits,
                                                config=cfg, gemv=True)
                    codes, scale = gemm.quantize_activation(x, block, mask, bits, padded_in=k)
                    exact = torch.equal(fn(wsets[0]), gemm.w4a8_gemm(codes, scale, block, wsets[0][1], wsets[0][2],
                                                                     group, config=cfg))
                    res.append((bench_sets(fn, wsets) * 1e3, cfg.label() + ("-prefetch" if prefetch else ""), exact))
                except Exception as exc:
                    print(f"  {name} {cfg.label()} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            best = sorted(res)[:5]
            print(f"K={k} N={n} M=1 {name}: cuBLAS {cub:.1f} two-launch prepared {two:.1f} | gemv best: "
                  + "; ".join(f"{g:.1f} {lab}{'' if ok else ' NOT EXACT'}" for g, lab, ok in best)
                  + f" | not exact: {sum(not r[2] for r in res)} of {len(res)}", flush=True)
    print(f"sweep {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
