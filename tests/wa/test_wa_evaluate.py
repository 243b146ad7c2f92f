"""full_ppl on a tiny model: windows, partial windows, agreement with a direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.eval.wa import full_ppl


def test_full_ppl_matches_direct_cross_entropy(make_tiny):
    model = make_tiny()
    ids = torch.randint(1, 256, (50,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        nll = 0.0
        for s in (0, 20, 40):
            chunk = ids[s : s + 20].unsqueeze(0)
            logits = model(chunk).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
    assert full_ppl(model, ids, window=20) == pytest.approx(math.exp(nll / (19 + 19 + 9)), rel=1e-5)
    assert full_ppl(model, ids.unsqueeze(0), window=20) == full_ppl(model, ids, window=20)
    # a random model is near uniform over the 256-token vocabulary
    assert 100 < full_ppl(model, ids, window=50) < 600


def test_full_ppl_needs_two_tokens(make_tiny):
    with pytest.raises(ValueError):
        full_ppl(make_tiny(), torch.tensor([5]))
