"""Eviction policies for :class:`~lowbit.kv.budget.BudgetLayer`: StreamingLLM, H2O, SnapKV and TOVA.

Each receives the compressible middle of a layer's kept states (sinks and recent window already set aside) and
returns exactly `m` states per head, in token order. Ties go to the earlier token.

* **StreamingLLM** (Xiao et al., 2023): keep the most recent `m` (with the sinks and window: the first `sinks`
  tokens plus the most recent ones). No scores.
* **H2O** (Zhang et al., 2023): the `m` heavy hitters by *accumulated* attention -- every query's attention, the
  whole prefill (column sums of its causal attention, in chunks) and then every decoding step (scorer ``all``).
  ``heads=each`` (the paper) chooses per KV head; ``heads=shared`` sums the scores over the layer's heads and keeps
  the same positions in every head.
* **SnapKV** (Li et al., 2024): the attention of the last ``obs`` prompt queries (the observation window; scorer
  ``window``), max-pooled over ``pool`` neighbouring tokens so the neighbours of a selected token come along,
  chosen per head. (lowbit's earlier ``h2o`` was this scorer without the pooling.)
* **TOVA** (Oren et al., 2024): the attention of the most recent query only (scorer ``last``), averaged over the
  heads: the same positions are kept in every head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.kv.budget import budget_method, budget_params
from lowbit.kv.registry import register_kv_method
from lowbit.spec import Param


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


def top_indices(scores: torch.Tensor, m: int, shared: bool = False) -> torch.Tensor:
    """Indices [B, H, m] of the `m` largest scores per head (``shared``: of the scores summed over the heads, the
    same for every head), sorted in token order; a stable sort breaks ties towards the earlier token."""
    s = scores.sum(dim=1, keepdim=True) if shared else scores
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :m]
    return order.sort(dim=-1).values.expand(*scores.shape[:2], m)


def streaming_policy(keys, values, scores, positions, m: int):
    """StreamingLLM: the most recent `m` states of the middle."""
    n = keys.shape[-2]
    idx = torch.arange(n - m, n, device=keys.device).expand(*keys.shape[:2], m)
    return keep_indices(keys, values, scores, positions, idx)


def make_h2o_policy(shared: bool = False):
    """H2O: the `m` states with the largest accumulated attention (per head, or ``shared`` across the heads)."""

    def policy(keys, values, scores, positions, m: int):
        if scores is None:
            raise ValueError("H2O needs accumulated attention scores")
        return keep_indices(keys, values, scores, positions, top_indices(scores, m, shared))

    return policy


h2o_policy = make_h2o_policy()


def pool_scores(scores: torch.Tensor, pool: int) -> torch.Tensor:
    """Max over a window of `pool` neighbouring tokens (centred; SnapKV's clustering of the selection)."""
    if pool <= 1:
        return scores
    B, H, n = scores.shape
    pad = pool // 2
    pooled = F.max_pool1d(scores.reshape(B * H, 1, n), pool, stride=1, padding=pad)
    return pooled[..., :n].reshape(B, H, n)


def make_snapkv_policy(pool: int = 7):
    """SnapKV: the `m` states of the middle with the largest pooled observation-window attention, per head."""

    def policy(keys, values, scores, positions, m: int):
        if scores is None:
            raise ValueError("SnapKV needs attention scores")
        return keep_indices(keys, values, scores, positions, top_indices(pool_scores(scores, pool), m))

    return policy


def tova_policy(keys, values, scores, positions, m: int):
    """TOVA: the `m` states the most recent query attends to most, averaged over the heads (shared positions)."""
    if scores is None:
        raise ValueError("TOVA needs the last query's attention")
    return keep_indices(keys, values, scores, positions, top_indices(scores, m, shared=True))


# ------------------------------------------------------------------------------ registration

HEADS = Param(str, "each", check=lambda h: h in ("each", "shared"), allowed="'each' (per-head selection) or 'shared' (one per layer)")

STREAMING = register_kv_method(budget_method(
    "streaming", lambda o: streaming_policy, "StreamingLLM: attention sinks + most recent tokens", budget_params(4, None, None)))
H2O = register_kv_method(budget_method(
    "h2o", lambda o: make_h2o_policy(o["heads"] == "shared"),
    "H2O: heavy hitters by the attention of all queries (accumulated) + recent window",
    {**budget_params(0, 32, "all"), "heads": HEADS}, scorer="all"))
SNAPKV = register_kv_method(budget_method(
    "snapkv", lambda o: make_snapkv_policy(o["pool"]),
    "SnapKV: attention of the last `obs` prompt queries, max-pooled over `pool` tokens, per head + recent window",
    {**budget_params(0, 32, "window"), "pool": Param(int, 7, check=lambda p: p >= 1, allowed="an integer >= 1 (1 = no pooling)")},
    scorer="window"))
TOVA = register_kv_method(budget_method(
    "tova", lambda o: tova_policy, "TOVA: the last query's attention, averaged over heads (positions shared)",
    budget_params(0, 1, "last"), scorer="last"))
