"""Where a paged KIVI decode call's time goes, program by program (GPU): builds the kernel with
-DLOWBIT_PAGED_TIMELINE=1 (each program records its start and end on the global timer and its SM), runs the call,
and prints the launch ramp, program durations (tails vs page slices), pages taken, and per SM its pages and last end.

    python tools/paged_timeline.py 8x32768x2 32x32768x2 1x131072x2      # batch x context x bits
    python tools/paged_timeline.py --json timeline.json 8x32768x2      # also every program's record, for analysis
"""

from __future__ import annotations

import argparse
import json
import os

os.environ["LOWBIT_NVCC_FLAGS"] = (os.environ.get("LOWBIT_NVCC_FLAGS", "") + " -DLOWBIT_PAGED_TIMELINE=1").strip()

import torch  # noqa: E402

import lowbit.kernels.kivi_paged as kp  # noqa: E402
from lowbit.bench.paged import _query, random_paged  # noqa: E402


def pct(x: torch.Tensor, qs=(0.0, 0.1, 0.5, 0.9, 1.0)) -> str:
    return " ".join(f"{torch.quantile(x.double(), q).item() / 1e3:6.2f}" for q in qs)


def main(points: list[str], json_out: str | None = None) -> None:
    buf = torch.zeros(1 << 22, dtype=torch.int64, device="cuda")
    kp.TIMELINE = buf  # every call writes its programs' records here
    raw = {}
    for p in points:
        b, t, bits = (int(x) for x in p.split("x"))
        cache, q = random_paged(b, t, bits), _query(b)
        hkv = cache.pool.shape[-2]
        plan = kp.plan_split(b * hkv, cache.key_pages, kp._sms(0), *kp._split_model())
        spans = []
        for _ in range(6):
            buf.zero_()
            kp.paged_decode_attention(q, cache)
            torch.cuda.synchronize()
            tl = buf.view(-1, 4)
            tl = tl[: int((tl[:, 1] != 0).sum())].cpu()  # programs write records 0..grid-1
            spans.append((tl[:, 1].max() - tl[:, 0].min()).item())
        t0 = tl[:, 0].min()
        start, end, sm = tl[:, 0] - t0, tl[:, 1] - t0, tl[:, 2]
        tail, pages = (tl[:, 3] >> 32) == 1, tl[:, 3] & 0xFFFFFFFF
        dur = end - start
        print(f"B{b}/{t // 1024}K KIVI-{bits}: {b * hkv} tails + {plan.chunks} slices of {plan.chunk} pages on "
              f"{int(sm.unique().numel())} SMs; "
              f"kernel span us (6 calls): {' '.join(f'{s / 1e3:.1f}' for s in spans)}")
        print("   quantiles (0 .1 .5 .9 1), times in us:")
        print(f"   start, slices       {pct(start[~tail])}")
        print(f"   duration, slices    {pct(dur[~tail])}")
        print(f"   duration, tails     {pct(dur[tail])}")
        print(f"   end, slices         {pct(end[~tail])}")
        print(f"   pages per slice     {' '.join(str(int(torch.quantile(pages[~tail].double(), q))) for q in (0, .1, .5, .9, 1))}")
        n_sm = int(sm.max()) + 1
        pages_sm = torch.bincount(sm, weights=pages.double(), minlength=n_sm)
        end_sm = torch.zeros(n_sm, dtype=end.dtype).scatter_reduce(0, sm, end, "amax")
        used = torch.bincount(sm, minlength=n_sm) > 0
        print(f"   per SM: programs {torch.bincount(sm, minlength=n_sm)[used].min().item()}-"
              f"{torch.bincount(sm, minlength=n_sm)[used].max().item()}, pages "
              f"{' '.join(str(int(torch.quantile(pages_sm[used], q))) for q in (0, .1, .5, .9, 1))}, last end {pct(end_sm[used])}")
        raw[p] = {"chunk": plan.chunk, "chunks": plan.chunks, "start_ns": start.tolist(), "end_ns": end.tolist(),
                  "sm": sm.tolist(), "tail": tail.tolist(), "pages": pages.tolist()}

    if json_out:
        with open(json_out, "w") as f:
            json.dump(raw, f)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("points", nargs="*", default=["8x32768x2", "32x32768x2", "1x131072x2"])
    ap.add_argument("--json", dest="json_out", help="write every program's record here")
    args = ap.parse_args()
    main(args.points, args.json_out)
