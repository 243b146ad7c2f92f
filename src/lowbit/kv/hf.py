"""One place for the transformers spellings that changed inside the supported range (pyproject.toml).

transformers 5.2x renamed the cache argument of ``forward``/``generate`` and the cache field of model outputs
from ``past_key_values`` to ``cache`` (the old name warns and goes away in 5.40); 5.0 knows only the old name.
Callers pass the cache through :func:`cache_kwargs` and read it back with :func:`output_cache`, so the same code
runs without warnings at both ends of the range.
"""

from __future__ import annotations

import inspect

OLD, NEW = "past_key_values", "cache"
_ARG: dict[type, str] = {}


def cache_arg(model) -> str:
    """The keyword under which `model`'s ``forward`` (and ``generate``) take a KV cache: ``cache`` or ``past_key_values``."""
    cls = type(model)
    if cls not in _ARG:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins / C callables
            params = {}
        _ARG[cls] = NEW if NEW in params else OLD
    return _ARG[cls]


def cache_kwargs(model, cache, **kwargs) -> dict:
    """``{<the model's cache keyword>: cache, **kwargs}``: ``model(ids, **cache_kwargs(model, cache, use_cache=True))``."""
    return {cache_arg(model): cache, **kwargs}


def output_cache(output):
    """The cache a model output carries, under either name, without touching the deprecated attribute."""
    if isinstance(output, dict) and NEW in output.keys():
        return output[NEW]
    return getattr(output, OLD, None)
