"""Tensor parallelism for the engine (Megatron-style, through ``torch.distributed``: NCCL on GPUs, gloo on CPUs).

:func:`shard_llama` cuts a Llama-family model in place to rank ``r`` of ``N``: q/k/v and gate/up are
column-parallel (their output features split by attention head, KV head and intermediate channel), o and down
are row-parallel (input features split the same way, one all-reduce after each), the embedding and the LM head
are vocab-parallel (each rank holds ``vocab / N`` rows; the embedding all-reduces, the head all-gathers the
logits so every rank samples the same tokens). Attention heads and the KV pool split by KV head, so each rank's
paged store holds ``kv_heads / N`` heads and KIVI pages never cross ranks. A W4Ax model is quantized whole, then cut
(:mod:`lowbit.wa.shard`): its codes, scales and INT8 blocks are sliced, never requantized, so each rank computes
exactly its part of the unsharded layer; the row-parallel cuts must fall on group/block boundaries.

:class:`TensorParallelEngine`: rank 0 takes requests and, at every step, broadcasts the step plan (new
requests, cancellations) to the others; every rank then runs the same :meth:`PagedEngine.step`. Admission,
rows and sampling are deterministic given the same plan, so the ranks stay in lockstep.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lowbit.engine.core import PagedEngine
from lowbit.wa.linear import QuantLinear


class RowParallelLinear(nn.Module):
    """A linear over this rank's slice of the input features, summed over ranks (bias added once)."""

    def __init__(self, inner: nn.Module, bias: torch.Tensor | None, group=None):
        super().__init__()
        self.inner, self.group = inner, group
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x):
        y = self.inner(x)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, start + n)`` of the embedding; tokens outside give zeros, then an all-reduce."""

    def __init__(self, weight: torch.Tensor, start: int, group=None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.group = start, group

    def forward(self, ids):
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * inside[..., None].to(self.weight.dtype)
        dist.all_reduce(out, group=self.group)
        return out


class VocabParallelHead(nn.Module):
    """This rank's rows of the LM head; the logits of all ranks gathered along the vocabulary."""

    def __init__(self, weight: torch.Tensor, world: int, group=None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.world, self.group = world, group

    def forward(self, x):
        part = F.linear(x, self.weight).contiguous()
        parts = [torch.empty_like(part) for _ in range(self.world)]
        dist.all_gather(parts, part, group=self.group)
        return torch.cat(parts, dim=-1)


def _rows(linear: nn.Module, lo: int, hi: int) -> nn.Module:
    """Output features ``[lo, hi)`` of a float or quantized linear (column-parallel part)."""
    if not isinstance(linear, nn.Linear):
        from lowbit.wa.shard import output_rows

        return output_rows(linear, lo, hi)
    out = nn.Linear(linear.in_features, hi - lo, bias=linear.bias is not None, device=linear.weight.device,
                    dtype=linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(linear.weight[lo:hi])
        if linear.bias is not None:
            out.bias.copy_(linear.bias[lo:hi])
    return out


def _cols(linear: nn.Module, lo: int, hi: int) -> nn.Module:
    """Input features ``[lo, hi)`` of a float or quantized linear, without bias (row-parallel part)."""
    if not isinstance(linear, nn.Linear):
        from lowbit.wa.shard import input_columns

        return input_columns(linear, lo, hi)
    out = nn.Linear(hi - lo, linear.out_features, bias=False, device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(linear.weight[:, lo:hi])
    return out


def check_shardable(config, world: int) -> None:
    """Raise ValueError when the model cannot be split over `world` ranks by KV head."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    problems = []
    if kv % world:
        problems.append(f"{kv} KV heads")
    if config.intermediate_size % world:
        problems.append(f"intermediate size {config.intermediate_size}")
    if config.vocab_size % world:
        problems.append(f"vocabulary {config.vocab_size}")
    if problems:
        raise ValueError(f"tensor parallelism over {world} ranks splits KV heads, MLP channels and the vocabulary "
                         f"evenly; this model has {', '.join(problems)} (not divisible by {world})")


def _shard_layer(attn, mlp, q_lo, q_hi, kv_lo, kv_hi, i_lo, i_hi, group=None) -> tuple:
    """This rank's q, k, v, o, gate, up, down (all cut before any is replaced: a failure leaves the layer whole)."""
    return (_rows(attn.q_proj, q_lo, q_hi), _rows(attn.k_proj, kv_lo, kv_hi), _rows(attn.v_proj, kv_lo, kv_hi),
            RowParallelLinear(_cols(attn.o_proj, q_lo, q_hi), attn.o_proj.bias, group),
            _rows(mlp.gate_proj, i_lo, i_hi), _rows(mlp.up_proj, i_lo, i_hi),
            RowParallelLinear(_cols(mlp.down_proj, i_lo, i_hi), mlp.down_proj.bias, group))


@torch.no_grad()
def weights_fingerprint(model) -> torch.Tensor:
    """A float64 vector that differs between two models whose weights or quantization (codes, scales, permutations,
    INT8 blocks) differ: per parameter/buffer, its sum and a position-weighted sum of up to 64K evenly spaced
    elements (whole for small tensors such as permutations); no full-size copy is made."""
    sums = []
    for t in list(model.parameters()) + [b for b in model.buffers() if b is not None]:
        v = t.detach().reshape(-1)
        sample = v[:: max(1, v.numel() // 65536)].double()
        sums += [v.sum(dtype=torch.float64) if v.is_floating_point() else v.long().sum().double(),
                 (sample * torch.linspace(1, 2, sample.numel(), dtype=torch.float64, device=v.device)).sum()]
    return torch.stack(sums) if sums else torch.zeros(1, dtype=torch.float64)


def check_same_weights(model, group=None) -> None:
    """Raise ValueError unless every rank holds the same (quantized) model: each rank quantizes the whole model
    before cutting its part, and parts of two different quantizations would not add up."""
    mine = weights_fingerprint(model)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    bad = [r for r, p in enumerate(parts) if not torch.equal(p, parts[0])]
    if bad:
        raise ValueError(f"ranks {bad} hold different weights than rank 0 after loading/quantizing (a nondeterministic "
                         "calibration?): tensor parallelism needs the same model on every rank")


def shard_llama(model, rank: int, world: int, group=None):
    """Cut `model` in place to rank `rank` of `world` (see the module docstring); returns it."""
    cfg = model.config
    check_shardable(cfg, world)
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    q_lo, q_hi = rank * heads // world * d, (rank + 1) * heads // world * d
    kv_lo, kv_hi = rank * kv // world * d, (rank + 1) * kv // world * d
    inter = cfg.intermediate_size // world
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for name, m in (("q_proj", attn.q_proj), ("k_proj", attn.k_proj), ("v_proj", attn.v_proj), ("o_proj", attn.o_proj),
                        ("gate_proj", mlp.gate_proj), ("up_proj", mlp.up_proj), ("down_proj", mlp.down_proj)):
            if not isinstance(m, (nn.Linear, QuantLinear)):
                raise ValueError(f"{name} is a {type(m).__name__}: tensor parallelism shards nn.Linear and lowbit's "
                                 "QuantLinear (quantize with lowbit.wa, then shard)")
        try:
            parts = _shard_layer(attn, mlp, q_lo, q_hi, kv_lo, kv_hi, rank * inter, (rank + 1) * inter, group)
        except ValueError as exc:
            raise ValueError(f"layer {i}: {exc}") from None
        (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj) = parts
    vocab = cfg.vocab_size // world
    lo = rank * vocab
    embed_w = model.model.embed_tokens.weight.detach()
    head_w = model.lm_head.weight.detach()
    model.model.embed_tokens = VocabParallelEmbedding(embed_w[lo : lo + vocab].clone(), lo, group)
    model.lm_head = VocabParallelHead(head_w[lo : lo + vocab].clone(), world, group)
    model.lowbit_tp = (rank, world)
    return model


class TensorParallelEngine:
    """A :class:`PagedEngine` per rank, driven in lockstep by rank 0 (it has the engine's interface).

    On rank 0, :meth:`add` and :meth:`cancel` act on the local engine at once and are logged; :meth:`step` broadcasts
    the log (the step plan) and every other rank replays it, in order, before the same :meth:`PagedEngine.step`.
    Requests are named by their engine id, which is the same on every rank (ids count the adds). Anything else
    (``store``, ``running``, ``waiting``, ``idle``, ``history``) reads this rank's engine.
    """

    def __init__(self, engine: PagedEngine, rank: int, world: int, group=None):
        self.engine, self.rank, self.world, self.group = engine, rank, world, group
        self._ops: list[tuple] = []
        self._by_id: dict[int, object] = {}

    def __getattr__(self, name):
        return getattr(self.engine, name)

    # rank 0 ---------------------------------------------------------------
    def add(self, *args, **kwargs):
        """Queue a request here (rank 0) and log it for the others; the engine's errors come straight back."""
        req = self.engine.add(*args, **kwargs)
        self._ops.append(("add", args, kwargs))
        return req

    def cancel(self, req) -> None:
        self.engine.cancel(req)
        self._ops.append(("cancel", req.id))

    # every rank -----------------------------------------------------------
    def step(self, stop: bool = False):
        """Broadcast rank 0's plan, replay it on the other ranks, and step; ``None`` once rank 0 said stop."""
        plan = [(self._ops, stop)] if self.rank == 0 else [None]
        dist.broadcast_object_list(plan, src=0, group=self.group)
        ops, stop = plan[0]
        self._ops = []
        if self.rank != 0:
            for op in ops:
                if op[0] == "add":
                    req = self.engine.add(*op[1], **op[2])
                    self._by_id[req.id] = req
                elif op[1] in self._by_id:
                    self.engine.cancel(self._by_id.pop(op[1]))
        if stop:
            return None
        return self.engine.step()

    def run(self) -> None:
        """Rank 0: step until every request has finished, then tell the others to stop."""
        while not self.engine.idle:
            self.step()
        self.step(stop=True)

    def follow(self) -> None:
        """Ranks > 0: replay rank 0's plans and step until it says stop."""
        while self.step() is not None:
            pass
