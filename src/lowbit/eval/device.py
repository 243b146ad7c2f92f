"""Where quality is measured: ``--device cpu|cuda`` (issue 16's held-out runs on a lent GPU).

:func:`load_for_quality` loads the model in float32 with TF32 off and marks it so that the streaming
protocol builds every KV cache on the PyTorch reference path (``make_cache(kernels=False)``): the same
quantization code and float32 compute on either device, so GPU figures equal CPU ones up to float32
summation order. ``--device auto`` keeps ``load_model``'s defaults (bfloat16 and the Triton kernels on CUDA).
"""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; ``cuda`` (or ``cuda:N``) must be available."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
        raise ValueError(f"unknown device '{device}': allowed are {', '.join(DEVICES)} (or cuda:N)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch {torch.__version__} sees no CUDA device here")
    return device


def exact_float32() -> dict:
    """Full float32 matmuls and convolutions (TF32 off for cuBLAS and cuDNN); returns the settings now in force."""
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def load_for_quality(name: str, device: str = "cpu"):
    """``(model, tokenizer)`` in float32 on `device` (resolved by :func:`resolve_device`), TF32 off, and
    ``model.lowbit_kernels = False``: :func:`lowbit.eval.evaluate_kv` then uses the reference KV path."""
    from lowbit.models import load_model

    device = resolve_device(device)
    exact_float32()
    model, tok = load_model(name, dtype=torch.float32, device=device)
    model.lowbit_kernels = False
    return model, tok
