"""Progress: bars on a terminal, one plain line per finished step elsewhere or with --quiet."""

import io

from rich.console import Console

from lowbit.cli import progress
from lowbit.cli.progress import Steps


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=120), buf


def test_off_a_terminal_one_line_per_step():
    con, buf = _console(False)
    with Steps(con, n=2) as steps:
        assert not steps.live
        with steps.step("reference", 3) as advance:
            for _ in range(3):
                advance()
        steps.begin("kivi:bits=2", 5)
        steps.advance(2)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in buf.getvalue() and "\x1b" not in buf.getvalue()
    assert lines[0].startswith("[1/2] reference: 3 tok in ") and "tok/s" in lines[0]
    assert lines[1].startswith("[2/2] kivi:bits=2: 2 tok in ")  # an open step is closed on exit


def test_terminal_bars_and_quiet(monkeypatch):
    con, buf = _console(True)
    with Steps(con, n=1, unit="samples") as steps:
        assert steps.live
        with steps.step("passkey", 2) as advance:
            advance(2)
    assert "[1/1] passkey: 2 samples in" in buf.getvalue()
    monkeypatch.setitem(progress._state, "quiet", False)
    progress.set_quiet(True)
    try:
        assert not Steps(con, n=1).live  # --quiet: line-based even on a terminal
    finally:
        progress.set_quiet(False)
        from transformers.utils import logging as hf_logging

        hf_logging.enable_progress_bar()


def test_compare_help_offers_full_and_quiet():
    from typer.testing import CliRunner

    from lowbit.cli import app

    res = CliRunner().invoke(app, ["compare", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "--full" in res.output and "--quiet" in res.output


def test_bench_points_bar_on_a_terminal_lines_elsewhere(capsys):
    from lowbit.cli.progress import BenchPoints

    con, buf = _console(True)
    with Steps(con, unit="points") as steps:
        pts = BenchPoints(steps, "bench gemm")
        pts.advance()  # before start: nothing to advance, no error
        pts.start(3)
        pts.log("K=4096 N=6144 M=1: ...")
        for _ in range(3):
            pts.advance()
    out = buf.getvalue()
    assert "K=4096 N=6144 M=1: ..." in out and "bench gemm: 3 points in" in out  # lines above the bar, one summary
    con, buf = _console(False)
    with Steps(con, unit="points") as steps:
        pts = BenchPoints(steps, "bench gemm")
        pts.start(2)
        pts.log("a point")
        pts.advance()
    assert capsys.readouterr().out == "a point\n"  # off a terminal: the benchmark's lines on stdout as before
    assert buf.getvalue().startswith("bench gemm: 1 points in") and "\x1b" not in buf.getvalue()
