"""The one-launch CUDA GEMV (lowbit.kernels.w4ax_gemv) against the prepared Triton two launches and cuBLAS bf16, per
Llama-3-8B linear shape and token count, graph and eager (quantizer included), and the layer's default path under
``$LOWBIT_W4AX_GEMV``'s policy; writes env and rows as JSON.

    PYTHONPATH=src python3 tools/w4ax_gemv_probe.py out.json            # MS=1,2,4 METHODS=w4a8,fmpq4 by default
    LOWBIT_NVCC_FLAGS=-DLOWBIT_GEMV_SKIP_QUANT=1 MS=1 METHODS=w4a8 ...   # the GEMV without its quantizer (wrong outputs)
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

from lowbit.bench.timing import bench_sets, env_info, rotating
from lowbit.kernels.gemm import linear_two_launch
from lowbit.kernels.layout import repack_weight
from lowbit.kernels.w4ax_fused import PreparedLinear
from lowbit.kernels.w4ax_gemv import GemvLinear

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
MS = [int(v) for v in os.environ.get("MS", "1,2,4").split(",")]
METHODS = os.environ.get("METHODS", "w4a8,fmpq4").split(",")
rows = []
for n, k in SHAPES:
    def make():
        qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        ws = (torch.rand(n, k // 128, device="cuda") * 0.02 + 0.001).half()
        return repack_weight(qw, 128), ws

    wsets, _ = rotating(make, n * k // 2, max_sets=16)
    bsets, _ = rotating(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16), n * k * 2, max_sets=8)
    mask = torch.rand(k // 128, device="cuda") < 0.1
    cublas = {}
    for method, low_bits, msk in [c for c in (("w4a8", 8, None), ("fmpq4", 4, mask)) if c[0] in METHODS]:
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            if m not in cublas:
                cublas[m] = (bench_sets(lambda b: F.linear(x, b, out=out), bsets) * 1e3,
                             bench_sets(lambda b: F.linear(x, b, out=out), bsets, graph=False) * 1e3)
            row = dict(method=method, m=m, n=n, k=k, cublas_graph_us=cublas[m][0], cublas_eager_us=cublas[m][1])
            two = [PreparedLinear(128, w, s, 128, msk, low_bits, launches="two") for w, s in wsets]
            for p in two:
                p.gemv_m = 0  # the Triton two launches only
            row["two_graph_us"] = bench_sets(lambda p: p(x, out), two) * 1e3
            row["two_eager_us"] = bench_sets(lambda p: p(x, out), two, graph=False) * 1e3
            want = linear_two_launch(x, 128, wsets[0][0], wsets[0][1], 128, msk, low_bits, workspace=None)
            gl = [GemvLinear(128, w, s, 128, msk, low_bits, None, None, torch.bfloat16) for w, s in wsets]
            got = gl[0](x)
            row["gemv_bit_exact_vs_two"] = bool(torch.equal(got, want))
            row["gemv_max_abs_diff_vs_two"] = float((got.float() - want.float()).abs().max())
            row["gemv_graph_us"] = bench_sets(lambda g: g(x, out), gl) * 1e3
            row["gemv_eager_us"] = bench_sets(lambda g: g(x, out), gl, graph=False) * 1e3
            default = [PreparedLinear(128, w, s, 128, msk, low_bits, launches="two") for w, s in wsets]
            row["default_graph_us"] = bench_sets(lambda p: p(x, out), default) * 1e3
            row["default_eager_us"] = bench_sets(lambda p: p(x, out), default, graph=False) * 1e3
            row["default_takes_gemv"] = bool(default[0]._gemv)
            for path in ("two", "gemv", "default"):
                row[f"{path}_graph_speedup"] = row["cublas_graph_us"] / row[f"{path}_graph_us"]
                row[f"{path}_eager_speedup"] = row["cublas_eager_us"] / row[f"{path}_eager_us"]
            rows.append(row)
            print(f"{method} N{n} K{k} M{m}: cublas {row['cublas_graph_us']:.1f}/{row['cublas_eager_us']:.1f}  "
                  + "  ".join(f"{p} {row[f'{p}_graph_us']:.1f}/{row[f'{p}_eager_us']:.1f} "
                              f"({row[f'{p}_graph_speedup']:.2f}x/{row[f'{p}_eager_speedup']:.2f}x)"
                              for p in ("two", "gemv", "default"))
                  + f"  gemv max diff {row['gemv_max_abs_diff_vs_two']:.2g}", flush=True)
            del two, gl, default
    del wsets, bsets
    torch.cuda.empty_cache()
json.dump(dict(env=env_info(), rows=rows), open(sys.argv[1], "w"), indent=1)
