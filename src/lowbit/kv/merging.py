"""KVMerger (Wang et al., 2024): merge runs of consecutive, highly similar keys, with a safeguard for heavy hitters.

For every layer and KV head, the compressible middle of the cache (sinks and recent window set aside, see
:mod:`lowbit.kv.budget`) becomes exactly `m` states:

1. **Safeguard** (``protect``, 0 = off, the paper's algorithm). The ``p = min(floor(protect*m), (m-1)//2)`` states
   with the largest accumulated attention (H2O's scores: every query's attention) are singleton sets: never merged.
2. **Merging sets.** A set is a run of consecutive tokens whose keys are highly similar: token t joins the set of
   token t-1 when ``cos(k[t-1], k[t]) > tau``. A protected token ends the run before it and starts a new one after.
3. **Adaptive threshold.** tau is chosen per layer and head so that the count is exactly `m`: the runs forced by
   the protected tokens count first, and the remaining set starts go to the lowest adjacent similarities (tau is
   the largest of those). The paper fixes one similarity threshold per model and lets the set count (the budget)
   vary; a fixed budget needs the threshold to adapt instead.
4. **Pivot.** In each set, the token with the largest accumulated attention (earliest on ties).
5. **Merge.** Gaussian-kernel weights around the pivot, ``w_i = exp(-||k_i - k_p||^2 / (2 sigma^2))``, normalised
   over the set; the merged key and value are the weighted means (the same weights). ``sigma`` is fixed when given
   (> 0); by default (0) it adapts per set: ``sigma^2`` is the mean squared distance of the set's other members to
   the pivot, so a typical member weighs ``exp(-1/2)`` of the pivot. The merged state carries the set's summed
   score and the pivot's position.

Everything is vectorised over heads, sets and tokens (one sort for the threshold, scatter-adds for the merge): no
Python loop over sets or heads; the cost is O(n log n + n*D) per head.
"""

from __future__ import annotations

import torch

from lowbit.kv.budget import budget_method, budget_params
from lowbit.kv.registry import register_kv_method
from lowbit.spec import Param


def adjacent_similarity(keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each key to the one before it, [R, n] for keys [R, n, D] (-inf for token 0)."""
    k = keys.float() if keys.dtype not in (torch.float32, torch.float64) else keys
    kn = k / k.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(k.dtype).tiny)
    sim = (kn[:, 1:] * kn[:, :-1]).sum(-1)
    return torch.cat([torch.full_like(sim[:, :1], float("-inf")), sim], dim=1)


def protected_mask(scores: torch.Tensor, m: int, protect: float) -> torch.Tensor:
    """[R, n] True at the ``min(floor(protect*m), (m-1)//2)`` highest-scoring tokens of each row (earliest on ties)."""
    R, n = scores.shape
    p = min(int(protect * m), (m - 1) // 2)
    mask = torch.zeros(R, n, dtype=torch.bool, device=scores.device)
    if p > 0:
        top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :p]
        mask.scatter_(1, top, True)
    return mask


def find_sets(keys: torch.Tensor, m: int, protected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly `m` merging sets per row of keys [R, n, D]: (starts [R, n] bool, threshold tau [R]).

    A set starts at token 0, at every `protected` token and right after it, and at the tokens with the lowest
    similarity to their predecessor (as many as the count needs; ties go to the earlier token). tau is the largest
    similarity that starts a set (-inf when none had to).
    """
    R, n, _ = keys.shape
    if m >= n:
        return torch.ones(R, n, dtype=torch.bool, device=keys.device), torch.full((R,), float("inf"), device=keys.device)
    if m < 1:
        raise ValueError(f"need at least one merging set, got m={m}")
    forced = torch.zeros(R, n, dtype=torch.bool, device=keys.device) if protected is None else protected.clone()
    if protected is not None:
        forced[:, 1:] |= protected[:, :-1]
    forced[:, 0] = True
    need = m - forced.sum(-1)  # [R] further starts to choose
    if bool((need < 0).any()):
        raise ValueError(f"{int(forced.sum(-1).max())} forced set starts exceed m={m}: protect fewer tokens")
    sim = adjacent_similarity(keys)
    cand = sim.masked_fill(forced, float("inf"))
    order = torch.sort(cand, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=keys.device).expand(R, n))
    starts = forced | (rank < need[:, None])
    tau = sim.masked_fill(~starts | forced, float("-inf")).amax(-1)
    return starts, tau


def merge_sets(keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, starts: torch.Tensor, sigma: float = 0.0):
    """Merge the sets given by ``starts`` [R, n] (same count m per row) of keys/values [R, n, D], scores [R, n].

    Returns merged keys, values [R, m, D], summed scores [R, m] and the pivot indices [R, m].
    """
    R, n, D = keys.shape
    m = int(starts[0].sum())
    dev = keys.device
    sid = starts.long().cumsum(-1) - 1  # [R, n] set index of each token
    kf = keys.to(torch.promote_types(keys.dtype, torch.float32))
    vf = values.to(kf.dtype)
    sf = scores.to(kf.dtype)
    zeros = lambda *shape: torch.zeros(*shape, dtype=kf.dtype, device=dev)  # noqa: E731
    best = torch.full((R, m), float("-inf"), dtype=sf.dtype, device=dev).scatter_reduce(1, sid, sf, "amax")
    ar = torch.arange(n, device=dev).expand(R, n)
    cand = torch.where(sf == best.gather(1, sid), ar, torch.full_like(ar, n))
    pivot = torch.full((R, m), n, dtype=torch.long, device=dev).scatter_reduce(1, sid, cand, "amin")  # [R, m]
    kp = kf.gather(1, pivot[..., None].expand(R, m, D))  # [R, m, D]
    d2 = ((kf - kp.gather(1, sid[..., None].expand(R, n, D))) ** 2).sum(-1)  # [R, n]
    if sigma > 0:
        s2 = torch.full((R, m), sigma * sigma, dtype=kf.dtype, device=dev)
    else:
        size = zeros(R, m).scatter_add(1, sid, torch.ones_like(d2))
        s2 = zeros(R, m).scatter_add(1, sid, d2) / (size - 1).clamp_min(1)
        s2 = torch.where(s2 > 0, s2, torch.ones_like(s2))
    w = torch.exp(-d2 / (2 * s2.gather(1, sid)))
    w = w / zeros(R, m).scatter_add(1, sid, w).gather(1, sid)
    idx = sid[..., None].expand(R, n, D)
    mk = zeros(R, m, D).scatter_add(1, idx, w[..., None] * kf)
    mv = zeros(R, m, D).scatter_add(1, idx, w[..., None] * vf)
    ms = zeros(R, m).scatter_add(1, sid, sf)
    return mk, mv, ms, pivot


def make_kvmerger_policy(sigma: float = 0.0, protect: float = 0.0):
    """The KVMerger policy for :class:`~lowbit.kv.budget.BudgetLayer` (`sigma` 0 = adaptive per set; `protect`: the
    fraction of the `m` slots kept for unmerged heavy hitters, 0 = the paper's algorithm)."""

    def policy(keys, values, scores, positions, m: int):
        B, H, n, D = keys.shape
        if m >= n:
            return keys, values, scores, positions
        if m == 0:
            e = keys[..., :0, :]
            return e, values[..., :0, :], scores[..., :0], positions[..., :0]
        s2 = scores.reshape(B * H, n)
        k2 = keys.reshape(B * H, n, D)
        starts, _ = find_sets(k2, m, protected_mask(s2, m, protect) if protect > 0 else None)
        mk, mv, ms, pivot = merge_sets(k2, values.reshape(B * H, n, D), s2, starts, sigma)
        pos = positions.reshape(B * H, n).gather(1, pivot)
        return (
            mk.reshape(B, H, m, D).to(keys.dtype),
            mv.reshape(B, H, m, D).to(values.dtype),
            ms.reshape(B, H, m).float(),
            pos.reshape(B, H, m),
        )

    return policy


# ------------------------------------------------------------------------------ registration

KVMERGER = register_kv_method(budget_method(
    "kvmerger", lambda o: make_kvmerger_policy(o["sigma"], o["protect"]),
    "KVMerger: merge runs of similar consecutive keys (Gaussian weights around the most-attended pivot); "
    "`protect` keeps the heaviest hitters unmerged",
    {**budget_params(4, 32, "all"),
     "sigma": Param(float, 0.0, check=lambda s: s >= 0, allowed="a number >= 0 (0 = adaptive per merging set)"),
     "protect": Param(float, 0.5, check=lambda p: 0 <= p <= 0.5,
                      allowed="a fraction in [0, 0.5] of the merged slots kept for unmerged heavy hitters (0 = off)")},
    scorer="all",
))
