"""Batched L-BFGS for the sparsity-constrained OT duals (piecewise-quadratic, concave).

One L-BFGS per problem of a batch, run in lockstep on tensors with a leading batch
dimension; problems that stop early are frozen by masks, so the loop moves data to the
host only for the line search's "all accepted?" test, which also reads whether any
problem is left: one host synchronisation per trial, usually one per iteration.
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


def _direction(g, pairs, sy, yy, sg, yg, valid, h0):
    """``H g`` for the L-BFGS inverse-Hessian approximation ``H`` built from the valid pairs.

    Compact form (Byrd, Nocedal & Schnabel 1994, thm 2.2): with the pairs as the rows of
    ``S`` and ``Y`` (oldest first), ``R = triu(S Y^T)``, ``D = diag(S Y^T)``, ``H0 = h0 I``:
    ``H g = h0 g + S^T a + h0 Y^T b`` with ``b = -R^{-1} S g`` and
    ``a = R^{-T} ((D + h0 Y Y^T) R^{-1} S g - h0 Y g)``. Equal to the two-loop recursion, but
    as a dozen batched operations on ``(B, m, m)`` matrices, however long the memory (the
    two-loop's 4m vector operations are as many kernel launches on a GPU). An invalid pair
    gets an identity row in ``R`` and zero coefficients: it drops out exactly.

    ``pairs (B, 2m, D)``: ``S`` then ``Y``; ``sy``, ``yy (B, m, m)``: ``S Y^T``, ``Y Y^T``;
    ``sg``, ``yg (B, m)``: ``S g``, ``Y g``; ``valid (B, m)`` bool; ``h0 (B,)``.
    """
    # masks by selection, not products: an invalidated pair's rows stay in the memory
    out = ~valid
    out2 = out[:, :, None] | out[:, None, :]
    R = torch.triu(sy).masked_fill(out2, 0.0) + torch.diag_embed(out.to(sy.dtype))
    h = h0[:, None, None]
    z = torch.linalg.solve_triangular(R, sg.masked_fill(out, 0.0)[..., None], upper=True)  # R^{-1} S g
    D = torch.diagonal(sy, dim1=1, dim2=2).masked_fill(out, 0.0)
    rhs = D[..., None] * z + h * (yy.masked_fill(out2, 0.0) @ z - yg.masked_fill(out, 0.0)[..., None])
    a = torch.linalg.solve_triangular(R.transpose(1, 2), rhs, upper=False)
    return h0[:, None] * g + (pairs.transpose(1, 2) @ torch.cat([a, -h * z], 1))[..., 0]


def _push(pairs, sy, yy, valid, s_new, y_new, keep, g):
    """Drop the oldest pair and append ``(s_new, y_new)``, valid where ``keep`` and where the
    product's ``s.y`` (the diagonal of ``R``) is positive too (in float32 it can differ in
    sign from an elementwise sum at rounding level); a pair not kept is stored as zeros
    (never its values: they may be non-finite). Refreshes the Gram matrices' newest row and
    column, and ``S g``, ``Y g`` for the new gradient ``g``: one batched product with the
    memory. Returns ``(pairs, sy, yy, sg, yg, valid)``."""
    m = valid.shape[1]
    # rolling S and Y together sends the oldest s to Y's last row and the oldest y to S's
    # last row: exactly the two rows the new pair overwrites
    pairs = pairs.roll(-1, 1)
    pairs[:, m - 1] = s_new.masked_fill(~keep[:, None], 0.0)
    pairs[:, 2 * m - 1] = y_new.masked_fill(~keep[:, None], 0.0)
    prod = pairs @ torch.stack([pairs[:, 2 * m - 1], pairs[:, m - 1], g.to(pairs.dtype)], -1)  # (B, 2m, 3)
    sy, yy = sy.roll((-1, -1), (1, 2)), yy.roll((-1, -1), (1, 2))
    sy[:, :, m - 1] = prod[:, :m, 0]  # s_i . y_new
    sy[:, m - 1, :] = prod[:, m:, 1]  # s_new . y_j
    yy[:, :, m - 1] = yy[:, m - 1, :] = prod[:, m:, 0]
    valid = torch.cat([valid[:, 1:], (keep & (prod[:, m - 1, 0] > 0))[:, None]], 1)
    return pairs, sy, yy, prod[:, :m, 2], prod[:, m:, 2], valid


def lbfgs(
    evaluate, theta, h0: float, tol: float, ftol: float, max_iter: int, history: int, progress=None,
    max_step=math.inf, c1: float = 1e-4, c2: float = 0.9, max_ls: int = 40, window: int = 10,
    fscale=None, flat_converges=True, kick=0.0, max_kicks: int = 3, unit=None,
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

    ``unit`` (B,), optional: each problem's objective is minimized as ``f / unit`` (``h0``
    times ``unit``, ``tol`` over it; the steps are the same in exact arithmetic; ``fscale``
    then maps ``f / unit`` to its scale in the same units). An objective and gradient of
    size ``unit`` (a transport problem's mass) then stay near 1, and the memory's products
    ``y.y`` neither overflow (float32 masses above ~1e19) nor underflow.

    Returns ``(theta, aux, n_iter, grad_l1, converged, reason)`` with per-problem tensors.
    """
    B, D = theta.shape
    dev, dt = theta.device, theta.dtype
    h0 = torch.as_tensor(h0, dtype=dt, device=dev).expand(B)
    if unit is not None:
        evaluate, tol, h0, unit = _in_units(evaluate, tol, h0, unit.to(dt))
    slack = 16 * torch.finfo(dt).eps
    f, g, aux, scale = evaluate(theta)
    gnorm = g.abs().sum(-1)
    converged = gnorm <= tol
    finite = torch.isfinite(f) & torch.isfinite(gnorm)
    active = ~converged & finite
    stalled = torch.zeros_like(active)
    n_iter = torch.zeros(B, dtype=torch.long, device=dev)
    pairs = torch.zeros(B, 2 * history, D, dtype=dt, device=dev)  # memory: s_1..s_m, y_1..y_m
    sy = torch.zeros(B, history, history, dtype=dt, device=dev)
    yy, sg, yg = torch.zeros_like(sy), sy[:, 0], sy[:, 0]
    valid = torch.zeros(B, history, dtype=torch.bool, device=dev)
    hscale = h0.clone()
    grad_ok = converged.clone()
    kicks = torch.zeros(B, dtype=torch.long, device=dev)
    pattern = (torch.arange(D, device=dev, dtype=torch.float64) * 0.6180339887498949).frac().mul(2).sub(1).to(dt)
    kick = torch.as_tensor(kick, dtype=dt, device=dev).expand(B)
    flat_stop = torch.zeros_like(active)  # stationary without converging (flat_converges=False)
    recent = []  # objective values of the last `window` iterations
    recent_g = []  # and gradient norms (flat_converges=False: progress of the gradient counts too)
    finished = False
    for it in range(max_iter):
        # after the first iteration, the first trial's sync also reads whether any problem is
        # left (one host sync per iteration, not two); without trials, a sync of its own
        if (it == 0 or max_ls == 0) and not bool(active.any()):
            break
        d = -_direction(g, pairs, sy, yy, sg, yg, valid, hscale)
        gd = (g * d).sum(-1)
        reset = ~(gd < 0)  # not a descent direction: restart from scaled steepest descent (no sync)
        d = torch.where(reset[:, None], -h0[:, None] * g, d)
        gd = torch.where(reset, (g * d).sum(-1), gd)
        valid &= ~reset[:, None]
        t = torch.clamp(max_step / d.abs().amax(-1).clamp(min=torch.finfo(dt).tiny), max=1.0)
        done = ~active
        new = (theta, f, g, aux, scale, gnorm)
        # the trials' step-independent terms: Armijo's bound is ceiling + t * descent
        ceiling, descent, rise = f + slack * (scale + f.abs()), c1 * gd, c2 * gd
        exhausted, last = True, False
        reached = ~active  # problems whose accepted step meets the gradient test (they stop)
        for trial in range(max_ls):
            cand = theta + t[:, None] * d
            fc, gc, auxc, sc = evaluate(cand)
            trial_out = (cand, fc, gc, auxc, sc, gc.abs().sum(-1))
            armijo = ~done & torch.isfinite(fc) & (fc <= ceiling + t * descent)
            curv = (gc * d).sum(-1) >= rise  # weak Wolfe: the slope has risen enough
            ok = armijo & curv
            reached = reached | (ok & (trial_out[-1] <= tol))
            # the trial's one sync: all stepped? any problem left? will every one stop on this step?
            every, all_ok, live, last = torch.stack([(ok | done).all(), ok.all(), active.any(), reached.all()]).tolist()
            if not live:  # every problem stopped last iteration (ftol, a failed search): a spare trial
                finished = True
                break
            if every:  # every live problem takes a step
                new = trial_out if all_ok else _where(ok, trial_out, new)
                done, exhausted = done | ok, False
                break
            if trial == 0:
                lo, hi = torch.zeros_like(t), torch.full_like(t, math.inf)
                fallback, armijo_seen = new, torch.zeros_like(done)
            new = _where(ok, trial_out, new)
            fallback = _where(armijo, trial_out, fallback)
            armijo_seen |= armijo
            done |= ok
            # bracket [lo, hi]: too long where Armijo fails, too short where the slope is still steep
            hi = torch.where(~done & ~armijo, t, hi)
            lo = torch.where(armijo & ~ok, t, lo)
            t = torch.where(done, t, torch.where(torch.isinf(hi), 2.0 * t, 0.5 * (lo + hi)))
        if finished:
            break
        kicked = None
        if exhausted:
            if max_ls > 0:  # trials exhausted: fall back to the last step with sufficient decrease
                late = ~done & armijo_seen
                new = _where(late, fallback, new)
                done |= late
            failed = active & ~done
            kicked = failed & (kicks < max_kicks) & (kick > 0)
            if bool(kicked.any()):  # a kink: step off it along a fixed pattern, forget the memory
                cand = theta + kick[:, None] * pattern
                fk, gk, auxk, sk = evaluate(cand)
                new = _where(kicked, (cand, fk, gk, auxk, sk, gk.abs().sum(-1)), new)
                valid &= ~kicked[:, None]
                kicks += kicked
                done |= kicked
            stalled |= failed & ~kicked
        moved = active & done
        s_new, y_new = new[0] - theta, new[2] - g
        s_y = (s_new * y_new).sum(-1)
        keep = moved & (s_y > 1e-10 * s_new.norm(dim=-1) * y_new.norm(dim=-1))
        if kicked is not None:
            keep &= ~kicked
        pairs, sy, yy, sg, yg, valid = _push(pairs, sy, yy, valid, s_new, y_new, keep, new[2])
        keep, s_y, y_y = valid[:, -1], sy[:, -1, -1], yy[:, -1, -1]
        hscale = torch.where(keep, s_y / y_y.masked_fill(~keep, 1.0), hscale)
        theta, f, g, aux, scale, gnorm = new
        n_iter += moved
        grad_ok = grad_ok | (moved & (gnorm <= tol))
        recent.append(f)
        recent_g.append(gnorm)
        if len(recent) > window:
            old_f, old_g = recent.pop(0), recent_g.pop(0)
            conv_flat = flat_converges(aux) if callable(flat_converges) else torch.full_like(active, flat_converges)
            drop = torch.where(conv_flat, ftol, 0.0) * (scale + f.abs() if fscale is None else fscale(f))
            flat = moved & (old_f - f <= drop)
            # not converging on it (smooth): below f's resolution the gradient may still fall
            flat &= conv_flat | (torch.stack(recent_g).amin(0) > 0.99 * old_g)
            converged = converged | (active & (grad_ok | (flat & conv_flat)))
            flat_stop |= active & flat & ~converged
        else:  # no window yet: nothing is flat
            converged = converged | (active & grad_ok)
        active = active & moved & ~converged & ~flat_stop
        if progress is not None and progress.due():
            progress.update(it + 1, float((gnorm if unit is None else gnorm * unit).max()), None, "L-BFGS")
        if last:  # every problem met the gradient test on this step: no spare trial
            break
    if progress is not None:
        progress.close()
    reason = torch.where(grad_ok, 0, torch.where(converged, 4, torch.where(flat_stop, 5, torch.where(
        ~(torch.isfinite(f) & torch.isfinite(gnorm)), 3, torch.where(stalled, 2, 1)))))
    return theta, aux, n_iter, gnorm if unit is None else gnorm * unit, converged, reason


def _in_units(evaluate, tol, h0, unit):
    """``lbfgs``'s problem with every objective divided by ``unit`` (B,): the evaluation,
    the gradient test's ``tol`` and the inverse-Hessian scale ``h0``."""
    def scaled(theta):
        f, g, aux, scale = evaluate(theta)
        return f / unit, g / unit[:, None], aux, scale / unit
    return scaled, tol / unit, h0 * unit, unit
