"""lowbit's attention function: how the queries of each attention call reach the KV cache explicitly.

A transformers ``Cache.update`` receives keys and values only. Methods that need more -- the queries
(H2O and KVMerger score cached states by the attention they receive), or the right to compute attention
themselves (the fused KIVI kernel reads packed codes) -- mark what ``update`` returns with
:func:`attach`: the key tensor carries the object that wants the call. :func:`lowbit_attention_forward`,
registered in transformers' ``AttentionInterface`` as ``"lowbit"``, is what the model calls right after
``update``; for a marked key it hands the call's queries to ``observe_queries(query)`` and, if the object
has ``attend(...)``, lets it compute the attention output. Everything else goes to SDPA unchanged, so a
model switched to ``"lowbit"`` computes exactly what it computes with ``"sdpa"``.

:func:`use_lowbit_attention` registers the function and switches a model to it; ``make_cache(spec,
config, model)`` does so for the methods that need it.
"""

from __future__ import annotations

import torch

ATTENTION_NAME = "lowbit"
_MARK = "_lowbit_attention_target"


def attach(tensor: torch.Tensor, target) -> torch.Tensor:
    """Mark `tensor` (a key returned by ``Cache.update``) so the attention call reaches `target`."""
    setattr(tensor, _MARK, target)
    return tensor


def target_of(tensor: torch.Tensor):
    """The object :func:`attach` marked `tensor` with, or None."""
    return getattr(tensor, _MARK, None)


def lowbit_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: queries to the cache's observer, its own attention if it has one, else SDPA."""
    target = target_of(key)
    if target is not None:
        observe = getattr(target, "observe_queries", None)
        if observe is not None:
            observe(query)
        attend = getattr(target, "attend", None)
        if attend is not None:
            return attend(query, key, value, attention_mask, scaling), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register_lowbit_attention(name: str = ATTENTION_NAME) -> str:
    """Register :func:`lowbit_attention_forward` (and SDPA's mask builder) under `name`; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, lowbit_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def uses_lowbit_attention(model) -> bool:
    """Whether `model` already calls :func:`lowbit_attention_forward`."""
    return getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME


def use_lowbit_attention(model) -> None:
    """Register the function and switch `model` to it (a no-op when it already uses it)."""
    if uses_lowbit_attention(model):
        return
    name = register_lowbit_attention()
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(name)
            return
        except Exception:  # noqa: BLE001 - older/newer transformers may validate differently: set the config
            pass
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None:
            cfg._attn_implementation = name
