"""The value's cost gradient where ``k`` binds at a tie: the plan mixed over the tied supports.

The semi-dual objective ``F(alpha, C) = <alpha, a> - sum_j b_j Omega*_j(alpha - C_:j)``
is jointly concave in ``(alpha, C)`` (``Omega*_j``, a maximum over supports of size ``k``
of smooth convex functions, is convex), so the value ``V(C) = max_alpha F`` is concave
and its supergradients are the plans ``T_:j = b_j p_j``, ``p_j`` in the convex hull of
the projections on the optimal supports of column ``j``, that meet ``T 1 = a`` (the
``alpha`` part of ``(0, T)`` in the joint superdifferential). Where the top ``k`` of
every column is unique that is the returned plan. Where two or more positions tie for
the ``k``-th place of a column (a kink: ``k`` binds and the solve stops on ``ftol`` with
the row sums off by ``grad_norm``) the returned plan takes one support, and ``T 1 != a``:
``T`` is then neither the derivative nor a supergradient (a 6 x 5 problem's directional
derivatives came out -0.409, 0.242, 0.172 where the value's finite differences give
-0.317, 0.160, 0.334).

At a tie the column's scores ``x = alpha - C_:j`` split into the positions above the tie
("sure", their entries ``(x + beta_j)/gamma`` in every optimal support), a tied group
``G`` (equal scores, entries ``u = (x_k + beta_j)/gamma`` each), and the rest (zero).
Each optimal support takes ``slots = k - #sure`` positions of ``G``, so the hull is
``{t in [0, u]^G : sum t = slots * u}`` on the group (the column's sum unchanged). A
linear program (HiGHS, through SciPy, on the host: the problems at a kink one at a time)
solves for the duals, the groups' common scores and the group entries with the supports
held fixed, where all of it is linear: row and line sums, ties, group sums, caps and the
supports' bounds (:meth:`_Lines.mix`). Its duals are a maximizer of the semi-dual at least
as good as the solver's (which stops near, not at, a kink); the plan there meets both
marginals. The dual formulation's plan has the same form, ``(alpha + beta - C)_+ / gamma``
on the top ``k``, and gets the same mixing.

Which scores tie: at the returned duals tied scores differ by the solve's error (1e-10 to
5e-13 in float64, 8e-6 to 2.4e-5 in float32 with the default ``tol`` and ``ftol`` on
6 x 5 and 30 x 20 random costs), untied ones by the data (down to 2.7e-4 there, and
less on larger problems). No fixed tolerance separates the two, so the tolerances of
:data:`TIE_LADDER` (relative to each line's scores) are tried smallest first, and the
first under which the mixed plan meets the row sums to ``tol`` is kept (the ladder stops
early where the least residual stays above :data:`GIVE_UP` of the returned plan's); if
none does, the returned plan is kept (the gradient as before).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

#: tie tolerances tried, smallest first, relative to each line's score scale
TIE_LADDER = (1e-9, 1e-7, 1e-5, 1e-4, 1e-3)
#: candidates read past the ``k``-th place of each line at first (doubled while a line's
#: last candidate may still tie with its ``k``-th)
WIDTH = 8
#: the widest read (a tie past it is cut there: its line's mixing may then miss the row sums)
WIDTH_MAX = 512
#: the ladder stops at a tolerance whose least row residual is above this fraction of the
#: returned plan's: the ties seen are not the kink's (the benchmark's 64-point problem, half
#: its lines tied, kept 49% at 1e-7, and 500 x 400 random costs from the default solve 27%;
#: the whole ladder cost 2.9 s at the benchmark's 1024 points, for nothing), while every
#: mixing that succeeded did so at the first tolerance with a solution or after ones within
#: 11% (equal costs; 5.6% on 300 x 200 clouds)
GIVE_UP = 0.25
#: the largest linear program tried: candidates of all lines plus positions (its
#: inequality rows and row sums); a larger problem keeps the returned plan. One program of
#: the benchmark's 1024 points (13,312: 4,154 variables, 12,345 inequalities) took 0.97 s of
#: HiGHS on the development CPU; the size grows with it, and so would its time
LP_MAX = 16384


def mixed_plan(pb, hp: torch.Tensor, out, row_err: np.ndarray, tol: float) -> Optional[tuple[torch.Tensor, ...]]:
    """The supergradient plan of the problems that stopped at a kink.

    Args:
        pb: the solver's problem (``pb.geom``, ``k``, ``gamma``, ``axis``, ``wp``, ``wl``).
        hp: (B, N) the positions' duals (``alpha`` for ``axis=0``).
        out: the :class:`~otcore.reference_ksparse.KSparse` pass at the returned duals.
        row_err: (B,) host array, the returned plans' L1 row residuals (0 where a problem did
            not converge); a problem above ``tol`` stopped at a kink.
        tol: the solve's tolerance: a mixed plan is kept if it meets the row sums to it.

    Returns:
        None where no problem's plan changes, else ``(vals, idx, mixed)``: the plan on
        ``W >= k + WIDTH`` candidates per line, (B, L, W) values and positions, and
        (B,) bool, the problems whose plan it is (the others keep ``out``'s).
    """
    N = pb.wp.shape[1]
    k = pb.k
    kink = row_err > tol
    if k >= N or not kink.any():
        return None
    B, L = out.beta.shape
    dt = out.vals.dtype
    width = min(k + WIDTH, N)
    if L * width + N > LP_MAX:
        return None
    beta_h = out.beta.cpu().double().numpy()
    while True:
        wide = pb.geom.ksparse_columns(hp, pb.gamma, width, pb.axis, beta=out.beta, backend=pb.backend,
                                       precision=pb.precision)
        cost = wide.cost.to(dt)
        x = hp.to(dt).gather(1, wide.idx.reshape(B, -1)).reshape(B, L, width) - cost
        xs, order = x.sort(dim=-1, descending=True, stable=True)
        # everything the linear programs read, on the host in float64
        xs_h = xs.cpu().double().numpy()
        # a tie that may reach past the last candidate (duplicated points, equal costs: all
        # of a line can tie) reads twice as many, up to the whole line or WIDTH_MAX
        scale = np.abs(xs_h[..., :k]).max(-1) + np.abs(beta_h)
        cut = ((np.abs(xs_h[..., -1] - xs_h[..., k - 1]) <= TIE_LADDER[-1] * scale)
               & (xs_h[..., k - 1] + beta_h > 0))  # (only where the k-th entry has mass)
        wider = min(2 * width, N, max(WIDTH_MAX, k + WIDTH), (LP_MAX - N) // L)
        if wider <= width or not cut[kink].any():
            break
        width = wider
    idx, cost = wide.idx.gather(-1, order), cost.gather(-1, order)
    cost_h, hp_h, wp_h, wl_h = (t.detach().cpu().double().numpy() for t in (cost, hp, pb.wp, pb.wl))
    idx_h = idx.cpu().numpy()
    vals_h = np.zeros(xs_h.shape)
    mixed = np.zeros(B, dtype=bool)
    for b in np.flatnonzero(kink):
        prob = _Lines(xs_h[b], cost_h[b], idx_h[b], hp_h[b], beta_h[b], wp_h[b], wl_h[b], pb.gamma, k, N)
        base = row_err[b]  # the returned plan's
        for rel in TIE_LADDER:
            got = prob.mix(rel, tol)
            if got is None:
                continue
            if got[0] is not None and got[1] <= tol:
                vals_h[b], mixed[b] = got[0], True
                break
            if got[1] > GIVE_UP * base:
                break  # the supports seen are far from the kink's: wider ties only cost time
    if not mixed.any():
        return None
    return torch.as_tensor(vals_h, device=out.vals.device).to(dt), idx, torch.as_tensor(mixed, device=out.vals.device)


class _Lines:
    """One problem's lines at the returned duals, (L, W) candidates sorted by score."""

    def __init__(self, xs, cost, idx, alpha, beta, wp, wl, gamma, k, N):
        self.xs, self.cost, self.idx, self.alpha, self.beta = xs, cost, idx, alpha, beta
        self.wp, self.wl, self.gamma, self.k, self.N = wp, wl, gamma, k, N
        self.xk = xs[:, k - 1:k]
        self.scale = np.abs(xs[:, :k]).max(-1, keepdims=True) + np.abs(beta)[:, None]
        # a tie matters only where the k-th entry has mass
        self.live = (xs[:, k - 1] + beta) > 0

    def mix(self, rel: float, tol: float):
        """The mixed plan at tie tolerance ``rel`` (relative to each line's scores):
        ``(vals (L, W), L1 row residual)``; ``(None, least residual)`` where no duals that
        keep the supports meet the row sums to ``tol``; None where no tie straddles the
        k-th place or no duals keep the supports.

        A linear program over the duals ``(alpha, beta)``, each group's common score ``s``
        and the group entries ``t``, the supports held fixed: the entries are linear in
        them, ``(alpha_i + beta_j - C_ij)/gamma`` on the active ones, and so are the row
        sums, the line sums, the ties (``alpha_i - C_ij = s_j``), the group sums
        (``slots (s_j + beta_j)/gamma``), the caps ``t <= (s_j + beta_j)/gamma`` and the
        supports' bounds (every other candidate scores no more than the kept ones, within
        ``delta``). First the least L1 row residual, then at that residual the duals
        nearest (L1) the returned ones: the support's connected parts each leave a free
        offset ``(alpha + c, beta - c)``, and an arbitrary one had broken the rankings
        (0.06 to 0.1 past them on 30 x 20 costs, before the bounds were constraints)."""
        from scipy import sparse as sp
        from scipy.optimize import linprog

        xs, k, N, g = self.xs, self.k, self.N, self.gamma
        L, W = xs.shape
        delta = rel * self.scale[:, 0]
        rank = np.arange(W)[None, :]
        tied = (np.abs(xs - self.xk) <= delta[:, None]) & self.live[:, None]
        sure = (xs > self.xk + delta[:, None]) & self.live[:, None]
        slots = k - sure.sum(-1)
        grouped = tied.sum(-1) > slots  # more tied candidates than free slots: a kink
        if not grouped.any():
            return None
        tied &= grouped[:, None]
        sure &= grouped[:, None]
        top = (rank < k) & ~grouped[:, None]  # the other lines keep their top k
        active = sure | (top & (xs + self.beta[:, None] > 0))
        al, ac = np.nonzero(active)
        tl, tc = np.nonzero(tied)
        n_a, n_t = len(al), len(tl)
        gl = np.flatnonzero(grouped)
        n_g = len(gl)
        g_of = np.full(L, -1)
        g_of[gl] = np.arange(n_g)
        # variables: alpha (N), beta (L), s (n_g), t (n_t), row residuals r+ r- (N each)
        o_b, o_s, o_t, o_r = N, N + L, N + L + n_g, N + L + n_g + n_t
        n_var = o_r + 2 * N
        P, Cst = self.idx, self.cost
        eq, ub = _Rows(n_var), _Rows(n_var)
        pa, ca = P[al, ac], Cst[al, ac]
        # row sums: sum_active (alpha_i + beta_j - C_ij)/g + sum t + r+ - r- = a_i
        eq.add(pa, [(pa, 1 / g), (o_b + al, 1 / g)])
        eq.add(P[tl, tc], [(o_t + np.arange(n_t), 1.0)])
        eq.add(np.arange(N), [(o_r + np.arange(N), 1.0), (o_r + N + np.arange(N), -1.0)])
        eq.rhs(N, self.wp + np.bincount(pa, weights=ca, minlength=N) / g)
        # line sums: sum_active (alpha_i + beta_j - C_ij)/g + slots_j (s_j + beta_j)/g = b_j
        eq.add(N + al, [(pa, 1 / g), (o_b + al, 1 / g)])
        eq.add(N + gl, [(o_s + np.arange(n_g), slots[gl] / g), (o_b + gl, slots[gl] / g)])
        eq.rhs(L, self.wl + np.bincount(al, weights=ca, minlength=L) / g)
        # ties: alpha_i - s_j = C_ij on each tied candidate
        r = eq.n
        eq.add(r + np.arange(n_t), [(P[tl, tc], 1.0), (o_s + g_of[tl], -1.0)])
        eq.rhs(n_t, Cst[tl, tc])
        # group sums: sum t - slots_j (s_j + beta_j)/g = 0
        r = eq.n
        eq.add(r + g_of[tl], [(o_t + np.arange(n_t), 1.0)])
        eq.add(r + np.arange(n_g), [(o_s + np.arange(n_g), -slots[gl] / g), (o_b + gl, -slots[gl] / g)])
        eq.rhs(n_g, np.zeros(n_g))
        # caps: t - (s_j + beta_j)/g <= 0
        ub.add(ub.n + np.arange(n_t), [(o_t + np.arange(n_t), 1.0), (o_s + g_of[tl], -1 / g), (o_b + tl, -1 / g)])
        ub.rhs(n_t, np.zeros(n_t))
        # supports' bounds, each within delta: active entries >= 0 ...
        ub.add(ub.n + np.arange(n_a), [(pa, -1.0), (o_b + al, -1.0)])
        ub.rhs(n_a, delta[al] - ca)
        # ... a top k's inactive ones <= 0 ...
        il, ic = np.nonzero(top & ~active)
        ub.add(ub.n + np.arange(len(il)), [(P[il, ic], 1.0), (o_b + il, 1.0)])
        ub.rhs(len(il), delta[il] + Cst[il, ic])
        # ... the candidates past a top k score no more than its k-th (the kept scores'
        # minimum, up to delta) ...
        ol, oc = np.nonzero((rank >= k) & ~grouped[:, None])
        ub.add(ub.n + np.arange(len(ol)), [(P[ol, oc], 1.0), (P[ol, k - 1], -1.0)])
        ub.rhs(len(ol), delta[ol] + Cst[ol, oc] - Cst[ol, k - 1])
        # ... and in a grouped line, the others no more than the group, the sure ones no less
        for mask, sign in ((grouped[:, None] & ~sure & ~tied, 1.0), (sure, -1.0)):
            ml, mc = np.nonzero(mask)
            ub.add(ub.n + np.arange(len(ml)), [(P[ml, mc], sign), (o_s + g_of[ml], -sign)])
            ub.rhs(len(ml), delta[ml] + sign * Cst[ml, mc])
        A_eq, b_eq, A_ub, b_ub = (*eq.matrix(), *ub.matrix())
        # the duals and scores free, t and the residuals >= 0; first the least L1 residual
        bounds = np.stack([np.concatenate([np.full(o_t, -np.inf), np.zeros(n_t + 2 * N)]), np.full(n_var, np.inf)], 1)
        sol = linprog(np.concatenate([np.zeros(o_r), np.ones(2 * N)]), A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq,
                      bounds=bounds, method="highs")
        if sol.status != 0:
            return None
        if sol.fun > tol:
            return None, sol.fun
        # at that residual, the duals nearest the returned ones: n_d more variables
        # e >= |(alpha, beta) - returned| (alpha and beta are the first n_d variables)
        n_d = N + L
        dev, ref = np.arange(n_d), np.concatenate([self.alpha, self.beta])
        near = _Rows(n_var + n_d)
        near.add(dev, [(dev, 1.0), (n_var + dev, -1.0)])
        near.rhs(n_d, ref)
        near.add(n_d + dev, [(dev, -1.0), (n_var + dev, -1.0)])
        near.rhs(n_d, -ref)
        near.add(np.full(2 * N, 2 * n_d), [(o_r + np.arange(2 * N), 1.0)])
        near.rhs(1, sol.fun * (1 + 1e-6))
        A_near, b_near = near.matrix()

        def pad(A):
            return sp.hstack([A, sp.csr_matrix((A.shape[0], n_d))]).tocsr()

        bounds = np.concatenate([bounds, np.stack([np.zeros(n_d), np.full(n_d, np.inf)], 1)])
        sol = linprog(np.concatenate([np.zeros(n_var), np.ones(n_d)]), A_ub=sp.vstack([pad(A_ub), A_near]).tocsr(),
                      b_ub=np.concatenate([b_ub, b_near]), A_eq=pad(A_eq), b_eq=b_eq, bounds=bounds, method="highs")
        if sol.status != 0:
            return None
        alpha, beta, t = sol.x[:N], sol.x[o_b:o_s], sol.x[o_t:o_r]
        vals = np.zeros((L, W))
        vals[al, ac] = np.maximum(alpha[pa] - ca + beta[al], 0) / g
        vals[tl, tc] = np.clip(t, 0, None)
        return vals, float(np.abs(self.wp - np.bincount(P.ravel(), weights=vals.ravel(), minlength=N)).sum())


class _Rows:
    """A sparse constraint matrix built in blocks of rows."""

    def __init__(self, n_var: int):
        self.n_var, self.n = n_var, 0
        self.r, self.c, self.v, self.b = [], [], [], []

    def add(self, rows, terms):
        """For each ``(cols, coef)`` in ``terms``: entry ``coef`` at ``(rows, cols)``."""
        rows = np.asarray(rows)
        for cols, coef in terms:
            self.r.append(rows), self.c.append(np.asarray(cols)), self.v.append(np.broadcast_to(coef, rows.shape))

    def rhs(self, count: int, values):
        """Close a block of ``count`` rows with its right-hand side."""
        self.b.append(np.broadcast_to(np.asarray(values, dtype=float), (count,)))
        self.n += count

    def matrix(self):
        from scipy import sparse as sp
        cat = (lambda xs, dt=float: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
        A = sp.coo_matrix((cat(self.v), (cat(self.r, int), cat(self.c, int))), shape=(self.n, self.n_var)).tocsr()
        return A, cat(self.b)
