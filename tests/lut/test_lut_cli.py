"""The `lowbit lut` typer app."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lowbit.lut import LutTable
from lowbit.cli.lut import app, parse_range

runner = CliRunner()
FAST = ["--generations", "20", "--population", "24"]


@pytest.mark.parametrize("range_args", [["--range", "-4,4"], ["--range=-4,4"], ["--range", " -4,4"], ["--range", "-4:4"]])
def test_fit_writes_json_and_prints_errors(tmp_path, range_args):
    out = tmp_path / "gelu8.json"
    res = runner.invoke(app, ["fit", "--fn", "gelu", "--segments", "8", *range_args, "--in-bits", "8",
                              "--out", str(out), "--seed", "0", *FAST])
    assert res.exit_code == 0, res.output
    assert "GA" in res.output and "uniform" in res.output and "max |err|" in res.output
    t = LutTable.from_json(out.read_text())
    assert (t.fn, t.segments, t.lo, t.hi, t.in_bits) == ("gelu", 8, -4.0, 4.0, 8)
    assert json.loads(out.read_text())["breakpoints"] == list(t.breakpoints)


def test_fit_plot(tmp_path):
    png = tmp_path / "silu.png"
    res = runner.invoke(app, ["fit", "--fn", "silu", "--plot", str(png), *FAST])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_errors():
    res = runner.invoke(app, ["fit", "--fn", "exp", "--range", "-8,1", *FAST])
    assert res.exit_code != 0 and "(-inf, 0]" in res.output
    res = runner.invoke(app, ["fit", "--fn", "nope", *FAST])
    assert res.exit_code != 0 and "unknown function" in res.output
    res = runner.invoke(app, ["fit", "--fn", "gelu", "--range", "4", *FAST])
    assert res.exit_code != 0 and "LO,HI" in res.output


def test_parse_range():
    assert parse_range("-4,4") == (-4.0, 4.0)
    assert parse_range(" -0.5, 2 ") == (-0.5, 2.0)
