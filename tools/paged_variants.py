"""Paged KIVI kernel variants side by side on one GPU: build them in parallel, then per variant (one process each,
rounds interleaved) the error against the float32 reference and the graph-timed points of `paged_sweep.py --quick`.

    python tools/paged_variants.py --rounds 2 new= old-math="-DLOWBIT_PAGED_SUBNORMAL_K=0 -DLOWBIT_PAGED_SUBNORMAL_V=0" \
        head=@/path/to/kivi_paged.cu

A variant is `label=nvcc flags` or `label=@source.cu` (another copy of the kernel source, default flags); words of
the form NAME=VALUE among the flags are set in the variant's environment instead (e.g. LOWBIT_PAGED_SPLIT=3,4)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import os, sys
sys.path.insert(0, {tools!r})
from pathlib import Path
import lowbit.kernels.cuda_build as cb
if {source!r}:
    cb.SOURCES = Path({source!r})
cb.load("kivi_paged")
if {build_only!r}:
    raise SystemExit(0)
import torch
from lowbit.bench.paged import _query, random_paged
from lowbit.kernels.kivi_paged import paged_decode_attention, paged_decode_attention_ref
errs = []
for bits in (2, 4):
    torch.manual_seed(bits)
    cache, q = random_paged(3, 5000, bits), _query(3)
    got, want = paged_decode_attention(q, cache), paged_decode_attention_ref(q, cache)
    errs.append(f"KIVI-{{bits}} rel err {{((got.float() - want).norm() / want.norm()).item():.2e}}")
print("[{label}] " + ", ".join(errs), flush=True)
import paged_sweep
sys.argv = ["paged_sweep", "--quick"]
paged_sweep.main(True)
"""


def _variant(spec: str) -> tuple[str, str, str, dict]:
    label, _, rest = spec.partition("=")
    if rest.startswith("@"):
        src = Path(rest[1:]).resolve()
        tmp = Path(tempfile.mkdtemp(prefix=f"paged-{label}-"))
        (tmp / "kivi_paged.cu").write_bytes(src.read_bytes())
        return label, "", str(tmp), {}
    words = rest.split()
    env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
    return label, " ".join(w for w in words if w.startswith("-")), "", env


def _run(label: str, flags: str, source: str, extra_env: dict, build_only: bool, wait: bool = True):
    env = {**os.environ, **extra_env, "LOWBIT_NVCC_FLAGS": flags, "PYTHONPATH": str(ROOT / "src")}
    code = CHILD.format(tools=str(ROOT / "tools"), source=source, build_only=build_only, label=label)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    return proc.wait() if wait else proc


def main(argv: list[str]) -> None:
    rounds = 1
    if argv[:1] == ["--rounds"]:
        rounds, argv = int(argv[1]), argv[2:]
    variants = [_variant(a) for a in argv]
    builds = [_run(*v, build_only=True, wait=False) for v in variants]  # nvcc in parallel
    for v, p in zip(variants, builds):
        if p.wait():
            print(f"[{v[0]}] build failed", flush=True)
    for r in range(rounds):  # --rounds 0: build only
        for v in (variants if r % 2 == 0 else variants[::-1]):
            _run(*v, build_only=False)


if __name__ == "__main__":
    main(sys.argv[1:])
