"""Eviction policies for :class:`~lowbit.kv.budget.BudgetLayer`: StreamingLLM and H2O.

Both receive the compressible middle of a layer's kept states (sinks and recent window already set aside) and
return exactly `m` states per head, in token order.

* **StreamingLLM** (Xiao et al., 2023): keep the most recent `m` (with the sinks and window: the first `sinks`
  tokens plus the most recent ones).
* **H2O** (Zhang et al., 2023): keep the `m` heavy hitters, the states with the largest accumulated attention,
  chosen per head (ties go to the earlier token).
"""

from __future__ import annotations

import torch

from lowbit.kv.budget import budget_method, budget_params
from lowbit.kv.registry import register_kv_method


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if t.dim() == idx.dim():
        return t.gather(-1, idx)
    return t.gather(-2, idx.unsqueeze(-1).expand(*idx.shape, t.shape[-1]))


def keep_indices(keys, values, scores, positions, idx: torch.Tensor):
    """Keep the states at `idx` [B, H, m] (sorted) of every tensor."""
    return (
        _gather(keys, idx),
        _gather(values, idx),
        None if scores is None else _gather(scores, idx),
        _gather(positions, idx),
    )


def streaming_policy(keys, values, scores, positions, m: int):
    """StreamingLLM: the most recent `m` states of the middle."""
    n = keys.shape[-2]
    idx = torch.arange(n - m, n, device=keys.device).expand(*keys.shape[:2], m)
    return keep_indices(keys, values, scores, positions, idx)


def h2o_policy(keys, values, scores, positions, m: int):
    """H2O: the `m` states of the middle with the largest accumulated attention, per head, in token order."""
    if scores is None:
        raise ValueError("H2O needs accumulated attention scores")
    # a stable sort breaks ties towards the earlier token
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :m]
    idx = order.sort(dim=-1).values
    return keep_indices(keys, values, scores, positions, idx)



# ------------------------------------------------------------------------------ registration

STREAMING = register_kv_method(budget_method(
    "streaming", lambda o: streaming_policy, "StreamingLLM: attention sinks + most recent tokens", budget_params(4, None, False)))
H2O = register_kv_method(budget_method(
    "h2o", lambda o: h2o_policy, "H2O: heavy hitters by accumulated attention + recent window", budget_params(0, 32, True)))
