"""Registers, stack and global-load instructions of the decode W4A8 GEMM's instances (`_w4a8_gemm_kernel`), compiled
offline for sm_90 (no GPU needed: Triton's bundled ptxas and cuobjdump): `PYTHONPATH=src python tools/triton_offline_regs.py`.
Needs Triton installed (the CPU-only environment has none).

Pointers and the row strides carry the JIT's divisibility-by-16 specialization (``tt.divisibility``), as the launches
on a GPU do. Without it the compile is not the GPU's: the weight loads become byte loads, 253 registers at BN 64 and 4
warps and no cp.async pipelining (what stop 30 read offline), against 72 registers and cp.async (LDGSTS) with it.
Any STACK above 0 is a spill."""

import itertools
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lowbit.kernels import gemm

KERNEL = gemm._w4a8_gemm_kernel
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
POINTERS = {"A": "*i8", "AS": "*fp32", "W": "*u8", "WS": "*fp16", "WZ": "*u8", "BIAS": "*fp16", "C": "*bf16",
            "PART": "*fp32", "COUNT": "*i32"}
ALIGNED = set(POINTERS) | {"s_am", "s_wn", "s_cm", "K"}  # multiples of 16 at every Llama-3-8B shape


def compile_instance(bn: int, warps: int, stages: int, split: bool, path: str) -> str:
    constexprs = dict(BLOCK_A=128, GROUP=128, TILE=128, BM=16, BN=bn, GROUP_M=8, HAS_ZERO=False, HAS_BIAS=False,
                      SPLIT=split, USE_ASM=True, FAST_CVT=True)
    names = KERNEL.arg_names
    signature = {n: "constexpr" if n in constexprs else POINTERS.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED}
    src = ASTSource(fn=KERNEL, signature=signature, attrs=attrs,
                    constexprs={(names.index(n),): v for n, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    open(path, "wb").write(compiled.asm["cubin"])
    usage = subprocess.run([CUOBJDUMP, "-res-usage", path], capture_output=True, text=True).stdout
    sass = subprocess.run([CUOBJDUMP, "-sass", path], capture_output=True, text=True).stdout
    regs, stack = [line for line in usage.splitlines() if "REG:" in line][0].split()[:2]
    return f"{regs} {stack} LDG {sass.count('LDG.')} LDGSTS {sass.count('LDGSTS')}"


def main() -> None:
    path = os.path.join(tempfile.mkdtemp(), "gemm.cubin")
    for bn, warps, stages in itertools.product((32, 64, 128), (4, 8), (2, 4)):
        print(f"BM16-BN{bn}-w{warps}-s{stages} split-K: {compile_instance(bn, warps, stages, True, path)}", flush=True)


if __name__ == "__main__":
    main()
