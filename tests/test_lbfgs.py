"""The batched L-BFGS behind sparse OT: its compact-form direction against the dense BFGS
inverse-Hessian recursion, and whole runs on quadratics with a known minimizer."""

import numpy as np
import pytest
import torch

from otcore.solvers._lbfgs import _direction, _push, lbfgs


def _dense_bfgs_direction(g, pairs, h0):
    """``H g`` with ``H`` from the BFGS update ``H <- V^T H V + rho s s^T``, ``V = I - rho y s^T``,
    applied to ``h0 I`` for the given pairs, oldest first (the textbook definition)."""
    H = h0 * torch.eye(g.shape[0], dtype=g.dtype)
    for s, y in pairs:
        rho = 1.0 / (s @ y)
        V = torch.eye(g.shape[0], dtype=g.dtype) - rho * torch.outer(y, s)
        H = V.T @ H @ V + rho * torch.outer(s, s)
    return H @ g


def test_compact_direction_equals_the_bfgs_recursion_with_dropped_pairs():
    """Pairs are pushed with a random ``keep`` mask (rejected pairs, stored as zeros, one of
    them non-finite), and the memory is sometimes dropped as the solver does on a reset or a
    kick (its rows stay, marked invalid), so valid pairs sit among invalid ones and the
    oldest fall out; the direction must equal the BFGS recursion over the valid pairs
    alone, per problem of the batch, and stay finite."""
    torch.manual_seed(0)
    B, m, D = 3, 4, 9
    dt = torch.float64
    A = torch.randn(B, D, D, dtype=dt)
    A = A @ A.transpose(1, 2) + torch.eye(D, dtype=dt)  # y = A s: curvature pairs of a quadratic
    pairs = torch.zeros(B, 2 * m, D, dtype=dt)
    sy, yy = torch.zeros(B, m, m, dtype=dt), torch.zeros(B, m, m, dtype=dt)
    valid = torch.zeros(B, m, dtype=torch.bool)
    history = [[] for _ in range(B)]  # (s, y, kept) per problem, oldest first
    for step in range(12):
        s = torch.randn(B, D, dtype=dt)
        y = (A @ s[..., None])[..., 0]
        keep = torch.rand(B) > 0.35
        if step == 3:  # a rejected pair with an infinite gradient difference
            keep[1], y[1, 0] = False, torch.inf
        if step in (5, 8):  # a reset or a kick of problem 0 and 2: the memory is forgotten
            forget = torch.tensor([True, False, True])
            valid &= ~forget[:, None]
            history = [[(sb, yb, False) for sb, yb, _ in hb] if forget[b] else hb for b, hb in enumerate(history)]
        g = torch.randn(B, D, dtype=dt)
        pairs, sy, yy, sg, yg, valid = _push(pairs, sy, yy, valid, s, y, keep, g)
        h0 = torch.rand(B, dtype=dt) + 0.1
        got = _direction(g, pairs, sy, yy, sg, yg, valid, h0)
        assert torch.isfinite(got).all()
        for b in range(B):
            history[b] = (history[b] + [(s[b], y[b], bool(keep[b]))])[-m:]
            kept = [(sb, yb) for sb, yb, k in history[b] if k]
            assert int(valid[b].sum()) == len(kept)
            want = _dense_bfgs_direction(g[b], kept, float(h0[b]))
            torch.testing.assert_close(got[b], want, rtol=1e-10, atol=1e-12)


def _quadratic(A, c):
    """``evaluate`` for ``f = x.A x / 2 - c.x`` per problem (the interface ``lbfgs`` expects)."""
    def evaluate(x):
        Ax = (A @ x[..., None])[..., 0]
        return (0.5 * (x * Ax).sum(-1) - (c * x).sum(-1), Ax - c, (), torch.ones(x.shape[0], dtype=x.dtype))
    return evaluate


@pytest.mark.parametrize("history", [1, 5, 40])
def test_lbfgs_minimizes_a_batch_of_quadratics(history):
    """Three quadratics of condition numbers 1 to 100 in one batch, the first started at its
    minimizer: each ends at ``A^{-1} c`` with reason 0 (gradient test), the first after no step."""
    torch.manual_seed(1)
    B, D = 3, 30
    dt = torch.float64
    Q, _ = torch.linalg.qr(torch.randn(B, D, D, dtype=dt))
    spectra = torch.stack([torch.logspace(0, e, D, dtype=dt) for e in (0.0, 1.0, 2.0)])
    A = Q @ torch.diag_embed(spectra) @ Q.transpose(1, 2)
    c = torch.randn(B, D, dtype=dt)
    x_star = torch.linalg.solve(A, c)
    x0 = torch.randn(B, D, dtype=dt)
    x0[0] = x_star[0]
    # flat_converges=False: a smooth objective, so a stall of f at its float resolution
    # does not count; the gradient must reach tol (which the line search, comparing values of
    # f, reaches only where f's rounding hides less than tol: hence the moderate conditioning)
    x, _, n_iter, gnorm, converged, reason = lbfgs(_quadratic(A, c), x0, h0=1e-2, tol=1e-9, ftol=0.0,
                                                  max_iter=5000, history=history, flat_converges=False)
    assert converged.all() and (reason == 0).all() and (gnorm <= 1e-9).all()
    assert n_iter[0] == 0 and (n_iter[1:] > 0).all()
    torch.testing.assert_close(x, x_star, rtol=0, atol=1e-8)


def test_longer_memory_takes_fewer_iterations_on_an_ill_conditioned_quadratic():
    """The memory is used: on a condition number of 100, 40 pairs need fewer iterations than 1."""
    torch.manual_seed(2)
    D = 60
    dt = torch.float64
    Q, _ = torch.linalg.qr(torch.randn(D, D, dtype=dt))
    A = (Q @ torch.diag(torch.logspace(0, 2, D, dtype=dt)) @ Q.T)[None]
    c = torch.randn(1, D, dtype=dt)
    iters = {}
    for history in (1, 40):
        *_, n_iter, _, converged, _ = lbfgs(_quadratic(A, c), torch.zeros(1, D, dtype=dt), h0=1e-2, tol=1e-7,
                                            ftol=0.0, max_iter=20000, history=history, flat_converges=False)
        assert converged.all()
        iters[history] = int(n_iter)
    assert iters[40] < 0.8 * iters[1], iters


def test_edge_settings_no_trials_and_a_gradient_of_another_dtype():
    """``max_ls=0`` (no line-search trial) stops every problem with reason 2 (no step), and
    an ``evaluate`` whose gradient comes in float64 for a float32 iterate still converges."""
    torch.manual_seed(3)
    A = torch.diag_embed(torch.rand(2, 5, dtype=torch.float64) + 0.5)
    c = torch.randn(2, 5, dtype=torch.float64)
    *_, n_iter, _, converged, reason = lbfgs(_quadratic(A, c), torch.zeros(2, 5, dtype=torch.float64), h0=1e-2,
                                             tol=1e-8, ftol=0.0, max_iter=20, history=3, max_ls=0)
    assert (reason == 2).all() and (n_iter == 0).all() and not converged.any()
    wide = _quadratic(A, c)

    def mixed(x):  # value and scale in the iterate's dtype, gradient in float64
        f, g, aux, scale = wide(x.double())
        return f.float(), g, aux, scale.float()
    x, _, _, _, converged, reason = lbfgs(mixed, torch.zeros(2, 5), h0=1e-2, tol=1e-4, ftol=0.0, max_iter=200,
                                          history=3, flat_converges=False)
    assert converged.all() and (reason == 0).all()
    torch.testing.assert_close(x.double(), torch.linalg.solve(A, c), rtol=0, atol=1e-4)


def test_per_problem_iteration_budgets():
    """``max_iter`` as a (B,) host array: each problem stops at its own budget (reason 1), a
    budget of 0 takes no step, and a problem within its budget runs on as alone."""
    torch.manual_seed(4)
    D = 20
    Q, _ = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64))
    A = (Q @ torch.diag(torch.logspace(0, 2, D, dtype=torch.float64)) @ Q.T).expand(3, D, D)
    c = torch.randn(3, D, dtype=torch.float64)
    kw = dict(h0=1e-2, tol=1e-9, ftol=0.0, history=5, flat_converges=False)
    *_, alone, _, _, _ = lbfgs(_quadratic(A[:1], c[:1]), torch.zeros(1, D, dtype=torch.float64), max_iter=5000, **kw)
    x, _, n_iter, _, converged, reason = lbfgs(_quadratic(A, c), torch.zeros(3, D, dtype=torch.float64),
                                               max_iter=np.array([5000, 0, 7]), **kw)
    assert int(alone) > 7 and n_iter.tolist() == [int(alone), 0, 7] and converged.tolist() == [True, False, False]
    assert reason.tolist() == [0, 1, 1] and torch.equal(x[1], torch.zeros(D, dtype=torch.float64))
