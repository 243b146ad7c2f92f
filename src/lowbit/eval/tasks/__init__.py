"""Long-context retrieval tasks (passkey, kv-retrieval) run with any ``--kv`` cache, and a quality-vs-budget plot.

Every sample is generated deterministically from ``(seed, sample index)``: WikiText-2 filler from the bundled test
split (:func:`lowbit.eval.data.read_text`), the needle placed at a chosen depth (fraction of the filler before it),
the chat template applied, and the model asked to answer; greedy generation of a few tokens, exact match of the
first 5-digit number in the output.

``run_task(model, tok, "passkey", length=2048, samples=10, kv_spec="h2o:budget=0.5", depth=0.5)`` is what
``lowbit eval --task passkey --length 2048 --samples 10 --kv h2o:budget=0.5`` calls.
"""

from lowbit.eval.tasks.needle import TASKS, Sample, TaskResult, extract_answer, make_sample, run_task
from lowbit.eval.tasks.plot import plot_quality_vs_budget

__all__ = ["TASKS", "Sample", "TaskResult", "extract_answer", "make_sample", "plot_quality_vs_budget", "run_task"]
