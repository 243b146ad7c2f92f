"""CUDA C++ kernels built at first use with the machine's ``nvcc`` and loaded through ctypes.

The sources live in ``lowbit/kernels/cuda/``; each is compiled once per (source hash, GPU architecture)
into ``$LOWBIT_CACHE`` (default ``~/.cache/lowbit/cuda``) as a shared library exposing ``extern "C"``
launchers that take raw device pointers and a stream. ``$LOWBIT_NVCC_FLAGS`` adds nvcc flags (part of the
cache key), for experiments. No PyTorch headers are involved, so a build takes
seconds and does not depend on the torch ABI. Without ``nvcc`` or a CUDA device, :func:`load` raises
:class:`CudaKernelUnavailable` and callers fall back to the Triton kernels or the PyTorch references.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

SOURCES = Path(__file__).resolve().parent / "cuda"
_LOCK = threading.Lock()
_LOADED: dict[str, ctypes.CDLL] = {}


class CudaKernelUnavailable(RuntimeError):
    """The CUDA kernels cannot be built or loaded here (no nvcc, no CUDA device, or the build failed)."""


def _cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "cuda"


def _arch() -> str:
    import torch

    if not torch.cuda.is_available():
        raise CudaKernelUnavailable("no CUDA device")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise CudaKernelUnavailable(f"the CUDA kernels need compute capability 8.0 or newer, this GPU has {major}.{minor}")
    suffix = "a" if (major, minor) == (9, 0) else ""
    return f"{major}{minor}{suffix}"


def nvcc_path() -> str | None:
    """The nvcc to build with: $NVCC, then PATH, then $CUDA_HOME/bin."""
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def load(name: str) -> ctypes.CDLL:
    """Build (once) and load ``cuda/<name>.cu`` for this GPU; raises :class:`CudaKernelUnavailable`."""
    with _LOCK:
        if name in _LOADED:
            return _LOADED[name]
        src = SOURCES / f"{name}.cu"
        arch = _arch()
        nvcc = nvcc_path()
        if nvcc is None:
            raise CudaKernelUnavailable("nvcc not found (set $NVCC or $CUDA_HOME, or add it to PATH)")
        extra = os.environ.get("LOWBIT_NVCC_FLAGS", "").split()  # experiments, e.g. -DLOWBIT_PAGED_MINBLOCKS=3
        digest = hashlib.sha256(src.read_bytes() + arch.encode() + " ".join(extra).encode()).hexdigest()[:16]
        lib = _cache_dir() / f"{name}-sm{arch}-{digest}.so"
        if not lib.exists():
            lib.parent.mkdir(parents=True, exist_ok=True)
            tmp = lib.with_suffix(f".{os.getpid()}.tmp")
            cmd = [nvcc, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-O3", "-std=c++17", "--use_fast_math",
                   "-shared", "-Xcompiler", "-fPIC", *extra, "-o", str(tmp), str(src)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise CudaKernelUnavailable(f"building {src.name} failed:\n{done.stderr[-4000:]}")
            os.replace(tmp, lib)
        _LOADED[name] = ctypes.CDLL(str(lib))
        return _LOADED[name]


def available(name: str) -> bool:
    """Whether ``cuda/<name>.cu`` builds and loads here (builds it on the first call)."""
    try:
        load(name)
        return True
    except CudaKernelUnavailable:
        return False
