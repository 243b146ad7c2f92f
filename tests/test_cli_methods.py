"""The CLI wiring of the W/A and LUT families: eval, quantize, compare."""

import json

import pytest
from typer.testing import CliRunner

from lowbit.cli import app

runner = CliRunner()


def test_quantize_writes_a_loadable_checkpoint(tiny_dir, tmp_path):
    from lowbit.wa import load_quantized

    out = tmp_path / "q"
    res = runner.invoke(app, ["quantize", "--model", str(tiny_dir), "--wa", "w4a16:group=64", "--out", str(out)])
    assert res.exit_code == 0, res.output
    model = load_quantized(out, str(tiny_dir))
    assert model.lowbit_wa is not None or model is not None


def test_eval_with_wa_and_kv(tmp_path, tiny_dir):
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["eval", "--model", str(tiny_dir), "--wa", "fmpq:w=4,a=4,block=64,group=64", "--kv", "kivi:bits=4,group=32,residual=32",
                              "--prefill", "48", "--tokens", "8", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["method"].startswith("wa=fmpq") and data["kv_bytes"] < data["kv_bytes_fp16"]
    assert data["kl_mean"] > 0


def test_compare_sections(tmp_path, tiny_dir):
    res = runner.invoke(app, ["compare", "--model", str(tiny_dir), "--kv", "fp16", "--kv", "kivi:bits=2,group=32,residual=32",
                              "--lut", "silu:segments=8", "--wa", "w8a8", "--wa-kv", "w8a8|kivi:bits=4,group=32,residual=32",
                              "--wa-tokens", "64", "--prefill", "40", "--tokens", "8", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "compare.json").read_text())
    methods = [r["method"] for r in data["results"]]
    assert methods == ["fp16", "kivi:bits=2,group=32,residual=32", "lut=silu:segments=8", "wa=w8a8 + kivi:bits=4,group=32,residual=32"]
    assert [r["spec"] for r in data["meta"]["wa"]] == ["fp", "w8a8"]
    assert data["meta"]["wa"][1]["bytes"] < data["meta"]["wa"][0]["bytes"]
    assert (tmp_path / "compare.png").exists()


@pytest.mark.parametrize(
    "args,match",
    [
        (["eval", "--wa", "fmpq:w=3"], "allowed values are one of"),
        (["eval", "--lut", "relu"], "unknown LUT function 'relu'"),
        (["eval", "--lut", "exp:segments=8"], "exp"),
        (["compare", "--wa-kv", "fmpq"], "must be 'WA_SPEC|KV_SPEC'"),
    ],
)
def test_bad_method_specs(args, match, smollm2):
    res = runner.invoke(app, args + ["--prefill", "16", "--tokens", "4"])
    assert res.exit_code == 2, res.output
    assert match in " ".join(res.output.split()) and "Traceback" not in res.output


def test_compare_budget_section(tmp_path, tiny_dir):
    res = runner.invoke(app, ["compare", "--model", str(tiny_dir), "--kv", "fp16", "--lut", "", "--wa", "", "--wa-kv", "",
                              "--budgets", "0.5", "--budget-methods", "streaming,kvmerger+kivi:bits=4",
                              "--task", "passkey", "--task-length", "200", "--task-samples", "1",
                              "--prefill", "64", "--tokens", "8", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "compare.json").read_text())["meta"]["budget_section"]
    assert [(r["method"], r["budget"]) for r in rows] == [("fp16", 1.0), ("streaming", 0.5), ("kvmerger+kivi:bits=4", 0.5)]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["ppl"] > 0 for r in rows)
    assert (tmp_path / "compare-budget.png").exists()
    bad = runner.invoke(app, ["compare", "--budgets", "half"])
    assert bad.exit_code == 2 and "comma-separated fractions" in bad.output
