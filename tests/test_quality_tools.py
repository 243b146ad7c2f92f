"""Issue 16's GPU run tooling: `--device` on compare, tools/quality_runs.py's specs, tools/fill_quality.py's tables."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.eval.device import load_for_quality, resolve_device
from lowbit.kv import parse_kv_spec
from lowbit.wa import parse_wa_spec

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_spec_of_the_driver_parses():
    q = _tool("quality_runs")
    for kv in q.KV_ROWS + [s for _, s in q.KV_ABLATION]:
        parse_kv_spec(kv)
    rows = q.wa_rows()
    for section in rows.values():
        for _, wa in section:
            if wa != "fp":
                parse_wa_spec(wa)
    assert q.spec("fmpq:w=4,a=4", {"gptq": "true", "int8_frac": "0.5"}) == "fmpq:w=4,a=4,int8_frac=0.5,gptq=true"
    assert len({s for s in rows["wa"]}) == len(rows["wa"])


def test_device_resolution():
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(smollm2[1]), max_position_embeddings=2048)
    path = tmp_path_factory.mktemp("tinyq")
    LlamaForCausalLM(config).save_pretrained(path)
    smollm2[1].save_pretrained(path)
    return path


def test_quality_loading_and_compare_device(tmp_path, tiny_dir):
    model, _ = load_for_quality(str(tiny_dir), "cpu")
    assert next(model.parameters()).dtype == torch.float32 and model.lowbit_kernels is False
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    args = ["compare", "--model", str(tiny_dir), "--kv", "fp16", "--kv", "2bit", "--lut", "", "--wa", "w4a16:group=64,gptq=true",
            "--wa-kv", "", "--wa-tokens", "64", "--prefill", "40", "--tokens", "4", "--offset", "100"]
    res = runner.invoke(app, args + ["--device", "cpu", "--out", str(tmp_path / "cpu")])
    assert res.exit_code == 0, res.output
    base = runner.invoke(app, args + ["--out", str(tmp_path / "auto")])
    assert base.exit_code == 0, base.output
    a, b = (json.loads((tmp_path / d / "compare.json").read_text()) for d in ("cpu", "auto"))
    assert [r["kl_mean"] for r in a["results"]] == pytest.approx([r["kl_mean"] for r in b["results"]], rel=1e-4, abs=1e-7)
    if not torch.cuda.is_available():
        res = runner.invoke(app, args + ["--device", "cuda", "--out", str(tmp_path / "cuda")])
        assert res.exit_code == 2 and "no CUDA device" in res.output


def _kv_row(spec, off, kl, ppl=10.0):
    return {"spec": spec, "label": spec, "offset": off, "ppl": ppl, "ppl_ref": 9.0, "kl_mean": kl, "top1": 0.9,
            "bits_at_4096": {"2bit": 3.233, "kivi:bits=2": 3.203}.get(spec, 16.0), "bytes_exact": True}


def _wa_row(spec, label, off, ppl):
    return {"spec": spec, "label": label, "offset": off, "ppl": ppl, "linear_bits": 4.5, "bytes": 2**20}


def test_fill_quality_writes_tables_between_markers(tmp_path):
    f = _tool("fill_quality")
    out, root = tmp_path / "out", tmp_path / "root"
    out.mkdir()
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "QUALITY.md").write_text("# Q\n\nHELDOUT_KV\n\nHELDOUT_WA\n\nLIMITS_WA\n")
    (root / "docs" / "FMPQ.md").write_text("SWEEP_FMPQ\n")
    (root / "README.md").write_text("x\n\nQUALITY_README\n\ny\n")
    meta = {"quick": False, "complete": True, "device": "cuda", "gpu": "H200", "wa_tokens": 2048}
    kv = [_kv_row(s, o, kl) for o in f.KV_HELD for s, kl in (("fp16", 0.0), ("kivi:bits=2", 0.3), ("2bit", 0.1))]
    (out / "kv.json").write_text(json.dumps({"meta": meta, "rows": kv}))
    wa = [_wa_row("fp", "fp16", o, 20.0) for o in (0, 160000)] + [_wa_row("w4a16", "W4A16 RTN", o, 25.0) for o in (0, 160000)]
    (out / "wa.json").write_text(json.dumps({"meta": meta, "rows": wa}))
    assert f.main([str(out), "--root", str(root)]) == 0
    q = (root / "docs" / "QUALITY.md").read_text()
    assert "<!-- HELDOUT_KV -->" in q and "| `2bit` | 3.233 | 10.000 | +11.1 % | 0.1000 |" in q
    assert "`2bit` KL / KIVI-2 KL = 0.33 (target ≤ 0.5: met)" in q
    assert "| W4A16 RTN | `w4a16` | 4.50 | 1.0 | 25.000 | +25.0 % | +25.0 % | ≤ +15 %: missed |" in q
    assert "W4A16 at g128: best held-out Δppl +25.0 % (`w4a16`); target ≤ +15 % missed." in q
    assert (root / "docs" / "FMPQ.md").read_text() == "SWEEP_FMPQ\n"  # no sweep JSON: left as it is
    assert "<!-- QUALITY_README -->" in (root / "README.md").read_text()
    kv[-1]["kl_mean"] = 0.2  # a second run replaces the tables in place
    (out / "kv.json").write_text(json.dumps({"meta": meta, "rows": kv}))
    assert f.main([str(out), "--root", str(root)]) == 0
    q2 = (root / "docs" / "QUALITY.md").read_text()
    assert q2.count("<!-- HELDOUT_KV -->") == 1 and "0.1250" in q2


def test_rows_from_two_devices_are_marked_and_keep_where_they_ran(tmp_path):
    from types import SimpleNamespace

    q, f = _tool("quality_runs"), _tool("fill_quality")
    gpu = {"quick": False, "complete": True, "device": "cuda:0", "gpu": "H200", "torch": "2.11", "transformers": "5.17",
           "wa_tokens": 2048}
    kv = [_kv_row(s, o, kl) for o in f.KV_HELD for s, kl in (("fp16", 0.0), ("kivi:bits=2", 0.3), ("2bit", 0.1))]
    (tmp_path / "kv.json").write_text(json.dumps({"meta": gpu, "rows": kv, "skipped": ["hfq:bits=2,group=32"]}))
    # a resumed process on another device: the old rows keep their device, the new rows carry theirs
    args = SimpleNamespace(out=str(tmp_path), force=False, quick=False, exclude=[])
    cpu_run = {"where": "cpu", "torch": "2.13", "transformers": "5.24"}
    runner = SimpleNamespace(args=args, meta=lambda name: {"quick": False, "device": "cpu", "gpu": None, "wa_tokens": 2048},
                             out_of_time=lambda: False)
    sec = q.Section(runner, "kv")
    assert all(r["run"] == {"where": "H200", "torch": "2.11", "transformers": "5.17"} for r in sec.rows)
    for o in f.KV_HELD:
        sec.add(dict(_kv_row("hfq:bits=2,group=32", o, 0.25), run=cpu_run))
    sec.write(done=True)
    d = json.loads((tmp_path / "kv.json").read_text())
    assert d["meta"]["complete"] and d["meta"]["device"] == "cpu"
    table = f.heldout_kv(d)
    assert "| `hfq:bits=2,group=32`† |" in table and "| `2bit` |" in table
    assert "rows marked † ran on CPU, torch 2.13, transformers 5.24" in table and "INCOMPLETE" not in table
    assert "`2bit` KL 0.1000 / `hfq:bits=2,group=32`† KL 0.2500 = 0.40 (per offset 0.40, 0.40, 0.40, 0.40; target ≤ 0.5: met)" in table
    # W/A: a marked row's Δ is against its own device's fp ppl
    wa = [_wa_row("fp", "fp16", o, 20.0) for o in (0, 160000)]
    wa += [dict(_wa_row("w4a16", "W4A16 RTN", o, 22.0), ppl_fp=21.0, run=cpu_run) for o in (0, 160000)]
    table = f.heldout_wa({"meta": gpu, "rows": wa, "skipped": ["w4a16:gptq=true"]})
    assert "| W4A16 RTN | `w4a16`† | 4.50 | 1.0 | 22.000 | +4.8 % |" in table
    assert "Not run: `w4a16:gptq=true`." in table and "INCOMPLETE" in table
