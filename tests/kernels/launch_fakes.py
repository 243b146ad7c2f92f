"""Stand-ins for a Triton JIT function and its compiled kernel (CPU tests of lowbit.kernels.launch and its users):
the JIT records each compile and hands out a compiled kernel that records each launch."""

from __future__ import annotations


class FakeCompiled:
    function, packed_metadata = "fn-handle", "meta"

    def __init__(self):
        self.runs = []

    def run(self, *args):
        self.runs.append(args)


class FakeJit:
    def __init__(self, arg_names=("X", "n", "BLOCK", "FLAG")):
        self.arg_names = list(arg_names)
        self.compiles, self.compiled = [], []

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.compiles.append((grid, args, kwargs))
            self.compiled.append(FakeCompiled())
            return self.compiled[-1]
        return call
