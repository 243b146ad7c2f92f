"""Eager W4Ax calls through the compiled kernels' own launchers (lowbit.kernels.launch) against Triton's JIT launch,
interleaved in one process (GPU): the one-launch fused linear and the two-launch path (quantizer + GEMM).

    python tools/launch_overhead.py            # 7 rounds x 200 calls per path, CUDA events around each call
"""

from __future__ import annotations

import statistics

import torch

from lowbit.bench.timing import per_call_ms
from lowbit.kernels import gemm, w4ax_fused
from lowbit.kernels.layout import repack_weight

SHAPES = ((1, 6144, 4096), (1, 4096, 4096), (16, 4096, 4096), (1, 28672, 4096), (1, 4096, 14336), (16, 4096, 14336))


class Jit:
    """The JIT launch in FastLaunch's calling convention."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, grid, *args, **kwargs):
        self.fn[grid](*args, **kwargs)


def main(rounds: int = 7) -> None:
    fast = {"fused": (w4ax_fused._LAUNCH,), "two": (gemm._ACT_QUANT, gemm._W4A8_GEMM)}
    jit = {"fused": (Jit(w4ax_fused._w4ax_fused_kernel),),
           "two": (Jit(gemm._act_quant_kernel), Jit(gemm._w4a8_gemm_kernel))}

    def use(path, launchers):
        if path == "fused":
            (w4ax_fused._LAUNCH,) = launchers
        else:
            gemm._ACT_QUANT, gemm._W4A8_GEMM = launchers

    for m, n, k in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        qw = repack_weight(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8), 128).cuda()
        ws = (torch.rand(n, k // 128) * 0.05 + 0.001).half().cuda()
        mask = (torch.rand(k // 128) < 0.1).to(torch.int8).cuda()
        perm = torch.randperm(k).int().cuda()
        calls = {
            "fused": lambda: w4ax_fused.w4ax_linear(x, 128, qw, ws, 128, int8_mask=mask, perm=perm),
            "two": lambda: gemm.w4a8_gemm(*gemm.quantize_activation(x, 128, mask, 4, perm=perm, padded_in=k), 128, qw, ws, 128),
        }
        for path, call in calls.items():
            res = {"launcher": [], "jit": []}
            for _ in range(rounds):
                for name, launchers in (("launcher", fast[path]), ("jit", jit[path])):
                    use(path, launchers)
                    call()
                    torch.cuda.synchronize()
                    res[name].append(per_call_ms(call, 200) * 1e3)
            use(path, fast[path])
            f, j = statistics.median(res["launcher"]), statistics.median(res["jit"])
            print(f"{path:5s} M={m} N={n} K={k}: eager, compiled launcher {f:.1f} us, JIT {j:.1f} us ({j / f:.2f}x)",
                  flush=True)


if __name__ == "__main__":
    main()
