"""apply() on a small Llama, LutActivation, and the spec registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lut_helpers import full_fit, quick_fit
from lowbit.lut import LUT_METHODS, LutActivation, apply, apply_spec, parse_lut_spec, restore, table_from_spec
from lowbit.spec import SpecError


def _llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_apply_silu_on_llama_keeps_logits_close():
    model = _llama()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    keys = set(model.state_dict())
    table = full_fit("silu", 16, -4.0, 4.0).table
    assert apply(model, {"silu": table}) == 2
    acts = [layer.mlp.act_fn for layer in model.model.layers]
    assert all(isinstance(a, LutActivation) and a.table is table for a in acts)
    assert set(model.state_dict()) == keys  # no new persistent state
    with torch.no_grad():
        out = model(ids).logits
    diff = (out - ref).abs().max().item()
    assert 0 < diff < 0.05 * ref.abs().max().item()
    # a second apply finds nothing left to replace
    with pytest.raises(ValueError, match="no activation matched"):
        apply(model, {"silu": table})
    assert restore(model) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref)


def test_apply_in_bfloat16():
    model = _llama().to(torch.bfloat16)
    apply(model, {"silu": quick_fit("silu", 16).table})
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        out = model(ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_apply_errors():
    model = _llama()
    with pytest.raises(ValueError, match="no activation matched: looked for attributes \\['act_fn'\\] of class .*GELU.*found SiLUActivation"):
        apply(model, {"gelu": quick_fit("gelu", 8).table})
    with pytest.raises(ValueError, match="cannot apply a LUT for 'exp' to model activations: allowed names are gelu, silu, hswish, sigmoid, tanh"):
        apply(model, {"exp": quick_fit("exp", 8).table})
    with pytest.raises(ValueError, match="approximates 'gelu'"):
        apply(model, {"silu": quick_fit("gelu", 8).table})
    with pytest.raises(ValueError, match="no tables given"):
        apply(model, {})


def test_apply_matches_torch_modules_and_other_attrs():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.act_fn = nn.GELU()
            self.act = nn.Tanh()

    net = nn.Sequential(Block(), Block())
    assert apply(net, {"gelu": quick_fit("gelu", 8).table}) == 2
    assert apply(net, {"tanh": quick_fit("tanh", 8).table}, attrs=("act",)) == 2
    x = torch.linspace(-3, 3, 50)
    torch.testing.assert_close(net[0].act(x), torch.tanh(x), atol=0.05, rtol=0)


def test_lut_activation_moves_with_model_and_shapes():
    act = LutActivation(quick_fit("silu", 8).table)
    x = torch.randn(3, 4, 5, dtype=torch.float16)
    y = act(x)
    assert y.shape == x.shape and y.dtype == torch.float16
    assert not act.state_dict()
    assert "fn=silu" in repr(act)


def test_spec_registry():
    assert set(LUT_METHODS) >= {"gelu", "silu", "hswish", "exp", "reciprocal", "rsqrt", "sigmoid", "tanh"}
    (p,) = parse_lut_spec("silu:segments=8")
    assert p.name == "silu" and p.options["segments"] == 8 and p.options["in_bits"] == 8 and p.options["seed"] == 0
    assert p.options["lo"] is None
    t = table_from_spec("gelu:n=4,lo=-3,hi=3,generations=10,population=16")
    assert (t.fn, t.segments, t.lo, t.hi) == ("gelu", 4, -3.0, 3.0)
    t = table_from_spec(parse_lut_spec("exp:segments=4,generations=5,population=8")[0])
    assert (t.lo, t.hi) == (-8.0, 0.0)
    with pytest.raises(SpecError, match="unknown LUT function 'relu': allowed methods are gelu"):
        parse_lut_spec("relu:segments=8")
    with pytest.raises(SpecError, match="option 'segments' of 'silu' is 99: allowed values are an integer in 2..64"):
        parse_lut_spec("silu:segments=99")
    with pytest.raises(SpecError, match="unknown option 'bins'"):
        parse_lut_spec("silu:bins=8")
    with pytest.raises(ValueError, match="must lie in"):
        table_from_spec("exp:hi=2,generations=2")


def test_apply_spec():
    model = _llama()
    assert apply_spec(model, "silu:segments=8,generations=10,population=16") == 2
