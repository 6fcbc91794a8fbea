"""Batched (Jacobi-)preconditioned conjugate gradient, shared by SNS and sparse OT."""

from __future__ import annotations

from typing import Callable, Optional

import torch


def pcg(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    rtol: float,
    max_iter: int,
    inv_diag: Optional[torch.Tensor] = None,
    active: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``K x = rhs`` for every problem of a batch, ``K`` symmetric positive semi-definite.

    Args:
        matvec: ``p (B, N) -> K p (B, N)``.
        rhs: ``(B, N)``, in the range of ``K`` where ``K`` is singular.
        rtol: a problem stops once ``r^T z <= rtol^2 r_0^T z_0`` (``z = M^-1 r``).
        max_iter: iteration cap.
        inv_diag: ``(B, N)`` Jacobi preconditioner ``M^-1 = diag(inv_diag)``; None: none.
        active: ``(B,)`` bool; inactive problems get ``x = 0``.

    Returns:
        ``(x, its)``, ``its`` (B,) long: the iterations each problem ran (began
        running). Stopped problems idle (step 0) until all have stopped;
        that is read from the device every 8 iterations only (one host sync each), from the
        8th on (a system with nothing to solve idles through 8 iterations). A
        direction with ``p^T K p <= 0`` (rounding at the null space) or not finite stops
        its problem at the iterate before it.
    """
    precond = (lambda r: r) if inv_diag is None else (lambda r: inv_diag * r)  # noqa: E731
    x = torch.zeros_like(rhs)
    r = rhs
    z = precond(r)
    p = z
    rz = (r * z).sum(-1)
    stop = rz * rtol**2
    run = rz > 0
    if active is not None:
        run = run & active
    its = torch.zeros(rhs.shape[0], dtype=torch.long, device=rhs.device)
    for k in range(max_iter):
        if k and k % 8 == 0 and not bool(run.any()):  # (none at k = 0: a call has work to do)
            break
        its += run
        q = matvec(p)
        pq = (p * q).sum(-1)
        step = run & (pq > 0)
        alpha = torch.where(step, rz / torch.where(pq > 0, pq, 1.0), 0.0)
        # a stopped problem keeps its iterate (x + 0 p would turn a non-finite p into NaN)
        x = torch.where(step[:, None], x + alpha[:, None] * p, x)
        r = torch.where(step[:, None], r - alpha[:, None] * q, r)
        z = precond(r)
        rz_new = (r * z).sum(-1)
        run = step & (rz_new > stop)
        beta = torch.where(run, rz_new / torch.where(rz > 0, rz, 1.0), 0.0)
        p = z + beta[:, None] * p
        rz = rz_new
    return x, its
