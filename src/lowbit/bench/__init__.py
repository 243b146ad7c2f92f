"""Benchmarks behind ``lowbit bench``: GPU kernels beside their PyTorch baselines, and the server.

* :mod:`lowbit.bench.attention`: KIVI-2/4 decode attention vs torch SDPA on bf16 KV (Llama-3-8B heads).
* :mod:`lowbit.bench.gemm`: W4A8 and FMPQ-W4A4 GEMM (and the activation quantizer) vs cuBLAS bf16 and
  ``torch._int_mm`` (Llama-3-8B linear shapes).
* :mod:`lowbit.bench.e2e`: decode tokens/s of a random Llama-3-8B-shaped model, bf16 vs KIVI kernels and W4Ax.
* :mod:`lowbit.bench.serve`: a bounded loopback load test of the server, one row per KV method.
* :mod:`lowbit.bench.timing`: the shared timing, environment and output helpers.

Every kernel timing is ``triton.testing.do_bench``'s median (warm-up first), inputs are fresh random
tensors rotated across enough copies to exceed the L2 cache, and each kernel is checked against its
PyTorch reference before it is timed. Triton and CUDA are imported lazily: importing these modules
needs neither.
"""
