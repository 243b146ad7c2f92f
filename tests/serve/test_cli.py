"""The typer entry points the main CLI mounts as `lowbit serve` and `lowbit bench serve`, and a tiny bench run."""

import json

import pytest
import typer
from typer.testing import CliRunner

from lowbit.cli import bench as bench_cli
from lowbit.cli import serve as serve_cli
from lowbit.serve import launch


@pytest.fixture
def app():
    app = typer.Typer()
    app.command("serve")(serve_cli.serve_command)
    bench = typer.Typer()
    bench.command("serve")(bench_cli.bench_serve_command)
    app.add_typer(bench, name="bench")
    return app


def test_serve_command_passes_options(app, monkeypatch):
    seen = {}
    monkeypatch.setattr(serve_cli, "serve", lambda *a, **k: seen.update(args=a, kwargs=k))
    r = CliRunner().invoke(app, ["serve", "--kv", "kivi:bits=2", "--kv-budget-mb", "8", "--port", "9001", "--max-queue", "3",
                                 "--max-batch", "5", "--drain-timeout-s", "7"], env={"LOWBIT_API_KEY": "from-env"})
    assert r.exit_code == 0, r.output
    assert seen["args"] == ("smollm2", "kivi:bits=2", None, 8.0, 9001, "127.0.0.1", "from-env", 3, 5)
    assert seen["kwargs"] == {"drain_timeout": 7.0, "engine": "auto", "tensor_parallel": 1, "prefill_chunk": 0}
    r = CliRunner().invoke(app, ["serve", "--engine", "paged"])
    assert r.exit_code == 0 and seen["kwargs"]["engine"] == "paged"


@pytest.mark.parametrize("argv", [["serve", "--kv", "kivi:bits=3"], ["serve", "--kv-budget-mb", "0"],
                                  ["bench", "serve", "--kv", "fp16", "--kv", "nope"], ["serve", "--engine", "turbo"],
                                  ["serve", "--engine", "paged", "--kv", "kivi:bits=2,residual=32"]])
def test_bad_options_fail_before_loading(app, argv, monkeypatch):
    monkeypatch.setattr(launch, "load_for_serving", lambda *a, **k: pytest.fail("should not load"))
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 2 and "error" in r.output


def test_wa_is_applied_or_explained(tiny_llama):
    try:
        import lowbit.wa  # noqa: F401
    except ImportError:
        with pytest.raises(launch.SpecError, match="lowbit.wa"):
            launch.apply_wa(tiny_llama, None, "fmpq:w=4,a=8")
        return
    with pytest.raises(launch.SpecError):
        launch.load_for_serving("smollm2", wa="no-such-method")


@pytest.mark.model
def test_tiny_bench_run(smollm2, tmp_path):
    from lowbit.bench.serve import bench_serve, to_json

    seen = []

    class Points:
        def start(self, total):
            seen.append(("start", total))

        def advance(self):
            seen.append("advance")

    results = bench_serve(kv=["fp16", "kivi:bits=2,residual=32"], kv_budget_mb=4, clients=3, requests=4, prompt_tokens=24,
                          max_tokens=4, time_limit_s=120, loaded=smollm2, log=lambda s: None, points=Points())
    assert [r.kv for r in results] == ["fp16", "kivi:bits=2,residual=32"]
    assert seen == [("start", 2), "advance", "advance"]  # the progress bar: one point per KV method
    for r in results:
        assert r.requests_ok == 4 and r.errors == 0 and r.output_tokens_per_s > 0 and r.peak_running >= 1
        assert r.ttft_p50_s > 0 and r.itl_p50_s > 0
    data = json.loads(to_json(results, {"test": True}))
    assert len(data["results"]) == 2
