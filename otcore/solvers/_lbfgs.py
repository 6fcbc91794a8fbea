"""Batched L-BFGS for the sparsity-constrained OT duals (piecewise-quadratic, concave).

One L-BFGS per problem of a batch, run in lockstep on tensors with a leading batch
dimension; problems that stop early are frozen by masks. The vectors (iterates,
gradients, the memory) stay on the device; each line-search trial sends its per-problem
numbers to the host in one transfer, where the line search and the stopping rules decide:
one host synchronisation per trial, usually one per iteration.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from . import _host


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
    """Drop the oldest pair and append ``(s_new, y_new)``, valid where ``keep`` (None: every
    problem) and where its curvature ``s.y`` from the product exceeds ``1e-10 |s| |y|`` (in
    float32 the product's ``s.y`` can differ in sign from an elementwise sum at rounding
    level; a problem that did not move has ``s = y = 0`` and no valid pair). A pair not kept
    is stored as zeros (never its values: they may be non-finite). Refreshes the Gram
    matrices' newest row and column, and ``S g``, ``Y g`` for the new gradient ``g``: one
    batched product with the memory. Returns ``(pairs, sy, yy, sg, yg, valid)``."""
    m = valid.shape[1]
    if keep is not None:
        s_new, y_new = s_new.masked_fill(~keep[:, None], 0.0), y_new.masked_fill(~keep[:, None], 0.0)
    # rolling S and Y together sends the oldest s to Y's last row and the oldest y to S's
    # last row: exactly the two rows the new pair overwrites
    pairs = pairs.roll(-1, 1)
    pairs[:, m - 1] = s_new
    pairs[:, 2 * m - 1] = y_new
    prod = pairs @ torch.stack([pairs[:, 2 * m - 1], pairs[:, m - 1], g.to(pairs.dtype)], -1)  # (B, 2m, 3)
    sy, yy = sy.roll((-1, -1), (1, 2)), yy.roll((-1, -1), (1, 2))
    sy[:, :, m - 1] = prod[:, :m, 0]  # s_i . y_new
    sy[:, m - 1, :] = prod[:, m:, 1]  # s_new . y_j
    yy[:, :, m - 1] = yy[:, m - 1, :] = prod[:, m:, 0]
    curv, ss, y2 = prod[:, m - 1, 0], prod[:, m - 1, 1], prod[:, 2 * m - 1, 0]
    ok = curv > 1e-10 * (ss * y2).sqrt()
    if keep is not None:
        ok &= keep
    valid = torch.cat([valid[:, 1:], ok[:, None]], 1)
    return pairs, sy, yy, prod[:, :m, 2], prod[:, m:, 2], valid


def _on_host(x, B: int) -> np.ndarray:
    """A number or a (B,) tensor as a (B,) float64 host array (read once per solve)."""
    if isinstance(x, torch.Tensor):
        x = _host.host_array(x.double())
    return np.broadcast_to(np.asarray(x, dtype=np.float64), (B,)).copy()


def memory_pairs(history: int, max_iter: int) -> int:
    """Pairs the memory is allocated for: at most one enters per iteration, so a memory
    longer than the budget would hold only zeros (history=10**6 had asked torch for two
    (B, 10**6, 10**6) matrices, a review)."""
    return max(1, min(history, max_iter))


def check_history(history: int, max_iter: int, theta: torch.Tensor) -> None:
    """``ValueError`` naming ``history`` where the memory for ``theta`` (B, D) (``2 h D + 2
    h^2`` numbers per problem, ``h`` = :func:`memory_pairs`) exceeds the device's memory
    (its total: the GPU's, or the machine's physical memory), before any pass."""
    B, D = theta.shape
    h = memory_pairs(history, max_iter)
    need = B * (2 * h * D + 2 * h * h) * theta.element_size()
    have = _memory_of(theta.device)
    if need > have:
        raise ValueError(f"history={history}: the L-BFGS memory, {B} x (2 x {h} x {D} + 2 x {h}^2) numbers "
                         f"({need / 2**30:.3g} GiB), exceeds the {have / 2**30:.3g} GiB of {theta.device}: give a "
                         f"shorter history (or max_iter, which bounds the pairs kept)")


def _memory_of(device: torch.device) -> float:
    """Total bytes of ``device``'s memory (inf where it cannot be read)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[1])
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # (no sysconf, or not these names: Windows, some BSDs)
        return math.inf


def _budgets(max_iter, B: int) -> np.ndarray:
    """``max_iter`` (a number, or a (B,) host array of per-problem budgets) as (B,) int64."""
    return _on_host(max_iter, B).astype(np.int64)


def _pick(mask: np.ndarray, new: tuple, old: tuple) -> tuple:
    """Per-problem select on tuples of host arrays."""
    return tuple(np.where(mask, u, v) for u, v in zip(new, old))


def lbfgs(
    evaluate, theta, h0, tol, ftol: float, max_iter, history: int, progress=None,
    max_step=math.inf, c1: float = 1e-4, c2: float = 0.9, max_ls: int = 40, window: int = 10, patience: int = 30,
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
    at most ``ftol * scale(f)`` over the last ``window`` iterations (``fscale``: None for
    ``scale + |f|``, or ``(offset, extra)`` (B,) for ``|f + offset| + extra``, a magnitude
    of the objective's variations): reason 4, the optimum of a nonsmooth objective, where
    the gradient need not vanish, or the dtype's resolution; it counts as converged where
    ``flat_converges`` (a bool, or ``(theta, aux) -> (B,) bool`` at the current iterate, asked
    only at an iteration where this test would stop some problem: it may cost a pass), else
    ``ftol`` is 0 there and it is reason 5 (stationary, not converged: a smooth objective's
    gradient must vanish), and then the gradient norm must also not have fallen 1% over
    the window nor 1% below its best for ``patience`` iterations (below the objective's
    float resolution the gradient is still measured accurately, and falls unevenly: the
    window alone stopped float64 solves of quadratically regularized OT 2-26x above a
    ``tol`` they went on to reach; the best alone stopped float32 ones whose gradient rose
    for a while after an early low, 10-400x above it). Otherwise: 1 = ``max_iter`` (a
    number, or a (B,) host array of per-problem budgets, 0 allowed), 2 = line search
    failed, 3 = non-finite values.

    Where the line search finds no step (at a kink, e.g. ties in a top-k selection, the
    gradient of one piece need not be a descent direction of the objective) and ``kick``
    (a number, or (B,) per problem) > 0, the iterate moves by ``kick`` times a fixed
    pattern in [-1, 1] (distinct per coordinate, so ties break), its memory is dropped, and
    the iterations go on; at most ``max_kicks`` times per problem, after which the problem
    stops with reason 2.

    ``unit`` (B,), optional: each problem's objective is minimized as ``f / unit`` (``h0``
    times ``unit``, ``tol`` over it; the steps are the same in exact arithmetic; ``fscale``
    is then per unit too). An objective and gradient of size ``unit`` (a transport
    problem's mass) then stay near 1, and the memory's products ``y.y`` neither overflow
    (float32 masses above ~1e19) nor underflow.

    Where the work runs: the direction, the trial points, their evaluations and the memory
    are tensors on the iterate's device; the line search's and the stopping rules' per-problem
    arithmetic runs on the host, on the numbers each trial sends back in one transfer (its
    value, slope, gradient norm, scale: the one synchronisation per trial, usually one per
    iteration). On a GPU each device operation is a launch, and a few dozen (B,)-sized
    tests per trial cost more host time than this transfer; a device mask is sent back
    only where problems of a batch part ways.

    Returns ``(theta, aux, n_iter, grad_l1, converged, reason)`` with per-problem tensors.
    """
    B, D = theta.shape
    dev, dt = theta.device, theta.dtype
    slack = 16 * torch.finfo(dt).eps
    h0 = torch.as_tensor(h0, dtype=dt, device=dev).expand(B)
    if unit is not None:
        evaluate, tol, h0, unit = _in_units(evaluate, tol, h0, unit.to(dt))
    tol_h, kick_h, unit_h = _on_host(tol, B), _on_host(kick, B), _on_host(1.0 if unit is None else unit, B)
    kick_d = torch.as_tensor(kick, dtype=dt, device=dev).expand(B)
    offset, extra = (None, None) if fscale is None else (_on_host(fscale[0], B), _on_host(fscale[1], B))
    judged = callable(flat_converges)  # else a constant

    def read(fv, gv, sv, *more):
        """Host rows of one evaluation: f, |g|_1, scale, more."""
        st = _host.to_host(fv, gv.abs().sum(-1), sv, *more)
        return (st[0], st[1], st[2]), st[3:]

    def kicked_off(which, base, base_h):
        """``(base, base_h)`` with the problems in ``which`` (host mask) moved off the
        iterate by ``kick`` times the fixed pattern, their memory dropped, their kicks counted."""
        cand = theta + kick_d[:, None] * pattern
        fk, gk, auxk, sk = evaluate(cand)
        out_h, _ = read(fk, gk, sk)
        mask = _host.to_device(which, dev)
        valid.masked_fill_(mask[:, None], False)
        np.add(kicks, which, out=kicks)
        return _where(mask, (cand, gk, auxk), base), _pick(which, out_h, base_h)

    f, g, aux, scale = evaluate(theta)
    cur, _ = read(f, g, scale)  # host: (f, gnorm, scale) at the iterate
    converged = cur[1] <= tol_h
    cap = _budgets(max_iter, B)
    active = ~converged & np.isfinite(cur[0]) & np.isfinite(cur[1]) & (cap > 0)
    start = cur[0]  # the objective at theta: an ftol stop no lower than it (by the slack) is suspect
    stalled, grad_ok, flat_stop = np.zeros(B, bool), converged.copy(), np.zeros(B, bool)
    n_iter, kicks = np.zeros(B, np.int64), np.zeros(B, np.int64)
    m = memory_pairs(history, int(cap.max(initial=0)))
    pairs = torch.zeros(B, 2 * m, D, dtype=dt, device=dev)  # memory: s_1..s_m, y_1..y_m
    sy, yy = torch.zeros(B, m, m, dtype=dt, device=dev), torch.zeros(B, m, m, dtype=dt, device=dev)
    sg, yg = sy[:, 0], sy[:, 0]
    valid = torch.zeros(B, m, dtype=torch.bool, device=dev)
    hscale = h0.clone()
    pattern = (torch.arange(D, device=dev, dtype=torch.float64) * 0.6180339887498949).frac().mul(2).sub(1).to(dt)
    recent, recent_g = [], []  # objective values and gradient norms of the last `window` iterations
    best_g, stale = cur[1].copy(), np.zeros(B, np.int64)  # iterations since |g|_1 fell 1% below its best
    for it in range(int(cap.max(initial=0))):
        if not active.any():
            break
        d = -_direction(g, pairs, sy, yy, sg, yg, valid, hscale)
        gd = (g * d).sum(-1)
        reset = ~(gd < 0)  # not a descent direction: restart from scaled steepest descent (no sync)
        d = torch.where(reset[:, None], -h0[:, None] * g, d)
        gd = torch.where(reset, (g * d).sum(-1), gd)
        valid &= ~reset[:, None]
        t = torch.clamp(max_step / d.abs().amax(-1).clamp(min=torch.finfo(dt).tiny), max=1.0)
        done = ~active
        new, new_h = (theta, g, aux), cur
        exhausted, kicked = True, np.zeros(B, bool)
        for trial in range(max_ls):
            cand = theta + t[:, None] * d
            fc, gc, auxc, sc = evaluate(cand)
            more = [(gc * d).sum(-1)] + ([gd, t] if trial == 0 else [])
            trial_h, st = read(fc, gc, sc, *more)
            if trial == 0:  # the trials' step-independent terms: Armijo's bound is ceiling + t * descent
                t_h, gd_h = st[2], st[1]
                ceiling = cur[0] + slack * (cur[2] + np.abs(cur[0]))
                descent, rise = c1 * gd_h, c2 * gd_h
            with np.errstate(invalid="ignore"):
                armijo = ~done & np.isfinite(trial_h[0]) & (trial_h[0] <= ceiling + t_h * descent)
                ok = armijo & (st[0] >= rise)  # weak Wolfe: the slope has risen enough
            trial_d = (cand, gc, auxc)
            if (ok | done).all():  # every live problem takes a step
                if ok.all():
                    new, new_h = trial_d, trial_h
                else:
                    new, new_h = _where(_host.to_device(ok, dev), trial_d, new), _pick(ok, trial_h, new_h)
                done, exhausted = done | ok, False
                break
            if trial == 0:
                lo, hi = np.zeros(B), np.full(B, np.inf)
                fallback, fallback_h, armijo_seen = new, new_h, np.zeros(B, bool)
            if ok.any():
                new, new_h = _where(_host.to_device(ok, dev), trial_d, new), _pick(ok, trial_h, new_h)
            if armijo.any():
                armijo_d = _host.to_device(armijo, dev)
                fallback, fallback_h = _where(armijo_d, trial_d, fallback), _pick(armijo, trial_h, fallback_h)
            armijo_seen |= armijo
            done |= ok
            # bracket [lo, hi]: too long where Armijo fails, too short where the slope is still steep
            hi = np.where(~done & ~armijo, t_h, hi)
            lo = np.where(armijo & ~ok, t_h, lo)
            t_h = np.where(done, t_h, np.where(np.isinf(hi), 2.0 * t_h, 0.5 * (lo + hi)))
            t = _host.to_device(t_h, dev).to(dt)
        if exhausted:
            if max_ls > 0:  # trials exhausted: fall back to the last step with sufficient decrease
                late = ~done & armijo_seen
                if late.any():
                    new, new_h = _where(_host.to_device(late, dev), fallback, new), _pick(late, fallback_h, new_h)
                    done |= late
            failed = active & ~done
            kicked = failed & (kicks < max_kicks) & (kick_h > 0)
            if kicked.any():  # a kink: step off it along a fixed pattern, forget the memory
                new, new_h = kicked_off(kicked, new, new_h)
                done |= kicked
            stalled |= failed & ~kicked
        moved = active & done
        keep = moved & ~kicked  # problems that did not move have s = y = 0: no pair either way
        keep_d = None if (keep | ~moved).all() else _host.to_device(keep, dev)
        pairs, sy, yy, sg, yg, valid = _push(pairs, sy, yy, valid, new[0] - theta, new[1] - g, keep_d, new[1])
        last, s_y, y_y = valid[:, -1], sy[:, -1, -1], yy[:, -1, -1]
        hscale = torch.where(last, s_y / y_y.masked_fill(~last, 1.0), hscale)
        (theta, g, aux), cur = new, new_h
        n_iter += moved
        grad_ok |= moved & (cur[1] <= tol_h)
        with np.errstate(invalid="ignore"):
            stale = np.where(moved & (cur[1] < 0.99 * best_g), 0, stale + moved)
            best_g = np.fmin(best_g, cur[1])
        recent.append(cur[0])
        recent_g.append(cur[1])
        if len(recent) > window:
            old_f, old_g = recent.pop(0), recent_g.pop(0)
            size = cur[2] + np.abs(cur[0]) if offset is None else np.abs(cur[0] + offset) + extra
            with np.errstate(invalid="ignore"):
                by_ftol = moved & (old_f - cur[0] <= ftol * size)
            if not judged:
                conv_flat = np.full(B, bool(flat_converges))
            elif by_ftol.any():  # asked only where ftol would stop a problem (it may cost a pass)
                conv_flat = _host.to_host(flat_converges(theta, aux))[0] > 0
            else:
                conv_flat = np.zeros(B, bool)
            with np.errstate(invalid="ignore"):
                flat = moved & (old_f - cur[0] <= np.where(conv_flat, ftol, 0.0) * size)
                # not converging on it (smooth): below f's resolution the gradient may still fall
                flat &= conv_flat | ((stale >= patience) & (np.min(recent_g, 0) > 0.99 * old_g))
                # flat without ever getting below the start by more than the rounding slack: ties at
                # the start (float32 accepted a first step 2^-18 long within the slack, then wandered
                # in it; ftol called that converged, 6.5% below the optimum). Kick it instead, once:
                # scores tied across lines (a router's all-zero gate) then stop after 60 iterations,
                # where three such kicks ran them to max_iter
                unmoved = flat & conv_flat & ~grad_ok & active & (start - cur[0] <= slack * (cur[2] + np.abs(cur[0])))
            unmoved &= (kicks == 0) & (kick_h > 0)
            converged |= active & (grad_ok | (flat & conv_flat & ~unmoved))
            flat_stop |= active & flat & ~converged & ~unmoved
        else:  # no window yet: nothing is flat
            converged |= active & grad_ok
            unmoved = np.zeros(B, bool)
        active &= moved & ~converged & ~flat_stop & (n_iter < cap)
        if unmoved.any():
            (theta, g, aux), cur = kicked_off(unmoved, (theta, g, aux), cur)
            recent = [np.where(unmoved, np.inf, f_old) for f_old in recent]  # a fresh window for them
        if progress is not None and progress.due():
            progress.update(it + 1, float((cur[1] * unit_h).max()), None, "L-BFGS")
    if progress is not None:
        progress.close()
    finite = np.isfinite(cur[0]) & np.isfinite(cur[1])
    reason = np.where(grad_ok, 0, np.where(converged, 4, np.where(flat_stop, 5, np.where(
        ~finite, 3, np.where(stalled, 2, 1)))))
    out = _host.to_device(np.stack([n_iter, cur[1] * unit_h, converged, reason]), dev)  # one copy
    return theta, aux, out[0].long(), out[1].to(dt), out[2] > 0, out[3].long()


def _in_units(evaluate, tol, h0, unit):
    """``lbfgs``'s problem with every objective divided by ``unit`` (B,): the evaluation,
    the gradient test's ``tol`` and the inverse-Hessian scale ``h0``."""
    def scaled(theta):
        f, g, aux, scale = evaluate(theta)
        return f / unit, g / unit[:, None], aux, scale / unit
    return scaled, tol / unit, h0 * unit, unit
