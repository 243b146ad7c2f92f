"""Whole-model quantization: calibration, layer selection, replacement, size accounting."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lowbit.wa.gptq import HessianAccumulator
from lowbit.wa.fold import choose_permutations, fold_permutations
from lowbit.wa.linear import QuantLinear, gptq_linears, layout
from lowbit.wa.methods import WAConfig, resolve_config
from lowbit.wa.rotation import rotate_model

LayerSelector = str | Callable[[str, nn.Module], bool] | None


@dataclass
class WAReport:
    """What :func:`quantize_model` did: the method, each replaced layer, and the model size."""

    spec: str
    config: WAConfig
    layers: list[dict] = field(default_factory=list)
    calibrated: bool = False
    nbytes: int = 0
    nbytes_fp16: int = 0
    inputs: dict[str, str] = field(default_factory=dict)  # fold=true: how each permuted layer gets its input

    @property
    def gathers(self) -> list[str]:
        """The permuted layers that still gather their input at run time (``fold=true``)."""
        return [n for n, how in self.inputs.items() if how.startswith("gather")]

    def summary(self) -> str:
        n8 = sum(l["int8_blocks"] for l in self.layers)
        nb = sum(l["blocks"] for l in self.layers if l["blocks"])
        blocks = f", INT8 blocks {n8}/{nb}" if nb else ""
        folded = f", permutations folded ({len(self.gathers)} layers still gather)" if self.inputs else ""
        return (f"{self.spec}: {len(self.layers)} linear layers quantized{blocks}, "
                f"{self.nbytes / 2**20:.1f} MiB (fp16 model {self.nbytes_fp16 / 2**20:.1f} MiB)"
                + (", calibrated" if self.calibrated else "") + folded)


def default_layer_prefix(model: nn.Module) -> str | None:
    """``model.layers.`` for HF decoder models (``model.model.layers``), else None."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return "model.layers."
    return None


def select_linears(model: nn.Module, layers: LayerSelector = None) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules to quantize.

    ``layers`` None: every linear inside ``model.model.layers`` (the decoder blocks; not the LM head);
    for models without that attribute every linear except the output embeddings. A string is a regex
    searched in the qualified name; a callable gets ``(name, module)`` and returns a bool.
    """
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if layers is None:
        prefix = default_layer_prefix(model)
        if prefix is not None:
            return [n for n, _ in linears if n.startswith(prefix)]
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [n for n, m in linears if m is not head]
    if isinstance(layers, str):
        pattern = re.compile(layers)
        return [n for n, _ in linears if pattern.search(n)]
    if callable(layers):
        return [n for n, m in linears if layers(n, m)]
    raise TypeError(f"layers must be None, a regex string or a callable(name, module) -> bool, got {type(layers).__name__}")


def calibration_ids(ids: torch.Tensor, n: int = 8, length: int = 256, seed: int = 0) -> torch.Tensor:
    """``n`` windows of `length` tokens drawn from a 1-D token tensor at seeded random offsets."""
    ids = ids.reshape(-1)
    if ids.numel() < length:
        raise ValueError(f"need at least {length} tokens for calibration windows, got {ids.numel()}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length + 1, (n,), generator=gen)
    return torch.stack([ids[s : s + length] for s in starts.tolist()])


class ChannelStats(dict):
    """``{linear name: max |x| per input channel}``, remembering the calibration ids it came from (``calib``)
    and whether the model was rotated (``rotated``): a rotated or GPTQ spec recalibrates from them."""

    calib: torch.Tensor | None = None
    rotated: bool = False


@torch.no_grad()
def collect_channel_stats(model: nn.Module, names: list[str], calib: torch.Tensor, batch_size: int = 4) -> ChannelStats:
    """Per-input-channel max |x| seen by each named linear while `model` runs on `calib` [n, L].

    Statistics are collected on the model as given (normally the unquantized one), in one pass.
    """
    if calib.dim() == 1:
        calib = calib.unsqueeze(0)
    if calib.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"calib must be token ids (an integer tensor [n, L]), got {calib.dtype}")
    modules = dict(model.named_modules())
    stats: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name: str):
        def hook(module, args):
            x = args[0].detach()
            amax = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            stats[name] = amax if name not in stats else torch.maximum(stats[name], amax)
        return hook

    for name in names:
        handles.append(modules[name].register_forward_pre_hook(hook_for(name)))
    device = next(model.parameters()).device
    try:
        for start in range(0, calib.shape[0], batch_size):
            model(calib[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = ChannelStats({k: v.cpu() for k, v in stats.items()})
    out.calib, out.rotated = calib, bool(getattr(model, "lowbit_rotated", False))
    return out


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    wa: str | WAConfig = "fmpq:w=4,a=4,block=128,int8_frac=0.1",
    calib: torch.Tensor | None = None,
    layers: LayerSelector = None,
    mode: str = "int",
    batch_size: int = 4,
    return_report: bool = False,
    stats: dict[str, torch.Tensor] | None = None,
):
    """Replace the selected ``nn.Linear`` layers of `model` (in place) by :class:`QuantLinear`.

    `wa` is a spec from :data:`~lowbit.wa.methods.WA_METHODS`. `calib` (token ids ``[n, L]``) is
    needed by ``fmpq`` with ``a=4`` (it decides the channel permutation and the INT8 blocks; for
    ``a=8`` it only decides the permutation, identity without it); the other methods ignore it.
    `mode` is ``"int"`` (reference integer matmul) or ``"fake"`` (dequantized float matmul).
    `stats` (from :func:`collect_channel_stats`) may be given instead of `calib` to reuse one
    calibration pass for several configs (it remembers its calibration ids: ``gptq=true`` takes its Hessians
    from them, and ``rotate=hadamard``, which first rotates `model` in place with
    :func:`lowbit.wa.rotation.rotate_model`, recollects the statistics in the rotated basis). Returns the model, or ``(model, WAReport)`` with
    ``return_report=True``; the report is also kept as ``model.lowbit_wa``. With ``fmpq:fold=true`` (the
    default) the permutations are chosen foldable and folded into their producers
    (:mod:`lowbit.wa.fold`; ``report.inputs`` says how each permuted layer gets its input).
    """
    cfg = resolve_config(wa)
    if calib is None:
        calib = getattr(stats, "calib", None)
    if cfg.rotate == "hadamard":
        rotate_model(model)
        if stats is not None and not getattr(stats, "rotated", False):
            stats = None  # statistics of the unrotated model: recollect them in the rotated basis
    names = select_linears(model, layers)
    if not names:
        raise ValueError(f"no nn.Linear layer matched {layers!r}: nothing to quantize")
    if cfg.gptq and calib is None:
        raise ValueError(f"{cfg.spec}: gptq=true needs calibration token ids (calib=LongTensor [n, L]) for its Hessians; "
                         "use lowbit.wa.calibration_ids(ids, n=8, length=256) on held-out text")
    stats = dict(stats or {}) if cfg.permute else {}
    if cfg.permute and not stats:
        if calib is not None:
            stats = collect_channel_stats(model, names, calib, batch_size)
        elif cfg.a_bits == 4:
            raise ValueError(
                f"{cfg.spec}: fmpq with a=4 needs calibration token ids (calib=LongTensor [n, L]) to find the "
                "outlier channels; use lowbit.wa.calibration_ids(ids, n=8, length=256) on held-out text"
            )
    missing = [n for n in names if stats and n not in stats]
    if missing:
        raise ValueError(f"no calibration statistics for {missing[:3]}: the calibration pass never reached them")
    report = WAReport(cfg.spec, cfg, calibrated=bool(stats) or cfg.gptq)
    fold = cfg.permute and cfg.fold
    perms = choose_permutations(model, names, stats, lambda n: min(layout(n, cfg)[:2])) if fold and stats else {}

    def replace(name: str, hessian: torch.Tensor | None = None, rounded=None) -> None:
        q = QuantLinear.from_linear(model.get_submodule(name), cfg, stats.get(name), mode=mode, hessian=hessian, rounded=rounded,
                                    perm=perms.get(name))
        _set_module(model, name, q)
        report.layers.append({
            "name": name, "in": q.in_features, "out": q.out_features, "padded_in": q.padded_in,
            "group": q.group, "block": q.block if q.quantizes_activations else 0,
            "blocks": q.n_blocks if q.quantizes_activations else 0, "int8_blocks": q.n_int8_blocks,
        })

    def replace_all(group: list[str], hessians: dict[str, torch.Tensor]) -> None:
        """GPTQ-round a decoder layer's linears in one batched pass, then replace them."""
        mods = [model.get_submodule(n) for n in group]
        rounded = gptq_linears(mods, cfg, [stats.get(n) for n in group], [hessians[n] for n in group],
                               [perms.get(n) for n in group])
        for name, r in zip(group, rounded):
            replace(name, hessians[name], r)

    if cfg.gptq:
        _gptq_sequential(model, names, calib, batch_size, replace_all)
    else:
        for name in names:
            replace(name)
    if fold:
        report.inputs = fold_permutations(model)
    report.nbytes = model_nbytes(model)
    report.nbytes_fp16 = fp16_nbytes(model)
    model.lowbit_wa = report
    return (model, report) if return_report else model


class _Captured(Exception):
    pass


def _hessians(model: nn.Module, names: list[str], run) -> dict[str, torch.Tensor]:
    """``E[x^T x]`` of the inputs each named linear sees while ``run()`` executes."""
    acc = {n: HessianAccumulator(model.get_submodule(n).in_features) for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: acc[n].add(a[0])) for n in names]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return {n: a.hessian for n, a in acc.items()}


@torch.no_grad()
def _gptq_sequential(model: nn.Module, names: list[str], calib: torch.Tensor, batch_size: int, replace_all) -> None:
    """GPTQ layer by layer: each decoder layer's Hessians come from its inputs with every earlier layer
    already quantized; its linears are replaced (``replace_all(names, hessians)``), then its outputs feed the next.
    Models without ``model.model.layers`` get one pass over the unquantized model instead."""
    device = next(model.parameters()).device
    calib = calib.unsqueeze(0) if calib.dim() == 1 else calib
    batches = [calib[i : i + batch_size].to(device) for i in range(0, calib.shape[0], batch_size)]
    prefix = default_layer_prefix(model)
    if prefix is None:
        replace_all(names, _hessians(model, names, lambda: [model(b, use_cache=False) for b in batches]))
        return
    layers = model.get_submodule(prefix.rstrip("."))
    inputs = []

    def grab(module, args, kwargs):
        inputs.append((args, kwargs))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for b in batches:
            try:
                model(b, use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    for i, layer in enumerate(layers):
        mine = [n for n in names if n.startswith(f"{prefix}{i}.")]
        if mine:
            replace_all(mine, _hessians(model, mine, lambda: [layer(*a, **kw) for a, kw in inputs]))
        outs = [layer(*a, **kw) for a, kw in inputs]
        inputs = [((o[0] if isinstance(o, tuple) else o,) + tuple(a[1:]), kw) for o, (a, kw) in zip(outs, inputs)]


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Switch every QuantLinear of `model` to ``"int"`` or ``"fake"`` execution."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            if mode not in ("int", "fake"):
                raise ValueError(f"unknown mode '{mode}': allowed modes are ('int', 'fake')")
            m.mode = mode
            m._cache = {}
    return model


def _tensors(model: nn.Module):
    """Unique persistent tensors of `model` with their owner: (tensor, is_quantized_storage)."""
    seen: set[int] = set()
    for mod in model.modules():
        quant = isinstance(mod, QuantLinear)
        for name, p in list(mod.named_parameters(recurse=False)) + [
            (n, b) for n, b in mod.named_buffers(recurse=False) if n not in mod._non_persistent_buffers_set
        ]:
            if p is None:
                continue
            key = p.data_ptr() if p.numel() else id(p)
            if key in seen:
                continue
            seen.add(key)
            yield name, p, quant


def model_nbytes(model: nn.Module) -> int:
    """True storage bytes: QuantLinear buffers at their real size (packed codes, fp16 scales, zero
    points, int32 permutation, bool mask), every other floating-point tensor at 2 bytes per element
    (as fp16), integer tensors at their real size. Tied weights are counted once; non-persistent
    buffers (e.g. rotary ``inv_freq``) are not counted. A QuantLinear bias counts as fp16 too."""
    total = 0
    for _, t, _ in _tensors(model):
        total += 2 * t.numel() if t.is_floating_point() else t.numel() * t.element_size()  # w_scale is fp16
    return total


def fp16_nbytes(model: nn.Module) -> int:
    """Bytes the model would take as plain fp16 (QuantLinear layers counted as fp16 ``[out, in]``)."""
    total = 0
    for name, t, quant in _tensors(model):
        if quant:
            continue
        total += 2 * t.numel() if t.is_floating_point() else t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += 2 * m.in_features * m.out_features + (2 * m.out_features if m.bias is not None else 0)
    return total
