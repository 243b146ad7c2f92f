import json
import math

import pytest
import torch
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.eval import evaluate_kv, load_tokens, reference_run
from lowbit.eval.report import plot_quality_vs_bytes, results_table, write_json

runner = CliRunner()


@pytest.fixture(scope="module")
def run(smollm2):
    model, tok = smollm2
    ids = load_tokens(tok, n_tokens=96 + 32)
    ref = reference_run(model, ids, 96, 32)
    return model, ids, ref


def test_fp16_has_zero_kl_and_full_agreement(run):
    model, ids, ref = run
    r = evaluate_kv(model, ids, "fp16", 96, 32, reference=ref)
    assert r.kl_mean == 0.0 and r.top1_agree == 1.0
    assert r.ppl == pytest.approx(r.ppl_ref)
    assert r.kv_bytes == r.kv_bytes_fp16 > 0


def test_kivi_costs_quality_and_saves_bytes(run):
    model, ids, ref = run
    r4 = evaluate_kv(model, ids, "kivi:bits=4,group=32,residual=32", 96, 32, reference=ref)
    r2 = evaluate_kv(model, ids, "kivi:bits=2,group=32,residual=32", 96, 32, reference=ref)
    assert 0 < r4.kl_mean < r2.kl_mean
    assert r2.kv_bytes < r4.kv_bytes < r4.kv_bytes_fp16
    assert math.isfinite(r2.ppl) and r2.top1_agree < 1.0
    d = r2.to_dict()
    for key in ("method", "ppl", "ppl_ref", "kl_mean", "top1_agree", "kv_bytes", "kv_bytes_fp16", "tokens"):
        assert key in d


def test_report_outputs(run, tmp_path):
    model, ids, ref = run
    r = evaluate_kv(model, ids, "kivi:bits=4,group=32,residual=32", 96, 32, reference=ref)
    p = write_json([r], tmp_path / "x.json")
    assert json.loads(p.read_text())["results"][0]["method"] == r.method
    png = plot_quality_vs_bytes([r], tmp_path / "x.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert results_table([r]).row_count == 1


def test_protocol_validation(run):
    model, ids, _ = run
    with pytest.raises(ValueError, match="need 400 tokens"):
        reference_run(model, ids, 300, 100)
    with pytest.raises(ValueError, match="shape"):
        reference_run(model, ids[0], 10, 10)
    with pytest.raises(ValueError, match=">= 1"):
        reference_run(model, ids, 0, 10)


def test_cli_eval_writes_json(tmp_path, smollm2):
    out = tmp_path / "out.json"
    res = runner.invoke(app, ["eval", "--kv", "kivi:bits=2,group=32,residual=32", "--prefill", "64", "--tokens", "16", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["method"] == "kivi:bits=2,group=32,residual=32" and data["tokens"] == 16
    assert data["kv_bytes"] < data["kv_bytes_fp16"]


@pytest.mark.parametrize(
    "args,match",
    [
        (["eval", "--kv", "kivi:bits=3"], "allowed values are one of"),
        (["eval", "--kv", "lz4"], "allowed methods are fp16, kivi"),
        (["compare", "--kv", "kivi:zz=1"], "unknown option 'zz'"),
        (["eval", "--model", "/no/such/model"], "not found"),
    ],
)
def test_cli_bad_input_gives_clear_error(args, match):
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    assert match in " ".join(res.output.split())
