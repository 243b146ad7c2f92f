"""KVMerger (Wang et al., 2024): merge runs of similar consecutive keys into one state each.

For every layer and KV head, the compressible middle of the cache (sinks and recent window set aside, see
:mod:`lowbit.kv.budget`) becomes exactly `m` states:

1. **Merging sets.** Walk the keys in token order. A set starts with one token; the next token joins it when its
   cosine similarity to the set's running representative (the mean of the set's keys so far) exceeds the
   threshold tau, otherwise it starts a new set. Sets are therefore runs of consecutive tokens.
2. **Threshold.** tau is chosen per layer *and head* so that the set count meets the budget: the walk is run for a
   grid of 17 thresholds at once ([-2, -1, -0.86, ..., 1, 2]; -2 merges everything into one set, 2 merges
   nothing), then for 16 thresholds between the largest grid value giving at most `m` sets and the next one; the
   largest threshold with at most `m` sets wins. Its remaining ``m - count`` sets come from cutting sets at the
   tokens that joined with the lowest similarity (the ones a slightly higher threshold would have split off),
   so every head ends with exactly `m` sets (dense tensors, no padding needed).
3. **Pivot.** In each set the pivot is the token with the largest accumulated attention (earliest on ties).
4. **Merge.** Gaussian-kernel weights around the pivot, ``w_i = exp(-||k_i - k_p||^2 / (2 sigma^2))``, normalised
   over the set; the merged key and value are the weighted means of the set's keys and values (the same weights).
   ``sigma`` is fixed when given (> 0); by default (0) it adapts per set: ``sigma^2`` is the mean squared distance
   of the set's other members to the pivot, so a typical member gets weight ``exp(-1/2)``.
   The merged state carries the set's summed attention score and the pivot's position.

The walk is sequential in tokens but vectorised over heads and thresholds (numpy, on the CPU).
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.kv.budget import budget_method, budget_params
from lowbit.kv.registry import register_kv_method
from lowbit.spec import Param

GRID = np.concatenate([[-2.0], np.linspace(-1.0, 1.0, 15), [2.0]])
REFINE = 16


def greedy_walk(keys: np.ndarray, tau: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run the set walk on keys [R, n, D] for thresholds tau [R, K].

    Returns ``starts`` [R, K, n] (True where a token starts a new set; token 0 always does) and ``sims``
    [R, K, n], each token's cosine similarity to the representative of the set it was compared with (inf for 0).
    """
    R, n, D = keys.shape
    K = tau.shape[1]
    knorm = np.sqrt((keys * keys).sum(-1))  # [R, n]
    sums = np.repeat(keys[:, None, 0, :], K, axis=1).copy()  # [R, K, D] running sum of the current set
    starts = np.zeros((R, K, n), dtype=bool)
    sims = np.full((R, K, n), np.inf, dtype=keys.dtype)
    starts[..., 0] = True
    tiny = np.finfo(keys.dtype).tiny
    for t in range(1, n):
        k = keys[:, t]  # [R, D]
        dot = np.einsum("rkd,rd->rk", sums, k)
        snorm = np.sqrt(np.einsum("rkd,rkd->rk", sums, sums))
        sim = dot / np.maximum(snorm * knorm[:, t, None], tiny)
        join = sim > tau
        sims[..., t] = sim
        starts[..., t] = ~join
        sums = np.where(join[..., None], sums + k[:, None, :], k[:, None, :])
    return starts, sims


def _best(starts: np.ndarray, tau: np.ndarray, m: int) -> np.ndarray:
    """Index (per row) of the largest threshold whose set count is at most m (thresholds sorted ascending)."""
    ok = starts.sum(-1) <= m  # [R, K]
    K = tau.shape[1]
    return K - 1 - np.argmax(ok[:, ::-1], axis=1)  # last True


def find_sets(keys: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Exactly `m` merging sets per row of keys [R, n, D]: (starts [R, n] bool, chosen threshold [R])."""
    R, n, _ = keys.shape
    if m >= n:
        return np.ones((R, n), dtype=bool), np.full(R, np.inf)
    if m < 1:
        raise ValueError(f"need at least one merging set, got m={m}")
    tau1 = np.broadcast_to(GRID.astype(keys.dtype), (R, len(GRID))).copy()
    starts1, _ = greedy_walk(keys, tau1)
    j = _best(starts1, tau1, m)  # GRID[0] = -2 always qualifies (one set); GRID[-1] = 2 never does (n > m sets)
    lo, hi = GRID[j], GRID[np.minimum(j + 1, len(GRID) - 1)]
    tau2 = (lo[:, None] + (hi - lo)[:, None] * np.arange(REFINE)[None, :] / REFINE).astype(keys.dtype)
    starts2, sims2 = greedy_walk(keys, tau2)
    j2 = _best(starts2, tau2, m)  # tau2[:, 0] = lo qualifies
    rows = np.arange(R)
    starts, sims = starts2[rows, j2].copy(), sims2[rows, j2]
    # top up to exactly m sets: cut at the joined tokens with the lowest similarity (earliest on ties)
    for r in range(R):
        need = m - int(starts[r].sum())
        if need > 0:
            cand = np.where(~starts[r])[0]
            order = np.argsort(sims[r, cand], kind="stable")[:need]
            starts[r, cand[order]] = True
    return starts, tau2[rows, j2]


def merge_sets(keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, starts: torch.Tensor, sigma: float = 0.0):
    """Merge the sets given by ``starts`` [R, n] (same count m per row) of keys/values [R, n, D], scores [R, n].

    Returns merged keys, values [R, m, D], summed scores [R, m] and the pivot indices [R, m].
    """
    R, n, D = keys.shape
    m = int(starts[0].sum())
    sid = starts.long().cumsum(-1) - 1  # [R, n] set index of each token
    kf = keys.to(torch.promote_types(keys.dtype, torch.float32))
    vf = values.to(kf.dtype)
    sf = scores.to(kf.dtype)
    best = torch.full((R, m), float("-inf"), dtype=sf.dtype).scatter_reduce(1, sid, sf, "amax")
    ar = torch.arange(n).expand(R, n)
    cand = torch.where(sf == best.gather(1, sid), ar, torch.full_like(ar, n))
    pivot = torch.full((R, m), n, dtype=torch.long).scatter_reduce(1, sid, cand, "amin")  # [R, m]
    kp = kf.gather(1, pivot[..., None].expand(R, m, D))  # [R, m, D]
    d2 = ((kf - kp.gather(1, sid[..., None].expand(R, n, D))) ** 2).sum(-1)  # [R, n]
    if sigma > 0:
        s2 = torch.full((R, m), sigma * sigma, dtype=kf.dtype)
    else:
        size = torch.zeros(R, m, dtype=kf.dtype).scatter_add(1, sid, torch.ones_like(d2))
        s2 = torch.zeros(R, m, dtype=kf.dtype).scatter_add(1, sid, d2) / (size - 1).clamp_min(1)
        s2 = torch.where(s2 > 0, s2, torch.ones_like(s2))
    w = torch.exp(-d2 / (2 * s2.gather(1, sid)))
    wsum = torch.zeros(R, m, dtype=kf.dtype).scatter_add(1, sid, w)
    w = w / wsum.gather(1, sid)
    idx = sid[..., None].expand(R, n, D)
    mk = torch.zeros(R, m, D, dtype=kf.dtype).scatter_add(1, idx, w[..., None] * kf)
    mv = torch.zeros(R, m, D, dtype=kf.dtype).scatter_add(1, idx, w[..., None] * vf)
    ms = torch.zeros(R, m, dtype=kf.dtype).scatter_add(1, sid, sf)
    return mk, mv, ms, pivot


def make_kvmerger_policy(sigma: float = 0.0):
    """The KVMerger policy for :class:`~lowbit.kv.budget.BudgetLayer` (`sigma` 0 = adaptive per set)."""

    def policy(keys, values, scores, positions, m: int):
        B, H, n, D = keys.shape
        if m >= n:
            return keys, values, scores, positions
        if m == 0:
            e = keys[..., :0, :]
            return e, values[..., :0, :], scores[..., :0], positions[..., :0]
        device = keys.device
        k2, v2, s2 = keys.reshape(B * H, n, D).cpu(), values.reshape(B * H, n, D).cpu(), scores.reshape(B * H, n).cpu()
        knp = k2.float().numpy() if k2.dtype != torch.float64 else k2.numpy()
        starts, _ = find_sets(knp, m)
        mk, mv, ms, pivot = merge_sets(k2, v2, s2, torch.from_numpy(starts), sigma)
        pos = positions.reshape(B * H, n).cpu().gather(1, pivot)
        shape = (B, H, m)
        return (
            mk.reshape(*shape, D).to(device, keys.dtype),
            mv.reshape(*shape, D).to(device, values.dtype),
            ms.reshape(shape).to(device, torch.float32),
            pos.reshape(shape).to(device),
        )

    return policy



# ------------------------------------------------------------------------------ registration

KVMERGER = register_kv_method(budget_method(
    "kvmerger", lambda o: make_kvmerger_policy(o["sigma"]),
    "KVMerger: merge similar consecutive keys (Gaussian weights around the most-attended pivot)",
    {**budget_params(4, 32, True),
     "sigma": Param(float, 0.0, check=lambda s: s >= 0, allowed="a number >= 0 (0 = adaptive per merging set)")},
))
