"""The ``lowbit`` command line: eval, compare, quantize, generate, serve, lm-eval, and the ``lut`` and ``bench`` groups.

Each module holds typer option parsing and printing only; the work is done by library modules.
"""

from __future__ import annotations

import typer

from lowbit.cli.bench import app as bench_app
from lowbit.cli.evaluate import compare, eval_cmd, generate, quantize
from lowbit.cli.lmeval import lm_eval_command
from lowbit.cli.lut import app as lut_app
from lowbit.cli.serve import serve_command

app = typer.Typer(help="lowbit: low-bit KV caches and weights for LLM inference, with honest measurements.", no_args_is_help=True)
app.add_typer(lut_app, name="lut", help="GQA-LUT: fit integer piecewise-linear approximations of non-linear functions")
app.command("serve", help="OpenAI-compatible server with continuous batching over compressed KV caches.")(serve_command)
app.add_typer(bench_app, name="bench", help="Benchmarks: GPU kernels (attention, gemm, e2e) and the server, beside baselines.")
app.command("eval")(eval_cmd)
app.command("compare")(compare)
app.command("quantize")(quantize)
app.command("generate")(generate)
app.command("lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
            help="lm-evaluation-harness's CLI with --model lowbit and lowbit's offline tasks (pip install 'lowbit[eval]').")(lm_eval_command)

__all__ = ["app"]
