"""The transformers spellings of the supported range (pyproject.toml): the cache goes in under the name the
installed version takes, with no deprecation warning, and comes back out of the model output."""

import inspect
import warnings

import torch

from lowbit.kv.hf import cache_arg, cache_kwargs, output_cache
from lowbit.kv.registry import make_cache


def test_cache_keyword_matches_the_installed_transformers(tiny_llama):
    params = inspect.signature(tiny_llama.forward).parameters
    assert cache_arg(tiny_llama) == ("cache" if "cache" in params else "past_key_values")
    assert cache_arg(tiny_llama) in params or "kwargs" in params


def test_forward_and_generate_through_a_lowbit_cache_without_warnings(tiny_llama):
    ids = torch.randint(0, 97, (1, 40))
    cache = make_cache("kivi:bits=2,group=32,residual=32", tiny_llama.config, tiny_llama)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a FutureWarning about past_key_values fails the test
        out = tiny_llama(ids, **cache_kwargs(tiny_llama, cache, use_cache=True))
        assert output_cache(out) is cache and cache.get_seq_length() == 40
        gen = tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0,
                                  **cache_kwargs(tiny_llama, make_cache("kivi:bits=2", tiny_llama.config, tiny_llama)))
    assert gen.shape == (1, 43)
