"""Cut a quantized :class:`~lowbit.wa.linear.QuantLinear` for tensor parallelism without requantizing.

:func:`output_rows` keeps output features ``[lo, hi)`` (column-parallel q/k/v, gate/up): rows are independent, so
codes, scales, zero points and bias are sliced and the input side (permutation, INT8 blocks) is kept whole.
:func:`input_columns` keeps input features ``[lo, hi)`` (row-parallel o/down): the cut must fall on weight-group and
activation-block boundaries (then every scale, zero point, packed tile and INT8 flag belongs to one side), and the
layer's input permutation must not move channels across the cut. Both give exactly the numbers the whole layer
computes on those rows / columns, so a model quantized once and then sharded matches the unsharded one.
"""

from __future__ import annotations

import torch

from lowbit.wa.linear import QuantLinear
from lowbit.wa.methods import WHOLE_ROW


def _empty_like(ql: QuantLinear, in_features: int, out_features: int, bias: bool) -> QuantLinear:
    bias_dtype = ql.bias.dtype if ql.bias is not None else torch.float32
    out = QuantLinear(in_features, out_features, ql.cfg, bias, bias_dtype, ql.mode, rotated_model=True)
    out.input_permuted, out.reuse_output = ql.input_permuted, ql.reuse_output
    return out.to(ql.qweight.device)


@torch.no_grad()
def output_rows(ql: QuantLinear, lo: int, hi: int) -> QuantLinear:
    """A new layer computing outputs ``[lo, hi)`` of `ql` (same input)."""
    if not 0 <= lo < hi <= ql.out_features:
        raise ValueError(f"output rows [{lo}, {hi}) outside a layer with {ql.out_features} outputs")
    out = _empty_like(ql, ql.in_features, hi - lo, ql.bias is not None)
    for name in ("qweight", "w_scale", "w_zero", "bias"):
        if getattr(ql, name) is not None:
            getattr(out, name).copy_(getattr(ql, name)[lo:hi])
    for name in ("perm", "int8_mask"):
        if getattr(ql, name) is not None:
            getattr(out, name).copy_(getattr(ql, name))
    out.in_rotation = ql.in_rotation
    return out


@torch.no_grad()
def input_columns(ql: QuantLinear, lo: int, hi: int) -> QuantLinear:
    """A new layer computing `ql`'s output from inputs ``[lo, hi)`` only, without bias (a row-parallel part: the
    parts' outputs sum to `ql`'s output minus its bias). Raises ValueError, saying why, when the cut cannot be exact."""
    what = f"{ql.cfg.spec} layer with {ql.in_features} inputs"
    if not 0 <= lo < hi <= ql.in_features:
        raise ValueError(f"input columns [{lo}, {hi}) outside a {what}")
    if ql.in_rotation is not None:
        raise ValueError(f"{what}: its online input rotation (rotate=hadamard) mixes all inputs, so it cannot be "
                         "split by input; quantize without rotate= for tensor parallelism")
    if ql.padded_in != ql.in_features:
        raise ValueError(f"{what}: it is zero-padded to {ql.padded_in} inputs; pick a group/block dividing "
                         f"{hi - lo} (the inputs per rank) so that no padding is needed")
    # whole-row groups/blocks (per-channel weights and per-token activation scales over every input) would need
    # the scale of all ranks' inputs: refused rather than silently changed into per-shard scales
    whole = ql.cfg.group == WHOLE_ROW or (ql.quantizes_activations and ql.cfg.block == WHOLE_ROW)
    unit = ql.in_features if whole else max(ql.group, ql.block)
    if whole or lo % unit or hi % unit:
        raise ValueError(f"{what}: inputs [{lo}, {hi}) per rank do not fall on its {'whole-row' if whole else unit}-"
                         f"channel groups/blocks; pick group= and block= dividing {hi - lo}")
    perm = None
    if ql.gathers_input:  # the forward gathers x[:, perm]: the cut's positions must gather from inside the cut
        perm = ql.perm[lo:hi].long()
        if perm.numel() and (perm.min() < lo or perm.max() >= hi):
            raise ValueError(f"{what}: its input permutation moves channels across the cut at [{lo}, {hi}); fold it "
                             "into the producer (fold=true) before sharding")
        perm = perm - lo
    out = _empty_like(ql, hi - lo, ql.out_features, False)
    bits = ql.cfg.w_bits
    out.qweight.copy_(ql.qweight[:, lo * bits // 8 : hi * bits // 8])
    out.w_scale.copy_(ql.w_scale[:, lo // ql.group : hi // ql.group])
    if ql.w_zero is not None:
        out.w_zero.copy_(ql.w_zero[:, lo // ql.group : hi // ql.group])
    if ql.int8_mask is not None:
        out.int8_mask.copy_(ql.int8_mask[lo // ql.block : hi // ql.block])
    if out.perm is not None:
        out.perm.copy_(perm if perm is not None else torch.arange(hi - lo))
    return out
