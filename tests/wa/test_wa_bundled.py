"""The bundled SmolLM2: FMPQ with padding (576 = 4.5 x 128) and generation with the default cache."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.model


@pytest.fixture
def smollm2_copy(smollm2):
    """A private copy of the session's bundled model (tests/conftest.py): quantization is in place."""
    import copy

    model, tok = smollm2
    return copy.deepcopy(model), tok


def test_fmpq_generate_with_dynamic_cache(smollm2_copy):
    from transformers import DynamicCache

    from lowbit.wa import QuantLinear, calibration_ids, quantize_model

    model, tok = smollm2_copy
    text = "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure in Paris."
    ids = tok(text * 4, return_tensors="pt")["input_ids"][0]
    calib = calibration_ids(ids, n=2, length=32, seed=0)
    q, report = quantize_model(model, "fmpq:w=4,a=4,block=128,int8_frac=0.1", calib=calib, return_report=True)
    down = q.model.layers[0].mlp.down_proj
    up = q.model.layers[0].mlp.up_proj
    assert isinstance(up, QuantLinear) and up.padded_in == 640 and up.n_int8_blocks == 1  # 576 padded to 5 blocks
    assert down.padded_in == 1536 and down.n_int8_blocks == 2  # 12 blocks
    assert report.nbytes < 0.5 * report.nbytes_fp16

    prompt = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = q.generate(prompt, max_new_tokens=3, do_sample=False, past_key_values=DynamicCache(config=q.config))
        nocache = q.generate(prompt, max_new_tokens=3, do_sample=False, use_cache=False)
    assert out.shape == (1, prompt.shape[1] + 3)
    assert torch.equal(out, nocache)
