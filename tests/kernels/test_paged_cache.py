"""PagedKiviLayer keeps KIVI's format in pages: the same states as KiviLayer, and the paged reference attention over
its pages equals the contiguous reference (CPU); on CUDA its decode path is the paged kernel."""

import pytest
import torch

from lowbit.kernels.kivi_paged import PagedKivi, paged_decode_attention_ref
from lowbit.kernels.reference import decode_attention_ref
from lowbit.kv.kivi import KiviLayer
from lowbit.kv.paged import PagedKiviLayer, paged_supported


def _feed(layer, steps, prefill, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 2, prefill, 128, generator=g)
    layer.update(k, k * 0.5 + 0.1)
    for _ in range(steps):
        k = torch.randn(2, 2, 1, 128, generator=g)
        layer.update(k, -k)
    return layer


@pytest.mark.parametrize("bits,prefill,steps,sinks", [(2, 300, 140, 0), (4, 129, 5, 3), (2, 20, 300, 4), (4, 1000, 0, 0)])
def test_paged_layer_holds_what_kivi_holds(bits, prefill, steps, sinks):
    ref = _feed(KiviLayer(bits, 32, 128, sinks), steps, prefill, seed=bits + steps)
    paged = _feed(PagedKiviLayer(bits, 32, 128, sinks), steps, prefill, seed=bits + steps)
    assert (paged.n_qk, paged.n_qv, paged.get_seq_length()) == (ref.n_qk, ref.n_qv, ref.get_seq_length())
    torch.testing.assert_close(paged.full_keys(), ref.full_keys(), rtol=0, atol=0)
    torch.testing.assert_close(paged.full_values(), ref.full_values(), rtol=0, atol=0)
    q = torch.randn(2, 8, 1, 128)
    view = PagedKivi(bits, paged.pages, paged.n_sink, paged.n_qk, paged.n_qv, paged.get_seq_length(),
                     paged.sink_k, paged.sink_v, paged.res_k, paged.res_v)
    torch.testing.assert_close(paged_decode_attention_ref(q, view), decode_attention_ref(q, ref.parts()).transpose(1, 2),
                               rtol=1e-5, atol=1e-5)
    assert paged.nbytes() >= ref.nbytes()  # whole pages: value scales of the last page are held in advance


@pytest.mark.parametrize("spec", ["kivi:bits=2,kernel=paged", "kivi:bits=4,kernel=paged,sinks=3,residual=256"])
def test_registered_paged_bytes_match_the_layer(spec):
    from lowbit.kv import KVShape, cache_bytes, make_cache, peak_cache_bytes
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=512, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)  # head dim 128
    cache = make_cache(spec, cfg)
    layer = cache.layers[0]
    assert isinstance(layer, PagedKiviLayer)
    shape = KVShape.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    most = 0
    for step in range(200):
        t = 150 if step == 0 else 1
        kv = torch.randn(2, 1, 2, t, 128, generator=g)
        cache.update(kv[0], kv[1], 0)
        n = cache.get_seq_length()
        assert cache.nbytes() == cache_bytes(spec, shape, n), n
        most = max(most, cache.nbytes())
    assert most <= peak_cache_bytes(spec, shape, n)


def test_paged_support_rules():
    assert paged_supported(2, 32, 128, 128) and paged_supported(4, 32, 256)
    assert not paged_supported(8, 32, 128) and not paged_supported(2, 64, 128) and not paged_supported(2, 32, 96)
    with pytest.raises(ValueError, match="residual multiple of 128"):
        PagedKiviLayer(2, 32, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paged_cache_decodes_like_kivi_on_cuda():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.kernels.cuda_build import available
    from lowbit.kv import KiviCache, make_cache
    from lowbit.kv.paged import PagedKiviCache

    if not available("kivi_paged"):
        pytest.skip("nvcc cannot build the paged kernel here")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=500, max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 500, (2, 400), device="cuda")
    paged = make_cache("kivi:bits=2,kernel=paged", model.config, model)
    assert isinstance(paged, PagedKiviCache)
    ref = KiviCache(model.config, bits=2)
    outs = []
    with torch.no_grad():
        for cache in (paged, ref):
            model(ids[:, :300], past_key_values=cache, use_cache=True)
            logits = [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(300, 400)]
            outs.append(torch.cat(logits, dim=1).float())
    rel = ((outs[0] - outs[1]).norm() / outs[1].norm()).item()
    assert rel < 2e-2
