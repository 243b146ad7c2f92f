"""Sibling projections fused into one W4Ax linear: q/k/v and gate/up read one input, so they can be one GEMM.

A decode step's W4Ax linears are latency-bound on the GPU: a 1024x4096 k_proj costs nearly what a 6144x4096 qkv
costs, and each one quantizes the same input again. :func:`fuse_projections` replaces each group of sibling
:class:`~lowbit.wa.linear.QuantLinear` layers (``q_proj, k_proj, v_proj`` and ``gate_proj, up_proj`` of every
decoder layer, when they quantize their input alike) by :class:`ProjectionSlice` modules sharing one
:class:`FusedProjection`: one QuantLinear over the siblings' concatenated weight rows (the only copy of the weights),
called once per input, each slice returning its columns of the output as a view. The HF modules call the siblings
one after another with the same tensor; the first call computes all of them and the others take their columns.
A sibling called with another input computes the group's output for it.

Fused models compute the same function (each output column depends only on its own weight row); the kernel path's
split-K plan follows the fused width, so its float sums may round differently. :func:`unfuse_projections` restores
separate layers (``save_quantized`` needs them).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.wa.linear import QuantLinear

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # sibling names under one parent module


def _version(x: torch.Tensor):
    """The tensor's in-place version counter, or None for inference tensors (they keep none)."""
    try:
        return x._version
    except RuntimeError:
        return None


class FusedProjection(nn.Module):
    """One QuantLinear (``fused``) over sibling layers' concatenated output rows, and which columns are whose."""

    def __init__(self, fused: QuantLinear, names: list[str], sizes: list[int]):
        super().__init__()
        self.fused = fused
        self.names, self.sizes = list(names), list(sizes)
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self._input = self._output = None
        self._taken: set[int] = set()

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Sibling `index`'s output for `x`: its columns of the fused output, computed on the first sibling call
        for this `x` (the same tensor, unchanged since) and released once every sibling has taken its columns."""
        same = self._input is not None and x is self._input[0] and _version(x) == self._input[1]
        if not same or index in self._taken:
            self._output, self._input, self._taken = self.fused(x), (x, _version(x)), set()
        self._taken.add(index)
        y = self._output[..., self.offsets[index]:self.offsets[index + 1]]
        if len(self._taken) == len(self.sizes):
            self._input = self._output = None
        return y

    def extra_repr(self) -> str:
        return "siblings=" + ", ".join(f"{n}:{s}" for n, s in zip(self.names, self.sizes))


class ProjectionSlice(nn.Module):
    """A sibling layer's place in its parent: its output columns of a :class:`FusedProjection` (registered as a
    submodule of the group's first slice only, so it is moved, counted and saved once)."""

    def __init__(self, group: FusedProjection, index: int):
        super().__init__()
        if index == 0:
            self.group = group
        self.__dict__["shared"] = group
        self.index = index
        self.in_features = group.fused.in_features
        self.out_features = group.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.output(x, self.index)

    def extra_repr(self) -> str:
        return f"{self.shared.names[self.index]}: columns {self.shared.offsets[self.index]}:" \
               f"{self.shared.offsets[self.index + 1]} of the fused projection"


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def fusable(layers: list[nn.Module]) -> bool:
    """Whether sibling layers quantize and read their input alike, so one QuantLinear can serve them all."""
    if len(layers) < 2 or not all(type(q) is QuantLinear for q in layers):
        return False
    first = layers[0]
    for q in layers[1:]:
        if (q.cfg != first.cfg or q.in_features != first.in_features or q.mode != first.mode
                or q.input_permuted != first.input_permuted or q.reuse_output != first.reuse_output
                or q.in_rotation is not None or first.in_rotation is not None
                or (q.w_zero is None) != (first.w_zero is None) or (q.bias is None) != (first.bias is None)
                or (q.bias is not None and q.bias.dtype != first.bias.dtype)
                or q.qweight.device != first.qweight.device
                or not _same(q.perm, first.perm) or not _same(q.int8_mask, first.int8_mask)):
            return False
    return True


def _like(q: QuantLinear, rows: dict[str, torch.Tensor | None]) -> QuantLinear:
    """A QuantLinear configured as `q` (its input permutation and INT8 blocks copied) whose per-output-row buffers
    (``qweight``, ``w_scale``, ``w_zero``, ``bias``) are `rows`."""
    bias_dtype = q.bias.dtype if q.bias is not None else torch.float32
    out = QuantLinear(q.in_features, rows["qweight"].shape[0], q.cfg, q.bias is not None, bias_dtype, q.mode,
                      rotated_model=True).to(q.qweight.device)
    for name, value in rows.items():
        setattr(out, name, value)
    for name in ("perm", "int8_mask"):
        value = getattr(q, name)
        setattr(out, name, None if value is None else value.clone())
    out.input_permuted, out.reuse_output = q.input_permuted, q.reuse_output
    return out


ROW_BUFFERS = ("qweight", "w_scale", "w_zero", "bias")


def fuse_layers(layers: list[QuantLinear]) -> QuantLinear:
    """One QuantLinear computing the siblings' outputs side by side (their weight rows concatenated in order)."""
    return _like(layers[0], {name: None if getattr(layers[0], name) is None else
                             torch.cat([getattr(q, name) for q in layers], 0) for name in ROW_BUFFERS})


def split_layer(fused: QuantLinear, start: int, stop: int) -> QuantLinear:
    """The QuantLinear of output rows ``[start, stop)`` of `fused` (its own copies of those rows)."""
    return _like(fused, {name: None if getattr(fused, name) is None else getattr(fused, name)[start:stop].clone()
                         for name in ROW_BUFFERS})


def _group_head(name: str) -> str:
    """The first sibling of `name`'s group (``...self_attn.q_proj`` for ``...self_attn.v_proj``), or `name`."""
    parent, _, leaf = name.rpartition(".")
    return next((f"{parent}.{group[0]}" for group in SIBLINGS if leaf in group), name)


def sibling_stats(names: list[str], make) -> dict:
    """Per linear name, input statistics ``make(name)``, one shared by the siblings of each group (:data:`SIBLINGS`):
    they read the same tensor, as calibration sees it (for benchmarks and probes that draw statistics at random)."""
    heads = {name: _group_head(name) for name in names}
    shared = {head: make(head) for head in dict.fromkeys(heads.values())}
    return {name: shared[head] for name, head in heads.items()}


def fuse_projections(model: nn.Module) -> int:
    """Fuse every fusable sibling group (:data:`SIBLINGS`) of `model` in place; returns how many were fused.
    Groups whose layers are not all QuantLinear, or quantize their input differently, are left as they are."""
    count = 0
    for parent in list(model.modules()):
        for names in SIBLINGS:
            layers = [getattr(parent, n, None) for n in names]
            if any(q is None for q in layers) or not fusable(layers):
                continue
            group = FusedProjection(fuse_layers(layers), list(names), [q.out_features for q in layers])
            for i, name in enumerate(names):
                setattr(parent, name, ProjectionSlice(group, i))
            count += 1
    return count


def unfuse_projections(model: nn.Module) -> int:
    """Undo :func:`fuse_projections`: each fused group back to separate QuantLinear layers; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ProjectionSlice) and child.index == 0:
                group = child.shared
                for i, sibling in enumerate(group.names):
                    setattr(parent, sibling, split_layer(group.fused, group.offsets[i], group.offsets[i + 1]))
                count += 1
    return count


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, ProjectionSlice) for m in model.modules())
