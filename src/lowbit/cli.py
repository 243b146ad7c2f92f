"""The ``lowbit`` command line: eval, compare, generate, and the method families' sub-commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lowbit.lut.cli import app as lut_app
from lowbit.spec import SpecError

app = typer.Typer(help="lowbit: low-bit KV caches and weights for LLM inference, with honest measurements.", no_args_is_help=True)
app.add_typer(lut_app, name="lut", help="GQA-LUT: fit integer piecewise-linear approximations of non-linear functions")
console = Console()
err = Console(stderr=True)

DEFAULT_COMPARE = ["fp16", "kivi:bits=4", "kivi:bits=2", "kivi:bits=2,sinks=4"]
DEFAULT_LUT = ["silu:segments=16"]


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True)


def _load(model_name: str):
    from lowbit.models import ModelNotFoundError, load_model

    with err.status(f"loading {model_name} …"):
        try:
            return load_model(model_name)
        except ModelNotFoundError as exc:
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


def _run_variants(model, ids, variants, prefill: int, tokens: int, calib=None):
    """Reference once, then each variant through the streaming protocol; returns EvalResults."""
    from lowbit.eval import evaluate_kv, reference_run
    from lowbit.eval.variants import prepared

    results = []
    with _progress() as progress:
        task = progress.add_task("reference (uncompressed)", total=tokens - 1)
        ref = reference_run(model, ids, prefill, tokens, progress=lambda: progress.advance(task))
        for variant in variants:
            task = progress.add_task(variant.label, total=tokens - 1)
            try:
                with prepared(model, variant, calib) as work:
                    result = evaluate_kv(work, ids, variant.kv, prefill, tokens, reference=ref, progress=lambda t=task: progress.advance(t))
            except ValueError as exc:  # e.g. a LUT function the model does not use
                _fail(f"{variant.label}: {exc}")
            result.method = variant.label
            results.append(result)
    return results


@app.command("eval")
def eval_cmd(
    model: str = typer.Option("smollm2", help="bundled name, local HF dir, .gguf file or hub id"),
    kv: str = typer.Option("fp16", help="KV method spec, e.g. kivi:bits=2,group=32,residual=128"),
    lut: Optional[str] = typer.Option(None, help="activation LUT spec, e.g. silu:segments=8"),
    text: Optional[Path] = typer.Option(None, help="UTF-8 text file (default: bundled WikiText-2 test)"),
    prefill: int = typer.Option(512, help="tokens processed in one forward into the cache"),
    tokens: int = typer.Option(256, help="tokens then fed one at a time and scored"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the result as JSON here"),
):
    """Streaming perplexity / KL / top-1 of one method against the uncompressed model."""
    from lowbit.eval.report import results_table, write_json
    from lowbit.eval.variants import Variant

    (variant,) = _validated([Variant(kv=kv, lut=lut)])
    m, tok = _load(model)
    ids = _tokens(tok, text, prefill + tokens)
    (result,) = _run_variants(m, ids, [variant], prefill, tokens)
    console.print(results_table([result], title=f"{model}: prefill {prefill}, {tokens} streamed tokens"))
    if json_out:
        write_json([result], json_out, {"model": model, "prefill": prefill, "tokens": tokens}, flat=result)
        console.print(f"wrote {json_out}")


@app.command()
def compare(
    model: str = typer.Option("smollm2", help="bundled name, local HF dir, .gguf file or hub id"),
    kv: list[str] = typer.Option(DEFAULT_COMPARE, help="KV methods to compare (repeat the option)"),
    lut: list[str] = typer.Option(DEFAULT_LUT, help="LUT rows (uncompressed KV, activation swapped); repeatable"),
    text: Optional[Path] = typer.Option(None, help="UTF-8 text file (default: bundled WikiText-2 test)"),
    prefill: int = typer.Option(512),
    tokens: int = typer.Option(256),
    out: Path = typer.Option(Path("lowbit-report"), help="folder for compare.json and compare.png"),
):
    """The main job: evaluate several methods on one model and text; table, JSON and plot."""
    from lowbit.eval import DEFAULT_TEXT
    from lowbit.eval.report import plot_quality_vs_bytes, results_table, write_json
    from lowbit.eval.variants import Variant

    variants = _validated([Variant(kv=k) for k in kv] + [Variant(lut=spec) for spec in lut if spec])
    m, tok = _load(model)
    ids = _tokens(tok, text, prefill + tokens)
    results = _run_variants(m, ids, variants, prefill, tokens)
    title = f"{model} · {Path(text or DEFAULT_TEXT).name} · prefill {prefill}, {tokens} streamed tokens"
    console.print(results_table(results, title=title))
    meta = {"model": model, "text": str(text or DEFAULT_TEXT), "prefill": prefill, "tokens": tokens}
    json_path = write_json(results, out / "compare.json", meta)
    kv_rows = [r for r, v in zip(results, variants) if not v.lut]
    console.print(f"wrote {json_path} and {plot_quality_vs_bytes(kv_rows, out / 'compare.png', title)}")


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="the prompt (chat template applied for instruct models)"),
    model: str = typer.Option("smollm2"),
    kv: str = typer.Option("fp16", help="KV method spec"),
    max_new_tokens: int = typer.Option(64, min=1),
    chat: bool = typer.Option(True, help="apply the tokenizer's chat template when it has one"),
):
    """Stream generated text with a (compressed) KV cache; greedy decoding."""
    from lowbit.eval.variants import Variant
    from lowbit.generation import generate_text

    _validated([Variant(kv=kv)])
    m, tok = _load(model)
    for piece in generate_text(m, tok, prompt, kv=kv, max_new_tokens=max_new_tokens, chat=chat, stream=True):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


if __name__ == "__main__":
    app()
