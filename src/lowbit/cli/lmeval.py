"""``lowbit lm-eval ARGS``: lm-evaluation-harness's own CLI, with the ``lowbit`` model registered and lowbit's
offline tasks (``lowbit_wikitext``, ``lowbit_cloze_mc``, ``lowbit_cloze_gen``) on its include path.

lm-eval 0.4 finds models only in its built-in table (no plugin entry points), so a plain ``lm_eval --model lowbit``
cannot see lowbit's model; this command is that same CLI, every argument passed through unchanged.
"""

from __future__ import annotations

import sys

import typer

from lowbit.cli.common import _fail


def lm_eval_command(ctx: typer.Context) -> None:
    """Run lm-evaluation-harness with --model lowbit available, e.g. --model lowbit --model_args kv=kivi:bits=2
    --tasks lowbit_cloze_mc (needs the extra: pip install 'lowbit[eval]')."""
    try:
        from lm_eval.__main__ import cli_evaluate

        from lowbit.eval.harness import TASKS_DIR
    except ImportError as exc:
        _fail(f"{exc} (pip install 'lowbit[eval]')")
    args = list(ctx.args)
    given = any(a == "--include_path" or a.startswith("--include_path=") for a in args)
    if args and not given and not {"-h", "--help"} & set(args):
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm-eval"] + args
    cli_evaluate()
