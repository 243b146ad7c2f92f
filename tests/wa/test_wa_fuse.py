"""Sibling projections (q/k/v, gate/up) fused into one QuantLinear: the same function, one weight copy, reversible."""

from __future__ import annotations

import pytest
import torch

from lowbit.wa import fuse_projections, model_nbytes, quantize_model, save_quantized, unfuse_projections
from lowbit.wa.fuse import FusedProjection, ProjectionSlice, fusable, fuse_layers
from lowbit.wa.linear import QuantLinear

SPECS = ["fmpq:w=4,a=4,block=32,group=32,int8_frac=0.25", "fmpq:w=4,a=8,block=32,group=32,fold=false",
         "w4a8:block=32,group=32,sym=false"]


def _quantized(make_tiny, spec):
    from lowbit.wa import calibration_ids

    model = make_tiny(seed=3)
    calib = calibration_ids(torch.randint(0, 256, (1, 2048), generator=torch.Generator().manual_seed(0)), n=2,
                            length=32)
    quantize_model(model, spec, calib=calib)
    return model


def _packed_bytes(model):
    return sum(m.qweight.numel() + m.w_scale.numel() * 2 for m in model.modules() if isinstance(m, QuantLinear))


def _buffers(model):
    return {n: b.clone() for n, b in model.named_buffers() if ".layers." in n}


@pytest.mark.parametrize("spec", SPECS)
def test_fused_model_computes_the_same_logits_and_unfuses_to_the_same_layers(make_tiny, spec):
    model = _quantized(make_tiny, spec)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    before, nbytes, packed = _buffers(model), model_nbytes(model), _packed_bytes(model)
    assert fuse_projections(model) == 2 * len(model.model.layers)  # q/k/v and gate/up of every layer
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, ProjectionSlice) and attn.k_proj.shared is attn.q_proj.group
    assert _packed_bytes(model) == packed  # one copy of the weights: the fused layer's
    assert model_nbytes(model) < nbytes  # and one permutation and mask per group instead of one per sibling
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 4 * len(model.model.layers)  # qkv, o, gate_up, down
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unfuse_projections"):
        save_quantized(model, "/nonexistent/never-written")
    assert unfuse_projections(model) == 2 * len(model.model.layers)
    after = _buffers(model)
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)


def _group(spec="fmpq:w=4,a=4,block=32,group=32,int8_frac=0.25", sizes=(48, 16, 16), bias=True):
    torch.manual_seed(7)
    stats = torch.rand(96) + 0.1
    layers = [QuantLinear.from_linear(torch.nn.Linear(96, n, bias=bias), _cfg(spec), stats) for n in sizes]
    return layers, FusedProjection(fuse_layers(layers), [f"p{i}" for i in range(len(sizes))], list(sizes))


def _cfg(spec):
    from lowbit.wa import resolve_config

    return resolve_config(spec)


def test_slices_take_their_columns_in_any_order_and_recompute_for_new_inputs(monkeypatch):
    layers, group = _group()
    slices = [ProjectionSlice(group, i) for i in range(3)]
    calls = []
    real = group.fused.forward
    monkeypatch.setattr(group.fused, "forward", lambda x: calls.append(x) or real(x))
    x = torch.randn(5, 96)
    for i in (2, 0, 1):  # any order: one fused call serves all three
        torch.testing.assert_close(slices[i](x), layers[i](x), rtol=1e-6, atol=1e-6)
    assert len(calls) == 1 and group._input is None  # released once all three took their columns
    y0 = slices[0](x)
    x2 = torch.randn(5, 96)
    torch.testing.assert_close(slices[1](x2), layers[1](x2), rtol=1e-6, atol=1e-6)  # another input: recomputed
    assert len(calls) == 3
    x2.mul_(2)  # changed in place since: recomputed, not served stale
    torch.testing.assert_close(slices[2](x2), layers[2](x2), rtol=1e-6, atol=1e-6)
    assert len(calls) == 4
    assert slices[0](x2) is not None and len(calls) == 4  # same input, unchanged: served
    slices[0](x2)  # the same sibling twice: a new call of the module, recomputed
    assert len(calls) == 5
    assert y0.shape == (5, 48)


@pytest.mark.parametrize("change", ["mask", "perm", "cfg", "bias", "type"])
def test_layers_that_quantize_their_input_differently_are_not_fused(change):
    layers, _ = _group()
    other = layers[1]
    if change == "mask":
        other.int8_mask = ~other.int8_mask
    elif change == "perm":
        other.perm = other.perm.flip(0)
    elif change == "cfg":
        layers[1] = QuantLinear.from_linear(torch.nn.Linear(96, 16), _cfg("fmpq:w=4,a=8,block=32,group=32"),
                                            torch.rand(96) + 0.1)
    elif change == "bias":
        other.bias = None
    else:
        layers[1] = torch.nn.Linear(96, 16)
    assert fusable(layers[:1] + layers[2:])
    assert not fusable(layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the W4Ax kernel path needs CUDA (and Triton)")
@pytest.mark.parametrize("spec", SPECS[:2])
def test_fused_model_on_the_kernel_path_matches_the_separate_layers(make_tiny, spec):
    """On CUDA the fused layer runs the W4Ax kernels (decode-sized calls through its prepared launches) and gives the
    separate layers' logits up to the float sums' order (the split-K plan follows the fused width)."""
    model = _quantized(make_tiny, spec).cuda()
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        want, step = model(ids).logits, model(ids[:, :1]).logits
        fuse_projections(model)
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(model(ids[:, :1]).logits, step, rtol=1e-3, atol=1e-3)


def test_sibling_stats_are_shared_within_each_group():
    from lowbit.wa.fuse import sibling_stats

    names = [f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.q_proj", "self_attn.k_proj",
                                                                 "self_attn.v_proj", "self_attn.o_proj",
                                                                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    made = []
    stats = sibling_stats(names, lambda n: made.append(n) or torch.rand(4))
    assert len(made) == 8  # per layer: q/k/v, o, gate/up, down
    for i in (0, 1):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        assert stats[f"{attn}.k_proj"] is stats[f"{attn}.q_proj"] is stats[f"{attn}.v_proj"]
        assert stats[f"{mlp}.up_proj"] is stats[f"{mlp}.gate_proj"] is not stats[f"{mlp}.down_proj"]
    assert stats["model.layers.0.self_attn.q_proj"] is not stats["model.layers.1.self_attn.q_proj"]
