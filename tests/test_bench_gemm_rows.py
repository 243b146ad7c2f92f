"""`lowbit bench gemm`'s per-method rows (issue 14's result format), from a measured point's fields."""

import pytest

from lowbit.bench.gemm import method_rows


def test_method_rows_ratios_and_paths():
    row = {"M": 16, "N": 4096, "K": 14336, "cublas_bf16_us": 50.0, "cublas_bf16_eager_us": 60.0,
           "two_launch_w4a8_us": 25.0, "two_launch_w4a8_eager_us": 40.0,
           "fused_w4a8_us": 20.0, "fused_w4a8_eager_us": 24.0, "fused_w4a8_bit_exact": True,
           "two_launch_fmpq_us": 30.0, "two_launch_fmpq_eager_us": 48.0}  # fmpq's fused path not measured here
    rows = {r["method"]: r for r in method_rows(row)}
    assert set(rows) == {"w4a8", "w4a8_fused", "fmpq_w4a4"}
    assert rows["w4a8"]["graph_speedup"] == pytest.approx(2.0) and rows["w4a8"]["eager_speedup"] == pytest.approx(1.5)
    assert rows["w4a8_fused"]["eager_speedup"] == pytest.approx(2.5) and rows["w4a8_fused"]["bit_exact_vs_two_launch"]
    assert rows["fmpq_w4a4"]["bit_exact_vs_two_launch"] is None
    assert all((r["m"], r["n"], r["k"]) == (16, 4096, 14336) for r in rows.values())
    assert method_rows({"M": 1, "N": 8, "K": 8, "cublas_bf16_us": 1.0, "cublas_bf16_eager_us": 1.0}) == []


@pytest.mark.parametrize("label,suffix", [("two_prepared", "_two_prepared"), ("fused_prepared", "_fused_prepared")])
def test_method_rows_prepared_layer_paths(label, suffix):
    row = {"M": 1, "N": 4096, "K": 4096, "cublas_bf16_us": 20.0, "cublas_bf16_eager_us": 30.0,
           f"{label}_fmpq_us": 10.0, f"{label}_fmpq_eager_us": 12.0, f"{label}_fmpq_bit_exact": False,
           f"{label}_fmpq_unfolded_us": 16.0, f"{label}_fmpq_unfolded_eager_us": 20.0}
    r, u = method_rows(row)
    assert r["method"] == "fmpq_w4a4" + suffix and r["eager_speedup"] == pytest.approx(2.5)
    assert r["bit_exact_vs_two_launch"] is False and r["graph_speedup"] == pytest.approx(2.0)
    assert u["method"] == "fmpq_w4a4_unfolded" + suffix and u["eager_speedup"] == pytest.approx(1.5)
    assert u["bit_exact_vs_two_launch"] is None  # not checked in this row


def test_method_rows_fp8_prefill():
    row = {"M": 4096, "N": 4096, "K": 14336, "cublas_bf16_us": 650.0, "cublas_bf16_eager_us": 660.0,
           "fp8_prefill_us": 500.0, "fp8_prefill_eager_us": 550.0}
    (r,) = method_rows(row)
    assert r["method"] == "fp8_prefill" and r["graph_speedup"] == pytest.approx(1.3)
    assert r["eager_speedup"] == pytest.approx(1.2)
