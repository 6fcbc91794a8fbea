"""Pure-torch implementation of every geometry primitive (fallback and test oracle).

All functions are batched: potentials are ``(B, n)`` / ``(B, m)`` and the cost
comes from ``geom.cost_block(rows, cols)``, which returns a ``(B, r, c)`` block.
Point clouds are processed in blocks of at most ``BLOCK_ELEMENTS`` cost entries
per problem batch, so no ``n x m`` buffer is ever allocated for them (a
``CostMatrix`` already is one).

Notation: ``F = f + eps*log(a)`` and ``G = g + eps*log(b)`` are the *biased*
potentials, so that the plan is ``P_ij = exp((F_i + G_j - C_ij) / eps)``.
Zero weights give ``-inf`` biases and therefore zero rows/columns of ``P``.
"""

from __future__ import annotations

from typing import Iterator

import torch

#: Largest number of cost entries materialised at once (per batch): 16M entries,
#: 64 MB in float32. Small enough that n = m = 100,000 stays far from an n*m buffer.
#: Not smaller: glibc serves blocks under its dynamic mmap threshold (up to 32 MB)
#: from the heap, where ~16 MB temporaries interleaved with small allocations
#: fragmented it and the peak RSS grew by 1.6 GB at n = m = 20,000 (tests/test_memory.py).
BLOCK_ELEMENTS = 1 << 24


def blocks(geom, axis: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(sl, C_block)`` covering the cost matrix.

    ``axis=1`` (reductions over j) cuts rows: ``C_block = C[:, sl, :]``.
    ``axis=0`` (reductions over i) cuts columns: ``C_block = C[:, :, sl]``.
    """
    full = geom.n if axis == 1 else geom.m
    other = geom.m if axis == 1 else geom.n
    step = full if geom.is_dense else max(1, BLOCK_ELEMENTS // max(1, geom.batch * other))
    if step >= full:  # one block: the whole (possibly cached) cost
        yield slice(None), geom.cost_block()
        return
    for s in range(0, full, step):
        sl = slice(s, min(full, s + step))
        yield sl, (geom.cost_block(rows=sl) if axis == 1 else geom.cost_block(cols=sl))


def _log_plan(F_blk: torch.Tensor, G_blk: torch.Tensor, C: torch.Tensor, eps: float) -> torch.Tensor:
    """log P on a block: (F_i + G_j - C_ij) / eps with F (B,r), G (B,c), C (B,r,c)."""
    return (F_blk[:, :, None] + G_blk[:, None, :] - C) / eps


def softmin(geom, h: torch.Tensor, eps: float, axis: int, precision: str = "fp32") -> torch.Tensor:
    """Soft minimum of the cost, shifted by ``h``.

    ``axis=1``: ``out_i = -eps * log sum_j exp((h_j - C_ij) / eps)``, h (B,m) -> (B,n).
    ``axis=0``: ``out_j = -eps * log sum_i exp((h_i - C_ij) / eps)``, h (B,n) -> (B,m).
    With ``h = g + eps*log b`` the first is the Sinkhorn update of ``f``.
    """
    out = []
    for sl, C in blocks(geom, axis):
        if axis == 1:
            out.append(-eps * torch.logsumexp((h[:, None, :] - C) / eps, dim=2))
        else:
            out.append(-eps * torch.logsumexp((h[:, :, None] - C) / eps, dim=1))
    return torch.cat(out, dim=1)


def apply_plan(geom, F, G, eps: float, v: torch.Tensor, axis: int, precision: str = "fp32") -> torch.Tensor:
    """``axis=1``: ``(P v)_i = sum_j P_ij v_j`` with v (B,m) or (B,m,k) -> (B,n[,k]).
    ``axis=0``: ``(P^T u)_j = sum_i P_ij u_i`` with u (B,n) or (B,n,k) -> (B,m[,k])."""
    vec = v.dim() == 2
    V = v[..., None] if vec else v
    out = []
    for sl, C in blocks(geom, axis):
        if axis == 1:
            P = torch.exp(_log_plan(F[:, sl], G, C, eps))
            out.append(P @ V)
        else:
            P = torch.exp(_log_plan(F, G[:, sl], C, eps))
            out.append(P.transpose(1, 2) @ V)
    res = torch.cat(out, dim=1)
    return res[..., 0] if vec else res


def marginals(geom, F, G, eps: float, axis: int, precision: str = "fp32") -> torch.Tensor:
    """``axis=1``: row sums ``P 1`` (B,n); ``axis=0``: column sums ``P^T 1`` (B,m)."""
    out = []
    for sl, C in blocks(geom, axis):
        if axis == 1:
            out.append(torch.exp(_log_plan(F[:, sl], G, C, eps)).sum(2))
        else:
            out.append(torch.exp(_log_plan(F, G[:, sl], C, eps)).sum(1))
    return torch.cat(out, dim=1)


def plan_dense(geom, F, G, eps: float, precision: str = "fp32") -> torch.Tensor:
    """The dense plan ``P`` (B,n,m). Small problems only: this *is* an n x m buffer."""
    return torch.exp(_log_plan(F, G, geom.cost_block(), eps))


def plan_cost(geom, F, G, eps: float, precision: str = "fp32") -> torch.Tensor:
    """Transport cost ``<P, C>`` per problem, (B,)."""
    total = torch.zeros(geom.batch, dtype=F.dtype, device=F.device)
    for sl, C in blocks(geom, 1):
        total = total + (torch.exp(_log_plan(F[:, sl], G, C, eps)) * C).sum((1, 2))
    return total


def plan_topk(geom, F, G, eps: float, k: int, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of each row of ``P``: values (B,n,k), column indices (B,n,k)."""
    vals, idx = [], []
    for sl, C in blocks(geom, 1):
        lp, ix = torch.topk(_log_plan(F[:, sl], G, C, eps), k, dim=2)
        vals.append(torch.exp(lp))
        idx.append(ix)
    return torch.cat(vals, 1), torch.cat(idx, 1)


def plan_cost_grad(geom, F, G, eps: float, precision: str = "fp32") -> tuple[torch.Tensor, ...]:
    """Derivative of ``<P, C>`` with respect to the cost's inputs, ``P`` held fixed.

    Dense cost: ``(P,)``. Point clouds: ``(gx, gy)`` with
    ``gx_i = sum_j P_ij dC_ij/dx_i`` (B,n,d) and ``gy_j = sum_i P_ij dC_ij/dy_j`` (B,m,d).
    Squared Euclidean: ``gx_i = 2 (x_i (P1)_i - (P y)_i)``. Euclidean:
    ``gx_i = sum_j P_ij (x_i - y_j) / |x_i - y_j|`` (0 where the points coincide).
    """
    if geom.is_dense:
        return (plan_dense(geom, F, G, eps),)
    x, y = geom.x, geom.y
    if geom.cost == "sqeuclidean":
        r = marginals(geom, F, G, eps, 1)
        c = marginals(geom, F, G, eps, 0)
        gx = 2 * (x * r[..., None] - apply_plan(geom, F, G, eps, y, 1))
        gy = 2 * (y * c[..., None] - apply_plan(geom, F, G, eps, x, 0))
        return gx, gy
    # Euclidean: weights W = P / C (zero on the diagonal where C = 0).
    gx = []
    for sl, C in blocks(geom, 1):
        W = torch.exp(_log_plan(F[:, sl], G, C, eps)) / torch.where(C > 0, C, torch.ones_like(C))
        W = torch.where(C > 0, W, torch.zeros_like(W))
        gx.append(x[:, sl] * W.sum(2)[..., None] - W @ y)
    gy = []
    for sl, C in blocks(geom, 0):
        W = torch.exp(_log_plan(F, G[:, sl], C, eps)) / torch.where(C > 0, C, torch.ones_like(C))
        W = torch.where(C > 0, W, torch.zeros_like(W))
        gy.append(y[:, sl] * W.sum(1)[..., None] - W.transpose(1, 2) @ x)
    return torch.cat(gx, 1), torch.cat(gy, 1)
