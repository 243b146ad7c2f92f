"""PreparedLinear's bookkeeping on the CPU, with a stand-in for Triton's JIT function and compiled kernel: its first
call of a key goes through w4ax_linear (compiling), later ones relaunch the compiled kernel with exactly the
arguments w4ax_linear would pass, the new activations and output swapped in. Needs Triton importable (the module
defines the kernel); the GPU test in test_w4ax_fused.py checks the bits."""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("triton")

from launch_fakes import FakeJit  # noqa: E402

from lowbit.kernels import launch  # noqa: E402


@pytest.fixture
def fused(monkeypatch):
    from lowbit.kernels import w4ax_fused

    jit = FakeJit(w4ax_fused._w4ax_fused_kernel.arg_names)
    monkeypatch.setattr(w4ax_fused, "_LAUNCH", launch.FastLaunch(jit))
    monkeypatch.setattr(w4ax_fused, "_sm_count", lambda device: 132)
    monkeypatch.setattr(launch, "_device", lambda: 0)
    monkeypatch.setattr(launch, "_raw_stream", lambda device: 0)
    return w4ax_fused, jit


def _operands(n=96, k=1024, seed=0):
    from lowbit.kernels.layout import repack_weight

    g = torch.Generator().manual_seed(seed)
    return dict(block=128, w_kernel=repack_weight(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g), 128),
                w_scale=(torch.rand(n, k // 128, generator=g) * 0.05 + 0.001).half(), group=128,
                int8_mask=(torch.rand(k // 128, generator=g) < 0.3).to(torch.int8),
                perm=torch.randperm(1000, generator=g).int(), bias=torch.randn(n, generator=g))


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            a.dtype == b.dtype and a.stride() == b.stride()
    return a == b


@pytest.mark.parametrize("m", [1, 7, 16])
def test_later_calls_relaunch_with_w4ax_linears_arguments(fused, m):
    w4, jit = fused
    ops = _operands()
    prepared = w4.PreparedLinear(**ops)
    x1 = torch.randn(m, 1000, dtype=torch.bfloat16)
    y1 = prepared(x1)
    assert len(jit.compiled) == 1 and not jit.compiled[0].runs and len(prepared._calls) == 1
    x2 = torch.randn(m, 1000, dtype=torch.bfloat16)
    y2 = prepared(x2)
    (got,) = jit.compiled[0].runs
    assert y2 is not y1 and y2.shape == (m, 96) and y2.dtype == torch.bfloat16
    w4.w4ax_linear(x2, **ops)  # the generic path: the same compiled kernel, its launcher called directly
    want = jit.compiled[0].runs[1]
    assert len(got) == len(want) and all(_same(a, b) for a, b in zip(got, want))
    tensors = [i for i, a in enumerate(got) if isinstance(a, torch.Tensor)]
    assert [got[i] is x2 for i in tensors] == [want[i] is x2 for i in tensors]  # x in the same slots
    assert any(got[i] is y2 for i in tensors)  # and the new output
    for name in ("w_kernel", "w_scale", "bias"):  # the layer's operands, as stored
        assert any(got[i] is ops[name] for i in tensors)


def test_keys_and_fallbacks(fused, monkeypatch):
    w4, jit = fused
    prepared = w4.PreparedLinear(**_operands())
    x = torch.randn(4, 1000, dtype=torch.bfloat16)
    prepared(x)
    prepared(torch.randn(5, 1000, dtype=torch.bfloat16))  # another M: another key
    out = torch.empty(4, 96, dtype=torch.bfloat16)
    assert prepared(x, out) is out  # a given output: another key (its stride and alignment)
    assert len(prepared._calls) == 3
    prepared(torch.randn(1000, 4, dtype=torch.bfloat16).t())  # strided channels: the generic path, not recorded
    assert len(prepared._calls) == 3
    with pytest.raises(ValueError, match="out must be a row-contiguous"):
        prepared(x, torch.empty(4, 95, dtype=torch.bfloat16))
    from triton import knobs  # an active launch hook (Triton's profiler): every call through the JIT, which runs it

    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", types.SimpleNamespace(calls=[print]))
    runs, compiles = sum(len(c.runs) for c in jit.compiled), len(jit.compiled)
    prepared(x)
    assert sum(len(c.runs) for c in jit.compiled) == runs and len(jit.compiled) == compiles + 1
