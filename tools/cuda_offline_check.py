"""Compile the paged KIVI kernel's device code without a GPU or nvcc: NVRTC -> PTX -> ptxas (registers, spills per
instantiation) and, optionally, an opcode histogram of the page loop from nvdisasm.

Setup (once, from PyPI; none of it is a lowbit dependency):
    pip install --target /tmp/cudatk nvidia-cuda-nvrtc-cu12 nvidia-cuda-nvcc-cu12 nvidia-cuda-runtime-cu12
    pip download --no-deps -d /tmp/dl nvidia-cuda-nvdisasm && python -m zipfile -e /tmp/dl/nvidia_cuda_nvdisasm-*.whl /tmp/cudatk
Run:
    python tools/cuda_offline_check.py [--toolkit /tmp/cudatk] [--sass "2, 3, true, __nv_bfloat16"] [-DNAME=VALUE ...]
Only the device code is compiled (host launchers are cut off), so host-side errors still need nvcc on the device.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import glob
import re
import subprocess
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src/lowbit/kernels/cuda/kivi_paged.cu"
INSTANCES = [(b, s) for b in (2, 4) for s in (3, 2)]
PRELUDE = ("#define INFINITY __int_as_float(0x7f800000)\n"
           "typedef unsigned char uint8_t; typedef unsigned int uint32_t; typedef unsigned long long uint64_t;\n")


def _find(root: str, pattern: str) -> str:
    hits = glob.glob(f"{root}/**/{pattern}", recursive=True)
    if not hits:
        raise SystemExit(f"{pattern} not found under {root}: see this script's docstring for the setup")
    return hits[0]


def device_source() -> str:
    src = SRC.read_text()
    cut = src.index("template <int BITS, int STAGES, bool FOLD, typename T>\nint launch(")
    body = src[:cut].replace("#include <stdint.h>", PRELUDE).replace("#include <cuda_runtime.h>", "")
    inst = "".join(f"template __global__ void kivi_paged_kernel<{b}, {s}, {f}, {t}>(Args);\n"
                   for b, s in INSTANCES for f in ("true", "false") for t in ("__half", "__nv_bfloat16"))
    inst += "".join(f"template __global__ void combine_kernel<{t}>(Args);\n" for t in ("__half", "__nv_bfloat16"))
    return body + inst + "}\n"


def compile_ptx(root: str, defines: list[str]) -> bytes:
    lib = ctypes.CDLL(_find(root, "libnvrtc.so.*[0-9]"))
    include = str(Path(_find(root, "cuda_fp16.h")).parent)
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), device_source().encode(), b"kivi_paged.cu", 0, None, None):
        raise SystemExit("nvrtcCreateProgram failed")
    opts = [b"--gpu-architecture=compute_90", b"-std=c++17", b"--use_fast_math", f"-I{include}".encode(),
            b"-default-device"] + [d.encode() for d in defines]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    errors = [ln for ln in log.value.decode().splitlines() if " error" in ln]
    if rc:
        raise SystemExit("NVRTC failed:\n" + "\n".join(errors[:20]))
    lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetPTX(prog, ptx)
    return ptx.value


def demangle(name: str) -> str:
    out = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
    m = re.search(r"(kivi_paged_kernel|combine_kernel)<([^>]*)>", out)
    return f"{m.group(1)}<{m.group(2)}>" if m else out[:60]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toolkit", default="/tmp/cudatk", help="folder the PyPI CUDA wheels were installed into")
    ap.add_argument("--sass", default="", help="template arguments of one kernel to histogram, e.g. '2, 3, true, __nv_bfloat16'")
    args, defines = ap.parse_known_args()
    work = Path("/tmp/lowbit-cuda-check")
    work.mkdir(exist_ok=True)
    (work / "k.ptx").write_bytes(compile_ptx(args.toolkit, defines))
    ptxas = _find(args.toolkit, "ptxas")
    res = subprocess.run([ptxas, "-arch=sm_90", "-v", str(work / "k.ptx"), "-o", str(work / "k.cubin")],
                         capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-2000:])
    cur = None
    for line in res.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            cur = demangle(m.group(1))
        elif cur and ("Used" in line or "spill" in line):
            print(f"{cur:55s} {line.split(' : ', 1)[-1].strip()}")
    if args.sass:
        loop_histogram(_find(args.toolkit, "nvdisasm"), work / "k.cubin", args.sass)


def loop_histogram(nvdisasm: str, cubin: Path, want: str) -> None:
    """Opcode counts of every backward-branch loop with tensor-core work in the chosen kernel."""
    txt = subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True, text=True).stdout
    for func in re.split(r"\n\s*\.text\.", txt):
        if f"<{want}>" not in demangle(func.split(":", 1)[0].strip()):
            continue
        ins, labels, pending = [], {}, []
        for line in func.splitlines():
            lab = re.match(r"\s*(\.L_x_\d+):", line)
            if lab:
                pending.append(lab.group(1))
                continue
            m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)(.*)", line)
            if m:
                addr = int(m.group(1), 16)
                ins.append((addr, m.group(3).split(".")[0], m.group(4)))
                labels.update({p: addr for p in pending})
                pending = []
        for addr, op, rest in ins:
            t = re.search(r"(\.L_x_\d+)", rest) if op == "BRA" else None
            if t and labels.get(t.group(1), addr) < addr:
                body = collections.Counter(o for a, o, _ in ins if labels[t.group(1)] <= a <= addr)
                if body["HMMA"]:
                    print(f"loop {labels[t.group(1)]:#x}-{addr:#x}, {sum(body.values())} instructions "
                          f"(spill STL {body['STL']}, LDL {body['LDL']}): " +
                          ", ".join(f"{k} {v}" for k, v in body.most_common(16)))


if __name__ == "__main__":
    main()
