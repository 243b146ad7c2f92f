"""Relaunch a compiled Triton kernel without the JIT's per-call work.

``kernel[grid](...)`` binds and specializes every argument, builds a cache key and parses the launch options on every
call: tens of microseconds from Python on the H200, more than a decode-sized W4Ax GEMM runs on the GPU. A
:class:`FastLaunch` keys its calls on what decides the compiled kernel (integer arguments exactly, tensors by dtype
and 16-byte alignment, the constexprs and options), compiles through the JIT the first time a key is seen, and calls
that compiled kernel's own launcher directly afterwards: the same binary, the same arguments. Launch hooks (Triton's
profiler) take the JIT path.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # CUDA builds only
_device = getattr(torch._C, "_cuda_getDevice", None)


MAX_KEYS = 4096  # calls remembered per kernel


class Recording:
    """The launches :class:`FastLaunch` kernels made while it was active: ``launches`` holds ``(run, head, argv)``
    per launch (``run(*head, *argv)`` repeats it), ``complete`` is False when a launch could not be recorded (no
    compiled launcher, a launch hook active, or a launch outside FastLaunch that said so through :func:`unrecorded`)."""

    def __init__(self):
        self.launches: list[tuple] = []
        self.complete = True


_RECORDINGS: list[Recording] = []


@contextmanager
def recording():
    """``with recording() as rec:`` -- the FastLaunch launches made inside, in order (see :class:`Recording`)."""
    rec = Recording()
    _RECORDINGS.append(rec)
    try:
        yield rec
    finally:
        _RECORDINGS.remove(rec)


def unrecorded() -> None:
    """Say that a launch is made outside :class:`FastLaunch` (a JIT launch with descriptors, a library call): the
    active recordings cannot repeat the call they are in."""
    for rec in _RECORDINGS:
        rec.complete = False


def _head(compiled, grid: tuple, stream) -> tuple:
    """The compiled launcher's arguments before the kernel's own: grid (3-D), stream, function, metadata, hooks."""
    return (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream, compiled.function,
            compiled.packed_metadata, None, None, None)


def _record(compiled, grid: tuple, stream, args: tuple, constexprs: list) -> None:
    head = _head(compiled, grid, stream)
    for rec in _RECORDINGS:
        rec.launches.append((compiled.run, head, list(args) + list(constexprs)))


def hooked() -> bool:
    """Whether a Triton launch hook is active (then calls take the JIT path, which runs them)."""
    from triton import knobs

    return _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook)


def _hooked(hook) -> bool:
    """Whether a launch hook does something (Triton 3.6 installs empty hook chains by default)."""
    return hook is not None and bool(getattr(hook, "calls", True))


class FastLaunch:
    """``FastLaunch(jit_fn)(grid, *positional, **constexprs_and_options)`` launches like ``jit_fn[grid](...)``."""

    def __init__(self, fn):
        self.fn = fn
        self.names = list(fn.arg_names)
        self.kernels: dict[tuple, tuple] = {}  # key -> (compiled kernel, the keyword arguments' values in order)

    @staticmethod
    def key(args: tuple, kwargs: dict) -> tuple:
        """What decides the compiled kernel of a call: the device, tensors' dtype and 16-byte alignment, the other
        arguments' values."""
        return (_device(),) + tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a
                                    for a in args) + tuple(kwargs.items())

    def compiled(self, args: tuple, kwargs: dict):
        """``(compiled kernel, the keyword arguments' values in signature order)`` of a call seen before, or None."""
        return self.kernels.get(self.key(args, kwargs))

    def __call__(self, grid: tuple[int, ...], *args, **kwargs):
        key = self.key(args, kwargs)
        hit = self.kernels.get(key)
        if hit is None or hooked():
            compiled = self.fn[grid](*args, **kwargs)
            rest = self.names[len(args):]
            ok = hasattr(compiled, "run") and all(n in kwargs for n in rest)
            if hit is None and ok:
                if len(self.kernels) >= MAX_KEYS:  # many shapes (prefill lengths): start over, the JIT still caches
                    self.kernels.clear()
                self.kernels[key] = (compiled, [kwargs[n] for n in rest])
            if _RECORDINGS:
                if ok and not hooked():
                    _record(compiled, grid, _raw_stream(_device()), args, [kwargs[n] for n in rest])
                else:
                    unrecorded()
            return
        compiled, constexprs = hit
        stream = _raw_stream(_device())
        compiled.run(*_head(compiled, grid, stream), *args, *constexprs)
        if _RECORDINGS:
            _record(compiled, grid, stream, args, constexprs)
