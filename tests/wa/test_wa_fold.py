"""Folded FMPQ permutations (lowbit.wa.fold): the folded model equals the gathering one bit for bit, no gather
remains where a fold applies, composition with rotation / GPTQ, save/load of the single layout, clear errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lowbit.kernels.layout import pack_tiles, unpack_tiles
from lowbit.wa import QuantLinear, QuantizedCheckpointError, load_quantized, quantize_model, resolve_config, save_quantized
from lowbit.wa.fold import PermutedRMSNorm, fold_permutations, gathers_per_forward, unfold_permutations
from lowbit.wa.io import CONFIG_FILE, config_sha256

SPECS = [
    "fmpq:w=4,a=4,block=32,group=32,int8_frac=0.25",  # tile 32 vs head_dim 24: v_proj rows permuted within heads
    "fmpq:w=4,a=8,block=32,group=32",
    "fmpq:w=4,a=4,block=64,group=32,sym=false",
]


def count_gathers(model, monkeypatch, ids):
    """Permutation gathers one forward runs: QuantLinear.gather calls plus permuted norms."""
    calls = []
    orig_gather, orig_norm = QuantLinear.gather, PermutedRMSNorm.forward
    monkeypatch.setattr(QuantLinear, "gather", lambda self, x: calls.append("linear") or orig_gather(self, x))
    monkeypatch.setattr(PermutedRMSNorm, "forward", lambda self, x: calls.append("norm") or orig_norm(self, x))
    with torch.no_grad():
        model(ids)
    monkeypatch.undo()
    return calls.count("linear"), calls.count("norm")


@pytest.mark.parametrize("spec", SPECS)
def test_folded_equals_gathered_bit_for_bit(spec, make_tiny, calib, ids, monkeypatch):
    model, report = quantize_model(make_tiny(), spec, calib=calib, return_report=True)
    gathered = unfold_permutations(copy.deepcopy(model))
    how = report.inputs
    assert set(how.values()) == {"norm", "gate/up rows", "v_proj rows"}, how
    assert not report.gathers and "0 layers still gather" in report.summary()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gathered(ids).logits)
    assert count_gathers(model, monkeypatch, ids) == (0, 4)  # one per norm, 2 layers x 2 norms
    assert count_gathers(gathered, monkeypatch, ids) == (14, 0)  # one per linear
    assert gathers_per_forward(model) == 4 and gathers_per_forward(gathered) == 14
    assert all(not m.gathers_input for m in model.modules() if isinstance(m, QuantLinear))
    # fold(unfold(m)) restores the same storage
    refolded = copy.deepcopy(gathered)
    fold_permutations(refolded)
    sd_a, sd_b = model.state_dict(), refolded.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_folded_fake_mode_and_generation(make_tiny, calib):
    model = quantize_model(make_tiny(), SPECS[0], calib=calib, mode="fake")
    gathered = unfold_permutations(copy.deepcopy(model))
    prompt = torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = model(prompt).logits, gathered(prompt).logits
        # fake mode is one float matmul: permuting the weight's rows leaves each output's sum as it was
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        out = model.generate(prompt, max_new_tokens=4, do_sample=False)
        assert torch.equal(out, gathered.generate(prompt, max_new_tokens=4, do_sample=False))


def test_o_proj_permutation_is_within_heads_and_shared_by_a_kv_group(make_tiny, calib):
    model = quantize_model(make_tiny(), SPECS[0], calib=calib)
    attn = model.model.layers[0].self_attn
    d, n_heads, n_kv = attn.head_dim, 4, 2
    perm = attn.o_proj.perm.long().reshape(n_heads, d) - torch.arange(n_heads)[:, None] * d
    assert perm.min() >= 0 and perm.max() < d
    assert torch.equal(perm[0], perm[1]) and torch.equal(perm[2], perm[3])  # query heads 0,1 share KV head 0
    # tiles holding whole heads: the order inside a head is immaterial, o_proj stays unpermuted (v untouched)
    m2, rep = quantize_model(make_tiny(hidden=128), "fmpq:a=4,block=32,group=32,int8_frac=0.25", calib=calib,
                             return_report=True)
    o = m2.model.layers[0].self_attn.o_proj
    assert torch.equal(o.perm.long(), torch.arange(128)) and rep.inputs["model.layers.0.self_attn.o_proj"] == "identity"


def test_unfolded_permutations_fall_back_to_the_gather(make_tiny, calib, ids):
    """fold=false keeps today's free per-linear sort; folding such a model keeps the gathers it cannot remove."""
    model, report = quantize_model(make_tiny(), "fmpq:a=4,block=32,group=32,int8_frac=0.25,fold=false", calib=calib,
                                   return_report=True)
    assert not report.inputs and gathers_per_forward(model) == 14
    ref = copy.deepcopy(model)
    how = fold_permutations(model)
    assert how["model.layers.0.self_attn.o_proj"].startswith("gather: o_proj's permutation moves channels")
    assert how["model.layers.0.mlp.down_proj"] == "gate/up rows"
    assert model.model.layers[0].self_attn.o_proj.gathers_input
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_partial_selection_keeps_gathers_where_producers_are_not_quantized(make_tiny, calib, ids):
    model, report = quantize_model(make_tiny(), SPECS[0], calib=calib, layers=r"(down|o)_proj", return_report=True)
    assert all(h.startswith("gather") for h in report.inputs.values()), report.inputs
    assert not any(isinstance(m, PermutedRMSNorm) for m in model.modules())


def test_rotation_composes(make_tiny, calib, ids):
    spec = "fmpq:a=4,block=32,group=32,int8_frac=0.25,rotate=hadamard"
    model, report = quantize_model(make_tiny(hidden=128, intermediate=192), spec, calib=calib, return_report=True)
    assert report.gathers == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert report.inputs["model.layers.0.mlp.down_proj"] == "gather: online input rotation"
    gathered = unfold_permutations(copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gathered(ids).logits)


def test_gptq_composes(make_tiny, calib, ids):
    model, report = quantize_model(make_tiny(), "fmpq:a=4,block=32,group=32,int8_frac=0.25,gptq=true", calib=calib,
                                   return_report=True)
    assert not report.gathers
    gathered = unfold_permutations(copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gathered(ids).logits)


def test_save_load_keeps_the_single_folded_layout(tmp_path, make_tiny, calib, ids):
    model = quantize_model(make_tiny(), SPECS[0], calib=calib)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path, make_tiny(), expect_spec=SPECS[0])
    assert sum(isinstance(m, PermutedRMSNorm) for m in loaded.modules()) == 4 and gathers_per_forward(loaded) == 4
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    for name, q in loaded.named_modules():
        if isinstance(q, QuantLinear):
            assert set(q.state_dict()) == {"qweight", "w_scale", "perm", "int8_mask", "bias"} - ({"bias"} if q.bias is None else set())
            assert not any(k for k in q._cache if isinstance(k, tuple) and k[0] == "triton_w")
            assert torch.equal(pack_tiles(unpack_tiles(q.qweight, q.tile), q.tile), q.qweight)
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert cfg["format_version"] == 2 and all(e["input_permuted"] for e in cfg["layers"])


def test_checkpoint_errors(tmp_path, make_tiny, calib):
    model = quantize_model(make_tiny(), SPECS[0], calib=calib)
    save_quantized(model, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    old = dict(cfg, format_version=1)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(old))
    with pytest.raises(QuantizedCheckpointError, match="format version 1.*quantize the model again"):
        load_quantized(tmp_path, make_tiny())
    bad = copy.deepcopy(cfg)
    bad["layers"][0]["input_permuted"] = "yes"
    bad["config_sha256"] = config_sha256(bad)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(bad))
    with pytest.raises(QuantizedCheckpointError, match="input_permuted must be"):
        load_quantized(tmp_path, make_tiny())
    bad = copy.deepcopy(cfg)
    bad["layers"][0]["input_permuted"] = False  # q_proj gathers, k/v expect the norm to permute: inconsistent
    bad["config_sha256"] = config_sha256(bad)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(bad))
    with pytest.raises(QuantizedCheckpointError, match="do not share one folded permutation"):
        load_quantized(tmp_path, make_tiny())


def test_bad_permutations_rejected_clearly():
    lin = torch.nn.Linear(64, 8)
    cfg = resolve_config("fmpq:block=32,group=32")
    for perm, msg in ((torch.arange(63), "1-D tensor of 64"), (torch.zeros(64, dtype=torch.long), "not a permutation"),
                      (torch.arange(64.0), "integer indices"), (torch.arange(64) + 1, "not a permutation")):
        with pytest.raises(ValueError, match=msg):
            QuantLinear.from_linear(lin, cfg, perm=perm)
    with pytest.raises(ValueError, match="does not permute"):
        QuantLinear.from_linear(lin, resolve_config("w4a4:block=32,group=32"), perm=torch.arange(64))
    q = QuantLinear.from_linear(lin, cfg, perm=torch.arange(64).flip(0))
    assert torch.equal(q.perm.long(), torch.arange(64).flip(0))
    with pytest.raises(ValueError, match="48 features for a layer with 64 inputs"):
        q(torch.randn(2, 48))
    with pytest.raises(ValueError, match="permutation of 8"):
        q.permute_output_rows(torch.arange(7))
    with pytest.raises(ValueError, match="not grouped-query"):
        _bad_heads()


def _bad_heads():
    from lowbit.wa.fold import _heads

    class A(torch.nn.Module):
        head_dim = 24
        o_proj = torch.nn.Linear(100, 96)
        v_proj = torch.nn.Linear(96, 48)

    _heads(A())


def test_permuted_norm_is_the_gathered_norm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(96, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96) * 3)
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(0))
    pn = PermutedRMSNorm(norm, perm)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(3, 5, 96) * 4).to(dtype)
        with torch.no_grad():
            assert torch.equal(pn.to(dtype)(x), norm.to(dtype)(x)[..., perm])
    assert set(pn.state_dict()) == {"weight"}


@pytest.mark.model
@pytest.mark.parametrize("spec", ["fmpq:w=4,a=4", "fmpq:w=4,a=8", "fmpq:w=4,a=4,block=32,group=32"])
def test_bundled_model_folded_equals_gathered(spec, monkeypatch):
    """SmolLM2-135M (9 query heads, 3 KV heads, head_dim 64) through lowbit.models.loading.load_model."""
    from lowbit.models.loading import load_model
    from lowbit.wa import calibration_ids

    model, tok = load_model("smollm2")
    text = "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure in Paris."
    ids = tok(text * 4, return_tensors="pt")["input_ids"][0]
    calib = calibration_ids(ids, n=2, length=32, seed=0)
    q, report = quantize_model(model, spec, calib=calib, return_report=True)
    assert not report.gathers and len(report.inputs) == 30 * 7
    o_how = {h for n, h in report.inputs.items() if n.endswith("o_proj")}
    assert o_how == ({"identity"} if "block=32" not in spec else {"v_proj rows"})  # tiles of 128 hold whole heads
    gathered = unfold_permutations(copy.deepcopy(q))
    x = tok("The capital of France is", return_tensors="pt")["input_ids"]
    assert count_gathers(q, monkeypatch, x) == (0, 60) and count_gathers(gathered, monkeypatch, x) == (30 * 7, 0)
    with torch.no_grad():
        assert torch.equal(q(x).logits, gathered(x).logits)


def test_fused_norm_setting_is_checked():
    import pytest

    from lowbit.wa.fold import fused_norm_setting

    assert fused_norm_setting(None) and fused_norm_setting("1") and not fused_norm_setting("0")
    with pytest.raises(ValueError, match="LOWBIT_FUSED_NORM"):
        fused_norm_setting("yes")
