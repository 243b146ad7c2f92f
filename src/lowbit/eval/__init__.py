"""Evaluation harness: streaming perplexity/KL against the uncompressed model, and method comparison."""

from lowbit.eval.data import DEFAULT_TEXT, load_tokens
from lowbit.eval.streaming import EvalResult, ReferenceRun, evaluate_kv, reference_run

__all__ = ["DEFAULT_TEXT", "EvalResult", "ReferenceRun", "evaluate_kv", "load_tokens", "reference_run"]
