"""quantize_model on a tiny random Llama: selection, calibration, sizes, caches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.wa import (
    QuantLinear,
    calibration_ids,
    collect_channel_stats,
    fp16_nbytes,
    model_nbytes,
    quantize_model,
    select_linears,
    set_mode,
)

SPEC = "fmpq:a=4,block=32,group=32,int8_frac=0.25"


def quant_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def test_default_selection_is_decoder_linears_not_lm_head(tiny, calib):
    model, report = quantize_model(tiny, SPEC, calib=calib, return_report=True)
    names = quant_names(model)
    assert len(names) == 2 * 7 and all(n.startswith("model.layers.") for n in names)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    assert model.lowbit_wa is report and report.calibrated and len(report.layers) == 14
    assert "14 linear layers" in report.summary()


def test_regex_and_callable_selection(calib, make_tiny):
    m = quantize_model(make_tiny(), SPEC, calib=calib, layers=r"mlp\.(gate|up)_proj")
    assert sorted(quant_names(m)) == sorted(f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up"))
    m = quantize_model(make_tiny(), "w4a16:group=32", layers=lambda name, mod: mod.out_features == 256)
    assert quant_names(m) == ["lm_head"]
    with pytest.raises(ValueError, match="nothing to quantize"):
        quantize_model(make_tiny(), "w8a8", layers="no_such_layer")


def test_quantized_model_close_to_fp(tiny, calib, ids, make_tiny):
    with torch.no_grad():
        ref = tiny(ids).logits
    errs = {}
    for spec in ("w8a8", "w4a16:group=32", "w4a4:block=32,group=32", SPEC, "fmpq:a=8,block=32,group=32"):
        q = quantize_model(make_tiny(), spec, calib=calib)
        with torch.no_grad():
            errs[spec] = float((q(ids).logits - ref).norm() / ref.norm())
    assert errs["w8a8"] < 0.05 and errs["w4a16:group=32"] < 0.35, errs
    assert errs[SPEC] < errs["w4a4:block=32,group=32"], errs
    assert errs["fmpq:a=8,block=32,group=32"] < errs[SPEC], errs


def test_int_and_fake_modes_agree_on_model(calib, ids, make_tiny):
    q = quantize_model(make_tiny(), SPEC, calib=calib)
    with torch.no_grad():
        a = q(ids).logits
        b = set_mode(q, "fake")(ids).logits
    # the tiny model has no rounding flips at this size; both compute the same quantized function
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_calibration_is_deterministic_for_a_seed(tiny, make_tiny):
    stream = torch.randint(1, 256, (5000,), generator=torch.Generator().manual_seed(5))
    a, b = calibration_ids(stream, 4, 32, seed=3), calibration_ids(stream, 4, 32, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, calibration_ids(stream, 4, 32, seed=4))
    names = select_linears(tiny)
    s1, s2 = collect_channel_stats(tiny, names, a), collect_channel_stats(tiny, names, b)
    assert all(torch.equal(s1[n], s2[n]) for n in names)
    m1, m2 = quantize_model(make_tiny(), SPEC, calib=a), quantize_model(make_tiny(), SPEC, calib=b)
    for (n, q1), q2 in zip(((n, m) for n, m in m1.named_modules() if isinstance(m, QuantLinear)),
                           (m for m in m2.modules() if isinstance(m, QuantLinear))):
        assert torch.equal(q1.perm, q2.perm) and torch.equal(q1.int8_mask, q2.int8_mask), n
        assert torch.equal(q1.qweight, q2.qweight)


def test_calibration_finds_planted_outliers(tiny, calib):
    q = quantize_model(tiny, SPEC, calib=calib)
    qproj = q.model.layers[0].self_attn.q_proj  # input = input_layernorm output, channels 3, 40, 77 boosted
    assert set(qproj.perm[:3].tolist()) == {3, 40, 77}
    assert bool(qproj.int8_mask[0])
    # q, k, v share their input: each owns the same permutation
    assert torch.equal(qproj.perm, q.model.layers[0].self_attn.k_proj.perm)


def test_fmpq_a4_without_calibration_is_rejected_clearly(tiny, make_tiny):
    with pytest.raises(ValueError, match="needs calibration"):
        quantize_model(tiny, SPEC)
    m = quantize_model(make_tiny(), "fmpq:a=8,block=32,group=32")  # W4A8: identity permutation is fine
    assert torch.equal(m.model.layers[0].mlp.up_proj.perm, torch.arange(96, dtype=torch.int32))


def test_stats_reuse_equals_calib(calib, make_tiny):
    base = make_tiny()
    stats = collect_channel_stats(base, select_linears(base), calib)
    m1 = quantize_model(make_tiny(), SPEC, calib=calib)
    m2 = quantize_model(make_tiny(), SPEC, stats=stats)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_model_nbytes_counts_packed_storage():
    lin = nn.Sequential(nn.Linear(128, 64, bias=True))
    assert model_nbytes(lin) == 2 * (128 * 64 + 64)  # fp params at 2 bytes (fp16)
    quantize_model(lin, "fmpq:a=4,block=64,group=64", calib=None, layers=".*", stats={"0": torch.rand(128)})
    # packed int4 weights + fp16 scales (one per row per group) + int32 perm + bool mask + fp16 bias
    assert model_nbytes(lin) == 64 * 64 + 2 * 64 * 2 + 4 * 128 + 2 + 2 * 64
    assert fp16_nbytes(lin) == 2 * (128 * 64 + 64)


def test_model_nbytes_on_tiny_model(tiny, calib):
    fp = model_nbytes(tiny)
    assert fp == fp16_nbytes(tiny)
    q = quantize_model(tiny, "w4a16:group=32")
    assert model_nbytes(q) < 0.6 * fp and fp16_nbytes(q) == fp


def test_generate_with_dynamic_cache_tiny(tiny, calib):
    q = quantize_model(tiny, SPEC, calib=calib)
    prompt = torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out = q.generate(prompt, max_new_tokens=5, do_sample=False)
        # the last step's logits from the cache equal a full recomputation (per-token quantization)
        full = q(out[:, :-1]).logits[:, -1]
        cached = q(out[:, -1:], past_key_values=q(out[:, :-1], use_cache=True).past_key_values).logits[:, -1]
        prefix = q(out[:, :-1], use_cache=False).logits[:, -1]
    assert out.shape == (1, 11)
    torch.testing.assert_close(full, prefix)
    assert cached.shape == full.shape and torch.isfinite(cached).all()
