"""Where a paged KIVI decode call's time goes, program by program (GPU): builds the kernel with
-DLOWBIT_PAGED_TIMELINE=1 (each program records its start and end on the global timer and its SM), runs the call,
and prints the launch ramp, program durations (tail vs page programs), pages taken and how late the last programs start and end.

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
    kp._merge_policy = lambda: 1 << 30                  # hand the buffer to every call as `counters`
    kp._merge_counters = lambda device, stream, n: buf.view(torch.int32)
    raw = {}
    for p in points:
        b, t, bits = (int(x) for x in p.split("x"))
        cache, q = random_paged(b, t, bits), _query(b)
        hkv = cache.pool.shape[-2]
        splits, per = kp.choose_splits(b * hkv, cache.key_pages, kp._sms(0), *kp._split_model())
        n = b * hkv * (splits + 1)
        spans = []
        for _ in range(6):
            buf.zero_()
            kp.paged_decode_attention(q, cache)
            torch.cuda.synchronize()
            tl = buf[: 4 * n].view(n, 4).cpu()
            spans.append((tl[:, 1].max() - tl[:, 0].min()).item())
        t0 = tl[:, 0].min()
        start, end, sm = tl[:, 0] - t0, tl[:, 1] - t0, tl[:, 2]
        split, pages = tl[:, 3] >> 16, tl[:, 3] & 0xFFFF
        dur, tail = end - start, split == 0
        late = end >= torch.quantile(end.double(), 0.95).to(end.dtype)
        print(f"B{b}/{t // 1024}K KIVI-{bits}: {splits} splits x {per} pages, {n} programs on {int(sm.unique().numel())} SMs; "
              f"kernel span us (6 calls): {' '.join(f'{s / 1e3:.1f}' for s in spans)}")
        print("   quantiles (0 .1 .5 .9 1) in us:")
        print(f"   start, page programs  {pct(start[~tail])}")
        print(f"   start, tail programs  {pct(start[tail])}")
        print(f"   duration, page        {pct(dur[~tail])}")
        print(f"   duration, tail        {pct(dur[tail])}")
        print(f"   end, page programs    {pct(end[~tail])}")
        print(f"   pages per program     {' '.join(str(int(torch.quantile(pages[~tail].double(), q))) for q in (0, .1, .5, .9, 1))}")
        print(f"   the last 5% to end: start {pct(start[late])}; duration {pct(dur[late])}")
        per_sm = torch.bincount(sm, minlength=int(sm.max()) + 1)
        print(f"   programs per SM: min {per_sm.min().item()} max {per_sm.max().item()}")
        # is a program's speed its SM's (placement) or its own (its pages)? share of the page programs' duration
        # variance between SMs, and the mean duration of the slowest and fastest SMs
        d, s_ = dur[~tail].double(), sm[~tail]
        n_sm = int(s_.max()) + 1
        cnt = torch.bincount(s_, minlength=n_sm).double()
        mean_sm = torch.bincount(s_, weights=d, minlength=n_sm) / cnt.clamp(min=1)
        between = (cnt * (mean_sm - d.mean()) ** 2).sum() / ((d - d.mean()) ** 2).sum().clamp(min=1e-9)
        busy = mean_sm[cnt > 0].sort().values / 1e3
        raw[p] = {"splits": splits, "pages_per_split": per, "start_ns": start.tolist(), "end_ns": end.tolist(),
                  "sm": sm.tolist(), "split": split.tolist(), "pages": pages.tolist()}
        print(f"   page-program duration variance between SMs: {between.item():.0%}; SM means us: fastest "
              f"{' '.join(f'{x:.1f}' for x in busy[:4].tolist())}, slowest {' '.join(f'{x:.1f}' for x in busy[-4:].tolist())}")


    if json_out:
        with open(json_out, "w") as f:
            json.dump(raw, f)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("points", nargs="*", default=["8x32768x2", "32x32768x2", "1x131072x2"])
    ap.add_argument("--json", dest="json_out", help="write every program's record here")
    args = ap.parse_args()
    main(args.points, args.json_out)
