"""KVMerger math against a plain float64 reference of the same algorithm."""

import math

import numpy as np
import pytest
import torch

from lowbit.kv.eviction import h2o_policy, streaming_policy
from lowbit.kv.merging import GRID, REFINE, find_sets, greedy_walk, make_kvmerger_policy, merge_sets


def ref_walk(keys, tau):
    """Starts and similarities of the set walk for one row [n, D] and one threshold (python floats)."""
    n = keys.shape[0]
    starts, sims = [True], [math.inf]
    s = keys[0].copy()
    for t in range(1, n):
        k = keys[t]
        sim = float(s @ k) / max(math.sqrt(float(s @ s)) * math.sqrt(float(k @ k)), np.finfo(np.float64).tiny)
        sims.append(sim)
        if sim > tau:
            starts.append(False)
            s = s + k
        else:
            starts.append(True)
            s = k.copy()
    return np.array(starts), np.array(sims)


def ref_find_sets(keys, m):
    n = keys.shape[0]
    if m >= n:
        return np.ones(n, bool)

    def best(taus):
        ok = [t for t in taus if ref_walk(keys, t)[0].sum() <= m]
        return max(ok)

    lo = best(list(GRID))
    hi = GRID[min(list(GRID).index(lo) + 1, len(GRID) - 1)]
    tau = best([lo + (hi - lo) * i / REFINE for i in range(REFINE)])
    starts, sims = ref_walk(keys, tau)
    need = m - starts.sum()
    joined = [(sims[i], i) for i in range(n) if not starts[i]]
    for _, i in sorted(joined)[:need]:
        starts[i] = True
    return starts


def ref_merge(keys, values, scores, starts, sigma=0.0):
    bounds = list(np.where(starts)[0]) + [len(starts)]
    mk, mv, ms, piv = [], [], [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        idx = list(range(a, b))
        p = max(idx, key=lambda i: (scores[i], -i))
        d2 = np.array([((keys[i] - keys[p]) ** 2).sum() for i in idx])
        if sigma > 0:
            s2 = sigma**2
        else:
            s2 = d2.sum() / max(len(idx) - 1, 1)
            s2 = s2 if s2 > 0 else 1.0
        w = np.exp(-d2 / (2 * s2))
        w = w / w.sum()
        mk.append((w[:, None] * keys[a:b]).sum(0))
        mv.append((w[:, None] * values[a:b]).sum(0))
        ms.append(scores[a:b].sum())
        piv.append(p)
    return np.array(mk), np.array(mv), np.array(ms), np.array(piv)


def correlated_keys(R, n, D, seed):
    """Random keys with runs of similar neighbours (a random walk plus noise), as real keys have."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randn(R, n, D, generator=g, dtype=torch.float64) * 0.3
    base = torch.randn(R, 1, D, generator=g, dtype=torch.float64) * 2
    return base + steps.cumsum(1) + torch.randn(R, n, D, generator=g, dtype=torch.float64) * 0.2


@pytest.mark.parametrize("n,m", [(40, 10), (57, 23), (30, 1), (25, 25), (64, 63)])
def test_sets_match_reference(n, m):
    keys = correlated_keys(3, n, 8, seed=n * 100 + m).numpy()
    starts, _ = find_sets(keys, m)
    assert starts.shape == (3, n)
    for r in range(3):
        assert starts[r].sum() == min(m, n)
        assert starts[r, 0]
        np.testing.assert_array_equal(starts[r], ref_find_sets(keys[r], m))


def test_walk_vectorised_over_thresholds_matches_reference():
    keys = correlated_keys(2, 33, 6, seed=5).numpy()
    tau = np.array([[-2.0, 0.0, 0.5, 0.9, 2.0], [0.3, 0.6, 0.7, 0.95, 0.99]])
    starts, sims = greedy_walk(keys, tau)
    for r in range(2):
        for j in range(tau.shape[1]):
            s, sim = ref_walk(keys[r], tau[r, j])
            np.testing.assert_array_equal(starts[r, j], s)
            np.testing.assert_allclose(sims[r, j, 1:], sim[1:], rtol=1e-12)
    assert starts[0, 0].sum() == 1 and starts[0, -1].all()


@pytest.mark.parametrize("sigma", [0.0, 1.5])
def test_merge_matches_reference(sigma):
    R, n, D, m = 4, 50, 8, 12
    keys = correlated_keys(R, n, D, seed=7)
    values = torch.randn(R, n, D, dtype=torch.float64)
    scores = torch.rand(R, n, dtype=torch.float64)
    scores[0, 3] = scores[0, 4] = 5.0  # a tie: the earlier token is the pivot
    starts, _ = find_sets(keys.numpy(), m)
    mk, mv, ms, piv = merge_sets(keys, values, scores, torch.from_numpy(starts), sigma)
    for r in range(R):
        rk, rv, rs, rp = ref_merge(keys[r].numpy(), values[r].numpy(), scores[r].numpy(), starts[r], sigma)
        np.testing.assert_array_equal(piv[r].numpy(), rp)
        np.testing.assert_allclose(mk[r].numpy(), rk, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(mv[r].numpy(), rv, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ms[r].numpy(), rs, rtol=1e-12)
    # weights are normalised: merging identical keys/values gives them back
    same = torch.ones(1, 10, D, dtype=torch.float64)
    st = torch.zeros(1, 10, dtype=torch.bool)
    st[0, [0, 4]] = True
    k1, v1, _, _ = merge_sets(same, same * 3, torch.rand(1, 10, dtype=torch.float64), st)
    torch.testing.assert_close(k1, torch.ones(1, 2, D, dtype=torch.float64))
    torch.testing.assert_close(v1, torch.full((1, 2, D), 3.0, dtype=torch.float64))


def test_policies_keep_exactly_m_per_head_in_order():
    B, H, n, D, m = 2, 3, 40, 8, 11
    keys = correlated_keys(B * H, n, D, seed=3).float().reshape(B, H, n, D)
    values = torch.randn(B, H, n, D)
    scores = torch.rand(B, H, n)
    pos = torch.arange(100, 100 + n).expand(B, H, n)
    for policy in (streaming_policy, h2o_policy, make_kvmerger_policy()):
        k, v, s, p = policy(keys, values, scores, pos, m)
        assert k.shape == (B, H, m, D) and v.shape == (B, H, m, D) and p.shape == (B, H, m)
        assert torch.all(p[..., 1:] > p[..., :-1])  # token order kept
    k, v, s, p = h2o_policy(keys, values, scores, pos, m)
    top = scores.topk(m, dim=-1).indices.sort(-1).values
    assert torch.equal(p, pos.gather(-1, top))
    k, v, s, p = streaming_policy(keys, values, scores, pos, m)
    assert torch.equal(p[0, 0], torch.arange(100 + n - m, 100 + n))
