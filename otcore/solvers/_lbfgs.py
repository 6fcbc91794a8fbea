"""Batched L-BFGS for the sparsity-constrained OT duals (piecewise-quadratic, concave).

One L-BFGS per problem of a batch, run in lockstep on tensors with a leading batch
dimension; problems that stop early are frozen by masks, so the loop never moves data to
the host except for the line search's "all accepted?" test and the stopping test.
"""

from __future__ import annotations

import math

import torch


def _where(mask: torch.Tensor, new, old):
    """Per-problem select on tensors (or tuples of tensors) with a leading batch dimension."""
    if isinstance(new, tuple):
        parts = [_where(mask, u, v) for u, v in zip(new, old)]
        return type(new)(*parts) if hasattr(new, "_fields") else tuple(parts)
    return torch.where(mask.reshape(-1, *([1] * (new.dim() - 1))), new, old)


def _two_loop(g, S, Y, rho, slots, h0):
    """L-BFGS two-loop recursion: ``H g`` from the pairs in ``slots`` (newest first)."""
    q = g.clone()
    coef = []
    for s in slots:
        c = rho[:, s] * (S[:, s] * q).sum(-1)
        q -= c[:, None] * Y[:, s]
        coef.append(c)
    r = h0[:, None] * q
    for s, c in zip(reversed(slots), reversed(coef)):
        bcoef = rho[:, s] * (Y[:, s] * r).sum(-1)
        r += (c - bcoef)[:, None] * S[:, s]
    return r


def lbfgs(
    evaluate, theta, h0: float, tol: float, ftol: float, max_iter: int, history: int, progress=None,
    max_step=math.inf, c1: float = 1e-4, c2: float = 0.9, max_ls: int = 40, window: int = 10,
    fscale=None, flat_converges=True, kick=0.0, max_kicks: int = 3,
):
    """Minimize a batch of functions with L-BFGS and a weak Wolfe line search.

    ``evaluate(theta) -> (f (B,), g (B, D), aux, scale (B,))``; ``aux`` is a tuple of
    batch-leading tensors carried along with the accepted iterate. The line search
    brackets a step with sufficient decrease (Armijo, ``c1``) and a risen slope (weak
    Wolfe, ``c2``), doubling or bisecting per problem (Lewis & Overton's choice for
    nonsmooth objectives: the curvature pairs stay informative across kinks); if the
    trials run out, the last step with sufficient decrease is taken. The Armijo test
    allows a rounding slack of ``16 eps |scale|`` so that a problem at the limit of its
    dtype does not stall the line search. A pair ``(s, y)`` enters the memory only
    when ``s.y > 0`` (the objective is piecewise quadratic and may be flat). The first
    trial step moves no coordinate by more than ``max_step`` (a number, or (B,) per problem):
    where the objective is nearly flat the quasi-Newton scaling ``s.y / y.y`` can be huge.

    Stops a problem when ``|g|_1 <= tol`` (reason 0) or when its objective improved by
    at most ``ftol * fscale(f)`` over the last ``window`` iterations (``fscale``: f (B,) ->
    a magnitude of the objective's variations (B,), by default ``scale + |f|``): reason 4, the
    optimum of a nonsmooth objective, where the gradient need not vanish, or the dtype's
    resolution; it counts as converged where ``flat_converges`` (a bool, or ``aux -> (B,)
    bool`` at the current iterate), else ``ftol`` is 0 there and it is reason 5
    (stationary, not converged: a smooth objective's gradient must vanish), and then the
    gradient norm must also not have fallen by 1% over the window (below the objective's
    float resolution the gradient is still measured accurately). Otherwise:
    1 = ``max_iter``, 2 = line search failed, 3 = non-finite values.

    Where the line search finds no step (at a kink, e.g. ties in a top-k selection, the
    gradient of one piece need not be a descent direction of the objective) and ``kick``
    (a number, or (B,) per problem) > 0, the iterate moves by ``kick`` times a fixed
    pattern in [-1, 1] (distinct per coordinate, so ties break), its memory is dropped, and
    the iterations go on; at most ``max_kicks`` times per problem, after which the problem
    stops with reason 2.

    Returns ``(theta, aux, n_iter, grad_l1, converged, reason)`` with per-problem tensors.
    """
    B, D = theta.shape
    dev, dt = theta.device, theta.dtype
    slack = 16 * torch.finfo(dt).eps
    f, g, aux, scale = evaluate(theta)
    gnorm = g.abs().sum(-1)
    converged = gnorm <= tol
    finite = torch.isfinite(f) & torch.isfinite(gnorm)
    active = ~converged & finite
    stalled = torch.zeros_like(active)
    n_iter = torch.zeros(B, dtype=torch.long, device=dev)
    S = torch.zeros(B, history, D, dtype=dt, device=dev)
    Y = torch.zeros_like(S)
    rho = torch.zeros(B, history, dtype=dt, device=dev)
    hscale = torch.full((B,), h0, dtype=dt, device=dev)
    filled, head = 0, 0
    grad_ok = converged.clone()
    kicks = torch.zeros(B, dtype=torch.long, device=dev)
    pattern = (torch.arange(D, device=dev, dtype=torch.float64) * 0.6180339887498949).frac().mul(2).sub(1).to(dt)
    kick = torch.as_tensor(kick, dtype=dt, device=dev).expand(B)
    flat_stop = torch.zeros_like(active)  # stationary without converging (flat_converges=False)
    recent = []  # objective values of the last `window` iterations
    recent_g = []  # and gradient norms (flat_converges=False: progress of the gradient counts too)
    for it in range(max_iter):
        if not bool(active.any()):
            break
        slots = [(head - 1 - i) % history for i in range(filled)]
        d = -_two_loop(g, S, Y, rho, slots, hscale)
        gd = (g * d).sum(-1)
        reset = ~(gd < 0)  # not a descent direction: restart from scaled steepest descent (no sync)
        d = torch.where(reset[:, None], -h0 * g, d)
        gd = torch.where(reset, (g * d).sum(-1), gd)
        rho = torch.where(reset[:, None], torch.zeros_like(rho), rho)
        t = torch.clamp(max_step / d.abs().amax(-1).clamp(min=torch.finfo(dt).tiny), max=1.0)
        lo = torch.zeros_like(t)
        hi = torch.full_like(t, math.inf)
        done = ~active
        armijo_seen = torch.zeros_like(done)
        new = (theta, f, g, aux, scale)
        fallback = new
        exhausted = True
        for _ in range(max_ls):
            cand = theta + t[:, None] * d
            fc, gc, auxc, sc = evaluate(cand)
            armijo = ~done & torch.isfinite(fc) & (fc <= f + c1 * t * gd + slack * (scale + f.abs()))
            curv = (gc * d).sum(-1) >= c2 * gd  # weak Wolfe: the slope has risen enough
            ok = armijo & curv
            if bool((ok | done).all()):  # every live problem takes a step (the trial's one sync)
                new, done = _where(ok, (cand, fc, gc, auxc, sc), new), done | ok
                exhausted = False
                break
            new = _where(ok, (cand, fc, gc, auxc, sc), new)
            fallback = _where(armijo, (cand, fc, gc, auxc, sc), fallback)
            armijo_seen |= armijo
            done |= ok
            # bracket [lo, hi]: too long where Armijo fails, too short where the slope is still steep
            hi = torch.where(~done & ~armijo, t, hi)
            lo = torch.where(armijo & ~ok, t, lo)
            t = torch.where(done, t, torch.where(torch.isinf(hi), 2.0 * t, 0.5 * (lo + hi)))
        # trials exhausted: fall back to the last step with sufficient decrease
        late = ~done & armijo_seen
        new = _where(late, fallback, new)
        done |= late
        failed = active & ~done
        kicked = failed & (kicks < max_kicks) & (kick > 0)
        # (a search that ended early left every problem done: nothing to kick, no sync)
        if exhausted and bool(kicked.any()):  # a kink: step off it along a fixed pattern, forget the memory
            cand = theta + kick[:, None] * pattern
            new = _where(kicked, (cand, *evaluate(cand)), new)
            rho = torch.where(kicked[:, None], torch.zeros_like(rho), rho)
            kicks += kicked
            done |= kicked
        moved = active & done
        stalled |= failed & ~kicked
        s_new, y_new = new[0] - theta, new[2] - g
        sy = (s_new * y_new).sum(-1)
        keep = moved & ~kicked & (sy > 1e-10 * s_new.norm(dim=-1) * y_new.norm(dim=-1))
        S[:, head] = torch.where(keep[:, None], s_new, S[:, head])
        Y[:, head] = torch.where(keep[:, None], y_new, Y[:, head])
        rho[:, head] = torch.where(keep, 1.0 / torch.where(keep, sy, torch.ones_like(sy)), torch.zeros_like(sy))
        hscale = torch.where(keep, sy / torch.where(keep, (y_new * y_new).sum(-1), torch.ones_like(sy)), hscale)
        head, filled = (head + 1) % history, min(filled + 1, history)
        theta, f, g, aux, scale = new
        n_iter += moved
        gnorm = g.abs().sum(-1)
        grad_ok = grad_ok | (moved & (gnorm <= tol))
        recent.append(f)
        recent_g.append(gnorm)
        flat = torch.zeros_like(active)
        conv_flat = flat_converges(aux) if callable(flat_converges) else torch.full_like(active, flat_converges)
        if len(recent) > window:
            old_f, old_g = recent.pop(0), recent_g.pop(0)
            drop = torch.where(conv_flat, ftol, 0.0) * (scale + f.abs() if fscale is None else fscale(f))
            flat = moved & (old_f - f <= drop)
            # not converging on it (smooth): below f's resolution the gradient may still fall
            flat &= conv_flat | (torch.stack(recent_g).amin(0) > 0.99 * old_g)
        converged = converged | (active & (grad_ok | (flat & conv_flat)))
        flat_stop |= active & flat & ~converged
        active = active & moved & ~converged & ~flat_stop
        if progress is not None and progress.due():
            progress.update(it + 1, float(gnorm.max()), None, "L-BFGS")
    if progress is not None:
        progress.close()
    reason = torch.where(grad_ok, 0, torch.where(converged, 4, torch.where(flat_stop, 5, torch.where(
        ~(torch.isfinite(f) & torch.isfinite(gnorm)), 3, torch.where(stalled, 2, 1)))))
    return theta, aux, n_iter, gnorm, converged, reason
