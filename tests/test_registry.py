"""The KV-method registry: a method defined here (not in src/) runs through `lowbit eval` and the server's engine,
and every registered method's byte count agrees with the caches it builds."""

import queue

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from lowbit.kv import KV_METHODS, KVMethod, KVShape, cache_bytes, cache_nbytes, make_cache, peak_cache_bytes, register_kv_method
from lowbit.spec import MethodSpec, Param, SpecError


class RoundedLayer(DynamicLayer):
    """Stores keys and values rounded to `bits` mantissa bits (a toy lossy cache)."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def update(self, key_states, value_states, *args, **kwargs):
        def rnd(t):
            m, e = torch.frexp(t)
            return torch.ldexp(torch.round(m * 2**self.bits) / 2**self.bits, e)

        return super().update(rnd(key_states), rnd(value_states), *args, **kwargs)


class RoundedCache(DynamicCache):
    def __init__(self, config, bits: int):
        layers = config.get_text_config(decoder=True).num_hidden_layers
        super(DynamicCache, self).__init__(layers=[RoundedLayer(bits) for _ in range(layers)])


def _nbytes(options, shape: KVShape, n, store):
    return shape.layers * n * shape.fp16_bytes_per_token


TOY = KVMethod(
    MethodSpec("toyround", {"bits": Param(int, 6, check=lambda b: 1 <= b <= 10, allowed="1..10")}, "test-only rounding cache"),
    make=lambda part, ctx, store: RoundedCache(ctx.config, part.options["bits"]),
    nbytes=_nbytes,
)


@pytest.fixture
def toy_method():
    register_kv_method(TOY)
    yield TOY
    del KV_METHODS[TOY.name]


def test_toy_method_parses_and_builds(toy_method, tiny_llama):
    cache = make_cache("toyround:bits=4", tiny_llama.config)
    assert isinstance(cache, RoundedCache)
    with pytest.raises(SpecError, match="1..10"):
        make_cache("toyround:bits=0", tiny_llama.config)
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        out = tiny_llama(ids, past_key_values=cache, use_cache=True)
    assert torch.isfinite(out.logits).all() and cache.get_seq_length() == 20


def test_toy_method_in_the_engine(toy_method, tiny_llama):
    from lowbit.serve.engine import Engine, Request
    from lowbit.serve.sampling import SamplingParams

    class Tok:
        eos_token_id = None
        chat_template = None

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(0x100 + int(i)) for i in ids)

    engine = Engine(tiny_llama, Tok(), kv="toyround:bits=5", kv_budget_mb=8)
    assert engine.sizer.peak_bytes(30) == 2 * 30 * 2 * 2 * 2 * 32  # layers x tokens x K,V x 2 bytes x heads x dim
    sink = queue.Queue()
    req = engine.submit(Request(list(range(3, 13)), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), sink=sink.put))
    engine.start()
    try:
        while (ev := sink.get(timeout=60))["type"] == "delta":
            pass
        assert ev["type"] == "done" and ev["completion_tokens"] == 6
        assert req.finish_reason == "length"
    finally:
        engine.shutdown()


@pytest.mark.model
def test_toy_method_in_lowbit_eval(toy_method, tmp_path):
    import json

    from typer.testing import CliRunner

    from lowbit.cli import app

    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["eval", "--kv", "toyround:bits=3", "--prefill", "48", "--tokens", "16", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["kl_mean"] > 0  # rounding to 3 mantissa bits is lossy, and measured as such


EXACT = ["fp16", "kivi:bits=2,group=32,residual=32", "kivi:bits=4,group=32,residual=64,sinks=4", "kivi:bits=8",
         "2bit", "4bit", "kiviplus:rotate=kv,hi_channels=4,kgroup=16,vgroup=16,residual=32,sinks=3,hi_layers=0",
         "kiviplus:kbits=4,vbits=2,hi_channels=5,hi_bits=8,residual=64,sinks=5,hi_layers=-1"]
BOUNDED = ["streaming:budget=0.5", "h2o:budget=0.3,window=8", "kvmerger:budget=0.4+kivi:bits=2", "h2o:budget=0.5+kivi:bits=4,residual=64",
           "h2o:budget=0.5,heads=shared", "snapkv:budget=0.4,pool=5", "tova:budget=0.3", "kvmerger:budget=0.5,protect=0", "tova:budget=0.5+kivi:bits=2"]


@pytest.mark.parametrize("spec", EXACT + BOUNDED)
def test_registered_bytes_match_real_caches(tiny_llama, spec):
    """Exact methods: the registry's bytes equal the cache's after every update; budget methods: never above."""
    shape = KVShape.from_config(tiny_llama.config)
    gen = torch.Generator().manual_seed(3)
    for prefill in (1, 45, 130):
        cache = make_cache(spec, tiny_llama.config)
        most = 0
        for step in range(90):
            t = prefill if step == 0 else 1
            for layer in range(2):
                kv = torch.randn(2, 1, 2, t, 32, generator=gen)
                cache.update(kv[0], kv[1], layer)
            n = cache.get_seq_length()
            held = cache_nbytes(cache)[0]
            most = max(most, held)
            if spec in EXACT:
                assert held == cache_bytes(spec, shape, n), (spec, prefill, n)
            else:
                assert held <= cache_bytes(spec, shape, n), (spec, prefill, n)
        assert most <= peak_cache_bytes(spec, shape, n)
