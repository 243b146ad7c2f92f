"""The library paths pick the Triton kernels on CUDA: make_cache(model=...) and QuantLinear in int mode."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernels)")


def _tiny(dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=500, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).to("cuda", dtype).eval()


@torch.no_grad()
def test_make_cache_uses_fused_kivi_on_cuda_and_matches_reference():
    from lowbit.kv import FusedKiviCache
    from lowbit.kv import KiviCache, make_cache

    model = _tiny()
    ids = torch.randint(0, 500, (2, 300), device="cuda")
    fused = make_cache("kivi:bits=4,group=32,residual=64", model.config, model)
    assert isinstance(fused, FusedKiviCache)
    ref = KiviCache(model.config, bits=4, group=32, residual=64)
    outs = []
    for cache in (fused, ref):
        model(ids[:, :256], past_key_values=cache, use_cache=True)
        steps = [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits.float() for t in range(256, 300)]
        outs.append(torch.cat(steps, 1))
    a, b = outs
    assert (a - b).abs().max() <= 3e-2 * b.abs().max()
    assert fused.nbytes() == ref.nbytes()


@torch.no_grad()
def test_quant_linear_int_mode_runs_the_gemm_on_cuda():
    from lowbit.wa import quantize_model

    model = _tiny(torch.float32).cpu()
    calib = torch.randint(0, 500, (4, 64))
    quantize_model(model, "fmpq:w=4,a=4,block=128,group=128,int8_frac=0.25", calib=calib, mode="int")
    x = torch.randint(0, 500, (1, 48))
    ref = model(x).logits
    got = model.to("cuda")(x.cuda()).logits.float().cpu()
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
