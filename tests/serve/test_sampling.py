"""Sampling: safe for any valid temperature, distributed as the (top-p) softmax, its randomness keyed by token
and independent of batch composition, and robust to the rounding noise batching puts on the logits."""

import queue

import pytest
import torch

from lowbit.serve.batching import BatchedCache
from lowbit.serve.engine import Engine, Request
from lowbit.serve.sampling import SamplingParams, sample_token


@pytest.mark.parametrize("temperature", [1e-39, 1e-45, 5e-324, 1e-300, 1e-8, 2.0])
def test_any_valid_temperature_samples(temperature):
    logits = torch.randn(500, generator=torch.Generator().manual_seed(0)) * 4
    p = SamplingParams(temperature=temperature, top_p=0.9, seed=3)
    g = p.make_generator()
    tokens = [sample_token(logits, p, g) for _ in range(20)]
    assert all(0 <= t < 500 for t in tokens)
    if temperature < 1e-6:  # the distribution is one-hot on the argmax
        assert set(tokens) == {int(logits.argmax())}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
def test_temperature_must_be_finite_and_not_negative(bad):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=bad)


def test_samples_follow_the_top_p_softmax():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    probs = torch.softmax(logits / 0.8, -1)
    p = SamplingParams(temperature=0.8, top_p=0.9, seed=1)
    g = p.make_generator()
    counts = torch.bincount(torch.tensor([sample_token(logits, p, g) for _ in range(6000)]), minlength=6).double()
    nucleus = int(((torch.cumsum(probs, 0) - probs) < 0.9).sum())  # the smallest prefix reaching 0.9
    assert 1 < nucleus < 6 and counts[nucleus:].sum() == 0
    expected = probs[:nucleus] / probs[:nucleus].sum()
    assert torch.allclose(counts[:nucleus] / 6000, expected.double(), atol=0.025)


def test_each_token_draws_the_same_randomness_whatever_the_logits():
    """One Exp(1) per vocabulary entry per token: after k tokens a generator is in the same state whatever was
    sampled, so a request's stream depends on its seed and token count only."""
    p = SamplingParams(temperature=0.7, top_p=0.5, seed=9)
    g1, g2 = p.make_generator(), p.make_generator()
    for k in range(5):
        sample_token(torch.randn(300), p, g1)
        sample_token(torch.randn(300) * 10, SamplingParams(temperature=1.5, seed=9), g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def _rank_order_sample(logits, params, generator):
    """The sampler as it was: multinomial over the probabilities sorted by rank (for contrast)."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    sorted_p, order = torch.sort(probs, descending=True)
    keep = (torch.cumsum(sorted_p, -1) - sorted_p) < params.top_p
    sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)])


def test_sampling_is_robust_to_rounding_noise_on_the_logits():
    """Batching changes logits by floating-point rounding (<= 1e-4 in the batching tests). Keyed by token id, the
    sampled token changes only when the noise moves a decision boundary; keyed by rank, it changes whenever
    tokens of nearly equal probability swap places."""
    gen = torch.Generator().manual_seed(0)
    same = {"token-keyed": 0, "rank-keyed": 0}
    n = 150
    for i in range(n):  # SmolLM2's vocabulary size: the larger the vocabulary, the more near-ties
        logits = torch.randn(49152, generator=gen) * 3
        noisy = logits + torch.randn(49152, generator=gen) * 1e-4
        p = SamplingParams(temperature=1.0, top_p=0.95, seed=i)
        same["token-keyed"] += sample_token(logits, p, p.make_generator()) == sample_token(noisy, p, p.make_generator())
        same["rank-keyed"] += _rank_order_sample(logits, p, p.make_generator()) == _rank_order_sample(noisy, p, p.make_generator())
    assert same["token-keyed"] >= n - 1
    assert same["rank-keyed"] < same["token-keyed"]


class RowWise(torch.nn.Module):
    """The tiny Llama with every decode step computed one request at a time on that request's own cache: each
    row's logits are exactly what it gets alone, whatever else is in the batch."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.generation_config = inner, inner.config, inner.generation_config

    def forward(self, input_ids, past_key_values=None, position_ids=None, **kwargs):
        if not isinstance(past_key_values, BatchedCache):
            return self.inner(input_ids=input_ids, past_key_values=past_key_values, **kwargs)
        rows = [self.inner(input_ids=input_ids[b : b + 1], past_key_values=c, position_ids=position_ids[b : b + 1],
                           use_cache=True).logits for b, c in enumerate(past_key_values.caches)]
        return type("Out", (), {"logits": torch.cat(rows)})()


@pytest.mark.parametrize("spec", ["fp16", "kivi:bits=2,group=32,residual=32"])
def test_seeded_output_does_not_depend_on_the_batch_given_the_same_logits(tiny_llama, fake_tok, spec):
    """The guarantee, exactly: with the same logits (here made batch-invariant by construction), a seeded request
    samples the same tokens alone and among three other requests (greedy and seeded ones)."""
    model = RowWise(tiny_llama)
    engine = Engine(model, fake_tok, kv=spec, kv_budget_mb=64).start()
    try:
        for seed in range(4):
            p = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=seed, ignore_eos=True)
            prompt = [3 + seed, 10, 20, 30]
            alone = engine.generate(prompt, p).token_ids
            others = [engine.submit(Request(list(range(5, 5 + n)), SamplingParams(
                max_tokens=30, temperature=0.9 * (k % 2), seed=k, ignore_eos=True), sink=queue.Queue().put))
                for k, n in enumerate((7, 40, 13))]
            mixed = engine.generate(prompt, p).token_ids
            assert all(r.done.wait(60) for r in others)
            assert len(alone) == 24 and mixed == alone
        assert engine.metrics.get("running_sequences_peak") == 4
    finally:
        engine.shutdown()
