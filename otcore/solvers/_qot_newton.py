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

Where ``N`` or ``L`` is small (a router's experts) systems in ``K`` are solved directly
(:func:`semi_dual_hessian_solve`: the implicit plan gradient, and Newton's steps); Newton's
steps past ``DIRECT_MAX`` positions by conjugate gradient on the support
(:func:`semi_dual_hessian_cg`, matrix-free: ``O(L s)`` per product, ``s`` the widest line's
support). Where no line's cardinality constraint can bind (quadratically regularized OT,
``k`` >= ``N``; the objective is then piecewise quadratic and once differentiable) the
solve itself is by semismooth Newton steps (:func:`newton`): tens of passes over the costs
instead of L-BFGS's hundreds.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import _host
from .._cg import pcg
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
#: the start in a stage of the continuation in gamma, where the support shrinks from the last
#: stage's and 1e-3 cost the first step 8 halvings (300 x 200 clouds, gamma 1e-3, float64: 240
#: passes over the costs; 184 with the gain-ratio rule below, 124 with both). Not for a solve
#: without stages: the router's seed took one Newton step more from 0.1 (4096 x 8: 3 against 2)
LAM_STAGE = 0.1
#: the gain ratio (actual over predicted decrease of the objective) above which a full step
#: lowers the damping, and below which a step raises it (Levenberg-Marquardt's usual 3/4, 1/4)
RHO_LOWER, RHO_RAISE = 0.75, 0.25
#: :func:`semi_dual_hessian_cg`: the relative (preconditioned) residual that ends it, and its
#: cap: an inexact Newton step; on 300 x 200 clouds ~30 CG products per step, and the same
#: Newton iterations as the direct solve to 1e-9. :func:`newton` tightens it with the gradient
#: (``CG_RTOL`` times the gradient norm's fall since its start, down to ``CG_RTOL_MIN`` steps of
#: the dtype): with weights spanning 1e-6 a fixed 1e-3 stalled Newton at a gradient norm of
#: 3.6e-8 where the direct solve converged to 1e-9 (a review's 120 x 50)
CG_RTOL, CG_MAX, CG_RTOL_MIN = 1e-3, 500, 100
#: :func:`newton` stops as stationary after ``patience`` steps that neither lowered the gradient
#: norm 1% below its best nor took ``FLAT`` of the objective's decrease so far off it (over those
#: steps). The gradient alone stopped solves whose first steps raised it while the objective fell
#: (a review: 1000 x 800 clouds at gamma 10-20, |g| 0.6 -> 1.8 -> 0.6 in 10 steps that took 12-81%
#: of the decrease so far, then converged in 22); any decrease let near-linear programs creep for
#: thousands of steps taking 0.03-1% each, where L-BFGS is the faster way on (90 x 110 at gamma x
#: weight 7e-7 of the costs' range: 3000 Newton steps to |g| 15 where L-BFGS converged in 2755)
FLAT = 0.02


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
    sup = support.to(dt)
    # M is never built whole: N x L in float64 is more than the dense cost on semi-discrete
    # problems (200,000 x 64 clouds: +166 MiB, a review). D, S and M's products are the
    # support's scatters and gathers; K and A are summed from slices of M's columns or rows.
    D = torch.zeros(B, N, dtype=dt, device=u.device).scatter_add_(1, idx.reshape(B, -1), sup.reshape(B, -1))
    S = sup.sum(2)
    if lam is not None:
        lam = lam.to(dt)[:, None]
        D = D * (1 + lam) + lam * (D == 0)
    inv_d = torch.where(D > 0, 1 / torch.where(D > 0, D, 1.0), 0.0)
    gu = gamma * u.to(dt)
    if N <= L:
        inv_s = torch.where(S > 0, 1 / S.clamp(min=1), 0.0)
        K = torch.diag_embed(D)
        for l0, l1 in _slices(L, N):  # K -= M_c diag(1/|S|) M_c^T over slices of M's columns
            Mc = torch.zeros(B, N, l1 - l0, dtype=dt, device=u.device).scatter_(
                1, idx[:, l0:l1].transpose(1, 2), sup[:, l0:l1].transpose(1, 2))
            K = K - (Mc * inv_s[:, None, l0:l1]) @ Mc.transpose(1, 2)
        w = _pinv_apply(*_eig(K), gu) if lam is None else torch.linalg.solve(K, gu)
        return w.to(u.dtype).contiguous()  # (batch-exact: see the end)
    A, G = torch.diag_embed(S), torch.zeros(B, L, L, dtype=dt, device=u.device)
    for rows, Mr in _incidence_rows(idx, sup, N):  # A -= M_r^T D^-1 M_r, G += M_r^T D^-2 M_r over slices of M's rows
        scaled = Mr * inv_d[:, rows, None]
        A, G = A - scaled.transpose(1, 2) @ Mr, G + scaled.transpose(1, 2) @ scaled
    rhs = _lines_times(idx, sup, inv_d * gu)  # M^T D^-1 gamma u
    if lam is not None:  # A is then positive definite on the lines with support (the others: rows of 0)
        empty = S == 0
        z = torch.linalg.solve(A + torch.diag_embed(empty.to(dt)), rhs)
        return (inv_d * (gu + _times_lines(idx, sup, z[:, :, None], N)[..., 0])).to(u.dtype).contiguous()
    lam_, V, keep = _eig(A)
    z = _pinv_apply(lam_, V, keep, rhs)
    w = inv_d * (gu + _times_lines(idx, sup, z[:, :, None], N)[..., 0])
    # w projected off K's null vectors P = D^-1 M V0 (V0: A's null vectors), through the lines:
    # P^T P = V0^T G V0, P^T w = V0^T M^T D^-1 w, P c = D^-1 M (V0 c) (P has N x #nulls entries)
    V0 = torch.where(keep[:, None, :], 0.0, V)
    PtP = ((V0[:, :, :, None] * G[:, :, None, :]).sum(1)[:, :, :, None] * V0[:, None, :, :]).sum(2)
    along = _pinv_apply(*_eig(PtP), (V0 * _lines_times(idx, sup, inv_d * w)[:, :, None]).sum(1))
    along = inv_d * _times_lines(idx, sup, (V0 * along[:, None, :]).sum(-1)[:, :, None], N)[..., 0]
    # batch-exact: contiguous (LAPACK's results come column-major in a batch, and a row's sum
    # over such a strided tensor rounds otherwise than alone), and matrix-vector products as
    # sums of elementwise products (a batched product rounded 5e-18 otherwise than one alone).
    # Newton's steps differed from a solve alone by 1e-18, which L-BFGS at a kink of a relaxed
    # start turned into plans 1.8e-9 (and, past a review, 1.6e-2) apart
    return (w - along).to(u.dtype).contiguous()


#: Entries of M's slices (float64: 8 MiB) in :func:`semi_dual_hessian_solve`.
SLICE_ENTRIES = 2**20


def _slices(total: int, width: int):
    """``(start, stop)`` over ``range(total)`` in steps holding ``SLICE_ENTRIES`` of ``width`` each."""
    step = max(1, SLICE_ENTRIES // max(1, width))
    return ((s, min(total, s + step)) for s in range(0, total, step))


def _incidence_rows(idx: torch.Tensor, sup: torch.Tensor, N: int):
    """Yield ``(rows, M[:, rows])`` over slices of the rows of the position x line incidence
    ``M`` (B, N, L) of the support ``idx``, ``sup`` (B, L, k): its entries sorted by position
    once, each slice filled from its own window of them (re-scanning the whole support per
    slice had made a wide support, k ~ N, quadratic: 64 lines of 400,000 in 21 s against the
    dense incidence's 1.6 s, a review). One host read, for the windows' widths."""
    B, L, k = idx.shape
    pos, order = torch.sort(idx.reshape(B, -1), dim=1, stable=True)  # (lines and values read per window)
    slices = list(_slices(N, L))
    starts = torch.tensor([n0 for n0, _ in slices] + [N], dtype=pos.dtype, device=pos.device)
    bounds = torch.searchsorted(pos, starts.expand(B, -1).contiguous())  # (B, slices + 1)
    widths = (bounds[:, 1:] - bounds[:, :-1]).amax(0).tolist()
    for i, ((n0, n1), width) in enumerate(zip(slices, widths)):
        at = bounds[:, i, None] + torch.arange(width, device=pos.device)
        inside = at < bounds[:, i + 1, None]
        at = at.clamp(max=pos.shape[1] - 1)
        entry = torch.gather(order, 1, at)
        # an entry outside the window adds 0 (to a real slot: a line holds a position once)
        flat = torch.where(inside, torch.gather(pos, 1, at) - n0, 0) * L + entry // k
        rows = torch.zeros(B, (n1 - n0) * L, dtype=sup.dtype, device=sup.device)
        value = torch.where(inside, torch.gather(sup.reshape(B, -1), 1, entry), 0.0)
        yield slice(n0, n1), rows.scatter_add_(1, flat, value).view(B, n1 - n0, L)


def _lines_times(idx: torch.Tensor, sup: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``M^T v`` (B, L) for ``v`` (B, N) on the positions: each line's support entries times
    ``v`` at their positions, summed."""
    return (sup * torch.gather(v, 1, idx.reshape(idx.shape[0], -1)).reshape(idx.shape)).sum(2)


def _times_lines(idx: torch.Tensor, sup: torch.Tensor, Z: torch.Tensor, N: int) -> torch.Tensor:
    """``M Z`` (B, N, c) for ``Z`` (B, L, c) on the lines: each support entry adds its value
    times its line's row of ``Z`` to its position."""
    B, L, k = idx.shape
    c = Z.shape[2]
    terms = (sup[..., None] * Z[:, :, None, :]).reshape(B, L * k, c)
    out = torch.zeros(B, N, c, dtype=terms.dtype, device=terms.device)
    return out.scatter_add_(1, idx.reshape(B, L * k, 1).expand(B, L * k, c), terms)


def _eig(K: torch.Tensor):
    """Eigenvalues, eigenvectors and the mask of those kept (above ``1e-12 n`` of the largest)
    of a symmetric positive semi-definite ``K`` (B, n, n)."""
    lam, V = torch.linalg.eigh(K)
    return lam, V, lam > lam[:, -1:].clamp(min=0) * (1e-12 * K.shape[-1])


def _pinv_apply(lam, V, keep, r: torch.Tensor) -> torch.Tensor:
    """``K^+ r`` from :func:`_eig`'s decomposition, ``r`` (B, n)."""
    coef = (V * r[:, :, None]).sum(1)  # (products as sums: batch-exact, see semi_dual_hessian_solve)
    coef = torch.where(keep, coef / torch.where(keep, lam, 1.0), 0.0)
    return (V * coef[:, None, :]).sum(-1)


def semi_dual_hessian_cg(gamma: float, idx: torch.Tensor, support: torch.Tensor, u: torch.Tensor,
                         lam: Optional[torch.Tensor], width: int, rtol=CG_RTOL, max_iter: int = CG_MAX,
                         active: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w, its)``: ``w ~ K_lam^-1 u`` (B, N) for the damped system of :func:`semi_dual_hessian_solve`
    (``lam`` (B,) > 0), by Jacobi-preconditioned conjugate gradient (:func:`otcore._cg.pcg`,
    to ``rtol``, a number or (B,) per problem; ``active`` (B,) bool: the others get 0 and do
    not keep the batch's iterations going); with ``lam`` None, ``w ~ K^+ u`` for ``u`` in
    ``K``'s range, by conjugate gradient without a preconditioner (from 0 its iterates stay
    in the range: the minimum-norm solution, as :func:`semi_dual_hessian_solve`'s; a
    diagonal preconditioner would add a part along ``K``'s null directions, which moves the
    weights' gradients).

    Both without forming ``K``: on the support compacted to ``width`` slots per line
    (``width`` >= every line's support size, a host number), a product
    ``K_lam v = (D_lam v - M diag(1/|S|) M^T v) / gamma`` is a gather, a sum per line and a
    scatter, ``O(L width)``. ``K_lam``'s diagonal is
    ``(D_lam_i - sum_{l ni i} 1/|S_l|) / gamma`` (positive: ``D_lam > D`` and a line holds
    ``i`` once). Stopped early (an inexact Newton step), ``w`` is still a descent direction:
    conjugate gradient's iterates from 0 are.
    """
    B, L, _ = idx.shape
    width = max(1, min(int(width), idx.shape[2]))
    on, slot = torch.topk(support.to(u.dtype), width, dim=-1)  # the support's slots first
    pos = torch.gather(idx, 2, slot).reshape(B, L * width)
    size = on.sum(-1)
    share = on * torch.where(size > 0, 1 / size.clamp(min=1), 0.0)[..., None]  # 1/|S_l| on line l's support

    def spread(t):  # (B, L, width) -> (B, N): summed over the lines holding each position
        return torch.zeros_like(u).scatter_add_(1, pos, t.reshape(B, L * width))

    D = spread(on)
    if lam is not None:
        lam = lam.to(u.dtype)[:, None]
        D = D * (1 + lam) + lam * (D == 0)

    def K(v):
        along = (torch.gather(v, 1, pos).reshape(B, L, width) * on).sum(-1)  # M^T v
        return (D * v - spread(share * along[..., None])) / gamma

    inv_diag = None if lam is None else gamma / (D - spread(share))
    return pcg(K, u, rtol, max_iter, inv_diag=inv_diag, active=active)


def newton(evaluate, gamma: float, theta: torch.Tensor, tol, max_iter, outside, entering,
           progress=None, lam_start=LAM_START, c1: float = 1e-4, max_halvings: int = 8,
           patience: int = 10):
    """Minimize a batch of semi-duals of quadratically regularized OT by damped Newton steps.

    ``evaluate(theta) -> (f (B,), g (B, N), out, scale (B,))`` as :meth:`_Problem.evaluate`
    (``out`` its :class:`~otcore.reference_ksparse.KSparse` pass, every position in every
    line's slots). The objective is piecewise quadratic and once differentiable, with
    Hessian ``K`` (module docstring) on each piece. ``K`` is singular where the support
    falls apart (a connected part of it can shift its potentials at no curvature: the
    objective is linear along that shift until the support changes) and zero for a position
    in no line's support, so the step solves the damped system ``K_lam d = -g``
    (:func:`semi_dual_hessian_solve` up to ``DIRECT_MAX`` positions, else
    :func:`semi_dual_hessian_cg`; Levenberg-Marquardt: ``lam`` per problem from
    ``lam_start`` (a number or a (B,) host array), divided by 10 after a full step whose
    decrease was at least ``RHO_LOWER`` of the quadratic model's, down to ``LAM_MIN``, where
    the steps are Newton's and converge superlinearly; multiplied by 10 after a step halved
    below 1/4 or one that gained less than ``RHO_RAISE`` of the model's, and by 100 after
    none was accepted), with backtracking (Armijo, ``c1``, at most ``max_halvings``
    halvings, and a rounding slack of ``16 eps scale`` so that a problem at its dtype's floor is not refused
    every step; a trial that passes only by that slack must lower ``|g|_1``: below the
    objective's resolution its decrease says nothing, and float32 steps taken on it alone
    wandered, the gradient norm rising up to 7x on some, stalling at 1.9e-3 where this
    reaches 1.0e-5: ``test_newton_float32_below_the_objectives_resolution``). A weighted
    position in no line's support is moved apart, to where it enters one (the damping's step, ``|g_i| gamma / lam``, has no scale to the distance):
    ``outside(out)`` (B,) counts them, and where there are any ``entering(theta, out)``
    (B, N) gives their steps (zero elsewhere).

    Stops a problem when ``|g|_1 <= tol`` (reason 0), on non-finite values (3), when the
    damping has grown past ``LAM_MAX`` without a step (2), or after ``patience`` iterations
    in which ``|g|_1`` did not fall 1% below its best while the objective fell by less than
    ``FLAT`` of its decrease since the start (5: stationary, not converged; the iterate
    returned is then the one of least ``|g|_1``, one more evaluation where it is not the
    last); else at ``max_iter`` (1; a number, or a (B,) host array of per-problem budgets,
    0 allowed). One host synchronisation per trial (usually one per iteration).

    Returns ``(theta, aux, n_iter, grad_l1, converged, reason)`` as :func:`~otcore.solvers._lbfgs.lbfgs`.
    """
    B = theta.shape[0]
    dev, dt = theta.device, theta.dtype
    slack = 16 * torch.finfo(dt).eps
    tol_h = _on_host(tol, B)
    cg = theta.shape[1] > DIRECT_MAX

    def probe(out):  # (B,) each: weighted positions in no support, and for CG the widest line's support
        return (outside(out), (out.vals > 0).sum(-1).amax(-1)) if cg else (outside(out),)

    f, g, out, scale = evaluate(theta)
    f_h, g_h, s_h, *held = _host.to_host(f, g.abs().sum(-1), scale, *probe(out))  # held: [outside, (width)]
    reason = np.where(g_h <= tol_h, 0, np.where(np.isfinite(f_h) & np.isfinite(g_h), 1, 3))
    best, stale, g_first, f_first = g_h.copy(), np.zeros(B, np.int64), g_h.copy(), f_h.copy()
    f_past, theta_best = [f_h], theta  # the objective at each of the last patience iterations; the best iterate
    n_iter, lam = np.zeros(B, np.int64), _on_host(lam_start, B)
    cap = _budgets(max_iter, B)
    for _ in range(int(cap.max(initial=0))):
        active = (reason == 1) & (n_iter < cap)  # (reason 1 at the end: the problem's cap)
        if not active.any():
            break
        n_iter += active
        lam_d = _host.to_device(lam, dev)
        if cg:  # per problem: another one's tolerance must not change this one's steps (a review)
            with np.errstate(invalid="ignore", divide="ignore"):
                rtol = np.clip(CG_RTOL * g_h / g_first, CG_RTOL_MIN * torch.finfo(dt).eps, CG_RTOL)
            d = -semi_dual_hessian_cg(gamma, out.idx, out.vals > 0, g, lam_d, int(held[1].max()),
                                      rtol=_host.to_device(np.nan_to_num(rtol, nan=CG_RTOL), dev).to(dt),
                                      active=_host.to_device(active, dev))[0]
        else:
            d = -semi_dual_hessian_solve(gamma, out.idx, out.vals > 0, g, lam_d)
        if (held[0][active] > 0).any():
            move = entering(theta, out)
            d = torch.where(move != 0, move, d)
        # off the constant: the objective does not change along it (equal masses), and in float32
        # the damped system turned the masses' rounding (sum g ~ 1e-7) into shifts of ~1/lam there
        # (30 x 12, gamma 0.01: mean potential -0.07 -> -2.6 in 3 steps, 11 of 30 converged, 24 without)
        d = d - d.mean(-1, keepdim=True)
        gd = (g * d).sum(-1)
        f_start = f_h
        alpha, searching, slope = np.ones(B), active.copy(), None
        for trial in range(max_halvings + 1):
            step = d if trial == 0 else _host.to_device(alpha, dev).to(dt)[:, None] * d
            fc, gc, outc, sc = evaluate(theta + step)
            st = _host.to_host(fc, gc.abs().sum(-1), sc, *probe(outc), *((gd,) if trial == 0 else ()))
            if trial == 0:
                slope = st[-1]
            with np.errstate(invalid="ignore"):
                armijo = st[0] <= f_h + c1 * alpha * slope
                within = st[0] <= f_h + c1 * alpha * slope + slack * np.maximum(s_h, st[2])
                ok = searching & np.isfinite(st[0]) & np.isfinite(st[1]) & (armijo | (within & (st[1] < g_h)))
            if ok.all():  # (one problem, or all: no mask)
                theta, g, out = theta + step, gc, outc
            elif ok.any():
                mask = _host.to_device(ok, dev)
                theta, g, out = _where(mask, (theta + step, gc, outc), (theta, g, out))
            f_h, g_h, s_h, *held = (np.where(ok, new, old) for new, old in zip(st, (f_h, g_h, s_h, *held)))
            searching &= ~ok
            if not searching.any():
                break
            alpha = np.where(searching, alpha / 2, alpha)
        taken = active & ~searching
        # the gain ratio: the decrease against the quadratic model's, -alpha g.d (1 - alpha/2) (its
        # minimum at alpha = 1 where the step is Newton's; the damping's and the support's
        # changes make the model optimistic, and the ratio says by how much). Taken as 1 where the
        # model's decrease is within the objective's rounding: there the ratio is noise, and it
        # raised the damping step after step (float32 at its floor: to LAM_MAX, where the solve
        # stopped at 10x the gradient norm L-BFGS reached)
        model = -alpha * slope * (1 - alpha / 2)
        with np.errstate(invalid="ignore", divide="ignore"):
            rho = np.where(model > slack * s_h, (f_start - f_h) / model, 1.0)
        lam = np.where(taken & (alpha >= 1) & (rho >= RHO_LOWER), np.maximum(lam / 10, LAM_MIN), lam)
        lam = np.where(taken & ((alpha < 0.25) | ~(rho >= RHO_RAISE)), lam * 10, lam)
        lam = np.where(active & searching, lam * 100, lam)
        with np.errstate(invalid="ignore"):
            stale = np.where(taken & (g_h < 0.99 * best), 0, stale + active)
            f_past = (f_past + [f_h])[-patience - 1:]
            flat = f_past[0] - f_h <= FLAT * np.maximum(f_first - f_h, 0)  # (FLAT, above: the last steps' share)
            better = g_h < best
            best = np.fmin(best, g_h)
            reason = np.where(active & (lam > LAM_MAX), 2, reason)
            reason = np.where(active & (stale >= patience) & flat, 5, reason)
            reason = np.where(taken & (g_h <= tol_h), 0, reason)
        if better.all():  # (no copy: theta is replaced, never written to)
            theta_best = theta
        elif better.any():
            theta_best = _where(_host.to_device(better, dev), theta, theta_best)
        if progress is not None and progress.due():
            progress.update(int(n_iter.max()), float(np.nanmax(g_h[active])), None, "Newton")
    back = ((reason == 2) | (reason == 5)) & (best < g_h)  # stalled past their best iterate: back to it
    if back.any():
        _, _, out_best, _ = evaluate(theta_best)
        theta, out = _where(_host.to_device(back, dev), (theta_best, out_best), (theta, out))
        g_h = np.where(back, best, g_h)
    res = _host.to_device(np.stack([n_iter, g_h, reason == 0, reason]), dev)
    return theta, out, res[0].long(), res[1].to(dt), res[2] > 0, res[3].long()
