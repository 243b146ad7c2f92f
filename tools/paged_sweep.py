"""Paged KIVI kernel experiments at fixed points (graph timing, rotating inputs).

`python tools/paged_sweep.py`: cp.async depth and the tail's share at B8/32K, B32/32K, B1/128K.
`python tools/paged_sweep.py --quick`: the default kernel only at those points (for build-flag variants:
`LOWBIT_NVCC_FLAGS=-DLOWBIT_PAGED_BIAS_CHAINS=1 python tools/paged_sweep.py --quick`)."""

import dataclasses
import os
import sys

from lowbit.bench.paged import _query, paged_nbytes, random_paged
from lowbit.bench.timing import bench_sets, rotating
from lowbit.kernels.kivi_paged import paged_decode_attention

POINTS = ((8, 32768), (32, 32768), (1, 131072))


def main(quick: bool) -> None:
    line = []
    for b, t in POINTS:
        for bits in (2,) if quick else (2, 4):
            probe = random_paged(b, t, bits)
            sets, _ = rotating(lambda: (_query(b), random_paged(b, t, bits)), paged_nbytes(probe), max_sets=8)
            if quick:
                line.append(f"B{b}/{t // 1024}K KIVI-{bits} {bench_sets(lambda s: paged_decode_attention(s[0], s[1]), sets) * 1e3:.1f}")
                continue
            res = []
            for stages in (2, 3):  # (stage 4 was also built for the 2026-12-02 run: no gain)
                us = bench_sets(lambda s: paged_decode_attention(s[0], s[1], stages=stages), sets) * 1e3
                res.append(f"stages {stages} {us:.1f}")
            no_tail = [(q, dataclasses.replace(c, total=c.n_qk, n_qv=c.n_qk, res_k=None, res_v=None)) for q, c in sets]
            us = bench_sets(lambda s: paged_decode_attention(s[0], s[1]), no_tail) * 1e3
            res.append(f"no tail {us:.1f}")
            print(f"B{b}/{t} KIVI-{bits}: " + ", ".join(res) + " us", flush=True)
    if quick:
        print(f"[{os.environ.get('LOWBIT_NVCC_FLAGS', '')}] " + ", ".join(line) + " us", flush=True)


if __name__ == "__main__":
    main("--quick" in sys.argv)
