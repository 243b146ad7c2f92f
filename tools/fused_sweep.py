"""Time the one-launch W4Ax linear (FMPQ W4A4 and W4A8) at decode M under a few tile widths, graph and eager:
`python tools/fused_sweep.py` on a GPU (prints one line per point and config)."""

import torch

from lowbit.bench.gemm import _weight_sets
from lowbit.bench.timing import bench_sets
from lowbit.kernels.layout import GemmConfig
from lowbit.kernels.w4ax_fused import w4ax_linear

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # K x N, Llama-3-8B


def main() -> None:
    block = group = 128
    for k, n in SHAPES:
        wsets, bsets, _ = _weight_sets(k, n, group, block, 256 << 20)
        perm = torch.randperm(k, device="cuda").int()
        maskf = torch.zeros(k // block, dtype=torch.bool, device="cuda")
        maskf[: k // block // 10 + 1] = True
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cub = bench_sets(lambda w: torch.nn.functional.linear(x, w), bsets) * 1e3
            for bn in (64, 128, 256):
                cfg = GemmConfig(16, bn, 4, 4)
                for name, mask, bits, p in (("w4a8", None, 8, None), ("fmpq", maskf, 4, perm)):
                    fn = lambda st: w4ax_linear(x, block, st[1], st[2], group, int8_mask=mask, low_bits=bits, perm=p,
                                                config=cfg)
                    g = bench_sets(fn, wsets) * 1e3
                    e = bench_sets(fn, wsets, graph=False) * 1e3
                    print(f"K={k} N={n} M={m} BN={bn} {name}: graph {g:.1f} us, eager {e:.1f} us, cuBLAS graph {cub:.1f}"
                          f" ({cub / g:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
