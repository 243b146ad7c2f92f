"""GPU kernels (Triton) for lowbit: KIVI decode attention, KIVI quantize-and-pack, W4A8 / FMPQ-W4A4 GEMM.

Kernels take tensors (and a :class:`~lowbit.quant.kivi.KiviParts`) and return tensors; they import only
:mod:`lowbit.quant`. The caches and linear layers that call them live with their methods
(:mod:`lowbit.kv.fused`, :mod:`lowbit.wa.linear`). Importing this package needs neither Triton nor CUDA:
the Triton modules are imported lazily and the PyTorch references (:mod:`lowbit.kernels.reference`)
always work. Entry points:

* :func:`kivi_decode_attention_parts` (parts, query ``[B, H_q, n_q, D]`` -> ``[B, n_q, H_q, D]``)
* :func:`quantize_pack_keys` / :func:`quantize_pack_values` (KIVI flush)
* :func:`quantize_activation` / :func:`repack_weight` / :func:`w4a8_gemm` (W4A8 / FMPQ GEMM)
"""

from __future__ import annotations

import importlib
import os

_LAZY = {
    "kivi_decode_attention_parts": "lowbit.kernels.kivi_attention",
    "quantize_pack_keys": "lowbit.kernels.kivi_quant",
    "quantize_pack_values": "lowbit.kernels.kivi_quant",
    "quantize_activation": "lowbit.kernels.gemm",
    "repack_weight": "lowbit.kernels.layout",
    "w4a8_gemm": "lowbit.kernels.gemm",
    "GemmConfig": "lowbit.kernels.layout",
    "decode_attention_ref": "lowbit.kernels.reference",
}

__all__ = sorted(_LAZY) + ["available", "triton_ready"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lowbit.kernels' has no attribute '{name}'")


def available() -> bool:
    """True when Triton imports and a CUDA device is present (the kernels can run)."""
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def triton_ready(t) -> bool:
    """Whether the Triton kernels can run on tensor `t`: CUDA (or anywhere under ``TRITON_INTERPRET=1``) and Triton importable."""
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
