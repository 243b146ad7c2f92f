"""lowbit: cheaper LLM inference by storing and computing in low bit-widths."""

from lowbit.models import load_model

__version__ = "0.1.0"
__all__ = ["load_model", "__version__"]
