"""Batched GPTQ (several layers per column step, issue 16's GPU runs) gives the one-by-one result exactly."""

from __future__ import annotations

import pytest
import torch

from lowbit.wa.gptq import gptq_quantize
from lowbit.wa.linear import QuantLinear, gptq_linears
from lowbit.wa.methods import resolve_config


def _hessian(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=gen) @ torch.randn(8, n, generator=gen) + 0.1 * torch.randn(256, n, generator=gen)
    return (x.t() @ x).double() / 256


@pytest.mark.parametrize("sym,clip", [(True, False), (False, True)])
def test_batched_gptq_equals_one_layer_at_a_time(sym, clip):
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(r, 64, generator=gen, dtype=torch.float64) for r in (24, 40)]
    hs = [_hessian(64, s) for s in (1, 2)]
    W = torch.stack([torch.nn.functional.pad(w, (0, 0, 0, 40 - w.shape[0])) for w in ws])
    q, scale, zero = gptq_quantize(W, torch.stack(hs), 4, 32, sym, clip=clip)
    for j, (w, h) in enumerate(zip(ws, hs)):
        one = gptq_quantize(w, h, 4, 32, sym, clip=clip)
        r = w.shape[0]
        assert torch.equal(one[0], q[j, :r]) and torch.equal(one[1], scale[j, :r])
        assert (one[2] is None) == sym and (sym or torch.equal(one[2], zero[j, :r]))


@pytest.mark.parametrize("spec", ["w4a16:gptq=true,group=32", "fmpq:w=4,a=4,gptq=true,group=32,block=32,sym=false,clip=true"])
def test_gptq_linears_match_from_linear(spec):
    cfg = resolve_config(spec)
    torch.manual_seed(0)
    linears = [torch.nn.Linear(48, out, bias=False) for out in (16, 48, 24)] + [torch.nn.Linear(80, 48, bias=False)]
    stats = [torch.rand(l.in_features) + 0.1 for l in linears]
    hessians = [_hessian(l.in_features, i) for i, l in enumerate(linears)]
    rounded = gptq_linears(linears, cfg, stats, hessians)
    for lin, st, h, r in zip(linears, stats, hessians, rounded):
        a = QuantLinear.from_linear(lin, cfg, st, mode="fake", hessian=h)
        b = QuantLinear.from_linear(lin, cfg, st, mode="fake", hessian=h, rounded=r)
        for name, buf in a.named_buffers():
            assert torch.equal(buf, dict(b.named_buffers())[name]), name
