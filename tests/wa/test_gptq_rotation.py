"""GPTQ against a float64 OBS reference, the Hadamard constructions, and QuaRot-style rotation of a model."""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit.quant.affine import ZeroPoint, quantize_integer
from lowbit.wa import QuantizedCheckpointError, collect_channel_stats, load_quantized, quantize_model, save_quantized, select_linears
from lowbit.wa.gptq import HessianAccumulator, gptq_quantize
from lowbit.wa.linear import QuantLinear
from lowbit.wa.methods import resolve_config
from lowbit.wa.rotation import hadamard_matrix, random_hadamard, rotate_model


def ref_grid(g: torch.Tensor, bits: int, sym: bool):
    """Float64 reference of quantize_integer's per-group grid for columns g [out, group]: (scale, zero | None)."""
    tiny = torch.finfo(torch.float16).tiny
    if sym:
        return (g.abs().amax(1) / (2 ** (bits - 1) - 1)).clamp_min(tiny).half().double(), None
    lo, hi = g.amin(1).clamp(max=0), g.amax(1).clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(tiny).half().double()
    return scale, torch.round(-lo / scale).clamp(0, 2**bits - 1)


def ref_gptq(w, h, bits, group, sym, damp=0.01):
    """Optimal Brain Surgeon form of GPTQ in float64: round column i, spread its error with H^-1, drop i from H^-1."""
    W, H = w.double().clone(), h.double().clone()
    n = W.shape[1]
    H += damp * torch.diag(H).mean() * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    Q = torch.zeros_like(W)
    for i in range(n):
        if i % group == 0:
            scale, zero = ref_grid(W[:, i : i + group], bits, sym)
        q = torch.round(W[:, i] / scale) + (0 if zero is None else zero)
        Q[:, i] = q.clamp(lo, hi)
        deq = (Q[:, i] - (0 if zero is None else zero)) * scale
        err = (W[:, i] - deq) / Hinv[i, i]
        W[:, i + 1 :] -= err[:, None] * Hinv[i, i + 1 :][None, :]
        Hinv = Hinv - torch.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
    return Q


def correlated_inputs(n=64, rows=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 16, generator=gen) @ torch.randn(16, n, generator=gen) + 0.1 * torch.randn(rows, n, generator=gen)


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_matches_float64_reference(sym):
    x = correlated_inputs()
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    acc = HessianAccumulator(64)
    acc.add(x[:200])
    acc.add(x[200:])
    assert torch.allclose(acc.hessian, (x.double().t() @ x.double()) / 512, rtol=1e-5, atol=1e-5)
    q, scale, zero = gptq_quantize(w, acc.hessian, 4, 32, sym, damp=0.01)
    want = ref_gptq(w, acc.hessian, 4, 32, sym)
    assert (q.double() == want).double().mean() > 0.97  # a float32-vs-64 flip may propagate to a few codes
    deq = lambda qq: (qq.double() - (zero.double().repeat_interleave(32, 1) if zero is not None else 0)) * scale.double().repeat_interleave(32, 1)  # noqa: E731
    err = lambda wq: ((x.double() @ (w.double() - wq).t()) ** 2).sum().item()  # noqa: E731
    assert err(deq(q)) == pytest.approx(err(deq(want.to(torch.int16))), rel=0.05)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    q, scale, zero = gptq_quantize(w, torch.eye(64, dtype=torch.float64), 4, 32, sym=False)
    q_rtn, scale_rtn, zero_rtn = quantize_integer(w, 4, 32, ZeroPoint.INT)
    assert torch.equal(q, q_rtn) and torch.equal(scale, scale_rtn) and torch.equal(zero, zero_rtn)


def test_gptq_lowers_the_output_error_of_correlated_inputs():
    x = correlated_inputs(seed=3)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    h = x.double().t() @ x.double() / x.shape[0]
    errs = {}
    for name, (q, s, _) in {"rtn": quantize_integer(w, 4, 32), "gptq": gptq_quantize(w, h, 4, 32)}.items():
        errs[name] = ((x @ (w - q.float() * s.float().repeat_interleave(32, 1)).t()) ** 2).mean().item()
    assert errs["gptq"] < 0.7 * errs["rtn"], errs


@pytest.mark.parametrize("n", [1, 2, 12, 20, 36, 64, 96, 160, 576, 1536])
def test_hadamard_orders(n):
    h = hadamard_matrix(n)
    assert torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))
    q = random_hadamard(n, seed=5)
    assert torch.allclose(q @ q.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_unknown_hadamard_order_is_an_error():
    with pytest.raises(ValueError, match="order 6"):
        hadamard_matrix(6)


@pytest.mark.parametrize("tied", [False, True])
def test_rotation_preserves_the_model(make_tiny, ids, tied):
    model = make_tiny()
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        ref = model(ids).logits
        rotated = rotate_model(copy.deepcopy(model))
        out = rotated(ids).logits
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    layer = rotated.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert not torch.allclose(layer.self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)


def _mse(model, ref, ids):
    with torch.no_grad():
        return ((model(ids).logits - ref) ** 2).mean().item()


def test_rotation_and_gptq_bring_w4_closer_to_the_float_model(make_tiny, calib, ids):
    base = make_tiny()
    with torch.no_grad():
        ref = base(ids).logits
    mse = {spec: _mse(quantize_model(copy.deepcopy(base), spec, calib=calib, mode="fake"), ref, ids)
           for spec in ("w4a16:group=32", "w4a16:group=32,gptq=true", "w4a16:group=32,gptq=true,rotate=hadamard")}
    rtn, gptq, both = mse.values()
    assert gptq < rtn and both < 0.6 * rtn, mse


def test_rotated_fmpq_int_and_fake_paths_agree(make_tiny, calib, ids):
    model = quantize_model(make_tiny(), "fmpq:a=8,block=32,group=32,rotate=hadamard,gptq=true", calib=calib, mode="int")
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.in_rotation is not None
    assert model.model.layers[0].self_attn.q_proj.in_rotation is None
    x = torch.randn(5, down.in_features)
    y_int = down(x)
    down.mode = "fake"
    assert torch.allclose(y_int, down(x), rtol=1e-4, atol=1e-4)


def test_stats_of_the_unrotated_model_are_recollected(make_tiny, calib, ids):
    base = make_tiny()
    stats = collect_channel_stats(base, select_linears(base), calib)
    spec = "fmpq:a=4,block=32,group=32,rotate=hadamard"
    a = quantize_model(copy.deepcopy(base), spec, stats=stats, mode="fake")
    b = quantize_model(copy.deepcopy(base), spec, calib=calib, mode="fake")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_gptq_needs_calibration_and_rotated_checkpoints_do_not_load(make_tiny, calib, tmp_path):
    with pytest.raises(ValueError, match="calibration token ids"):
        quantize_model(make_tiny(), "w4a16:gptq=true")
    with pytest.raises(ValueError, match="rotate_model"):
        QuantLinear(64, 8, resolve_config("w4a16:rotate=hadamard,group=32"), has_bias=False)
    model = quantize_model(make_tiny(), "w4a16:group=32,rotate=hadamard", calib=calib)
    save_quantized(model, tmp_path)
    with pytest.raises(QuantizedCheckpointError, match="rotate_model"):
        load_quantized(tmp_path, make_tiny())


def test_search_grid_against_float64_brute_force():
    from lowbit.wa.gptq import CLIP_RATIOS, rtn_quantize, search_grid

    gen = torch.Generator().manual_seed(7)
    w = torch.randn(12, 64, generator=gen) ** 3  # heavy tails: shrinking the range pays for most rows
    for sym in (True, False):
        q, s, z = rtn_quantize(w, 4, 32, sym, clip=True)
        for j in range(2):
            g = w[:, 32 * j : 32 * (j + 1)].double()
            best = []
            for row in g:
                errs = []
                for r in CLIP_RATIOS:
                    scale, zero = ref_grid((row * r)[None, :], 4, sym)
                    lo, hi = (-8, 7) if sym else (0, 15)
                    qq = (torch.round(row / scale) + (0 if zero is None else zero)).clamp(lo, hi)
                    errs.append(((row - (qq - (0 if zero is None else zero)) * scale) ** 2).sum().item())
                best.append(min(range(len(errs)), key=errs.__getitem__))
            want_scale = torch.stack([ref_grid((g[i] * CLIP_RATIOS[b])[None, :], 4, sym)[0][0] for i, b in enumerate(best)])
            assert torch.equal(s[:, j].double(), want_scale)
        assert any(b > 0 for b in best)  # some rows did clip
        one, _ = search_grid(w[:, :32], 4, sym, ratios=(1.0,))
        assert torch.equal(one, quantize_integer(w[:, :32], 4, 32, ZeroPoint.NONE if sym else ZeroPoint.INT)[1])
        plain = quantize_integer(w, 4, 32, ZeroPoint.NONE if sym else ZeroPoint.INT)
        deq = lambda q_, s_, z_: (q_.double() - (z_.double().repeat_interleave(32, 1) if z_ is not None else 0)) * s_.double().repeat_interleave(32, 1)  # noqa: E731
        assert ((deq(q, s, z) - w) ** 2).sum() < ((deq(*plain) - w) ** 2).sum()


def test_activation_clipping_clamps_int4_blocks_only(make_tiny, calib):
    model = quantize_model(make_tiny(), "fmpq:a=4,block=32,group=32,int8_frac=0.34,aclip=0.8", calib=calib, mode="fake")
    ql = model.model.layers[0].self_attn.q_proj
    x = torch.randn(6, ql.in_features, dtype=torch.float64) * 3
    got = ql.clip_input(ql.prepare_input(x.float())).double()
    xp = torch.nn.functional.pad(x[:, ql.perm.long()], (0, ql.padded_in - ql.in_features))
    for b in range(ql.n_blocks):
        blk = xp[:, b * 32 : (b + 1) * 32]
        bound = 0.8 * blk.abs().amax(1, keepdim=True)
        want = blk if ql.int8_mask[b] else torch.maximum(torch.minimum(blk, bound), -bound)
        assert torch.allclose(got[:, b * 32 : (b + 1) * 32], want, atol=1e-5)
    assert ql.int8_mask.any() and not ql.int8_mask.all()
    codes, scale = ql.quantize_input(x.float())
    y_fake = ql(x.float())
    ql.mode = "int"
    assert torch.allclose(ql(x.float()), y_fake, rtol=1e-4, atol=1e-4)
