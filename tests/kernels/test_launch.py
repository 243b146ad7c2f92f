"""FastLaunch's bookkeeping on the CPU, with a stand-in for Triton's JIT function and compiled kernel: the first call
of a key compiles through the JIT, later ones call the compiled launcher with every argument in signature order;
alignment, integers, constexprs and active launch hooks decide which path a call takes."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from launch_fakes import FakeJit as _Jit

from lowbit.kernels import launch


@pytest.fixture
def fake_triton(monkeypatch):
    runtime = types.SimpleNamespace(launch_enter_hook=types.SimpleNamespace(calls=[]), launch_exit_hook=None)
    mod = types.ModuleType("triton")
    mod.knobs = types.SimpleNamespace(runtime=runtime)
    monkeypatch.setitem(sys.modules, "triton", mod)
    monkeypatch.setattr(launch, "_device", lambda: 0)
    monkeypatch.setattr(launch, "_raw_stream", lambda device: 1234)
    return runtime


def test_second_call_of_a_key_takes_the_compiled_launcher(fake_triton):
    jit = _Jit()
    fast = launch.FastLaunch(jit)
    x = torch.randn(64)
    fast((3, 2), x, 7, BLOCK=32, FLAG=True, num_warps=4)
    assert len(jit.compiles) == 1 and not jit.compiled[0].runs
    y = torch.randn(64)  # another tensor, same dtype and alignment: same key
    fast((5,), y, 7, BLOCK=32, FLAG=True, num_warps=4)
    assert len(jit.compiles) == 1
    (run,) = jit.compiled[0].runs
    assert run[:9] == (5, 1, 1, 1234, "fn-handle", "meta", None, None, None)
    assert run[9] is y and run[10:] == (7, 32, True)  # positional, then the constexprs in signature order


def test_what_changes_the_key(fake_triton):
    jit = _Jit()
    fast = launch.FastLaunch(jit)
    x = torch.randn(65)
    calls = [((x, 7), dict(BLOCK=32, FLAG=True)), ((x[1:], 7), dict(BLOCK=32, FLAG=True)),  # 4-byte offset
             ((x, 8), dict(BLOCK=32, FLAG=True)), ((x.half(), 7), dict(BLOCK=32, FLAG=True)),
             ((x, 7), dict(BLOCK=64, FLAG=True)), ((x, 7), dict(BLOCK=32, FLAG=True, num_warps=8))]
    for args, kwargs in calls:
        fast((1,), *args, **kwargs)
    assert len(jit.compiles) == len(calls) == len(fast.kernels)


def test_active_hooks_and_missing_constexprs_take_the_jit(fake_triton):
    jit = _Jit()
    fast = launch.FastLaunch(jit)
    x = torch.randn(8)
    fast((1,), x, 1, BLOCK=8, FLAG=False)
    fake_triton.launch_enter_hook.calls.append(print)  # a profiler attached
    fast((1,), x, 1, BLOCK=8, FLAG=False)
    assert len(jit.compiles) == 2 and len(fast.kernels) == 1
    fake_triton.launch_enter_hook.calls.clear()
    fast((1,), x, 1, BLOCK=8, FLAG=False)
    assert len(jit.compiles) == 2
    fast((1,), x, 1, BLOCK=8)  # FLAG left to a default: never cached (its value is not known here)
    fast((1,), x, 1, BLOCK=8)
    assert len(jit.compiles) == 4


def test_the_remembered_calls_are_bounded(fake_triton, monkeypatch):
    monkeypatch.setattr(launch, "MAX_KEYS", 3)
    jit = _Jit()
    fast = launch.FastLaunch(jit)
    x = torch.randn(8)
    for n in range(7):
        fast((1,), x, n, BLOCK=8, FLAG=False)
    assert len(fast.kernels) <= 3
