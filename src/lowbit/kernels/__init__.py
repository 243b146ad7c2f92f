"""GPU kernels (Triton) for lowbit: KIVI decode attention, KIVI quantize-and-pack, W4A8 / FMPQ-W4A4 GEMM.

Importing this package needs neither Triton nor CUDA: the Triton modules are imported lazily, the
PyTorch references (:mod:`lowbit.kernels.reference`) always work, and the integration helpers fall
back to the references off CUDA. Entry points:

* :func:`kivi_decode_attention` (cache layer or parts, query ``[B, H_q, n_q, D]`` -> ``[B, H_q, n_q, D]``)
* :class:`FusedKiviCache` / :class:`FusedKiviLayer` and :func:`use_kivi_kernels` /
  :func:`register_kivi_attention` (transformers ``AttentionInterface`` name ``"lowbit_kivi"``)
* :func:`quantize_pack_keys` / :func:`quantize_pack_values` (KIVI flush)
* :func:`quantize_activation` / :func:`repack_weight` / :func:`w4a8_gemm` and
  :func:`quant_linear_forward` (a CUDA forward for ``lowbit.wa.QuantLinear``)
* ``lowbit.kernels.bench.app``: the ``lowbit bench`` typer app.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "kivi_decode_attention": "lowbit.kernels.integration",
    "decode_parts": "lowbit.kernels.integration",
    "FusedKiviCache": "lowbit.kernels.integration",
    "FusedKiviLayer": "lowbit.kernels.integration",
    "kivi_attention_forward": "lowbit.kernels.integration",
    "register_kivi_attention": "lowbit.kernels.integration",
    "use_kivi_kernels": "lowbit.kernels.integration",
    "quant_linear_forward": "lowbit.kernels.integration",
    "supports_quant_linear": "lowbit.kernels.integration",
    "kivi_decode_attention_parts": "lowbit.kernels.kivi_attention",
    "quantize_pack_keys": "lowbit.kernels.kivi_quant",
    "quantize_pack_values": "lowbit.kernels.kivi_quant",
    "quantize_activation": "lowbit.kernels.gemm",
    "repack_weight": "lowbit.kernels.layout",
    "w4a8_gemm": "lowbit.kernels.gemm",
    "GemmConfig": "lowbit.kernels.layout",
    "KiviParts": "lowbit.kernels.reference",
    "kivi_parts": "lowbit.kernels.reference",
    "decode_attention_ref": "lowbit.kernels.reference",
}

__all__ = sorted(_LAZY)


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
