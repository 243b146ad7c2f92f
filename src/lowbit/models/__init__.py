"""Model loading: the bundled SmolLM2 GGUF, any local HF directory or .gguf file, or a hub id."""

from lowbit.models.loading import ModelNotFoundError, load_model, resolve_model

__all__ = ["ModelNotFoundError", "load_model", "resolve_model"]
