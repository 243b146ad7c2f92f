"""The one-launch permuted RMSNorm against PermutedRMSNorm's PyTorch path (float sums in another order: equal up to
the last bit of the output dtype). Runs on CUDA, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``
with Triton installed); skipped otherwise."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None or not (torch.cuda.is_available() or INTERPRET),
                                reason="needs Triton and CUDA (or TRITON_INTERPRET=1)")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _norm(k, dtype, seed):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from lowbit.wa.fold import PermutedRMSNorm

    g = torch.Generator().manual_seed(seed)
    norm = LlamaRMSNorm(k, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(k, generator=g) * 2 + 0.1)
    return PermutedRMSNorm(norm.to(DEV, dtype), torch.randperm(k, generator=g)).to(DEV)


@pytest.mark.parametrize("k,lead,x_dtype,w_dtype", [(96, (1,), torch.bfloat16, torch.bfloat16),
                                                    (4096, (2, 3), torch.bfloat16, torch.bfloat16),
                                                    (576, (5,), torch.float16, torch.float32),
                                                    (1000, (4, 1), torch.float32, torch.float32)])
def test_one_launch_matches_the_module(k, lead, x_dtype, w_dtype):
    from lowbit.kernels.rmsnorm import permuted_rmsnorm

    norm = _norm(k, w_dtype, seed=k)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(*lead, k, generator=g) * 3).to(DEV, x_dtype)
    x[..., 7] = 40.0  # an outlier channel
    want = norm(x)
    got = permuted_rmsnorm(x, norm.perm.int(), norm.permuted_weight(), norm.variance_epsilon)
    assert got.shape == want.shape and got.dtype == want.dtype
    # the normalized input is rounded to x's dtype before the weight multiplies it (as the module does): a last-bit
    # difference of the rsqrt shows there, at x's precision, when x is narrower than the output
    ulp = max(torch.finfo(want.dtype).eps, torch.finfo(x_dtype).eps)
    assert ((got.float() - want.float()).abs() <= 2 * ulp * want.float().abs() + 1e-6).all()
    strided = x.transpose(0, -1).contiguous().transpose(0, -1) if len(lead) > 1 else x
    assert torch.equal(permuted_rmsnorm(strided, norm.perm, norm.permuted_weight(), norm.variance_epsilon), got)


def test_bad_shapes_are_refused():
    from lowbit.kernels.rmsnorm import permuted_rmsnorm

    norm = _norm(64, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"shape \(64,\)"):
        permuted_rmsnorm(torch.randn(2, 64, device=DEV), norm.perm[:32], norm.permuted_weight(), 1e-5)


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="the module takes the kernel on CUDA only")
def test_module_takes_the_kernel_when_asked(monkeypatch):
    from lowbit.kernels import rmsnorm
    from lowbit.wa import fold

    norm = _norm(256, torch.bfloat16, seed=3)
    x = torch.randn(3, 256, device=DEV, dtype=torch.bfloat16)
    calls = []
    real = rmsnorm.permuted_rmsnorm
    monkeypatch.setattr(rmsnorm, "permuted_rmsnorm", lambda *a: calls.append(1) or real(*a))
    want = norm(x)
    monkeypatch.setattr(fold, "FUSED_NORM", True)
    got = norm(x)
    assert calls and torch.allclose(got.float(), want.float(), rtol=2e-2, atol=1e-3)

