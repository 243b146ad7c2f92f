"""Shared CLI helpers: consoles, failing with exit code 2, progress, model/text loading with clear errors."""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext

import typer
from rich.console import Console

from lowbit.cli.progress import Steps, live_terminal, set_quiet
from lowbit.spec import SpecError

console = Console(width=None if sys.stdout.isatty() else 150)  # full tables in logs and CI too
err = Console(stderr=True)


QUIET_HELP = "no bars or spinners: one plain line per finished step (also the default when stderr is not a terminal)"


def _quiet(quiet: bool) -> None:
    set_quiet(quiet)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def _fail_plain(message: str) -> None:
    """As :func:`_fail`, in plain text (``lowbit serve`` and ``lowbit bench serve``)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _steps(n: int | None = None, unit: str = "tok") -> Steps:
    """Progress of `n` steps on stderr: bars with ETA on a terminal, one line per step otherwise or with --quiet."""
    return Steps(err, n, unit)


def _load(model_name: str, device: str = "auto"):
    """``device`` auto: ``load_model``'s defaults; cpu/cuda: float32, TF32 off, reference KV path (lowbit.eval.device)."""
    from lowbit.models import ModelNotFoundError, load_model

    t0 = time.perf_counter()
    if live_terminal(err):
        status = err.status(f"loading {model_name} …")
    else:  # no spinner off a terminal or with --quiet: say what is happening, once
        err.print(f"loading {model_name} (a first load converts the GGUF, ≈30 s) …", highlight=False)
        status = nullcontext()
    with status:
        try:
            if device == "auto":
                loaded = load_model(model_name)
            else:
                from lowbit.eval.device import load_for_quality

                loaded = load_for_quality(model_name, device)
        except (ModelNotFoundError, ValueError) as exc:
            _fail(str(exc))
    err.print(f"loaded {model_name} in {time.perf_counter() - t0:.1f} s", highlight=False)
    return loaded


def _validated(variants):
    for v in variants:
        try:
            v.validate()
        except SpecError as exc:
            _fail(str(exc))
    return variants


def _tokens(tok, text, n):
    from lowbit.eval import DEFAULT_TEXT, load_tokens

    try:
        return load_tokens(tok, text or DEFAULT_TEXT, n)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


def _calibration(tok, text):
    from lowbit.eval import DEFAULT_TEXT
    from lowbit.eval.data import calibration_tokens

    try:
        return calibration_tokens(tok, text or DEFAULT_TEXT)
    except (FileNotFoundError, ValueError) as exc:
        _fail(f"calibration: {exc}")
