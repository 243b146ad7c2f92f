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


@pytest.fixture
def two(monkeypatch, fused):
    from lowbit.kernels import gemm

    jits = {}
    for name, fn in (("_ACT_QUANT", gemm._act_quant_kernel), ("_W4A8_GEMM", gemm._w4a8_gemm_kernel)):
        jits[name] = FakeJit(fn.arg_names)
        monkeypatch.setattr(gemm, name, launch.FastLaunch(jits[name]))
    monkeypatch.setattr(gemm, "_sm_count", lambda device: 132)
    return fused[0], gemm, jits


@pytest.mark.parametrize("m", [1, 16])
def test_two_launch_relaunches_the_quantizer_and_gemm(two, m):
    w4, gemm, jits = two
    ops = _operands()
    prepared = w4.PreparedLinear(**ops, launches="two")
    prepared(torch.randn(m, 1000, dtype=torch.bfloat16))
    order = ("_ACT_QUANT", "_W4A8_GEMM")
    assert [len(jits[n].compiled) for n in order] == [1, 1]  # split-K at this size, reduced inside the GEMM
    (steps,) = prepared._calls.values()
    assert len(steps) == 2
    x2 = torch.randn(m, 1000, dtype=torch.bfloat16)
    y2 = prepared(x2)
    got = [jits[n].compiled[0].runs[-1] for n in order]
    gemm.linear_two_launch(x2, *prepared.ops)  # the function itself, through the same launchers
    want = [jits[n].compiled[0].runs[-1] for n in order]
    assert all(len(jits[n].compiled[0].runs) == 2 for n in order)
    for g, w in zip(got, want):
        assert len(g) == len(w) and all(_same(a, b) for a, b in zip(g, w))
        for i, a in enumerate(g):
            if a is x2:  # x where the function passes (a view of) x
                assert w[i].data_ptr() == x2.data_ptr()
            elif a is y2:  # the new output where the function passes its fresh one
                assert w[i].shape == y2.shape and w[i].data_ptr() != x2.data_ptr()
            elif isinstance(a, torch.Tensor):  # the layer's operands and the workspace, the buffers the function uses
                assert a.data_ptr() == w[i].data_ptr()
    assert any(a is x2 for a in got[0]) and any(a is y2 for a in got[1])  # the quantizer reads x, the GEMM writes y


def test_not_recorded_when_a_launch_reads_a_slice_of_x(fused, monkeypatch):
    w4, jit = fused
    prepared = w4.PreparedLinear(**_operands())
    real = w4._fused_call

    def sliced(x, *a):  # a launch that reads part of x: relaunching with a new x could not swap it
        grid, args, kwargs, out = real(x, *a)
        return grid, (x[:, 1:],) + args[1:], kwargs, out

    monkeypatch.setattr(w4, "_fused_call", sliced)
    x = torch.randn(2, 1000, dtype=torch.bfloat16)
    prepared(x)
    assert list(prepared._calls.values()) == [None]
    prepared(x)
    assert len(jit.compiled) == 1 and len(jit.compiled[0].runs) == 1  # the second call went through the function


def test_launches_option_is_checked():
    from lowbit.kernels import w4ax_fused

    with pytest.raises(ValueError, match="launches must be one of"):
        w4ax_fused.PreparedLinear(**_operands(), launches="three")


def test_a_launch_outside_fastlaunch_leaves_the_call_unrecorded(two, monkeypatch):
    """The large-M path's JIT launches (weight unpack, then the INT8 GEMM) say they cannot be replayed: every call of
    that key takes the function."""
    from lowbit.kernels.layout import GemmConfig

    w4, gemm, jits = two
    unpack, i8 = FakeJit(gemm._unpack_weight_kernel.arg_names), FakeJit(gemm._i8_gemm_kernel.arg_names)
    monkeypatch.setattr(gemm, "_unpack_weight_kernel", unpack)
    monkeypatch.setattr(gemm, "_i8_gemm_kernel", i8)
    monkeypatch.setattr(gemm, "_has_tma", lambda device: False)
    cfg = GemmConfig(64, 128, 4, 4, split_k=1, unpacked=True)
    prepared = w4.PreparedLinear(**_operands(), config=cfg, launches="two")
    for _ in range(2):
        prepared(torch.randn(4, 1000, dtype=torch.bfloat16))
    assert list(prepared._calls.values()) == [None]
    assert len(unpack.compiles) == 2 and len(i8.compiles) == 2  # both calls ran the function's own launches
    ops = _operands()
    with launch.recording() as rec:  # the mechanism itself: a JIT launch outside FastLaunch marks the recording
        gemm.unpack_weight_int8(ops["w_kernel"], 128, 128)
    assert not rec.complete and not rec.launches
