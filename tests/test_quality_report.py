"""The quality report of issue 16: compare --offset, bits at 4,096 tokens, families and their frontier."""

import json

import pytest
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.eval.report import family, frontier
from lowbit.eval.streaming import EvalResult, bits_per_element_at, kv_family

runner = CliRunner()


def _result(method, bits, kl, fam):
    return EvalResult(method, 10.0, 9.0, kl, kl, 0.9, 100, 400, 8, 8, 1.0, extra={"bits_at_4096": bits, "family": fam})


def test_frontier_keeps_only_points_that_beat_every_cheaper_one():
    pts = [(3.0, 0.2), (2.5, 0.5), (5.0, 0.05), (4.0, 0.3), (3.5, 0.1), (16.0, 0.0)]
    assert frontier(pts) == [(2.5, 0.5), (3.0, 0.2), (3.5, 0.1), (5.0, 0.05), (16.0, 0.0)]


def test_families():
    assert kv_family("2bit") == "preset" and kv_family("kivi:bits=4") == "kivi"
    assert kv_family("kvmerger:budget=0.5+kivi:bits=2") == "kvmerger+kivi"
    assert family(_result("wa=w8a8 + kivi:bits=4", 5.0, 0.1, "kivi")) == "W/A+KV"
    assert family(_result("kiviplus:rotate=kv", 3.0, 0.1, "kiviplus")) == "kiviplus"


def test_bits_at_4096_of_faithful_kivi(tiny_llama):
    # head_dim 32, G32, R128: keys 2+1 bits; values: 3968 tokens at 3 bits, 128 at 16
    want = (3 + (3968 * 3 + 128 * 16) / 4096) / 2
    assert bits_per_element_at("kivi:bits=2", tiny_llama.config) == pytest.approx(want)


def test_compare_offset_presets_and_improved_wa(tmp_path, tiny_dir):
    args = ["compare", "--model", str(tiny_dir), "--kv", "fp16", "--kv", "2bit", "--kv", "kivi:bits=2", "--lut", "",
            "--wa", "w4a16:group=64,gptq=true,rotate=hadamard", "--wa-kv", "", "--wa-tokens", "64", "--prefill", "40", "--tokens", "8"]
    runs = {}
    for offset in (0, 5000):
        res = runner.invoke(app, args + ["--offset", str(offset), "--out", str(tmp_path / str(offset))])
        assert res.exit_code == 0, res.output
        runs[offset] = json.loads((tmp_path / str(offset) / "compare.json").read_text())
    data = runs[5000]
    assert data["meta"]["offset"] == 5000
    fp, two, kivi = data["results"]
    assert two["method"] == "2bit" and two["extra"]["family"] == "preset" and two["extra"]["bytes_exact"]
    assert 3.0 < two["extra"]["bits_at_4096"] < 4.0  # head_dim 32: 16 of 32 key channels at 4 bits
    assert two["kv_bytes"] == fp["kv_bytes"]  # 48 tokens: all in the fp16 residual window
    assert kivi["extra"]["bits_at_4096"] == pytest.approx((3 + (3968 * 3 + 128 * 16) / 4096) / 2)
    assert runs[0]["results"][0]["ppl_ref"] != fp["ppl_ref"]  # another stretch of text
    assert [r["spec"] for r in data["meta"]["wa"]] == ["fp", "w4a16:group=64,gptq=true,rotate=hadamard"]
    assert (tmp_path / "5000" / "compare.png").exists()
