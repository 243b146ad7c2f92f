"""GPTQ (Frantar et al., 2023): error-compensating rounding of a linear layer's weights (``gptq=true``).

For ``y = x W^T`` and calibration inputs ``X`` with ``H = X^T X``, the columns (input channels) of ``W`` are
rounded one at a time; the rounding error of column ``i``, divided by ``[H^-1]_ii``, is subtracted from the
columns not yet rounded in proportion to row ``i`` of the upper Cholesky factor of ``H^-1``. This is the
least-squares-optimal update of the remaining columns for the output error ``||X W^T - X Q^T||``.
``damp`` (default 0.1, the spec's ``damp``) adds ``damp * mean(diag H)`` to the diagonal: with lowbit's small
calibration set (8 x 256 tokens) 0.1 generalizes better than GPTQ's usual 0.01 (docs/QUALITY.md).

The storage is :func:`lowbit.quant.affine.quantize_integer`'s (same scale rule, fp16 scales, integer zeros):
each group's scale and zero are fixed from the group's columns *as updated so far* when its first column is
reached, then every column is rounded with them. Columns are visited in the layer's stored order (FMPQ's
outlier-first permutation, when it has one: an activation-ordered GPTQ with static groups).

``clip=true`` (:func:`search_grid`): a group's grid is chosen among its range shrunk by each of
:data:`CLIP_RATIOS`, the one with the least squared rounding error per row (weighted by ``diag H`` under
GPTQ); :func:`rtn_quantize` is plain rounding with that search.
"""

from __future__ import annotations

import torch

from lowbit.quant.affine import ZeroPoint, quantize_integer
from lowbit.quant.integer import qrange


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


class HessianAccumulator:
    """Running ``H = sum x^T x`` over the rows of every input seen (float64), and the row count."""

    def __init__(self, n: int):
        self.h = torch.zeros(n, n, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.h += (x.t() @ x).double().cpu()  # one batch in fp32, accumulated in fp64
        self.rows += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return self.h / max(1, self.rows)


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
    """Integer values of column(s) `w` [out, k] on the grid (scale [out, 1], integer zero or None): what quantize_integer computes."""
    q = torch.round(w / scale)
    if zero is not None:
        q = q + zero
    return q.clamp_(lo, hi)


def search_grid(g: torch.Tensor, bits: int, sym: bool, col_weight: torch.Tensor | None = None,
                ratios: tuple[float, ...] = CLIP_RATIOS):
    """Scale (fp16 ``[rows, 1]``) and integer zero (uint8 or None) for the columns ``g [rows, group]``: the grid
    of ``quantize_integer(g * r)`` for the ratio ``r`` in `ratios` with the least ``sum_j col_weight_j (g - deq)^2``
    (`col_weight` ``[group]`` for every row, or ``[rows, group]``)."""
    zp = ZeroPoint.NONE if sym else ZeroPoint.INT
    lo, hi = qrange(bits, sym)
    g = g.double()
    best = None
    for r in ratios:
        _, s, z = quantize_integer(g * r, bits, g.shape[1], zp)
        sd, zd = s.double(), (z.double() if z is not None else None)
        q = _codes(g, sd, zd, lo, hi)
        err = (g - (q - zd if zd is not None else q) * sd) ** 2
        if col_weight is not None:  # [group] for every row, or [rows, group]
            cw = col_weight.double().to(g.device)
            err = err * (cw if cw.dim() == 2 else cw[None, :])
        err = err.sum(1)
        if best is None:
            best = [err, s, z]
            continue
        better = err < best[0]
        best[0] = torch.where(better, err, best[0])
        best[1] = torch.where(better[:, None], s, best[1])
        if z is not None:
            best[2] = torch.where(better[:, None], z, best[2])
    return best[1], best[2]


def rtn_quantize(w: torch.Tensor, bits: int, group: int, sym: bool = True, clip: bool = False):
    """Round-to-nearest ``w [out, n]`` in :func:`quantize_integer`'s format; ``clip``: each group's grid by :func:`search_grid`."""
    zp = ZeroPoint.NONE if sym else ZeroPoint.INT
    if not clip:
        return quantize_integer(w, bits, group, zp)
    lo, hi = qrange(bits, sym)
    out_f, n = w.shape
    q = torch.empty(out_f, n, dtype=torch.int16)
    scales = torch.empty(out_f, n // group, dtype=torch.float16)
    zeros = None if sym else torch.empty(out_f, n // group, dtype=torch.uint8)
    for j in range(n // group):
        g = w[:, j * group : (j + 1) * group].detach().double().cpu()
        s, z = search_grid(g, bits, sym)
        q[:, j * group : (j + 1) * group] = _codes(g, s.double(), z.double() if z is not None else None, lo, hi).to(torch.int16)
        scales[:, j] = s[:, 0]
        if zeros is not None:
            zeros[:, j] = z[:, 0]
    return q, scales, zeros


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, sym: bool = True,
                  damp: float = 0.1, block: int = 128, clip: bool = False):
    """GPTQ-round ``w [out, n]`` (n a multiple of `group`) with the Hessian ``h [n, n]`` of its inputs.

    Returns ``(q int16, scale fp16 [out, n/group], zero uint8 | None)`` in :func:`quantize_integer`'s format.
    `damp` adds ``damp * mean(diag H)`` to the diagonal; dead inputs (zero diagonal, e.g. padding) get weight 0;
    `clip` picks each group's grid with :func:`search_grid` (weighted by ``diag H``).

    Batched: ``w [B, out, n]`` with ``h [B, n, n]`` rounds B independent layers in one pass (GPTQ treats every
    row on its own, so several layers -- zero-padded to the same number of rows -- share each column step);
    outputs then carry the leading ``B``. Runs in float64 on `w`'s device (`h` is moved there).
    """
    batched = w.dim() == 3
    W = (w if batched else w[None]).detach().to(torch.float64).clone()
    nb, out_f, n = W.shape
    H = (h if batched else h[None]).detach().to(device=W.device, dtype=torch.float64).clone()
    if n % group or H.shape != (nb, n, n):
        raise ValueError(f"gptq: weight [{out_f}, {n}] needs a multiple of group {group} inputs and a [{n}, {n}] Hessian")
    zp = ZeroPoint.NONE if sym else ZeroPoint.INT
    lo, hi = qrange(bits, sym)
    dev, rows = W.device, nb * out_f
    diag = H.diagonal(dim1=-2, dim2=-1)  # a view: writing it writes H
    dead = diag == 0
    diag[dead] = 1.0
    col_weight = diag.clone()  # [B, n]
    W.masked_fill_(dead[:, None, :], 0.0)
    H += (damp * diag.mean(-1))[:, None, None] * torch.eye(n, dtype=torch.float64, device=dev)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    block = max(group, block // group * group)
    Q = torch.zeros(nb, out_f, n, dtype=torch.float64, device=dev)
    scales = torch.zeros(nb, out_f, n // group, dtype=torch.float16, device=dev)
    zeros = torch.zeros(nb, out_f, n // group, dtype=torch.uint8, device=dev) if not sym else None
    for a in range(0, n, block):
        b = min(n, a + block)
        W1, E1, U1 = W[..., a:b].clone(), torch.zeros(nb, out_f, b - a, dtype=torch.float64, device=dev), U[:, a:b, a:b]
        for i in range(b - a):
            col = a + i
            if col % group == 0:  # this group's grid, from its columns as updated so far
                g = W1[..., i : i + group].reshape(rows, group)
                if clip:
                    s, z = search_grid(g, bits, sym, col_weight[:, col : col + group].repeat_interleave(out_f, dim=0))
                else:
                    _, s, z = quantize_integer(g, bits, group, zp)
                s, z = s.reshape(nb, out_f, 1), (z.reshape(nb, out_f, 1) if z is not None else None)
                scale, zero = s.double(), (z.double() if z is not None else None)
                scales[..., col // group] = s[..., 0]
                if zeros is not None:
                    zeros[..., col // group] = z[..., 0]
            q = _codes(W1[..., i : i + 1], scale, zero, lo, hi)
            Q[..., col] = q[..., 0]
            deq = (q - zero if zero is not None else q) * scale
            err = (W1[..., i : i + 1] - deq) / U1[:, i, i][:, None, None]
            W1[..., i:] -= err @ U1[:, i : i + 1, i:]
            E1[..., i] = err[..., 0]
        W[..., b:] -= E1 @ U[:, a:b, b:]
    Q = Q.to(torch.int16)
    if not batched:
        return Q[0], scales[0], (zeros[0] if zeros is not None else None)
    return Q, scales, zeros
