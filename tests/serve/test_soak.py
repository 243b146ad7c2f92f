"""The soak of issue 18 in its short form (tiny random Llama, fake tokenizer, KIVI-2), and `lowbit bench soak`."""

import pytest
import typer
from typer.testing import CliRunner

from lowbit.bench import soak as soak_mod
from lowbit.bench.soak_cases import CATEGORIES
from lowbit.cli import bench as bench_cli
from lowbit.serve import launch

pytest.importorskip("openai")


def test_short_soak_passes_every_check(tiny_llama, fake_tok):
    report = soak_mod.run_soak(tiny_llama, fake_tok, kv="kivi:bits=2,group=32,residual=32", kv_budget_mb=0.25,
                               requests=300, concurrency=8, max_tokens=8, seed=0, timeout=60, rss_tolerance_mb=32,
                               model_name="tiny", log=lambda s: None)
    text = soak_mod.format_report(report)
    assert report.passed, text
    rows = {r["category"]: r for r in report.rows}
    assert set(rows) == {c.name for c in CATEGORIES} and all(r["sent"] >= 1 for r in rows.values()), text
    assert sum(r["sent"] for r in rows.values()) == 300
    assert rows["model_fault"]["statuses"].startswith("500x")  # induced, and the only 5xx
    assert rows["over_kv_budget"]["statuses"].startswith("400x")  # this budget cannot hold the whole context
    greedy = sum(rows[k]["sent"] for k in ("completion", "completion_stream", "chat", "chat_stream"))
    assert report.checks["greedy = one-at-a-time"]["value"] == f"{greedy}/{greedy}"
    assert set(report.checks["drained to 0"]["value"].values()) == {0}
    assert report.meta["peak_running"] > 1 and report.meta["cancelled"] >= 1  # dropped streams were cancelled
    assert "| model_fault | 500 induced |" in text and "PASS  nothing hung: 0" in text


def _cli():
    app = typer.Typer()
    bench = typer.Typer()
    bench.command("soak")(bench_cli.soak_command)
    bench.command("other")(lambda: None)
    app.add_typer(bench, name="bench")
    return app


@pytest.mark.parametrize("passed, code", [(True, 0), (False, 1)])
def test_soak_command_exit_code_follows_the_checks(monkeypatch, passed, code):
    seen = {}

    def fake_main(*args):
        seen["args"] = args
        return soak_mod.SoakReport([], {"x": {"ok": passed, "value": 0}}, 1, 1, 0.0)

    monkeypatch.setattr(soak_mod, "soak_main", fake_main)
    r = CliRunner().invoke(_cli(), ["bench", "soak", "--requests", "40", "--concurrency", "3", "--kv", "fp16"])
    assert r.exit_code == code, r.output
    assert seen["args"][:5] == ("smollm2", "fp16", 64.0, 40, 3)


def test_soak_command_rejects_a_bad_spec_before_loading(monkeypatch):
    monkeypatch.setattr(launch, "load_for_serving", lambda *a, **k: pytest.fail("should not load"))
    r = CliRunner().invoke(_cli(), ["bench", "soak", "--kv", "kivi:bits=3"])
    assert r.exit_code == 2 and "error" in r.output
