"""QuantLinear: permutation, padding, int vs fake vs float64 reference, INT8 blocks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.wa import QuantLinear, resolve_config
from lowbit.quant import integer
from lowbit.wa import core
from lowbit.wa.linear import outlier_permutation, select_int8_blocks

SETTINGS = settings(max_examples=20, deadline=None)


def make_linear(in_f, out_f, seed=0, bias=True):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_f, out_f, bias=bias)


def make_input(tokens, in_f, seed=0, outliers=(1, 5)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_f, generator=g) + 0.05
    for c in outliers:
        if c < in_f:
            x[:, c] *= 40.0
    return x


def reference(q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """float64 from the same quantized values: dequantized activations @ dequantized weights."""
    xp = q.prepare_input(x)
    if q.quantizes_activations:
        codes, scale = integer.quantize_activation(xp, q.block, q.int8_mask, q.cfg.a_bits)
        xp = codes.double() * scale.double().repeat_interleave(q.block, dim=1)
    w = q.weight_int().double() * q.w_scale.double().repeat_interleave(q.group, dim=1)
    y = xp.double() @ w.t()
    return y + q.bias.double() if q.bias is not None else y


def test_permutation_preserves_unquantized_output():
    lin = make_linear(96, 40).double()
    x = make_input(11, 96).double()
    perm = outlier_permutation(x.abs().amax(0))
    assert sorted(perm.tolist()) == list(range(96))
    y = x[:, perm] @ lin.weight[:, perm].t() + lin.bias
    torch.testing.assert_close(y, lin(x), rtol=1e-12, atol=1e-12)
    # the same through QuantLinear's input preparation (permute + zero pad) and the padded weight
    q = QuantLinear.from_linear(lin.float(), resolve_config("fmpq:block=64,group=64"), x.abs().amax(0).float())
    w_perm = integer.pad_last(lin.weight.double()[:, q.perm.long()], q.padded_in)
    torch.testing.assert_close(q.prepare_input(x.float()).double() @ w_perm.t() + lin.bias.double(), lin.double()(x),
                               rtol=1e-6, atol=1e-5)


def test_permutation_gathers_outliers_in_the_first_block():
    x = make_input(8, 256, outliers=(17, 130, 201))
    q = QuantLinear.from_linear(make_linear(256, 8), resolve_config("fmpq:block=64,group=64,int8_frac=0.1"), x.abs().amax(0))
    assert set(q.perm[:3].tolist()) == {17, 130, 201}
    assert q.int8_mask.tolist() == [True, False, False, False]


@pytest.mark.parametrize("spec", [
    "fmpq:block=64,group=64,int8_frac=0.25",
    "fmpq:block=64,group=32,sym=false",
    "fmpq:a=8,block=32,group=64",
    "w8a8",
    "w4a16:group=32",
    "w4a4:block=32,group=32",
])
def test_int_and_fake_paths_match_reference(spec):
    lin = make_linear(160, 48, seed=3)
    x = make_input(2 * 13, 160, seed=4).reshape(2, 13, 160)
    q = QuantLinear.from_linear(lin, resolve_config(spec), x.reshape(-1, 160).abs().amax(0))
    ref = reference(q, x.reshape(-1, 160)).reshape(2, 13, 48)
    tol = 1e-5 * float(ref.abs().max())
    y_int = q(x)
    assert y_int.shape == (2, 13, 48) and y_int.dtype == torch.float32
    torch.testing.assert_close(y_int.double(), ref, rtol=1e-5, atol=tol)
    q.mode = "fake"
    torch.testing.assert_close(q(x).double(), ref, rtol=1e-5, atol=tol)
    # and the quantized layer approximates the float one
    rel = (q(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.2


@SETTINGS
@given(in_f=st.integers(3, 200).map(lambda v: 2 * v), out_f=st.integers(1, 24), tokens=st.integers(1, 6),
       block=st.sampled_from([16, 32, 64]), ratio=st.sampled_from([1, 2, -2]), frac=st.sampled_from([0.0, 0.1, 0.5]),
       a=st.sampled_from([4, 8]), sym=st.booleans(), seed=st.integers(0, 1000))
def test_quantlinear_any_shape(in_f, out_f, tokens, block, ratio, frac, a, sym, seed):
    group = block * ratio if ratio > 0 else block // 2
    spec = f"fmpq:a={a},block={block},group={group},int8_frac={frac},sym={sym}"
    lin = make_linear(in_f, out_f, seed=seed)
    x = make_input(tokens, in_f, seed=seed)
    q = QuantLinear.from_linear(lin, resolve_config(spec), x.abs().amax(0))
    unit = max(block, group)
    assert q.padded_in % unit == 0 and in_f <= q.padded_in < in_f + unit
    ref = reference(q, x)
    torch.testing.assert_close(q(x).double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()) + 1e-6)


def test_non_divisible_rejected_clearly_without_padding():
    cfg = resolve_config("fmpq:block=128,group=128,pad=false")
    with pytest.raises(ValueError, match=r"576 is not a multiple of 128.*block=64,group=64"):
        QuantLinear.from_linear(make_linear(576, 8), cfg)
    q = QuantLinear.from_linear(make_linear(512, 8), cfg)  # divisible: fine
    assert q.padded_in == 512
    padded = QuantLinear.from_linear(make_linear(576, 8), resolve_config("fmpq:block=128,group=128"))
    assert padded.padded_in == 640 and padded.n_blocks == 5


def mse(a, b):
    return float((a - b).detach().pow(2).mean())


def test_int8_blocks_reduce_error_on_planted_outliers():
    in_f = 512
    lin = make_linear(in_f, 64, seed=7)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(64, in_f, generator=g) + 0.05
    hot = torch.randperm(in_f, generator=g)[:40]
    x[:, hot] *= torch.linspace(5, 60, 40)
    stats = x.abs().amax(0)
    errors = []
    for frac in (0.0, 0.125, 0.25, 0.5, 1.0):
        q = QuantLinear.from_linear(lin, resolve_config(f"fmpq:block=64,group=64,int8_frac={frac}"), stats)
        assert q.n_int8_blocks == core.ceil_blocks(frac, 8)
        errors.append(mse(q(x), lin(x)))
    assert all(later <= earlier for earlier, later in zip(errors, errors[1:])), errors
    # one INT8 block holding every gathered outlier beats plain RTN W4A4 by a wide margin
    rtn = QuantLinear.from_linear(lin, resolve_config("w4a4:block=64,group=64"))
    assert errors[1] < 0.5 * mse(rtn(x), lin(x))


def test_int8_masks_nest():
    stats = torch.rand(640, generator=torch.Generator().manual_seed(0))
    cfgs = [resolve_config(f"fmpq:block=64,group=64,int8_frac={f}") for f in (0.1, 0.3, 0.6)]
    masks = [select_int8_blocks(stats, 64, 640, c) for c in cfgs]
    for small, big in zip(masks, masks[1:]):
        assert torch.all(big[small])


def test_storage_layout():
    q = QuantLinear.from_linear(make_linear(96, 10), resolve_config("fmpq:block=64,group=32,sym=false"),
                                torch.rand(96) + 0.1)
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (10, 64)  # 128 padded inputs, 2 per byte
    assert q.w_scale.dtype == torch.float16 and q.w_scale.shape == (10, 4)
    assert q.w_zero.dtype == torch.uint8 and q.w_zero.shape == (10, 4)
    assert q.perm.dtype == torch.int32 and q.perm.shape == (96,)
    assert q.int8_mask.shape == (2,)
    assert "state_dict" and set(q.state_dict()) == {"qweight", "w_scale", "w_zero", "perm", "int8_mask", "bias"}


def test_bad_mode_rejected():
    with pytest.raises(ValueError, match="allowed modes"):
        QuantLinear.from_linear(make_linear(64, 4), resolve_config("w4a4:block=64,group=64"), mode="fast")
