"""The semi-dual's Hessian on a fixed support, and Newton's method where it is small.

For sparse OT's semi-dual (``otcore.solvers.sparse``) in line coordinates -- ``N`` positions
with potentials ``hp``, ``L`` lines each projecting ``(hp - C_l)/gamma`` onto its simplex
of mass ``wl_l`` -- the plan on a fixed support is
``T_l = (x_l - mean_{S_l} x_l)/gamma + wl_l/|S_l|`` (``x = hp[idx] - C``), and the Hessian
of the minimized objective ``f = -J`` (whose gradient is ``T 1 - wp``) is

    K = (D - M diag(1/|S|) M^T) / gamma,

``M`` (N, L) the support's incidence (position ``i`` in line ``l``'s support), ``D = M 1``
the lines holding each position, ``|S| = M^T 1``. ``K`` is singular: a constant on the
positions of a connected part of the support leaves the plan unchanged.

Where ``N`` or ``L`` is small (a router's experts) systems in ``K`` are solved directly:
the implicit plan gradient (:func:`semi_dual_hessian_solve`) and, where no line's
cardinality constraint can bind (quadratically regularized OT, ``k`` >= ``N``; the
objective is then piecewise quadratic and once differentiable), the solve itself by
semismooth Newton steps (:func:`newton`), a few instead of L-BFGS's tens.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import _host
from ._lbfgs import _budgets, _on_host, _where

#: Systems in ``K`` are solved directly (a dense ``min(N, L)`` square system) when the positions
#: or the lines number at most this, and Newton's method runs when the positions do. Forming
#: ``K`` costs ``N L min(N, L)``: on one CPU thread at 4096 tokens x 128 experts the direct
#: backward took 13.6 ms against 4.4 ms by conjugate gradient (64: 5.2 against 4.1; 32: 2.6
#: against 2.8), and a review measured Newton slower than L-BFGS at 8192 x 64 and 8192 x 256
#: (2.35 s against 1.29 s; 13 s against 7.2 s; the router's seed at 4096 x 64 and x 128
#: was faster by Newton: 164 against 234 ms, 267 against 402 ms)
DIRECT_MAX = 64
#: :func:`newton`'s damping: its start, floor (steps then Newton's to ~1e-10) and cap
LAM_START, LAM_MIN, LAM_MAX = 1e-3, 1e-10, 1e8


def semi_dual_hessian_solve(gamma: float, idx: torch.Tensor, support: torch.Tensor, u: torch.Tensor,
                            lam: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``w = K^+ u`` (B, N), the minimum-norm solution of ``K w = u`` (as conjugate gradient
    from 0 finds it; ``u`` in the range of ``K``) for the support ``support`` (B, L, k) at
    positions ``idx`` (B, L, k) (the layout of :class:`~otcore.reference_ksparse.KSparse`);
    with ``lam`` (B,) > 0, the damped system's ``w = K_lam^-1 u`` instead, ``K_lam`` being
    ``K`` with ``D`` replaced by ``D (1 + lam) + lam [D = 0]`` (positive definite).

    - ``N <= L``: from ``K``'s ``N x N`` matrix (eigendecomposition, or a solve if damped).
    - else through the lines (Woodbury): with ``z = diag(1/|S|) M^T w``,
      ``w = D^-1 (gamma u + M z)`` solves ``K w = u`` when
      ``A z = M^T D^-1 gamma u``, ``A = diag(|S|) - M^T D^-1 M`` (L x L, a graph Laplacian of
      the lines sharing positions: its null vectors are the connected parts' indicators, and
      ``D^-1 M`` of them ``K``'s). ``w`` is then projected off those null vectors (undamped).

    In float64 whatever ``u``'s dtype: ``K``'s and ``A``'s entries are then exact to rounding
    and their null directions fall ~1e-16 below the largest eigenvalue, far under the cut at
    ``1e-12 n`` of it. Undamped, positions in no support get 0.
    """
    B, L, _ = idx.shape
    N = u.shape[1]
    dt = torch.float64
    M = torch.zeros(B, N, L, dtype=dt, device=u.device).scatter_(
        1, idx.transpose(1, 2), support.transpose(1, 2).to(dt))
    D, S = M.sum(2), M.sum(1)
    if lam is not None:
        lam = lam.to(dt)[:, None]
        D = D * (1 + lam) + lam * (D == 0)
    inv_d = torch.where(D > 0, 1 / torch.where(D > 0, D, 1.0), 0.0)
    gu = gamma * u.to(dt)
    if N <= L:
        K = torch.diag_embed(D) - (M * torch.where(S > 0, 1 / S.clamp(min=1), 0.0)[:, None, :]) @ M.transpose(1, 2)
        w = _pinv_apply(*_eig(K), gu) if lam is None else torch.linalg.solve(K, gu)
        return w.to(u.dtype)
    A = torch.diag_embed(S) - (M * inv_d[:, :, None]).transpose(1, 2) @ M
    rhs = (M.transpose(1, 2) @ (inv_d * gu)[..., None])[..., 0]
    if lam is not None:  # A is then positive definite on the lines with support (the others: rows of 0)
        empty = S == 0
        z = torch.linalg.solve(A + torch.diag_embed(empty.to(dt)), rhs)
        return (inv_d * (gu + (M @ z[..., None])[..., 0])).to(u.dtype)
    lam_, V, keep = _eig(A)
    z = _pinv_apply(lam_, V, keep, rhs)
    w = inv_d * (gu + (M @ z[..., None])[..., 0])
    P = (M @ torch.where(keep[:, None, :], 0.0, V)) * inv_d[..., None]  # K's null vectors (zero columns elsewhere)
    along = _pinv_apply(*_eig(P.transpose(1, 2) @ P), (P.transpose(1, 2) @ w[..., None])[..., 0])
    return (w - (P @ along[..., None])[..., 0]).to(u.dtype)


def _eig(K: torch.Tensor):
    """Eigenvalues, eigenvectors and the mask of those kept (above ``1e-12 n`` of the largest)
    of a symmetric positive semi-definite ``K`` (B, n, n)."""
    lam, V = torch.linalg.eigh(K)
    return lam, V, lam > lam[:, -1:].clamp(min=0) * (1e-12 * K.shape[-1])


def _pinv_apply(lam, V, keep, r: torch.Tensor) -> torch.Tensor:
    """``K^+ r`` from :func:`_eig`'s decomposition, ``r`` (B, n)."""
    coef = (V.transpose(1, 2) @ r[..., None])[..., 0]
    coef = torch.where(keep, coef / torch.where(keep, lam, 1.0), 0.0)
    return (V @ coef[..., None])[..., 0]


def newton(evaluate, gamma: float, theta: torch.Tensor, tol, max_iter, outside, entering,
           progress=None, c1: float = 1e-4, max_halvings: int = 8, patience: int = 10):
    """Minimize a batch of semi-duals of quadratically regularized OT by damped Newton steps.

    ``evaluate(theta) -> (f (B,), g (B, N), out, scale (B,))`` as :meth:`_Problem.evaluate`
    (``out`` its :class:`~otcore.reference_ksparse.KSparse` pass, every position in every
    line's slots). The objective is piecewise quadratic and once differentiable, with
    Hessian ``K`` (module docstring) on each piece. ``K`` is singular where the support
    falls apart (a connected part of it can shift its potentials at no curvature: the
    objective is linear along that shift until the support changes) and zero for a position
    in no line's support, so the step solves the damped system ``K_lam d = -g``
    (:func:`semi_dual_hessian_solve`; Levenberg-Marquardt: ``lam`` per problem, divided by
    10 after a full step down to ``LAM_MIN``, where the steps are Newton's and converge
    superlinearly, multiplied by 10 after a step halved below 1/4 and by 100 after none was
    accepted), with backtracking (Armijo, ``c1``, at most ``max_halvings`` halvings, and a
    rounding slack of ``16 eps scale`` so that a problem at its dtype's floor is not refused
    every step). A weighted position in no line's support is moved apart, to where it
    enters one (the damping's step, ``|g_i| gamma / lam``, has no scale to the distance):
    ``outside(out)`` (B,) counts them, and where there are any ``entering(theta, out)``
    (B, N) gives their steps (zero elsewhere).

    Stops a problem when ``|g|_1 <= tol`` (reason 0), on non-finite values (3), when the
    damping has grown past ``LAM_MAX`` without a step (2), or when ``|g|_1`` has not fallen
    1% below its best for ``patience`` iterations (5: stationary at the dtype's floor, not
    converged); else at ``max_iter`` (1; a number, or a (B,) host array of per-problem
    budgets, 0 allowed). One host synchronisation per trial (usually one per iteration).

    Returns ``(theta, aux, n_iter, grad_l1, converged, reason)`` as :func:`~otcore.solvers._lbfgs.lbfgs`.
    """
    B = theta.shape[0]
    dev, dt = theta.device, theta.dtype
    slack = 16 * torch.finfo(dt).eps
    tol_h = _on_host(tol, B)
    f, g, out, scale = evaluate(theta)
    f_h, g_h, s_h, out_h = _host.to_host(f, g.abs().sum(-1), scale, outside(out))
    reason = np.where(g_h <= tol_h, 0, np.where(np.isfinite(f_h) & np.isfinite(g_h), 1, 3))
    best, stale = g_h.copy(), np.zeros(B, np.int64)
    n_iter, lam = np.zeros(B, np.int64), np.full(B, LAM_START)
    cap = _budgets(max_iter, B)
    for _ in range(int(cap.max(initial=0))):
        active = (reason == 1) & (n_iter < cap)  # (reason 1 at the end: the problem's cap)
        if not active.any():
            break
        n_iter += active
        d = -semi_dual_hessian_solve(gamma, out.idx, out.vals > 0, g, _host.to_device(lam, dev))
        if (out_h[active] > 0).any():
            move = entering(theta, out)
            d = torch.where(move != 0, move, d)
        # off the constant: the objective does not change along it (equal masses), and in float32
        # the damped system turned the masses' rounding (sum g ~ 1e-7) into shifts of ~1/lam there
        # (30 x 12, gamma 0.01: mean potential -0.07 -> -2.6 in 3 steps, 11 of 30 converged, 24 without)
        d = d - d.mean(-1, keepdim=True)
        gd = (g * d).sum(-1)
        alpha, searching, slope = np.ones(B), active.copy(), None
        for trial in range(max_halvings + 1):
            step = d if trial == 0 else _host.to_device(alpha, dev).to(dt)[:, None] * d
            fc, gc, outc, sc = evaluate(theta + step)
            st = _host.to_host(fc, gc.abs().sum(-1), sc, outside(outc), *((gd,) if trial == 0 else ()))
            if trial == 0:
                slope = st[4]
            with np.errstate(invalid="ignore"):
                ok = searching & np.isfinite(st[0]) & np.isfinite(st[1]) & (
                    st[0] <= f_h + c1 * alpha * slope + slack * np.maximum(s_h, st[2]))
            if ok.all():  # (one problem, or all: no mask)
                theta, g, out = theta + step, gc, outc
            elif ok.any():
                mask = _host.to_device(ok, dev)
                theta, g, out = _where(mask, (theta + step, gc, outc), (theta, g, out))
            f_h, g_h, s_h, out_h = (np.where(ok, new, old) for new, old in zip(st[:4], (f_h, g_h, s_h, out_h)))
            searching &= ~ok
            if not searching.any():
                break
            alpha = np.where(searching, alpha / 2, alpha)
        taken = active & ~searching
        lam = np.where(taken & (alpha >= 1), np.maximum(lam / 10, LAM_MIN), lam)
        lam = np.where(taken & (alpha < 0.25), lam * 10, lam)
        lam = np.where(active & searching, lam * 100, lam)
        with np.errstate(invalid="ignore"):
            stale = np.where(taken & (g_h < 0.99 * best), 0, stale + active)
            best = np.fmin(best, g_h)
            reason = np.where(active & (lam > LAM_MAX), 2, reason)
            reason = np.where(active & (stale >= patience), 5, reason)
            reason = np.where(taken & (g_h <= tol_h), 0, reason)
        if progress is not None and progress.due():
            progress.update(int(n_iter.max()), float(np.nanmax(g_h[active])), None, "Newton")
    res = _host.to_device(np.stack([n_iter, g_h, reason == 0, reason]), dev)
    return theta, out, res[0].long(), res[1].to(dt), res[2] > 0, res[3].long()
