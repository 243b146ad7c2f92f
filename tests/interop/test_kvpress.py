"""kvpress interoperability (optional extra ``lowbit[kvpress]``, kvpress 0.5.5 installed with --no-deps): any press
over lowbit's KIVI storage, KVMerger as a press, and kvpress's own pipeline running both on the bundled model."""

import warnings

import pytest
import torch

kvpress = pytest.importorskip("kvpress", reason="kvpress not installed: pip install --no-deps kvpress==0.5.5 && pip install 'lowbit[kvpress]'")

from lowbit.eval.kvpress_interop import KVMergerPress, PressKiviCache, kvpress_compat, press_kivi_cache  # noqa: E402
from lowbit.kv import KiviCache  # noqa: E402
from lowbit.kv.hf import cache_kwargs  # noqa: E402


@torch.no_grad()
def test_without_a_press_it_is_plain_kivi(tiny_llama):
    ids = torch.randint(0, 97, (1, 120))
    a = KiviCache(tiny_llama.config, bits=2, group=32, residual=32)
    b = PressKiviCache(tiny_llama.config, bits=2, group=32, residual=32)
    outs = []
    for cache in (a, b):
        steps = [tiny_llama(ids[:, :100], **cache_kwargs(tiny_llama, cache, use_cache=True)).logits[0, -1]]
        steps += [tiny_llama(ids[:, i : i + 1], **cache_kwargs(tiny_llama, cache, use_cache=True)).logits[0, -1] for i in range(100, 120)]
        outs.append(torch.stack(steps))
    torch.testing.assert_close(outs[0], outs[1])
    assert a.nbytes() == b.nbytes() and b.layers[0].n_qk > 0


@torch.no_grad()
@pytest.mark.parametrize("press", [kvpress.KnormPress(compression_ratio=0.5), KVMergerPress(compression_ratio=0.5, sinks=4, window=8)],
                         ids=["knorm", "kvmerger"])
def test_a_press_prunes_then_kivi_stores_the_kept_states(tiny_llama, press):
    ids = torch.randint(0, 97, (1, 128))
    cache = press_kivi_cache(tiny_llama, "kivi:bits=2,group=32,residual=32")
    with kvpress_compat(tiny_llama), press(tiny_llama), warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing deprecated reaches the model from lowbit's side
        tiny_llama(ids, **cache_kwargs(tiny_llama, cache, use_cache=True))
    assert cache.get_seq_length() == 64  # half the prefill kept
    kept = cache.layers[0].keys.clone()
    tiny_llama(ids[:, :1], **cache_kwargs(tiny_llama, cache, use_cache=True))  # next step: the kept 64 are stored
    layer = cache.layers[0]
    assert cache.get_seq_length() == 65 and layer.n_qk >= 32  # keys quantized past the residual window
    assert not torch.equal(layer.full_keys()[..., :32, :], kept[..., :32, :])  # 2-bit codes, not the exact states
    torch.testing.assert_close(layer.full_keys()[..., :32, :], kept[..., :32, :], atol=1.0, rtol=0.5)
    assert cache.nbytes() < 0.5 * cache.nbytes_fp16()


def test_kvmerger_press_checks_its_options():
    with pytest.raises(ValueError, match="compression_ratio"):
        KVMergerPress(compression_ratio=1.0)
    with pytest.raises(ValueError, match="protect"):
        KVMergerPress(compression_ratio=0.5, protect=0.9)
    with pytest.raises(ValueError, match="kivi"):
        press_kivi_cache(None, "kvmerger:budget=0.5")


@pytest.mark.model
def test_kvpress_pipeline_with_lowbit_kivi_and_kvmerger(smollm2):
    from transformers import pipeline

    from lowbit.eval.data import read_text

    model, tok = smollm2
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok)
    context = read_text()[:2500]
    question = "\nQuestion: Who is Robert Boulter?\nAnswer:"
    n_context = len(tok(context).input_ids)
    with kvpress_compat(model):
        cache = press_kivi_cache(model, "kivi:bits=4,residual=32")
        out = pipe(context, question=question, press=kvpress.SnapKVPress(compression_ratio=0.5), max_new_tokens=8, cache=cache)
        assert "Boulter" in out["answer"]
        assert cache.get_seq_length() < 0.6 * n_context + 40 and cache.nbytes() < 0.4 * cache.nbytes_fp16()
        out = pipe(context, question=question, press=KVMergerPress(compression_ratio=0.5), max_new_tokens=8)
        assert "Boulter" in out["answer"]
