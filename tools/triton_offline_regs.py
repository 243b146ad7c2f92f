"""Registers and stack of the W4Ax GEMV kernel's instances, compiled offline for sm_90 (no GPU needed: Triton's
bundled ptxas and cuobjdump): `PYTHONPATH=src python tools/triton_offline_regs.py`. Any STACK above 0 is a spill.
Needs Triton installed (the CPU-only environment has none)."""

import itertools
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lowbit.kernels import w4ax_fused as f
k = f._w4ax_gemv_kernel
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
path = os.path.join(tempfile.mkdtemp(), "gemv.cubin")
ptrs = {"X": "*bf16", "PERM": "*i32", "MASK": "*i8", "W": "*u8", "WS": "*fp16", "WZ": "*u8", "BIAS": "*fp16", "C": "*bf16",
        "PART": "*fp32", "COUNT": "*i32"}
for bn, warps, prefetch in itertools.product((16, 32, 64, 128), (2, 4, 8), (True, False)):
    constexprs = dict(GROUP=128, TILE=128, BN=bn, LOW_HI=7.0, HAS_PERM=False, HAS_MASK=True, HAS_ZERO=False,
                      HAS_BIAS=False, SPLIT=True, FAST_CVT=True, USE_LIBDEVICE=True,
                      PREFETCH=prefetch)
    signature = {n: "constexpr" if n in constexprs else ptrs.get(n, "i32") for n in k.arg_names}
    src = ASTSource(fn=k, signature=signature, constexprs={(k.arg_names.index(n),): v for n, v in constexprs.items()})
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=2))
    open(path, "wb").write(ck.asm["cubin"])
    r = subprocess.run([CUOBJDUMP, "-res-usage", path], capture_output=True, text=True).stdout
    line = [l for l in r.splitlines() if "REG:" in l][0].split()
    print(f"BN{bn} w{warps} prefetch={prefetch}: {line[0]} {line[1]}")
