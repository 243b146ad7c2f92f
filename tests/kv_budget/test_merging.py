"""KVMerger math against a plain float64 reference of the same algorithm."""

import math

import numpy as np
import pytest
import torch

from lowbit.kv.eviction import h2o_policy, make_snapkv_policy, streaming_policy, tova_policy
from lowbit.kv.merging import adjacent_similarity, find_sets, make_kvmerger_policy, merge_sets, protected_mask


def ref_find_sets(keys, m, protected=None):
    """Set starts for one row [n, D] by the rules, one token at a time (python floats)."""
    n = keys.shape[0]
    if m >= n:
        return np.ones(n, bool)
    protected = np.zeros(n, bool) if protected is None else protected
    forced = [t == 0 or protected[t] or protected[t - 1] for t in range(n)]
    sims = []
    for t in range(1, n):
        a, b = keys[t - 1], keys[t]
        sims.append((float(a @ b) / (math.sqrt(float(a @ a)) * math.sqrt(float(b @ b))), t))
    free = sorted((s, t) for s, t in sims if not forced[t])[: m - sum(forced)]
    starts = np.array(forced)
    for _, t in free:
        starts[t] = True
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
@pytest.mark.parametrize("protect", [0.0, 0.5])
def test_sets_match_reference(n, m, protect):
    keys = correlated_keys(3, n, 8, seed=n * 100 + m)
    scores = torch.rand(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(m))
    prot = protected_mask(scores, m, protect)
    starts, tau = find_sets(keys, m, prot)
    assert starts.shape == (3, n)
    sim = adjacent_similarity(keys)
    for r in range(3):
        assert starts[r].sum() == min(m, n)
        assert starts[r, 0]
        np.testing.assert_array_equal(starts[r].numpy(), ref_find_sets(keys[r].numpy(), m, prot[r].numpy()))
        # protected tokens are singleton sets: they start one and so does the token after them
        p = prot[r].nonzero().flatten()
        assert starts[r, p].all() and starts[r, (p + 1)[p + 1 < n]].all()
        assert len(p) == min(int(protect * m), (m - 1) // 2)
        if m < n:  # every joined token is more similar to its predecessor than the threshold
            assert (sim[r][~starts[r]] > tau[r]).all()


def test_protected_heavy_hitters_survive_merging():
    """With the safeguard, the highest-scoring tokens come out unmerged (their own key and value, exactly)."""
    B, H, n, D, m = 1, 2, 60, 8, 20
    keys = correlated_keys(B * H, n, D, seed=11).float().reshape(B, H, n, D)
    values = torch.randn(B, H, n, D)
    scores = torch.rand(B, H, n)
    scores[..., 30:35] = 10.0  # a needle
    pos = torch.arange(n).expand(B, H, n)
    k, v, s, p = make_kvmerger_policy(protect=0.5)(keys, values, scores, pos, m)
    for h in range(H):
        for t in range(30, 35):
            j = (p[0, h] == t).nonzero().item()
            torch.testing.assert_close(k[0, h, j], keys[0, h, t])
            torch.testing.assert_close(v[0, h, j], values[0, h, t])
    k0, _, _, p0 = make_kvmerger_policy(protect=0.0)(keys, values, scores, pos, m)
    assert k0.shape == k.shape


@pytest.mark.parametrize("sigma", [0.0, 1.5])
def test_merge_matches_reference(sigma):
    R, n, D, m = 4, 50, 8, 12
    keys = correlated_keys(R, n, D, seed=7)
    values = torch.randn(R, n, D, dtype=torch.float64)
    scores = torch.rand(R, n, dtype=torch.float64)
    scores[0, 3] = scores[0, 4] = 5.0  # a tie: the earlier token is the pivot
    starts, _ = find_sets(keys, m)
    mk, mv, ms, piv = merge_sets(keys, values, scores, starts, sigma)
    for r in range(R):
        rk, rv, rs, rp = ref_merge(keys[r].numpy(), values[r].numpy(), scores[r].numpy(), starts[r].numpy(), sigma)
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
    for policy in (streaming_policy, h2o_policy, make_snapkv_policy(7), tova_policy, make_kvmerger_policy(), make_kvmerger_policy(protect=0.0)):
        k, v, s, p = policy(keys, values, scores, pos, m)
        assert k.shape == (B, H, m, D) and v.shape == (B, H, m, D) and p.shape == (B, H, m)
        assert torch.all(p[..., 1:] > p[..., :-1])  # token order kept
    k, v, s, p = h2o_policy(keys, values, scores, pos, m)
    top = scores.topk(m, dim=-1).indices.sort(-1).values
    assert torch.equal(p, pos.gather(-1, top))
    k, v, s, p = streaming_policy(keys, values, scores, pos, m)
    assert torch.equal(p[0, 0], torch.arange(100 + n - m, 100 + n))
    # shared selections keep the same positions in every head: TOVA always, H2O with heads=shared
    k, v, s, p = tova_policy(keys, values, scores, pos, m)
    top = scores.sum(1).topk(m, dim=-1).indices.sort(-1).values
    assert torch.equal(p, pos.gather(-1, top[:, None].expand(B, H, m)))


def test_snapkv_pooling_keeps_the_neighbours_of_a_peak():
    scores = torch.zeros(1, 1, 30)
    scores[..., 10] = 5.0
    scores[..., 20] = 1.0
    pos = torch.arange(30).expand(1, 1, 30)
    kv = torch.randn(1, 1, 30, 4)
    _, _, _, p = make_snapkv_policy(5)(kv, kv, scores, pos, 5)
    assert p.flatten().tolist() == [8, 9, 10, 11, 12]
    _, _, _, p = make_snapkv_policy(1)(kv, kv, scores, pos, 2)
    assert p.flatten().tolist() == [10, 20]


def test_h2o_mean_accumulation_removes_the_age_bias():
    """accumulate=mean ranks by attention per query that could see the state (kvpress's ObservedAttention)."""
    from lowbit.kv.budget import BudgetLayer

    layer = BudgetLayer(h2o_policy, budget=0.5, sinks=0, window=0, scorer="all", scores_from="keys", accumulate="mean")
    layer.n_seen, layer.head_dim = 10, 4
    layer.positions = torch.arange(10).expand(1, 1, 10)
    layer.scores = torch.tensor([[[9.0, 8, 7, 6, 5, 4, 3, 2.5, 2, 1]]])  # sums; seen by 10, 9, ..., 1 queries
    keys = torch.randn(1, 1, 10, 4)
    layer.store.update(keys, keys)
    layer._compress(keys, keys, 5)
    # means: 0.9, 0.89, 0.875, 0.857, 0.83, 0.8, 0.75, 0.83, 1.0, 1.0 -> top 5: 8, 9, 0, 1, 2
    assert layer.positions.flatten().tolist() == [0, 1, 2, 8, 9]
    torch.testing.assert_close(layer.scores.flatten(), torch.tensor([9.0, 8, 7, 2, 1]))
