"""Folding FMPQ's input permutations into the layers that produce those inputs (``fmpq:fold=true``).

A permuted :class:`~lowbit.wa.linear.QuantLinear` reads its input in ``perm`` order. Gathering it at every
call is pure data movement; wherever the input is written by something we control, that writer can emit
the permuted order instead (``input_permuted``), exactly (the same numbers, moved), in a Llama-style decoder:

* **down_proj** reads ``act(gate_proj(x)) * up_proj(x)``, elementwise: gate/up's *output rows* (codes,
  scales, zero points, bias) are permuted by down_proj's ``perm``.
* **o_proj** reads the attention output; its channel ``h*d + j`` is head ``h``'s value channel ``j``, i.e.
  row ``j`` of the KV head ``g(h) = h // n_rep`` in v_proj. Attention is linear in V and acts per channel, so
  permuting v_proj's rows *within* each KV head by ``s_g`` permutes o_proj's input by
  ``P[h*d + j] = h*d + s_{g(h)}[j]``. Only such ``P`` fold, so with ``fold=true`` o_proj's permutation is
  *chosen* of that form (:func:`choose_permutations`): ``s_g`` sorts the channels of KV group ``g`` by their
  largest magnitude over the group's query heads. When every reduction tile holds whole heads
  (``min(block, group) % d == 0``) the order inside a head changes no block or group, and ``s_g`` is the
  identity (v_proj untouched).
* **q/k/v** read ``input_layernorm``'s output, **gate/up** ``post_attention_layernorm``'s: each norm gets one
  permutation (from the elementwise max of its readers' statistics, which see the same tensor) and becomes a
  :class:`PermutedRMSNorm`, which computes the RMS over the input in its original order (so the sum is the
  same sum), then writes ``x[perm] * rsqrt(...) * weight[perm]``: bit for bit the gathered output, one
  gather per norm instead of one per linear (a fused norm kernel writes it at no cost). Keeping the whole
  residual stream permuted would remove even that, but it needs one permutation for every norm of every
  layer (worse outlier clustering) and changes the RMS summation order (not bit-exact), so it is not done.

Where a fold does not apply (a producer that is not a QuantLinear -- its weights would not be saved --, an
online rotation before down_proj, an o_proj permutation not of the within-head form, an unknown norm or
layer structure), the layer keeps its run-time gather: folding never changes the function.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from lowbit.kernels import triton_ready
from lowbit.wa.linear import QuantLinear, outlier_permutation

NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")  # weight * x / rms(x), weight as is


def fused_norm_setting(raw: str | None) -> bool:
    """``$LOWBIT_FUSED_NORM`` checked: on CUDA, :class:`PermutedRMSNorm` runs as one Triton launch
    (:mod:`lowbit.kernels.rmsnorm`) instead of PyTorch's ~8 kernels, unless it is ``0``. Its mean is summed in another
    order, so its output may differ from the plain norm's in the last bit; ``0`` keeps the module bit-exact. On by
    default: a Llama-3-8B layer's linear work at M = 1 took 80.9 instead of 107.3 µs under CUDA graphs (H200, stop 32)."""
    value = (raw or "").strip() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"$LOWBIT_FUSED_NORM must be 0 (PyTorch's kernels, bit-exact) or 1 (one launch), got {raw!r}")
    return value == "1"


FUSED_NORM = fused_norm_setting(os.environ.get("LOWBIT_FUSED_NORM"))  # read once at import


class PermutedRMSNorm(nn.Module):
    """An RMSNorm (Llama form) writing its output in ``perm`` order: ``norm(x)[..., perm]`` (bit for bit, except on
    CUDA under :data:`FUSED_NORM`, where one launch computes it up to the last bit)."""

    def __init__(self, norm: nn.Module, perm: torch.Tensor):
        super().__init__()
        self.weight = norm.weight  # the same Parameter: state dict keys and values unchanged
        self.variance_epsilon = norm.variance_epsilon
        self.register_buffer("perm", perm.to(norm.weight.device, torch.long), persistent=False)
        object.__setattr__(self, "original", norm)  # not a submodule; unfold_permutations puts it back
        self._pw = self._perm32 = None

    def permuted_weight(self) -> torch.Tensor:
        key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype, self.perm.device)
        if self._pw is None or self._pw[0] != key:
            self._pw = (key, self.weight.detach().index_select(0, self.perm.to(self.weight.device)))
        return self._pw[1]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if FUSED_NORM and hidden_states.is_cuda and triton_ready(hidden_states):  # one launch, not bit-exact
            from lowbit.kernels.rmsnorm import permuted_rmsnorm

            if self._perm32 is None or self._perm32.device != hidden_states.device:
                self._perm32 = self.perm.to(hidden_states.device, torch.int32)
            return permuted_rmsnorm(hidden_states, self._perm32, self.permuted_weight(), self.variance_epsilon)
        input_dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)  # over the original order: the same sum as the plain norm
        h = (h * torch.rsqrt(variance + self.variance_epsilon)).index_select(-1, self.perm)
        return self.permuted_weight() * h.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, output in permuted order"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers with the Llama structure the folds rely on, else ``[]`` (then nothing folds)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        return []
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        ok = (all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"))
              and all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj", "act_fn"))
              and type(mlp).__name__.endswith("MLP")
              and hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm"))
        if not ok:
            return []
    return list(layers)


def _norm_sites(layer: nn.Module):
    attn, mlp = layer.self_attn, layer.mlp
    return (("input_layernorm", (attn.q_proj, attn.k_proj, attn.v_proj)),
            ("post_attention_layernorm", (mlp.gate_proj, mlp.up_proj)))


def _heads(attn: nn.Module) -> tuple[int, int, int]:
    """``(query heads, kv heads, head_dim)`` from the projections' shapes."""
    d = int(attn.head_dim)
    o_in, v_out = attn.o_proj.in_features, attn.v_proj.out_features
    if o_in % d or v_out % d or (o_in // d) % (v_out // d):
        raise ValueError(f"attention with o_proj input {o_in}, v_proj output {v_out} and head_dim {d} is not grouped-query")
    return o_in // d, v_out // d, d


def head_permutation(sigma: torch.Tensor, n_heads: int) -> torch.Tensor:
    """o_proj's input permutation ``P[h*d + j] = h*d + sigma[g(h), j]`` from per-KV-group orders ``sigma [n_kv, d]``."""
    n_kv, d = sigma.shape
    g = torch.arange(n_heads) // (n_heads // n_kv)
    return (torch.arange(n_heads)[:, None] * d + sigma.long()[g]).reshape(-1)


def _head_sigma(perm: torch.Tensor, n_heads: int, n_kv: int, d: int) -> torch.Tensor | None:
    """The per-KV-group orders ``[n_kv, d]`` if `perm` is of :func:`head_permutation`'s form, else None."""
    s = perm.long().cpu().reshape(n_heads, d) - torch.arange(n_heads)[:, None] * d
    if s.min() < 0 or s.max() >= d:
        return None  # moves channels between heads
    sigma = s[:: n_heads // n_kv]
    return sigma if torch.equal(head_permutation(sigma, n_heads), perm.long().cpu()) else None


def choose_permutations(model: nn.Module, names: list[str], stats: dict, tile_of) -> dict[str, torch.Tensor]:
    """Foldable input permutations for the selected linears that have statistics: each norm's readers share
    the sort of their elementwise-max statistics; o_proj gets the within-head form (module docstring).
    ``tile_of(in_features)`` is the layer's reduction tile. Layers not named here sort their own statistics."""
    out: dict[str, torch.Tensor] = {}
    mods = {m: n for n, m in model.named_modules()}
    chosen = set(names)
    for layer in decoder_layers(model):
        for _, readers in _norm_sites(layer):
            rn = [mods[r] for r in readers if mods.get(r) in chosen and stats.get(mods[r]) is not None]
            if rn:
                combined = torch.stack([stats[n].float().cpu() for n in rn]).amax(0)
                perm = outlier_permutation(combined)
                out.update({n: perm for n in rn})
        attn = layer.self_attn
        o_name, v_name = mods[attn.o_proj], mods[attn.v_proj]
        if o_name in chosen and v_name in chosen and stats.get(o_name) is not None:
            n_heads, n_kv, d = _heads(attn)
            s = stats[o_name].float().cpu().reshape(n_kv, n_heads // n_kv, d).amax(1)  # [n_kv, d]
            if tile_of(attn.o_proj.in_features) % d == 0:  # tiles hold whole heads: the order inside is immaterial
                sigma = torch.arange(d).expand(n_kv, d)
            else:
                sigma = torch.stack([outlier_permutation(row) for row in s])
            out[o_name] = head_permutation(sigma, n_heads)
    return out


def _is_identity(perm: torch.Tensor) -> bool:
    return torch.equal(perm.long().cpu(), torch.arange(perm.numel()))


def _gathering(m) -> bool:
    return isinstance(m, QuantLinear) and m.gathers_input and m.in_rotation is None


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    p = perm.long().cpu()
    inv = torch.empty_like(p)
    inv[p] = torch.arange(p.numel())
    return inv


@torch.no_grad()
def fold_permutations(model: nn.Module) -> dict[str, str]:
    """Fold every foldable input permutation of `model`'s QuantLinears (in place; module docstring).
    Returns ``{layer name: how its input arrives}`` for every permuted QuantLinear: ``"norm"``, ``"gate/up
    rows"``, ``"v_proj rows"``, ``"identity"`` (nothing to move) or ``"gather: <why>"``."""
    names = {m: n for n, m in model.named_modules()}
    how: dict[str, str] = {}
    for layer in decoder_layers(model):
        for norm_name, readers in _norm_sites(layer):
            norm = getattr(layer, norm_name)
            if not all(_gathering(r) for r in readers):
                continue
            perm = readers[0].perm
            if not all(torch.equal(r.perm, perm) for r in readers):
                how.update({names[r]: "gather: the norm's readers have different permutations" for r in readers})
                continue
            if not _is_identity(perm):
                if type(norm).__name__ not in NORMS:
                    how.update({names[r]: f"gather: unknown norm {type(norm).__name__}" for r in readers})
                    continue
                setattr(layer, norm_name, PermutedRMSNorm(norm, perm))
            for r in readers:
                r.input_permuted, how[names[r]] = True, "norm" if not _is_identity(perm) else "identity"
        mlp, attn = layer.mlp, layer.self_attn
        down, gate, up = mlp.down_proj, mlp.gate_proj, mlp.up_proj
        if _gathering(down):
            if _is_identity(down.perm):
                down.input_permuted, how[names[down]] = True, "identity"
            elif isinstance(gate, QuantLinear) and isinstance(up, QuantLinear):
                gate.permute_output_rows(down.perm)
                up.permute_output_rows(down.perm)
                down.input_permuted, how[names[down]] = True, "gate/up rows"
            else:
                how[names[down]] = "gather: gate_proj/up_proj are not quantized (their rows would not be saved)"
        o, v = attn.o_proj, attn.v_proj
        if _gathering(o):
            n_heads, n_kv, d = _heads(attn)
            sigma = _head_sigma(o.perm, n_heads, n_kv, d)
            if _is_identity(o.perm):
                o.input_permuted, how[names[o]] = True, "identity"
            elif sigma is None:
                how[names[o]] = "gather: o_proj's permutation moves channels across heads or differs within a KV group"
            elif not isinstance(v, QuantLinear):
                how[names[o]] = "gather: v_proj is not quantized (its rows would not be saved)"
            else:
                v.permute_output_rows((torch.arange(n_kv)[:, None] * d + sigma).reshape(-1))
                o.input_permuted, how[names[o]] = True, "v_proj rows"
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.perm is not None and name not in how:
            if m.gathers_input and _is_identity(m.perm):
                m.input_permuted = True
            how[name] = "identity" if m.input_permuted else ("gather: online input rotation" if m.in_rotation is not None
                                                             else "gather: no foldable producer")
    return how


@torch.no_grad()
def unfold_permutations(model: nn.Module) -> nn.Module:
    """Undo :func:`fold_permutations`: producers back in natural order, plain norms, every permuted layer
    gathering its input again (the reference the folded model equals)."""
    for layer in decoder_layers(model):
        for norm_name, readers in _norm_sites(layer):
            norm = getattr(layer, norm_name)
            if isinstance(norm, PermutedRMSNorm):
                setattr(layer, norm_name, norm.original)
                for r in readers:
                    r.input_permuted = False
        mlp, attn = layer.mlp, layer.self_attn
        if isinstance(mlp.down_proj, QuantLinear) and mlp.down_proj.input_permuted and not _is_identity(mlp.down_proj.perm):
            inv = _inverse(mlp.down_proj.perm)
            mlp.gate_proj.permute_output_rows(inv)
            mlp.up_proj.permute_output_rows(inv)
        o = attn.o_proj
        if isinstance(o, QuantLinear) and o.input_permuted and not _is_identity(o.perm):
            n_heads, n_kv, d = _heads(attn)
            sigma = _head_sigma(o.perm, n_heads, n_kv, d)
            attn.v_proj.permute_output_rows(_inverse((torch.arange(n_kv)[:, None] * d + sigma).reshape(-1)))
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.input_permuted = False
    return model


def restore_norms(model: nn.Module) -> None:
    """After loading a folded checkpoint (readers flagged ``input_permuted``, producer rows as saved): give
    the norms whose readers expect a permuted input their :class:`PermutedRMSNorm`. ValueError if impossible."""
    for i, layer in enumerate(decoder_layers(model)):
        for norm_name, readers in _norm_sites(layer):
            flagged = [r for r in readers if isinstance(r, QuantLinear) and r.input_permuted and not _is_identity(r.perm)]
            if not flagged:
                continue
            norm = getattr(layer, norm_name)
            norm = norm.original if isinstance(norm, PermutedRMSNorm) else norm
            if len(flagged) != len(readers) or not all(torch.equal(r.perm, flagged[0].perm) for r in flagged):
                raise ValueError(f"layer {i}: the readers of {norm_name} do not share one folded permutation")
            if type(norm).__name__ not in NORMS:
                raise ValueError(f"layer {i}: {norm_name} is a {type(norm).__name__}, which cannot write a permuted output")
            setattr(layer, norm_name, PermutedRMSNorm(norm, flagged[0].perm))
    if not decoder_layers(model) and any(isinstance(m, QuantLinear) and m.input_permuted and not _is_identity(m.perm)
                                         for m in model.modules()):
        raise ValueError("folded permutations need the Llama-style decoder they were folded in")


def gathers_per_forward(model: nn.Module) -> int:
    """Permutation gathers one forward performs: QuantLinears that gather plus norms writing permuted output."""
    return sum(1 for m in model.modules() if (isinstance(m, QuantLinear) and m.gathers_input) or isinstance(m, PermutedRMSNorm))
