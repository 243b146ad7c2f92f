"""Shared CLI helpers: consoles, failing with exit code 2, progress bars, model/text loading with clear errors."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lowbit.spec import SpecError

console = Console(width=None if sys.stdout.isatty() else 150)  # full tables in logs and CI too
err = Console(stderr=True)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def _fail_plain(message: str) -> None:
    """As :func:`_fail`, in plain text (``lowbit serve`` and ``lowbit bench serve``)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True)


def _load(model_name: str, device: str = "auto"):
    """``device`` auto: ``load_model``'s defaults; cpu/cuda: float32, TF32 off, reference KV path (lowbit.eval.device)."""
    from lowbit.models import ModelNotFoundError, load_model

    with err.status(f"loading {model_name} …"):
        try:
            if device == "auto":
                return load_model(model_name)
            from lowbit.eval.device import load_for_quality

            return load_for_quality(model_name, device)
        except (ModelNotFoundError, ValueError) as exc:
            _fail(str(exc))


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
