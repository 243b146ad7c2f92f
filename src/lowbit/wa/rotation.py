"""QuaRot-style Hadamard rotation of a Llama-style decoder (``rotate=hadamard``), before its linears are quantized.

The function the model computes is unchanged (up to float rounding); what changes is the basis in which the
linears see their inputs, so that outlier channels are spread over all channels before quantization:

1. **RMSNorm weights are folded** into the linears that read the norm's output (q/k/v after
   ``input_layernorm``, gate/up after ``post_attention_layernorm``); the norms keep weight 1. A weightless
   RMSNorm commutes with an orthogonal ``Q``: ``norm(xQ) = norm(x)Q``.
2. **The residual stream is rotated** by ``Q`` (order ``hidden``): every linear reading it gets ``W Q``,
   every linear writing to it (o_proj, down_proj) ``Q^T W``. Fused into the weights: exact.
3. **Values and o_proj's input per head** by ``Q_h`` (order ``head_dim``): v_proj's output rows of each
   KV head get ``Q_h^T``, o_proj's input columns of each head ``Q_h``; attention is linear in V. Exact.
4. **One online Hadamard before down_proj** (order ``intermediate``): its input ``x`` becomes ``x Q_m``
   at run time and its weight ``W Q_m``. Carried by :class:`~lowbit.wa.linear.QuantLinear` (``in_rotation``).
5. The embedding output is rotated online (``e Q``) and the final norm un-rotates its input (``h Q^T``), so
   the tied embedding / LM head stay one unquantized fp16 matrix (fusing would untie them: +1 embedding).

Each ``Q`` is a randomized Hadamard matrix, ``diag(s) H / sqrt(n)`` with seeded random signs ``s``; ``H`` is
Sylvester's (powers of two) times a Paley matrix (orders q+1 for primes q = 3 mod 4, 2(q+1) for q = 1 mod 4),
e.g. 576 = 36 x 16, 1536 = 12 x 128. Structured: a kernel applies it in O(n log n) without storing it.
"""

from __future__ import annotations

import torch
from torch import nn

ROTATIONS = ("none", "hadamard")


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)``, chi the quadratic character mod the prime `q`."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley(m: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order `m` from Paley's constructions, or None."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    q = m - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: I + [[0, 1^T], [-1, Q]]
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return s + torch.eye(m, dtype=torch.float64)
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II: C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


def hadamard_matrix(n: int) -> torch.Tensor:
    """A ±1 Hadamard matrix of order `n` (float64, ``H H^T = n I``): Sylvester x Paley; ValueError if none is known."""
    k = 1
    while n % (2 * k) == 0:
        k *= 2
    while k >= 1:  # the largest power of two first: the smallest Paley factor
        base = _paley(n // k) if n % k == 0 else None
        if base is not None:
            h = base
            while h.shape[0] < n:
                h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
            return h
        k //= 2
    raise ValueError(f"no Hadamard matrix of order {n} is known here (Sylvester x Paley): rotate=hadamard cannot rotate this model")


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """Orthonormal ``diag(s) H / sqrt(n)`` with seeded random signs `s` (float64)."""
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).double() * 2 - 1
    return signs[:, None] * hadamard_matrix(n) / n**0.5


def _decoder(model: nn.Module):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    needed = ("embed_tokens", "norm")
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(inner, a) for a in needed):
        raise ValueError("rotate=hadamard needs a Llama-style decoder (model.model.embed_tokens/layers/norm)")
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                or not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")) \
                or not hasattr(layer, "input_layernorm") or not hasattr(layer, "post_attention_layernorm"):
            raise ValueError("rotate=hadamard needs Llama-style layers (self_attn q/k/v/o_proj, mlp gate/up/down_proj, RMSNorms)")
    return inner, layers


def _set(linear: nn.Linear, w: torch.Tensor) -> None:
    linear.weight.data = w.to(linear.weight.dtype).contiguous()


def _rotate_input_hook(q: torch.Tensor):
    def hook(module, args):
        x = args[0]
        return (x @ q.to(x.device, x.dtype),) + tuple(args[1:])
    return hook


def _rotate_output_hook(q: torch.Tensor):
    def hook(module, args, out):
        return out @ q.to(out.device, out.dtype)
    return hook


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> nn.Module:
    """Rotate `model` in place (steps 1-5 of the module docstring); returns it. Linears must still be ``nn.Linear``."""
    if getattr(model, "lowbit_rotated", False):
        return model
    inner, layers = _decoder(model)
    cfg = model.config
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    dev = next(model.parameters()).device  # built on the CPU (seeded), applied where the weights are
    q_res, q_mlp, q_head = (random_hadamard(n, seed + i).to(dev) for i, n in enumerate((hidden, inter, head_dim)))
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm, readers in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                              (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
            g = norm.weight.double()
            for lin in readers:
                _set(lin, (lin.weight.double() * g[None, :]) @ q_res)
            norm.weight.fill_(1.0)
        wv = attn.v_proj.weight.double()  # [kv_heads * head_dim, hidden]: each head's rows by Q_h^T
        _set(attn.v_proj, (q_head.t() @ wv.reshape(-1, head_dim, hidden)).reshape(wv.shape))
        if attn.v_proj.bias is not None:
            attn.v_proj.bias.data = (attn.v_proj.bias.double().reshape(-1, head_dim) @ q_head).reshape(-1).to(attn.v_proj.bias.dtype)
        wo = attn.o_proj.weight.double()  # [hidden, heads * head_dim]: each head's columns by Q_h, then Q^T
        wo = (wo.reshape(hidden, -1, head_dim) @ q_head).reshape(wo.shape)
        _set(attn.o_proj, q_res.t() @ wo)
        _set(mlp.down_proj, q_res.t() @ mlp.down_proj.weight.double() @ q_mlp)
        for lin in (attn.o_proj, mlp.down_proj):
            if lin.bias is not None:
                lin.bias.data = (lin.bias.double() @ q_res).to(lin.bias.dtype)
        q32 = q_mlp.float()
        mlp.down_proj.lowbit_in_rotation = q32  # QuantLinear.from_linear carries it over
        mlp.down_proj.register_forward_pre_hook(_rotate_input_hook(q32))
    inner.embed_tokens.register_forward_hook(_rotate_output_hook(q_res.float()))
    inner.norm.register_forward_pre_hook(_rotate_input_hook(q_res.t().float()))
    model.lowbit_rotated = True
    return model
