"""Per-kernel GPU time of one paged KIVI decode-attention call (split-K kernel vs log-sum-exp merge), by the
PyTorch profiler: `python tools/paged_profile.py 1x131072x2 8x32768x2` (batch x context x bits)."""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from lowbit.bench.paged import _query, random_paged
from lowbit.kernels.kivi_paged import paged_decode_attention


def main(points: list[str]) -> None:
    for p in points:
        b, t, bits = (int(x) for x in p.split("x"))
        cache, q = random_paged(b, t, bits), _query(b)
        for _ in range(5):
            paged_decode_attention(q, cache)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                paged_decode_attention(q, cache)
            torch.cuda.synchronize()
        rows = [(e.key, e.device_time_total / e.count) for e in prof.key_averages() if e.device_time_total > 0]
        print(f"B{b}/{t} KIVI-{bits}: " + ", ".join(f"{k.split('<')[0][:40]} {us:.1f} us" for k, us in rows))


if __name__ == "__main__":
    main(sys.argv[1:] or ["1x32768x2", "1x131072x2", "8x32768x2", "32x32768x2"])
