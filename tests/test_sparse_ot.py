"""Sparsity-constrained (top-k) OT: the torch path against POT, SciPy and closed forms.

Kernel (Triton interpreter) tests live in test_kernels_ksparse.py, router tests in
test_router.py. Everything here is float64 on small problems unless said otherwise.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings

import numpy as np
import ot
import pytest
import torch

import otcore
from otcore import reference_ksparse as R
from otcore.result import ConvergenceWarning
from otcore.solvers import _qot_newton as Q
from otcore.solvers import sparse as S

# tight tolerances stop on the dtype's resolution ("line search failed") on purpose
# (and POT's SciPy calls raise SciPy deprecation notices)
pytestmark = [
    pytest.mark.filterwarnings("ignore::otcore.result.ConvergenceWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

F64 = torch.float64
TIGHT = dict(tol=1e-12, ftol=1e-16, max_iter=5000, backend="torch")


def _problem(n, m, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    C = torch.rand(n, m, generator=g, dtype=dtype)
    a = torch.rand(n, generator=g, dtype=dtype) + 0.5
    b = torch.rand(m, generator=g, dtype=dtype) + 0.5
    return C, a / a.sum(), b / b.sum()


def _quiet(fn, *args, **kw):
    """POT's sparse projection prints a shape on every call: swallow it."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kw)


def _band_problem(seed=0):
    """k = 2 binds (gamma is large, the unconstrained plan is dense) yet the optimum is smooth:
    a circulant band of cheap entries carries an exact k-sparse coupling."""
    n = 6
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    band = ((i - j) % n == 0) | ((i - j) % n == 1)
    g = torch.Generator().manual_seed(seed)
    C = 0.3 * torch.rand(n, n, generator=g, dtype=F64) + (~band).to(F64)
    u = torch.full((n,), 1.0 / n, dtype=F64)
    return C, u, u.clone(), 2, 20.0


# --- the k-sparse simplex projection -------------------------------------------------


@pytest.mark.parametrize("k,expected", [(1, [1, 0, 0, 0]), (2, [0.55, 0.45, 0, 0]), (3, [13 / 30, 10 / 30, 7 / 30, 0])])
def test_projection_unit_cases(k, expected):
    x = torch.tensor([0.5, 0.4, 0.3, -1.0], dtype=F64)
    want = torch.tensor(expected, dtype=F64)
    torch.testing.assert_close(R.ksparse_simplex(x, k), want, rtol=0, atol=1e-12)
    # the same through the geometry primitive: one column with C = -x, h = 0, mass 1, gamma 1
    out = otcore.CostMatrix(-x[:, None]).ksparse_columns(torch.zeros(1, 4, dtype=F64), 1.0, k, 0, mass=torch.ones(1, 1, dtype=F64))
    dense = torch.zeros(4, dtype=F64).scatter(0, out.idx[0, 0], out.vals[0, 0])
    torch.testing.assert_close(dense, want, rtol=0, atol=1e-12)


def test_projection_matches_pot_and_brute_force():
    g = torch.Generator().manual_seed(3)
    V = torch.randn(7, 9, generator=g, dtype=F64)
    for k in (1, 3, 9):
        ours = R.ksparse_simplex(V, k)
        pot = _quiet(ot.utils.projection_sparse_simplex, V.numpy(), k, axis=1)
        np.testing.assert_allclose(ours.numpy(), pot, atol=1e-12)
        assert int((ours > 0).sum(1).max()) <= k
        torch.testing.assert_close(ours.sum(1), torch.ones(7, dtype=F64))


@pytest.mark.parametrize("k", [1, 2, 3, 8, 13, 64])
def test_log_step_scan_is_the_prefix_sum(k):
    t = torch.randn(4, 3, k, generator=torch.Generator().manual_seed(k), dtype=F64)
    torch.testing.assert_close(R.log_step_scan(t), torch.cumsum(t, -1), rtol=0, atol=1e-13)


def test_deterministic_mode_solves_the_same_problem(deterministic_algorithms):
    """torch refuses a floating-point cumsum on CUDA in deterministic mode; the k-sparse
    projection then sums its prefixes by a log-step scan (on every device) to the same optimum."""
    C, a, b = _problem(12, 9, seed=21)
    det = otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=3, gamma=0.3, **TIGHT)
    torch.use_deterministic_algorithms(False)
    ref = otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=3, gamma=0.3, **TIGHT)
    torch.testing.assert_close(det.value, ref.value, rtol=1e-12, atol=0)
    torch.testing.assert_close(det.to_dense(), ref.to_dense(), rtol=0, atol=1e-9)


# --- objective and gradient of one pass against POT -----------------------------------


@pytest.mark.parametrize("k", [1, 3, 7])
def test_pass_matches_pot_objectives(k):
    C, a, b = _problem(7, 9, seed=1)  # k = 1 leaves room: 9 columns for 7 rows
    g = torch.Generator().manual_seed(2)
    alpha = 0.3 * torch.randn(7, generator=g, dtype=F64)
    beta = 0.3 * torch.randn(9, generator=g, dtype=F64) + 0.3
    geom = otcore.CostMatrix(C)
    reg = ot.smooth.SparsityConstrained(max_nz=k, gamma=0.4) if k < 7 else ot.smooth.SquaredL2(gamma=0.4)
    # semi-dual
    pb, _, _ = S._make_problem(geom, a, b, k, 0.4, "semi-dual", 0, "implicit", "torch", "fp32", None, 1e-5)
    f, grad, _, _ = pb.evaluate(alpha[None])
    obj, g_pot = _quiet(ot.smooth.semi_dual_obj_grad, alpha.numpy(), a.numpy(), b.numpy(), C.numpy(), reg)
    assert abs(-float(f) - obj) < 1e-12
    np.testing.assert_allclose(-grad[0].numpy(), g_pot, atol=1e-12)
    # dual
    pb, _, _ = S._make_problem(geom, a, b, k, 0.4, "dual", 0, "implicit", "torch", "fp32", None, 1e-5)
    f, grad, _, _ = pb.evaluate(torch.cat([alpha, beta])[None])
    obj, ga, gb = _quiet(ot.smooth.dual_obj_grad, alpha.numpy(), beta.numpy(), a.numpy(), b.numpy(), C.numpy(), reg)
    assert abs(-float(f) - obj) < 1e-12
    np.testing.assert_allclose(-grad[0].numpy(), np.concatenate([ga, gb]), atol=1e-12)


# --- solutions ----------------------------------------------------------------------------


@pytest.mark.parametrize("formulation", ["semi-dual", "dual"])
def test_k_large_is_quadratically_regularized_ot(formulation):
    C, a, b = _problem(12, 9, seed=4)
    # k >= n: smooth, so converged means the gradient is <= tol (the dual stagnates at ~2e-10 in float64)
    res = otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=12, gamma=0.3, formulation=formulation, **dict(TIGHT, tol=1e-9))
    pot = ot.smooth.smooth_ot_dual(a.numpy(), b.numpy(), C.numpy(), 0.3, reg_type="l2", stopThr=1e-14, numItermax=5000)
    assert res.converged and res.grad_norm <= 1e-9
    np.testing.assert_allclose(res.to_dense().numpy(), pot, atol=1e-6)
    # strong duality for the convex (k large) problem: value = <T, C> + gamma/2 |T|^2
    T = res.to_dense()
    assert abs(float(res.value) - float((T * C).sum() + 0.15 * (T * T).sum())) < 1e-9


def test_agrees_with_pot_sparsity_constrained():
    C, a, b = _problem(15, 10, seed=5)
    k, gamma = 3, 0.5
    reg = ot.smooth.SparsityConstrained(max_nz=k, gamma=gamma)
    values = {}
    for form in ("semi-dual", "dual"):
        res = otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=k, gamma=gamma, formulation=form, **TIGHT)
        values[form] = float(res.value)
        if form == "semi-dual":
            _, log = _quiet(ot.smooth.smooth_ot_semi_dual, a.numpy(), b.numpy(), C.numpy(), gamma,
                            reg_type="sparsity_constrained", max_nz=k, log=True)
            pot = _quiet(ot.smooth.semi_dual_obj_grad, log["alpha"], a.numpy(), b.numpy(), C.numpy(), reg)[0]
        else:
            _, log = _quiet(ot.smooth.smooth_ot_dual, a.numpy(), b.numpy(), C.numpy(), gamma,
                            reg_type="sparsity_constrained", max_nz=k, log=True)
            pot = _quiet(ot.smooth.dual_obj_grad, log["alpha"], log["beta"], a.numpy(), b.numpy(), C.numpy(), reg)[0]
        # both maximize the same concave objective: ours at least as high, and close
        assert values[form] >= pot - 1e-9
        assert values[form] - pot < 1e-3 * abs(pot)
    # the semi-dual is the dual maximized over beta: same optimum
    assert abs(values["semi-dual"] - values["dual"]) < 1e-5 * abs(values["dual"])


def test_value_non_increasing_in_k_and_sparsity():
    C, a, b = _problem(8, 10, seed=6)  # 10 columns: room for the 8 rows from k = 1
    prev = math.inf
    for k in range(1, 9):
        res = otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=k, gamma=1.0, **TIGHT)
        assert float(res.value) <= prev + 1e-9
        prev = float(res.value)
        T = res.to_dense()
        assert int((T > 0).sum(0).max()) <= k  # at most k nonzeros per column
        assert res.values.shape == (10, k)
        torch.testing.assert_close(T.sum(0), b, rtol=0, atol=1e-12)  # exact column sums
        assert float(T.min()) >= 0


def test_row_sparse_axis_is_the_transposed_problem():
    C, a, b = _problem(9, 11, seed=7)
    rows = otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=2, gamma=0.7, axis=1, **TIGHT)
    cols = otcore.sparse_ot(otcore.CostMatrix(C.T.contiguous()), b, a, k=2, gamma=0.7, axis=0, **TIGHT)
    assert rows.values.shape == (9, 2)
    assert abs(float(rows.value) - float(cols.value)) < 1e-9
    torch.testing.assert_close(rows.to_dense(), cols.to_dense().T, atol=1e-9, rtol=0)
    torch.testing.assert_close(rows.alpha, cols.beta, atol=1e-9, rtol=0)
    assert int((rows.to_dense() > 0).sum(1).max()) <= 2
    torch.testing.assert_close(rows.to_dense().sum(1), a, rtol=0, atol=1e-12)


def _lp_value(C, a, b):
    from scipy.optimize import linprog

    n, m = C.shape
    A_eq = np.vstack([np.kron(np.eye(n), np.ones(m)), np.kron(np.ones(n), np.eye(m))])
    res = linprog(C.numpy().ravel(), A_eq=A_eq, b_eq=np.concatenate([a.numpy(), b.numpy()]), bounds=(0, None), method="highs")
    assert res.status == 0
    return res.fun, res.x.reshape(n, m)


def test_k1_is_the_lp_plus_a_constant():
    """k = 1: the semi-dual is the unregularized OT semi-dual plus (gamma/2) sum_j b_j^2, so
    its optimum is the LP value plus that constant. With n = m and uniform weights the LP
    has a permutation solution, which the k = 1 plan recovers exactly."""
    g = torch.Generator().manual_seed(8)
    n, gamma = 8, 0.3
    C = torch.rand(n, n, generator=g, dtype=F64)
    u = torch.full((n,), 1.0 / n, dtype=F64)
    res = otcore.sparse_ot(otcore.CostMatrix(C), u, u, k=1, gamma=gamma, **TIGHT)
    lp, plan = _lp_value(C, u, u)
    const = 0.5 * gamma * float((u * u).sum())
    assert abs(float(res.value) - (lp + const)) < 1e-9
    np.testing.assert_allclose(res.to_dense().numpy(), plan, atol=1e-9)
    assert res.marginal_error < 1e-9
    # General weights: no k = 1 coupling exists, the piecewise-linear semi-dual has its
    # maximum on a kink and L-BFGS stalls below it (0.075% here; POT's L-BFGS-B stalls
    # lower still, 0.18%, see docs/sparse_ot.md). A lower bound, within 1%.
    C2, a2, b2 = _problem(6, 8, seed=9)
    res2 = otcore.sparse_ot(otcore.CostMatrix(C2), a2, b2, k=1, gamma=gamma, **TIGHT)
    lp2, _ = _lp_value(C2, a2, b2)
    target = lp2 + 0.5 * gamma * float((b2 * b2).sum())
    assert float(res2.value) <= target + 1e-9
    assert float(res2.value) > target - 1e-2 * abs(target)
    assert res2.grad_norm > 0.1  # the plan cannot match the row marginals


def test_point_cloud_equals_cost_matrix_and_batches():
    g = torch.Generator().manual_seed(10)
    x = torch.rand(2, 9, 3, generator=g, dtype=F64)
    y = torch.rand(2, 7, 3, generator=g, dtype=F64)
    for cost in ("sqeuclidean", "euclidean"):
        pc = otcore.sparse_ot(otcore.PointCloud(x, y, cost=cost), k=3, gamma=0.2, **TIGHT)
        C = otcore.PointCloud(x, y, cost=cost).cost_block()
        cm = otcore.sparse_ot(otcore.CostMatrix(C), k=3, gamma=0.2, **TIGHT)
        torch.testing.assert_close(pc.value, cm.value)
        one = otcore.sparse_ot(otcore.CostMatrix(C[1]), k=3, gamma=0.2, **TIGHT)
        torch.testing.assert_close(one.value, cm.value[1])
        torch.testing.assert_close(one.to_dense(), cm.to_dense()[1])
        assert pc.values.shape == (2, 7, 3) and pc.converged.dtype == torch.bool
        # cost = <T, C>
        torch.testing.assert_close(pc.cost, (pc.to_dense() * C).sum((1, 2)))


def test_float32_matches_float64():
    C, a, b = _problem(20, 16, seed=11)
    r64 = otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=20, gamma=0.5, tol=1e-10, backend="torch")
    r32 = otcore.sparse_ot(otcore.CostMatrix(C.float()), a.float(), b.float(), k=20, gamma=0.5, tol=1e-6, backend="torch")
    assert r32.values.dtype == torch.float32
    assert abs(float(r32.value) - float(r64.value)) < 1e-5 * abs(float(r64.value))
    assert float((r32.to_dense().double() - r64.to_dense()).abs().max()) < 1e-4

@pytest.mark.parametrize("formulation", ["semi-dual", "dual"])
@pytest.mark.parametrize("mass", [1e-30, 1e20])
def test_float32_solve_scales_with_the_mass(formulation, mass):
    """Weights of mass ``M`` with ``gamma / M`` and ``tol * M`` are the unit problem scaled:
    the same duals, the plan and value times ``M``. In float32 the L-BFGS memory's ``y.y``
    (~M^2) overflowed at M = 1e20, ``gamma T^2`` underflowed at 1e-30, and the ftol scale's
    ``w.w`` overflowed: both stopped on ftol within ~12 iterations, ``converged=True``, with
    plans 0.3-1.2 (of 2) from the unit solution and values 4-42% off."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(40, 2, generator=g), torch.rand(30, 2, generator=g)
    a, b = torch.rand(40, generator=g) + 0.1, torch.rand(30, generator=g) + 0.1
    a, b = a / a.sum(), b / b.sum()
    geom = otcore.PointCloud(x, y)
    unit = otcore.sparse_ot(geom, a, b, k=5, gamma=0.1, formulation=formulation, backend="torch")
    big = otcore.sparse_ot(geom, a * mass, b * mass, k=5, gamma=0.1 / mass, tol=1e-5 * mass,
                           formulation=formulation, backend="torch")
    assert unit.converged and big.converged
    assert float((big.to_dense() / mass - unit.to_dense()).abs().sum()) < 2e-3
    assert float(big.value) / mass == pytest.approx(float(unit.value), rel=1e-5)



def test_max_iter_warns_and_reports():
    C, a, b = _problem(10, 8, seed=12)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        res = otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=3, gamma=0.5, max_iter=2, backend="torch")
    assert res.converged is False and res.n_iter == 2
    assert math.isfinite(res.grad_norm) and res.grad_norm > 0


def test_warm_start_from_the_solution():
    C, a, b = _problem(10, 8, seed=13)
    res = otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=8, gamma=0.5, tol=1e-9, backend="torch")
    again = otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=8, gamma=0.5, tol=1e-9, init=(res.alpha, res.beta), backend="torch")
    assert again.n_iter <= 3 < res.n_iter and abs(float(again.value) - float(res.value)) < 1e-10


# --- gradients ----------------------------------------------------------------------------


def _fd(fn, h=1e-5):
    """Central difference. The plan is piecewise linear in the data (exact differences while
    the support holds); the error is the solver's: |grad| / (curvature * h) ~ 1e-10 / h."""
    return (fn(h) - fn(-h)) / (2 * h)


def _support_margin(res, C):
    """How far the optimum is from a change of support (unbatched): the gap between
    each line's k-th and (k+1)-th scores ``alpha_i + beta_j - C_ij`` and their distance
    from 0 within the top k. Finite differences need it well above the step."""
    X = res.alpha[:, None] + res.beta[None, :] - C
    X = X.T if res.axis == 0 else X  # one line per row of X
    k = res.values.shape[-1]
    top = torch.sort(X, dim=1, descending=True).values
    margins = [top[:, :k].abs().min()]
    if k < X.shape[1]:
        margins.append((top[:, k - 1] - top[:, k]).min())
    return float(min(margins))


# the implicit gradient's system (the dual's reduced to the semi-dual's): solved directly (small
# problems) or by conjugate gradient (as for large ones)
@pytest.mark.parametrize("formulation", ["semi-dual", "dual"])
@pytest.mark.parametrize("solve", ["direct", "cg"])
@pytest.mark.parametrize("case", ["k_large", "band"])
def test_value_and_plan_gradients_by_finite_differences(formulation, case, solve, monkeypatch):
    if solve == "cg":
        monkeypatch.setattr(S, "DIRECT_MAX", 0)
    if case == "band":
        C, a, b, k, gamma = _band_problem()
    else:
        C, a, b = _problem(7, 6, seed=14)
        k, gamma = 7, 0.3
    Cr, ar, br = (t.clone().requires_grad_() for t in (C, a, b))
    res = otcore.sparse_ot(otcore.CostMatrix(Cr), ar, br, k=k, gamma=gamma, formulation=formulation, **TIGHT)
    assert res.grad_norm < 1e-10  # a smooth optimum: finite differences are meaningful
    assert _support_margin(res, C) > 3e-4
    W = torch.randn(res.values.shape, generator=torch.Generator().manual_seed(15), dtype=F64)
    (res.value + (res.values * W).sum()).backward()
    g = torch.Generator().manual_seed(16)
    dC = torch.randn(C.shape, generator=g, dtype=F64)
    da = torch.randn(a.shape, generator=g, dtype=F64)
    db = torch.randn(b.shape, generator=g, dtype=F64)
    da, db = da - da.mean(), db - db.mean()  # stay on the balanced set

    def loss(h):
        r = otcore.sparse_ot(otcore.CostMatrix(C + h * dC), a + h * da, b + h * db, k=k, gamma=gamma, formulation=formulation, **TIGHT)
        assert torch.equal(r.indices, res.indices)
        return float(r.value + (r.values * W).sum())

    analytic = float((Cr.grad * dC).sum() + (ar.grad * da).sum() + (br.grad * db).sum())
    assert abs(_fd(loss) - analytic) < 2e-5 * max(1.0, abs(analytic))


@pytest.mark.parametrize("n,m,k,gamma,axis,dtype", [
    (30, 5, 10, 0.1, 0, F64),    # few lines: through the lines' Laplacian (Woodbury)
    (30, 5, 10, 0.1, 1, F64),    # few positions: the N x N system itself
    (24, 24, 6, 0.2, 0, F64),
    (30, 5, 10, 1e-3, 0, F64),   # every position in one line's support: disconnected, 5 null directions
    (30, 5, 30, 1.0, 0, torch.float32),
])
def test_implicit_plan_gradient_solved_directly_matches_conjugate_gradient(n, m, k, gamma, axis, dtype, monkeypatch):
    """The semi-dual's implicit gradient solves ``K w = u`` directly where the positions or the
    lines are few (the router's experts): the same minimum-norm ``w`` as conjugate gradient,
    hence the same gradients (the weights' too, which the null directions would move), batched,
    with a zero-weight line."""
    g = torch.Generator().manual_seed(n + m + k)
    C = torch.rand(2, n, m, generator=g, dtype=dtype)
    a = torch.rand(2, n, generator=g, dtype=dtype) + 0.1
    b = torch.rand(2, m, generator=g, dtype=dtype) + 0.1
    b[1, 0] = 0.0
    b = b * a.sum(-1, keepdim=True) / b.sum(-1, keepdim=True)
    W = torch.randn(2, m if axis == 0 else n, min(k, n if axis == 0 else m), generator=g, dtype=dtype)

    def grads(direct):
        monkeypatch.setattr(S, "DIRECT_MAX", 10**9 if direct else 0)
        Cr, ar, br = (t.clone().requires_grad_() for t in (C, a, b))
        tol = 1e-12 if dtype == F64 else 1e-5
        res = otcore.sparse_ot(otcore.CostMatrix(Cr), ar, br, k=k, gamma=gamma, axis=axis, tol=tol, max_iter=3000)
        return torch.autograd.grad((res.values * W).sum(), (Cr, ar, br))

    rtol = 1e-7 if dtype == F64 else 2e-3
    for d, c in zip(grads(True), grads(False)):
        torch.testing.assert_close(d, c, rtol=0, atol=rtol * max(1.0, float(c.abs().max())))


def test_implicit_plan_gradient_on_a_chain_like_support_runs_its_conjugate_gradient_to_the_end(monkeypatch):
    """1-D clouds give a chain-like support, which conditions the implicit gradient's system
    like a path's Laplacian (~N^2): conjugate gradient needs ~0.6 N iterations here (612 for
    N = 1200). Capped at 500, it stopped short silently (2000 x 1800 clouds: gradients 1.3e-2
    off, a review); now up to 2N + 10, the same gradients as the direct solve."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1200, 1, generator=g, dtype=F64).requires_grad_()
    y = torch.rand(1000, 1, generator=g, dtype=F64)
    res = otcore.sparse_ot(otcore.PointCloud(x, y), k=1200, gamma=1e-2, tol=1e-11, max_iter=5000)
    assert res.converged
    W = torch.randn(res.values.shape, generator=g, dtype=F64)
    seen = []
    pcg = Q.pcg

    def spy(*args, **kw):
        w, its = pcg(*args, **kw)
        seen.append(int(its.max()))
        return w, its

    monkeypatch.setattr(Q, "pcg", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no cap reached, no warning
        (by_cg,) = torch.autograd.grad((res.values * W).sum(), x, retain_graph=True)
    assert seen and seen[0] > 500
    monkeypatch.setattr(S, "DIRECT_MAX", 10**9)
    (direct,) = torch.autograd.grad((res.values * W).sum(), x)
    torch.testing.assert_close(by_cg, direct, rtol=0, atol=1e-7 * float(direct.abs().max()))


def test_implicit_plan_gradient_warns_when_its_conjugate_gradient_stops_at_the_cap(monkeypatch):
    """A system conjugate gradient cannot finish within 2N + 10 iterations gives a gradient it
    cannot vouch for: a ConvergenceWarning says so (the cap had been reached silently)."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(80, 1, generator=g, dtype=F64).requires_grad_()
    y = torch.rand(70, 1, generator=g, dtype=F64)
    res = otcore.sparse_ot(otcore.PointCloud(x, y), k=80, gamma=1e-2, tol=1e-11, max_iter=5000)
    monkeypatch.setattr(S, "DIRECT_MAX", 0)
    pcg = Q.pcg
    monkeypatch.setattr(Q, "pcg", lambda K, u, rtol, max_iter, **kw: pcg(K, u, rtol, 3, **kw)[:1]
                        + (torch.full((u.shape[0],), max_iter),))  # three iterations, reported as the cap
    with pytest.warns(ConvergenceWarning, match=r"conjugate gradient .* stopped at its cap of 170 iterations"):
        torch.autograd.grad(res.values.sum() + (res.values**2).sum(), x)


def test_value_gradient_is_the_plan_and_the_duals():
    """At a smooth optimum (k = 3: no tie across a column's k-th place, the gradient norm
    3e-14). With k = 2 the same problem stops at a kink (gradient norm 0.15), where the
    cost gradient is the plan mixed over the tied supports: tests/test_sparse_ot_kink.py."""
    C, a, b = _problem(8, 6, seed=17)
    Cr, ar, br = (t.clone().requires_grad_() for t in (C, a, b))
    res = otcore.sparse_ot(otcore.CostMatrix(Cr), ar, br, k=3, gamma=0.5, **TIGHT)
    assert float(res.grad_norm) < 1e-10
    res.value.backward()
    torch.testing.assert_close(Cr.grad, res.to_dense().detach())  # envelope: dvalue/dC = T
    torch.testing.assert_close(ar.grad, res.alpha)
    torch.testing.assert_close(br.grad, res.beta)


@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean"])
@pytest.mark.parametrize("axis", [0, 1])
def test_point_cloud_gradients(cost, axis):
    g = torch.Generator().manual_seed(18)
    x = torch.rand(7, 3, generator=g, dtype=F64)
    y = torch.rand(5, 3, generator=g, dtype=F64)
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    res = otcore.sparse_ot(otcore.PointCloud(xr, yr, cost=cost), k=10, gamma=0.5, axis=axis, **TIGHT)
    C = otcore.PointCloud(x, y, cost=cost).cost_block()[0]
    assert _support_margin(res, C) > 3e-4
    W = torch.randn(res.values.shape, generator=g, dtype=F64)
    (res.value + res.cost + (res.values * W).sum()).backward()
    dx, dy = torch.randn(x.shape, generator=g, dtype=F64), torch.randn(y.shape, generator=g, dtype=F64)
    T = res.to_dense().detach()

    def loss(h):
        r = otcore.sparse_ot(otcore.PointCloud(x + h * dx, y + h * dy, cost=cost), k=10, gamma=0.5, axis=axis, **TIGHT)
        # cost is differentiated with the plan held fixed: <T_fixed, C(x, y)>
        Ch = otcore.PointCloud(x + h * dx, y + h * dy, cost=cost).cost_block()[0]
        return float(r.value + (T * Ch).sum() + (r.values * W).sum())

    analytic = float((xr.grad * dx).sum() + (yr.grad * dy).sum())
    assert abs(_fd(loss) - analytic) < 2e-5 * max(1.0, abs(analytic))


def test_fixed_plan_gradient_is_the_projection_jacobian():
    """plan_grad="fixed": on column j's support S, dT_ij/dC_i'j = -(delta_ii' - 1/|S|)/gamma."""
    C, a, b = _problem(8, 5, seed=19)
    Cr = C.clone().requires_grad_()
    res = otcore.sparse_ot(otcore.CostMatrix(Cr), a, b, k=3, gamma=0.5, plan_grad="fixed", **TIGHT)
    j = 2
    sup = res.values[j] > 0
    rows = res.indices[j][sup]
    i0 = int(rows[0])
    res.values[j][sup][0].backward()
    want = torch.zeros_like(C)
    want[rows, j] = 1.0 / (0.5 * len(rows))
    want[i0, j] -= 1.0 / 0.5
    torch.testing.assert_close(Cr.grad, want)


def test_sparse_cost_grad_matches_autograd_of_the_cost():
    g = torch.Generator().manual_seed(20)
    x = torch.rand(2, 6, 4, generator=g, dtype=F64, requires_grad=True)
    y = torch.rand(2, 5, 4, generator=g, dtype=F64, requires_grad=True)
    for cost in ("sqeuclidean", "euclidean"):
        for axis in (0, 1):
            geom = otcore.PointCloud(x.detach(), y.detach(), cost=cost)
            L, N = (5, 6) if axis == 0 else (6, 5)
            idx = torch.stack([torch.randperm(N, generator=g)[:3] for _ in range(2 * L)]).reshape(2, L, 3)
            W = torch.rand(2, L, 3, generator=g, dtype=F64)
            gx, gy = geom.sparse_cost_grad(W, idx, axis)
            D = torch.cdist(x, y)
            Cfull = D * D if cost == "sqeuclidean" else D
            Cl = Cfull.transpose(1, 2) if axis == 0 else Cfull
            total = (torch.gather(Cl, 2, idx) * W).sum()
            ex, ey = torch.autograd.grad(total, (x, y))
            torch.testing.assert_close(gx, ex)
            torch.testing.assert_close(gy, ey)


@pytest.mark.parametrize("formulation", ["semi-dual", "dual"])
def test_smooth_problem_runs_to_tol_whatever_the_offset_of_costs_or_duals(formulation):
    """k >= n: the optimum is smooth, so converged means grad_norm <= tol. The ftol rule
    measured improvement against |<alpha, a>| + |<beta, b>| + reg, terms that grow with a
    cost offset or a dual shift and cancel: it stopped C + 1e6 at grad_norm 5.8e-2
    (dual) and reported converged. Now it does not stop smooth problems, and its scale is
    mass times the cost's range."""
    C, a, b = _problem(12, 9, seed=30)
    ref = otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=12, gamma=0.3, tol=1e-10, max_iter=5000).to_dense()
    for Cs, init in ((C + 1e6, None), (C, (torch.full((12,), 1e6, dtype=F64), torch.zeros(9, dtype=F64)))):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            r = otcore.sparse_ot(otcore.CostMatrix(Cs), a, b, k=12, gamma=0.3, formulation=formulation, init=init,
                                 max_iter=5000)
        assert r.converged and r.info["stop"] == "gradient norm <= tol" and r.grad_norm <= 1e-5
        assert float((r.to_dense() - ref).abs().max()) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_line_sums_stay_exact_for_large_scores_and_small_gamma(backend):
    """The semi-dual's line sums are exact by construction. Computed as [x + beta]_+ / gamma
    they cancelled once gamma * mass fell below the scores' rounding: float32, C + 1e6 gave
    line sums off by 20%, gamma = 1e-10 an all-zero plan, reported converged. Relative to
    the line's top score they stay exact -- at every iterate, so the interpreter's run stops
    after 20 iterations (its 200 took 35 s of CI)."""
    C, a, b = _problem(13, 7, seed=31, dtype=torch.float32)
    for Cs, gamma in ((C + 1e6, 0.5), (C, 1e-10)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            r = otcore.sparse_ot(otcore.CostMatrix(Cs), a, b, k=2, gamma=gamma, max_iter=200 if backend == "torch" else 20,
                                 backend=backend)
        torch.testing.assert_close(r.to_dense().sum(0), b, rtol=1e-5, atol=0)


def test_plan_that_misses_its_line_sums_is_not_converged(monkeypatch):
    """The line sums are exact in exact arithmetic (and at the dual's optimum): a final pass
    whose line sums miss the weights beyond tol (a resolution failure, simulated here)
    gives converged=False and a warning that says why."""
    C, a, b = _problem(12, 9, seed=32)
    settle = S._settle
    monkeypatch.setattr(S, "_settle", lambda pb, hp, out: (lambda h, o: (h, o._replace(line_sum=0.9 * o.line_sum)))(
        *settle(pb, hp, out)))
    with pytest.warns(ConvergenceWarning, match="line sums miss the line weights by 1.000e-01"):
        r = otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=2, gamma=0.5)
    assert not r.converged


@pytest.mark.parametrize("formulation", ["semi-dual", "dual"])
@pytest.mark.parametrize("axis", [0, 1])
def test_zero_weight_potential_is_the_weight_gradient(formulation, axis):
    """A zero-weight point's potential is arbitrary for the solve (no mass reaches it), yet
    it is d value / d weight. It is set to the boundary where the point starts to receive
    mass: one-sided finite differences of re-solved problems agree (it was -0.499 against
    -0.436 for the semi-dual's rows, -0.609 for the dual)."""
    g = torch.Generator().manual_seed(4)
    C = torch.rand(5, 4, generator=g, dtype=F64)
    a0 = torch.tensor([0.3, 0.0, 0.3, 0.4, 0.0], dtype=F64)
    b0 = torch.tensor([0.25, 0.25, 0.3, 0.2], dtype=F64)
    kw = dict(k=5, gamma=5.0, tol=1e-13, max_iter=5000, formulation=formulation, axis=axis)
    a = a0.clone().requires_grad_()
    r = otcore.sparse_ot(otcore.CostMatrix(C), a, b0, **kw)
    (ga,) = torch.autograd.grad(r.value, a)
    d = torch.tensor([-1.0, 1.0, 0, 0, 0], dtype=F64)  # mass onto the zero-weight row 1
    h = 1e-6
    fd = (float(otcore.sparse_ot(otcore.CostMatrix(C), a0 + h * d, b0, **kw).value) - float(r.value.detach())) / h
    assert float(ga @ d) == pytest.approx(fd, abs=1e-4)


@pytest.mark.parametrize("formulation", ["semi-dual", "dual"])
@pytest.mark.parametrize("axis", [0, 1])
def test_zero_weights_on_both_sides_give_the_weight_gradients(formulation, axis):
    """Both clouds padded with zero-weight points at the origin (cost 0 between the pads).
    The boundary dual of a zero-weight position ran over the zero-weight lines too, and a
    zero-weight line's multiplier took the top score over the zero-weight positions too:
    the pads set each other's duals through their cheap mutual costs, and d value / d
    weight came out -0.246 and -0.336 against +2.857 and +3.073 by finite differences
    (axis 0 and 1 disagreeing), with converged True."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(5, 2, generator=g, dtype=F64) + 1, torch.zeros(2, 2, dtype=F64)])
    y = torch.cat([torch.rand(4, 2, generator=g, dtype=F64) + 1, torch.zeros(2, 2, dtype=F64)])
    a0 = torch.tensor([0.2] * 5 + [0.0] * 2, dtype=F64)
    b0 = torch.tensor([0.25] * 4 + [0.0] * 2, dtype=F64)
    kw = dict(k=7, gamma=0.5, tol=1e-11, max_iter=5000, formulation=formulation, axis=axis, backend="torch")
    geom = otcore.PointCloud(x, y)
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    r = otcore.sparse_ot(geom, a, b, **kw)
    ga, gb = torch.autograd.grad(r.value, (a, b))
    assert r.converged
    h = 1e-7
    for grad, w0, pad in ((ga, a0, 5), (gb, b0, 4)):
        d = torch.zeros_like(w0)
        d[pad], d[0] = 1.0, -1.0  # mass from point 0 onto a pad
        moved = (a0 + h * d, b0) if w0 is a0 else (a0, b0 + h * d)
        fd = (float(otcore.sparse_ot(geom, *moved, **kw).value) - float(r.value.detach())) / h
        assert float(grad @ d) == pytest.approx(fd, abs=1e-5)
    # the pad's dual is its boundary over the lines with mass (docs/sparse_ot.md)
    C = torch.cdist(x, y) ** 2
    pos, lines, line_w = (r.alpha, r.beta, b0) if axis == 0 else (r.beta, r.alpha, a0)
    Cl = C if axis == 0 else C.T
    pad = 5 if axis == 0 else 4
    assert float(pos[pad]) == pytest.approx(float((Cl[pad] - lines)[line_w > 0].min()), abs=1e-9)
    if formulation == "semi-dual":  # the Triton path (interpreter on the CPU): the same duals
        rt = otcore.sparse_ot(geom, a0, b0, **dict(kw, backend="triton"))
        torch.testing.assert_close(rt.alpha[5:], r.alpha[5:].detach(), rtol=0, atol=1e-8)
        torch.testing.assert_close(rt.beta[4:], r.beta[4:].detach(), rtol=0, atol=1e-8)


def test_zero_weight_points_get_no_mass_after_their_boundary_dual():
    """The boundary dual of a zero-weight point must stay strictly below the k-th weighted
    score: at a tie the top-k selection (first in position order) gave it a slot and mass
    (0.17 here, k = 1)."""
    g = torch.Generator().manual_seed(4)
    n, m = int(torch.randint(4, 12, (1,), generator=g)), int(torch.randint(4, 12, (1,), generator=g))
    C = torch.rand(n, m, generator=g, dtype=F64)
    a = torch.rand(n, generator=g, dtype=F64) + 0.1
    b = torch.rand(m, generator=g, dtype=F64) + 0.1
    zero = torch.rand(n, generator=g) < 0.3
    zero[0] = True
    a[zero] = 0
    a, b = a / a.sum(), b / b.sum()
    for k in (1, 2):
        r = otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=k, gamma=0.5)
        assert float(r.to_dense()[zero].abs().max()) == 0.0, k


@pytest.mark.parametrize("formulation", ["semi-dual", "dual"])
@pytest.mark.parametrize("seed", [1, 8])
def test_zero_weight_points_left_inside_a_support_get_no_mass(seed, formulation):
    """Newton can stop (to tol) with a zero-weight position inside a column's support,
    holding a residual's mass; its boundary dual is taken from the columns without it, so
    the returned plan gives it none (from the solve's multipliers 1e-8 of mass came back at
    these seeds: a review)."""
    g = torch.Generator().manual_seed(seed)
    C = torch.rand(30, 20, generator=g, dtype=F64)
    a = torch.rand(30, generator=g, dtype=F64) + 0.1
    b = torch.rand(20, generator=g, dtype=F64) + 0.1
    a[[0, 7, 13]] = 0
    b[2] = 0
    a, b = a / a.sum(), b / b.sum()
    r = otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=30, gamma=0.05, formulation=formulation)
    assert r.converged and r.info["solver"].startswith("newton")
    P = r.to_dense()
    assert float(P[a == 0].abs().max()) == 0.0 and float(P[:, b == 0].abs().max()) == 0.0
    torch.testing.assert_close(P.sum(0), b, rtol=0, atol=1e-12)  # the mass went to weighted rows


@pytest.mark.parametrize("formulation,k,dtype", [("semi-dual", 6, F64), ("dual", 6, F64), ("dual", 30, F64),
                                                 ("semi-dual", 6, torch.float32)])
def test_a_stall_above_tol_says_what_may_help(formulation, k, dtype):
    """A smooth solve that stops improving above tol (here: tol below what any dtype
    resolves) warns with advice that fits: float64 only where it is not the dtype, the
    semi-dual only to a dual that ran its own solver (not one solved as its semi-dual)."""
    geom, a, b = _clouds(30, 20, seed=2)
    geom = otcore.PointCloud(geom.x[0].to(dtype), geom.y[0].to(dtype))
    with pytest.warns(ConvergenceWarning, match="tol may be below what the dtype resolves") as rec:
        r = otcore.sparse_ot(geom, a.to(dtype), b.to(dtype), k=k, gamma=0.5, formulation=formulation, tol=1e-30,
                             max_iter=3000)
    assert not r.converged and int(r.n_iter) < 3000
    text = str(rec[0].message)
    assert ("or float64" in text) == (dtype != F64)
    assert ("formulation='semi-dual'" in text) == (formulation == "dual" and k < 30)


@pytest.mark.parametrize("formulation", ["semi-dual", "dual"])
@pytest.mark.parametrize("k", [3, 12])
def test_zero_weight_rows_cheaper_than_the_rest_get_no_mass(k, formulation):
    """Padding rows of zero weight and zero cost below a weighted block at 0.5-0.6: their
    duals are pushed below every line's reach by the range of all costs, theirs included
    (by the weighted block's range alone they outranked every weighted row and took all the
    mass, value 0.21 instead of 0.52, with converged=True: a review)."""
    g = torch.Generator().manual_seed(1)
    C = torch.zeros(12, 9, dtype=F64)
    C[2:] = 0.5 + 0.1 * torch.rand(10, 9, generator=g, dtype=F64)
    a = torch.zeros(12, dtype=F64)
    a[2:] = 0.1
    b = torch.full((9,), 1 / 9, dtype=F64)
    r = otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=k, gamma=0.01, tol=1e-9, formulation=formulation)
    alone = otcore.sparse_ot(otcore.CostMatrix(C[2:]), a[2:], b, k=min(k, 10), gamma=0.01, tol=1e-9,
                             formulation=formulation)
    assert r.converged and r.grad_norm <= 1e-9
    assert float(r.to_dense()[:2].abs().max()) == 0.0
    torch.testing.assert_close(r.to_dense()[2:], alone.to_dense(), rtol=0, atol=1e-9)
    torch.testing.assert_close(r.value, alone.value, rtol=1e-10, atol=0)


def test_zero_weight_duals_do_not_depend_on_the_other_problems_of_a_batch():
    """The boundary duals come from a near-hard softmin whose eps is one number for the
    batch: sized by a problem with costs ~1e5 it made another problem's zero-weight duals
    soft (-0.22 batched against 0.013 alone). It is sized by the smallest problem now."""
    g = torch.Generator().manual_seed(0)
    C1, C0 = torch.rand(12, 9, generator=g), torch.rand(12, 9, generator=g) * 1e5
    a1 = torch.rand(12, generator=g) + 0.2
    a1[[2, 7]] = 0
    a1 /= a1.sum()
    a0, b = torch.full((12,), 1 / 12), torch.full((9,), 1 / 9)
    kw = dict(k=12, gamma=0.5, backend="torch")
    single = otcore.sparse_ot(otcore.CostMatrix(C1), a1, b, **kw)
    batch = otcore.sparse_ot(otcore.CostMatrix(torch.stack([C0, C1])), torch.stack([a0, a1]), torch.stack([b, b]), **kw)
    d_single, d_batch = single.alpha - single.alpha[0], batch.alpha[1] - batch.alpha[1, 0]
    torch.testing.assert_close(d_batch[[2, 7]], d_single[[2, 7]], rtol=0, atol=1e-5)


def test_ftol_scale_ignores_a_far_outlier():
    """One far target of tiny mass made the cost's range 900 times the rest: with it as
    ftol's scale the solve stopped at grad_norm 2.7e-2 (k = 4 does not bind at the
    optimum, which a long run reaches). The scale is the value above its floor instead."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 2, generator=g, dtype=F64), torch.rand(64, 2, generator=g, dtype=F64)
    y[-1] = 30.0
    a = torch.full((64,), 1 / 64, dtype=F64)
    b = torch.full((64,), (1 - 1e-4) / 63, dtype=F64)
    b[-1] = 1e-4
    r = otcore.sparse_ot(otcore.PointCloud(x, y), a, b, k=4, gamma=0.1)
    ref = otcore.sparse_ot(otcore.PointCloud(x, y), a, b, k=4, gamma=0.1, tol=1e-10, ftol=1e-16, max_iter=5000)
    assert r.converged and r.grad_norm < 1e-3
    assert float(r.value) == pytest.approx(float(ref.value), rel=1e-7)


def test_float32_smooth_problem_converges_with_default_settings():
    """k >= n in float32: below the objective's float resolution the gradient still falls,
    so the solve must not stop while it does (it stopped at 4.6e-5 > tol, unconverged)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 2, generator=g), torch.rand(64, 2, generator=g)
    for formulation in ("semi-dual", "dual"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            r = otcore.sparse_ot(otcore.PointCloud(x, y), k=64, gamma=0.1, formulation=formulation)
        assert r.converged and r.grad_norm <= 1e-5


@pytest.mark.parametrize("seed", [5, 23, 24])
def test_float32_ties_at_the_start_are_not_called_converged(seed):
    """Integer costs tie in every column's top k at alpha = 0. In float32 the line search
    accepted a first step 2^-18 long within its rounding slack, without any decrease; the
    iterate wandered inside the slack and ftol called the start converged, 6.5-10% below
    float64's value (5 of 30 such problems). An ftol stop no lower than the start now kicks."""
    g = torch.Generator().manual_seed(seed)
    C = torch.randint(0, 4, (20, 10), generator=g).double()
    r64 = otcore.sparse_ot(otcore.CostMatrix(C), k=3, gamma=0.5, backend="torch", max_iter=2000)
    r32 = otcore.sparse_ot(otcore.CostMatrix(C.float()), k=3, gamma=0.5, backend="torch", max_iter=2000)
    assert r32.converged and r64.converged
    assert float(r32.value) >= float(r64.value) * (1 - 2e-3)


def test_ties_at_the_start_do_not_stop_the_solve():
    """Duplicated points tie in every column at alpha = 0: the line search found no step
    and the solve gave up at iteration 0, 44% below the optimum. A small fixed kick off
    the kink lets it go on; k = 1 with n = m reaches LP + (gamma/2)|b|^2."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 2, generator=g, dtype=F64)
    X, y = torch.cat([x, x]), torch.rand(8, 2, generator=g, dtype=F64)
    u = torch.full((8,), 1 / 8, dtype=F64)
    r = otcore.sparse_ot(otcore.PointCloud(X, y), u, u, k=1, gamma=0.1, backend="torch")
    lp, _ = _lp_value(torch.cdist(X, y) ** 2, u, u)
    assert r.converged and r.n_iter > 0
    assert float(r.value) == pytest.approx(lp + 0.5 * 0.1 * float((u * u).sum()), rel=1e-9)


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,err,match",
    [
        (dict(k=0), ValueError, "^k must be >= 1, got 0$"),
        (dict(k=1.5), TypeError, "^k must be an int, got float$"),
        (dict(gamma=0.0), ValueError, "gamma"),
        (dict(gamma=-1.0), ValueError, "gamma"),
        (dict(gamma=float("nan")), ValueError, "gamma"),
        (dict(formulation="primal"), ValueError, "formulation"),
        (dict(axis=2), ValueError, "axis"),
        (dict(axis=1.0), TypeError, "^axis must be an int, got float$"),
        (dict(gamma=1e305), ValueError, "^gamma=1e[+]305 is too large for float64"),
        (dict(tol=0.0), ValueError, "tol"),
        (dict(ftol=-1.0), ValueError, "ftol"),
        (dict(max_iter=0), ValueError, "max_iter"),
        (dict(history=0), ValueError, "history"),
        (dict(plan_grad="unrolled"), ValueError, "plan_grad"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(init=(torch.zeros(3, dtype=F64), torch.zeros(4, dtype=F64))), ValueError, "alpha"),
    ],
)
def test_bad_arguments(kw, err, match):
    C, a, b = _problem(5, 4, seed=21)
    args = dict(k=2, gamma=0.5)
    args.update(kw)
    with pytest.raises(err, match=match):
        otcore.sparse_ot(otcore.CostMatrix(C), a, b, **args)


def test_a_problem_solves_alike_alone_and_in_a_batch_with_larger_costs():
    """The first step's cap and the kick off kinks are per problem: with the batch's largest
    cost range they changed a binding problem's result (0.1740544602 alone, 0.1740685819
    batched with a problem of 10x the costs)."""
    g = torch.Generator().manual_seed(0)
    torch.rand(12 * 3 + 9 * 3, generator=g, dtype=F64)  # (the numbers of the case found)
    C = torch.rand(3, 10, 7, generator=g, dtype=F64)
    C[1] *= 10
    a = torch.rand(3, 10, generator=g, dtype=F64)
    b = torch.rand(3, 7, generator=g, dtype=F64)
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    kw = dict(k=2, gamma=0.2, tol=1e-10, backend="torch")
    both = otcore.sparse_ot(otcore.CostMatrix(C), a, b, **kw)
    for i in range(3):
        alone = otcore.sparse_ot(otcore.CostMatrix(C[i]), a[i], b[i], **kw)
        assert int(both.n_iter[i]) == alone.n_iter
        torch.testing.assert_close(both.value[i], alone.value, rtol=1e-14, atol=0)


def test_ftol_does_not_stop_a_problem_where_k_does_not_bind():
    """k = 40 < 60 rows, but no column's support reaches 40 entries at the optimum: the
    objective is smooth there and the solve must run to tol (ftol stopped it at 7.7x tol)."""
    C, a, b = _problem(60, 12, seed=32)
    res = otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=40, gamma=0.05, tol=1e-9, ftol=1e-3, backend="torch")
    assert int((res.values > 0).sum(-1).max()) < 40  # k does not bind
    assert res.info["stop"] == "gradient norm <= tol" and res.grad_norm <= 1e-9


@pytest.mark.parametrize("axis", [0, 1])
def test_k_too_small_for_any_coupling_is_rejected(axis):
    """k nonzeros per line over L weighted lines cover at most k L positions: fewer than the
    weighted positions means no coupling exists (it was solved and reported converged with
    a marginal error of 1.6 out of 2)."""
    C = torch.rand(10, 3, dtype=F64) if axis == 0 else torch.rand(3, 10, dtype=F64)
    with pytest.raises(ValueError, match=r"k=2 is too small: 3 (columns|rows) with positive weight .* k must be >= 4"):
        otcore.sparse_ot(otcore.CostMatrix(C), k=2, gamma=0.5, axis=axis)
    otcore.sparse_ot(otcore.CostMatrix(C), k=4, gamma=0.5, axis=axis)  # room enough
    w = torch.ones(10, dtype=F64)
    w[6:] = 0  # 6 weighted positions: k = 2 has room
    a, b = (w / 6, None) if axis == 0 else (None, w / 6)
    otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=2, gamma=0.5, axis=axis)


def test_numpy_and_tensor_numbers_are_accepted_bools_are_not():
    C, a, b = _problem(6, 5, seed=33)
    ref = otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=2, gamma=0.5)
    for k, gamma in ((np.int64(2), np.float32(0.5)), (torch.tensor(2), torch.tensor(0.5, dtype=F64))):
        res = otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=k, gamma=gamma)
        assert torch.equal(res.values, ref.values)
    for bad in (True, np.bool_(True), torch.tensor(True), 2.0, torch.tensor(2.0)):
        with pytest.raises(TypeError, match="k must be an int"):
            otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=bad, gamma=0.5)
    for bad in (np.bool_(True), torch.tensor(0.5 + 0j), torch.tensor([0.5, 0.5])):
        with pytest.raises(TypeError, match="gamma must be a number"):
            otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=2, gamma=bad)
    res = otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=2, gamma=0.5, axis=np.int64(0))  # a NumPy axis too
    assert torch.equal(res.values, ref.values)


def test_bad_inputs():
    C, a, b = _problem(5, 4, seed=22)
    with pytest.raises(TypeError, match="geom"):
        otcore.sparse_ot(C, a, b, k=2, gamma=0.5)
    with pytest.raises(ValueError, match="same total mass"):
        otcore.sparse_ot(otcore.CostMatrix(C), a, 2 * b, k=2, gamma=0.5)
    with pytest.raises(ValueError, match="negative"):
        otcore.sparse_ot(otcore.CostMatrix(C), -a, b, k=2, gamma=0.5)
    bad = C.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="C contains NaN"):
        otcore.sparse_ot(otcore.CostMatrix(bad), a, b, k=2, gamma=0.5)
    with pytest.raises(ValueError, match="shape"):
        otcore.sparse_ot(otcore.CostMatrix(C), a[:3], b, k=2, gamma=0.5)


@pytest.mark.parametrize("formulation", ["semi-dual", "dual"])
def test_k_equal_to_the_natural_support_does_not_bind(formulation):
    """Where the unconstrained optimum already uses at most ``k`` positions per line, a line
    filling its ``k`` slots does not make ``k`` bind (its ``(k+1)``-th score lies below the
    threshold): the objective is smooth there, so ``ftol`` must not stop it. Counting full
    lines stopped it at 3600x (semi-dual) and 2.4e5x (dual) tol with ``converged=True``."""
    C = torch.rand(30, 20, generator=torch.Generator().manual_seed(0), dtype=F64)
    full = otcore.sparse_ot(otcore.CostMatrix(C), k=30, gamma=0.5, tol=1e-10, backend="torch")
    natural = int((full.to_dense() > 0).sum(0).max())
    assert natural < 30
    res = otcore.sparse_ot(otcore.CostMatrix(C), k=natural, gamma=0.5, tol=1e-10, formulation=formulation,
                           backend="torch")
    assert res.converged and res.grad_norm <= 1e-10 and res.info["stop"] == "gradient norm <= tol"
    torch.testing.assert_close(res.to_dense(), full.to_dense(), rtol=0, atol=1e-9)
    tight = otcore.sparse_ot(otcore.CostMatrix(C), k=natural - 1, gamma=0.5, tol=1e-10, formulation=formulation,
                             backend="torch")  # one slot fewer: it binds, and ftol stops it
    assert tight.converged and tight.info["stop"] == "objective stationary (ftol)"


@pytest.mark.parametrize("k", [3, 30])
def test_a_warm_start_in_another_gauge_is_solved_in_a_centred_one(k):
    """``(alpha + c, beta - c)`` is the same dual point. Carried into a float32 solve, c = 1e4
    moved the value by 4e-3 relative with ``converged=True`` (at 1e8: a uniform plan,
    ``grad_norm`` 0, value -0.004 for 0.072). The duals come back in the given gauge."""
    C = torch.rand(30, 20, generator=torch.Generator().manual_seed(0))
    cold = otcore.sparse_ot(otcore.CostMatrix(C), k=k, gamma=0.5, backend="torch")
    c = 1e4
    warm = otcore.sparse_ot(otcore.CostMatrix(C), k=k, gamma=0.5, init=(cold.alpha + c, cold.beta - c),
                            backend="torch")
    assert warm.converged and warm.n_iter < 30
    torch.testing.assert_close(warm.value, cold.value, rtol=1e-6, atol=0)
    torch.testing.assert_close(warm.to_dense(), cold.to_dense(), rtol=0, atol=1e-4)
    assert abs(float((warm.alpha - cold.alpha).mean()) - c) < 1e-2  # the caller's gauge


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("axis", [0, 1])
def test_a_semi_dual_warm_start_does_not_depend_on_the_side_it_ignores(dtype, axis):
    """The semi-dual uses the positions' duals alone (alpha for axis 0) and is invariant to a
    constant in them. Both sides had been centred together: an ignored beta of -1e8 (float32;
    -1e17 in float64) left |alpha| ~ 5e7, every score tied, and the solve returned value
    -0.025 for 0.372, half the mass misplaced, converged True (a review); a constant in alpha
    was only halved. The start is now the used side at weighted mean 0."""
    C = torch.rand(6, 5, generator=torch.Generator().manual_seed(0), dtype=F64).to(dtype)
    cold = otcore.sparse_ot(otcore.CostMatrix(C), k=2, gamma=0.5, axis=axis, backend="torch")
    used = cold.alpha if axis == 0 else cold.beta
    for far in (1e8, 1e17):
        other = torch.full((5,) if axis == 0 else (6,), -far, dtype=dtype)
        for init in ((used, other), (used + far, torch.zeros_like(other))):
            warm = otcore.sparse_ot(otcore.CostMatrix(C), k=2, gamma=0.5, axis=axis, backend="torch",
                                    init=init if axis == 0 else init[::-1])
            # (k binds: the kink's gap depends on the path there, 0.09-0.28 of the mass 2 here)
            assert warm.converged and warm.marginal_error < 0.5, (far, warm.marginal_error)
            torch.testing.assert_close(warm.value, cold.value, rtol=1e-5, atol=0)


def test_max_iter_past_int64_counts_is_refused():
    """2^63 raised OverflowError in the stages' int64 counts, 2^63 - 1 ran 0 iterations and
    reported max_iter reached (a review, through the CLI)."""
    C = torch.rand(6, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    for max_iter in (2**63, 2**63 - 1):
        with pytest.raises(ValueError, match=r"^max_iter must be <= 2\*\*62"):
            otcore.sparse_ot(otcore.CostMatrix(C), k=2, gamma=1.0, max_iter=max_iter, backend="torch")
    assert otcore.sparse_ot(otcore.CostMatrix(C), k=2, gamma=1.0, max_iter=2**62, backend="torch").converged


def test_a_float64_warm_start_is_shifted_before_the_cast_to_float32():
    """Float64 duals of the optimum in another gauge on a float32 problem: cast first, c = 1e7
    took as many iterations as a cold start and c = 1e10 ended unconverged (65 iterations);
    the shifts (cost offset, gauge) now run in float64. The duals come back in the caller's
    gauge, to float32's resolution there."""
    C = torch.rand(30, 20, generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = otcore.sparse_ot(otcore.CostMatrix(C), k=30, gamma=0.5, tol=1e-10, backend="torch")
    for c in (1e7, 1e10):
        warm = otcore.sparse_ot(otcore.CostMatrix(C.float()), k=30, gamma=0.5, init=(ref.alpha + c, ref.beta - c),
                                backend="torch")
        assert warm.converged and warm.n_iter <= 1, c
        torch.testing.assert_close(warm.to_dense().double(), ref.to_dense(), rtol=0, atol=1e-6)
        assert abs(float((warm.alpha.double() - ref.alpha).mean()) / c - 1) < 1e-6


def test_the_duals_fixed_plan_jacobian_keeps_the_line_sums():
    """``plan_grad="fixed"`` is the projection's Jacobian on the support for both
    formulations: a line's sum is exact whatever the costs, so its gradient is 0 (the
    dual's held the line multiplier fixed instead: a gradient of 2)."""
    C = torch.rand(8, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    grads = []
    for formulation in ("semi-dual", "dual"):
        Cg = C.clone().requires_grad_()
        res = otcore.sparse_ot(otcore.CostMatrix(Cg), k=8, gamma=0.5, formulation=formulation, plan_grad="fixed",
                               tol=1e-12, backend="torch")
        (g,) = torch.autograd.grad(res.values[0].sum(), Cg)
        assert float(g.abs().max()) < 1e-12
        w = torch.randn(6, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
        grads.append(torch.autograd.grad((otcore.sparse_ot(
            otcore.CostMatrix(Cg), k=8, gamma=0.5, formulation=formulation, plan_grad="fixed", tol=1e-12,
            backend="torch").values * w).sum(), Cg)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-9)  # one Jacobian, both formulations


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_newton_system_by_conjugate_gradient_matches_the_direct_solve(dtype):
    """Past DIRECT_MAX positions Newton's damped system ``K_lam d = u`` is solved by conjugate
    gradient on the support compacted to its widest line, without forming ``K``: the same
    ``d`` as the direct solve, batched, on supports with an empty line, a position in no line
    (``D = 0``: damped to ``lam``), one-slot lines (parts of their own: ``K``'s null
    directions, which only the damping holds) and slots off the support."""
    g = torch.Generator().manual_seed(3)
    B, L, N, k = 2, 9, 13, 8
    idx = torch.sort(torch.rand(B, L, N, generator=g).argsort(-1)[..., :k], -1).values  # k of N per line, ascending
    support = torch.rand(B, L, k, generator=g) < 0.5
    support[0, 2] = False  # an empty line
    support[1] &= idx[1] != 5  # position 5 of problem 1 in no line
    support[1, 3], support[1, 4] = False, False
    support[1, 3, 0], support[1, 4, 7] = True, True  # one-slot lines
    u = torch.randn(B, N, generator=g, dtype=dtype)
    lam = torch.tensor([1e-3, 0.5], dtype=dtype)
    width = int(support.sum(-1).max())
    assert width < k
    direct = Q.semi_dual_hessian_solve(0.3, idx, support, u, lam)
    rtol = 1e-13 if dtype == F64 else 1e-6
    cg = Q.semi_dual_hessian_cg(0.3, idx, support, u, lam, width, rtol=rtol, max_iter=500)[0]
    scale = float(direct.abs().max())
    torch.testing.assert_close(cg, direct, rtol=0, atol=(1e-10 if dtype == F64 else 1e-4) * scale)
    # stopped at the default 1e-3 it is an inexact step, still a descent direction for -u
    rough = Q.semi_dual_hessian_cg(0.3, idx, support, u, lam, width)[0]
    assert bool(((rough * u).sum(-1) > 0).all())
    # undamped (the implicit plan gradient's system), u in K's range: the minimum-norm solution,
    # as the direct solve's (the one-slot lines' and the empty position's null directions untouched)
    M = torch.zeros(B, N, L, dtype=F64).scatter_(1, idx.transpose(1, 2), support.transpose(1, 2).to(F64))
    size = M.sum(1)
    K = (torch.diag_embed(M.sum(2)) - (M / size.clamp(min=1)[:, None, :]) @ M.transpose(1, 2)) / 0.3
    u_range = (K @ torch.randn(B, N, 1, generator=g, dtype=F64))[..., 0].to(dtype)
    direct = Q.semi_dual_hessian_solve(0.3, idx, support, u_range)
    cg = Q.semi_dual_hessian_cg(0.3, idx, support, u_range, None, width, rtol=rtol, max_iter=500)[0]
    torch.testing.assert_close(cg, direct, rtol=0, atol=(1e-9 if dtype == F64 else 1e-4) * float(direct.abs().max()))


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-5)])
def test_newton_past_direct_max_solves_by_conjugate_gradient(dtype, tol, monkeypatch):
    """Quadratically regularized OT past DIRECT_MAX positions is solved by Newton steps whose
    systems conjugate gradient solves (no n x n Hessian): a batch with zero weights on both
    sides, the same optimum as L-BFGS's (which solved it before, in 3.5-7.2x the time on
    300 x 200 and 1000 x 800 clouds, bench/sparse_ot_qot_newton.py) and as POT's, in fewer
    passes over the costs."""
    g = torch.Generator().manual_seed(11)
    n, m = 90, 40
    C = torch.rand(2, n, m, generator=g, dtype=F64)
    a = torch.rand(2, n, generator=g, dtype=F64) + 0.1
    b = torch.rand(2, m, generator=g, dtype=F64) + 0.1
    a[1, :4], b[1, 0] = 0.0, 0.0
    b = b * a.sum(-1, keepdim=True) / b.sum(-1, keepdim=True)
    passes = []

    def solve():
        calls, evaluate = [0], S._Problem.evaluate

        def counted(pb, theta):
            calls[0] += 1
            return evaluate(pb, theta)

        monkeypatch.setattr(S._Problem, "evaluate", counted)
        res = otcore.sparse_ot(otcore.CostMatrix(C.to(dtype)), a.to(dtype), b.to(dtype), k=n, gamma=0.05, tol=tol,
                               max_iter=3000)
        monkeypatch.setattr(S._Problem, "evaluate", evaluate)
        passes.append(calls[0])
        return res

    with monkeypatch.context() as mp:
        mp.setattr(Q, "semi_dual_hessian_solve", None)  # past DIRECT_MAX: never the direct solve
        res = solve()
    assert res.info["solver"] == "newton" and bool(res.converged.all()) and bool((res.grad_norm <= tol).all())
    monkeypatch.setattr(S, "_newton_applies", lambda pb: False)
    ref = solve()
    assert ref.info["solver"] == "L-BFGS" and bool(ref.converged.all())
    assert (2 if dtype == F64 else 1) * passes[0] < passes[1]  # measured 27 against 74; float32 36 against 46
    close = dict(rtol=1e-9, atol=1e-9) if dtype == F64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.value, ref.value, **close)
    torch.testing.assert_close(res.to_dense(), ref.to_dense(), **dict(close, atol=close["atol"] * 10))
    pot = ot.smooth.smooth_ot_dual(a[0].numpy(), b[0].numpy(), C[0].numpy(), 0.05, reg_type="l2", stopThr=1e-15,
                                   numItermax=20000)
    np.testing.assert_allclose(res.to_dense()[0].double().numpy(), pot, atol=1e-6 if dtype == F64 else 1e-5)


@pytest.mark.parametrize("kind,axis,dtype", [("matrix", 0, F64), ("matrix", 1, F64), ("sqeuclidean", 0, F64),
                                              ("matrix", 0, torch.float32)])
def test_newton_solves_quadratically_regularized_ot_as_lbfgs_does(kind, axis, dtype, monkeypatch):
    """With no cardinality constraint left (k >= the line length) and few positions the
    semi-dual is solved by damped Newton steps: the same optimum as L-BFGS in fewer
    iterations, batched, with zero weights on both sides (a position in no line's support
    is moved to where it enters one)."""
    g = torch.Generator().manual_seed(7)
    n, m = 23, 9
    if kind == "matrix":
        geom = otcore.CostMatrix(torch.rand(3, n, m, generator=g, dtype=dtype))
    else:
        geom = otcore.PointCloud(torch.rand(3, n, 2, generator=g, dtype=dtype),
                                 torch.rand(3, m, 2, generator=g, dtype=dtype))
    a = torch.rand(3, n, generator=g, dtype=dtype) + 0.1
    b = torch.rand(3, m, generator=g, dtype=dtype) + 0.1
    a[1, :3], b[1, 0] = 0.0, 0.0
    b = b * a.sum(-1, keepdim=True) / b.sum(-1, keepdim=True)
    tol = 1e-10 if dtype == F64 else 1e-5
    kw = dict(k=max(n, m), gamma=0.3, axis=axis, tol=tol, max_iter=2000)
    res = otcore.sparse_ot(geom, a, b, **kw)
    assert res.info["solver"] == "newton" and bool(res.converged.all())
    monkeypatch.setattr(S, "_newton_applies", lambda pb: False)
    ref = otcore.sparse_ot(geom, a, b, **kw)
    assert ref.info["solver"] == "L-BFGS" and bool(ref.converged.all())
    assert bool((res.n_iter < ref.n_iter).all())
    close = dict(rtol=1e-9, atol=1e-9) if dtype == F64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.value, ref.value, **close)
    torch.testing.assert_close(res.to_dense(), ref.to_dense(), **close)


def test_newton_as_gamma_falls_and_its_fallback():
    """As gamma falls the support splits into parts (the Hessian singular along each part's
    shift: the damping steps along it) and changes at every step. Without the continuation
    in gamma Newton stalls at gamma = 1e-3 on this 12 x 9 problem and L-BFGS goes on from
    its iterate; with it (the default) Newton converges alone, in fewer iterations. Against POT."""
    g = torch.Generator().manual_seed(8)
    C = torch.rand(12, 9, generator=g, dtype=F64)
    a = torch.full((12,), 1 / 12, dtype=F64)
    b = torch.full((9,), 1 / 9, dtype=F64)
    cases = ((0.3, None, "newton"), (0.01, None, "newton"), (1e-3, None, "newton, then L-BFGS"),
             (1e-3, "auto", "newton"))
    its = {}
    for gamma, schedule, solver in cases:
        res = otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=12, gamma=gamma, tol=1e-11, max_iter=500,
                               gamma_schedule=schedule)
        assert res.info["solver"] == solver and res.converged and res.grad_norm <= 1e-11
        assert (len(res.info["gamma_stages"]) > 0) == (schedule == "auto")
        its[gamma, schedule] = int(res.n_iter)
        pot = ot.smooth.smooth_ot_dual(a.numpy(), b.numpy(), C.numpy(), gamma, reg_type="l2", stopThr=1e-15,
                                       numItermax=20000)
        np.testing.assert_allclose(res.to_dense().numpy(), pot, atol=1e-6)
    assert its[1e-3, "auto"] < its[1e-3, None]


def _clouds(n, m, seed, batch=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, 2, generator=g, dtype=F64)
    y = torch.randn(*batch, m, 2, generator=g, dtype=F64)
    a = torch.rand(*batch, n, generator=g, dtype=F64) + 0.1
    b = torch.rand(*batch, m, generator=g, dtype=F64) + 0.1
    return otcore.PointCloud(x, y), a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)


@pytest.mark.parametrize("n, m", [(40, 30), (80, 60)])  # Newton's systems solved directly (40 positions), by CG (80)
def test_gamma_schedule_solves_small_gamma_in_fewer_iterations(n, m):
    """At gamma small against the costs (nearly a linear program: the support changes at
    every step) the default continuation solves at 4x larger gammas first; the same plan as
    without it and as POT, in fewer iterations (measured at gamma 1e-3: 40 x 30 100 Newton
    iterations against 1254, Newton's then L-BFGS's without; 80 x 60 149 against 2663)."""
    geom, a, b = _clouds(n, m, seed=0)
    kw = dict(k=n, gamma=1e-3, tol=1e-9, max_iter=4000)
    auto = otcore.sparse_ot(geom, a, b, **kw)
    plain = otcore.sparse_ot(geom, a, b, gamma_schedule=None, **kw)
    assert auto.converged and plain.converged
    assert auto.info["solver"] == "newton"  # (without it Newton stalls at 40 x 30: L-BFGS ends it)
    stages = auto.info["gamma_stages"]
    assert plain.info["gamma_stages"] == [] and len(stages) >= 5
    np.testing.assert_allclose(np.array(stages[:-1]) / np.array(stages[1:]), 4.0, rtol=1e-12)
    assert stages[-1] == pytest.approx(4e-3, rel=1e-12)
    # the first stage is the first gamma (of 1e-3 * 4^s) with gamma * mean(b) >= 1% of the cost's range
    rho = stages[0] * float(b.mean()) / float(geom.diameters(a, b))
    assert 1e-2 <= rho < 4e-2
    assert 3 * int(auto.n_iter) < 2 * int(plain.n_iter)
    torch.testing.assert_close(auto.to_dense(), plain.to_dense(), rtol=0, atol=1e-8)
    torch.testing.assert_close(auto.value, plain.value, rtol=1e-10, atol=0)
    C = ((geom.x[0, :, None] - geom.y[0, None]) ** 2).sum(-1)
    pot = ot.smooth.smooth_ot_dual(a.numpy(), b.numpy(), C.numpy(), 1e-3, reg_type="l2", stopThr=1e-15,
                                   numItermax=50000)
    # (at 40 x 30 POT's plan misses the marginals by 1.8e-5 and ours by 2.3e-10, and ours is within
    # 1.1e-10 of L-BFGS's to tol 1e-12: POT is off by 1.4e-6)
    np.testing.assert_allclose(auto.to_dense().numpy(), pot, atol=2e-6)


def test_gamma_schedule_where_it_applies():
    """"auto": stages only for quadratically regularized OT (k >= the line length, either
    formulation) with gamma below the start; a decay factor applies to any k (the same
    problem solved, to its tolerance); an explicit sequence is run as given; a warm start
    skips the stages."""
    geom, a, b = _clouds(20, 15, seed=1)
    small, large = 1e-3, 50.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # k binding at small gamma: stops on ftol or not
        binding = otcore.sparse_ot(geom, a, b, k=3, gamma=small, max_iter=50, relaxed_start=False)
        relaxed = otcore.sparse_ot(geom, a, b, k=3, gamma=small, max_iter=50)
    assert binding.info["gamma_stages"] == []  # k can bind: none by default on its own L-BFGS
    qot = otcore.sparse_ot(geom, a, b, k=20, gamma=small, tol=1e-5)
    assert relaxed.info["gamma_stages"] == qot.info["gamma_stages"] != []  # the relaxed start's Newton runs them
    dual = otcore.sparse_ot(geom, a, b, k=20, gamma=small, formulation="dual", tol=1e-9)
    assert dual.info["gamma_stages"] and dual.info["solver"] == "newton (semi-dual)" and dual.converged
    assert otcore.sparse_ot(geom, a, b, k=20, gamma=large).info["gamma_stages"] == []  # dense already
    kw = dict(k=3, gamma=0.05, tol=1e-9)
    factor = otcore.sparse_ot(geom, a, b, gamma_schedule=0.5, **kw)
    stages = factor.info["gamma_stages"]
    assert len(stages) >= 3 and all(s == pytest.approx(0.05 * 2 ** (len(stages) - i), rel=1e-12)
                                    for i, s in enumerate(stages))
    given = otcore.sparse_ot(geom, a, b, gamma_schedule=[1.0, 0.2], **kw)
    assert given.info["gamma_stages"] == [1.0, 0.2]
    for r in (factor, given):
        assert r.converged
        torch.testing.assert_close(r.value, otcore.sparse_ot(geom, a, b, gamma_schedule=None, **kw).value,
                                   rtol=1e-7, atol=0)
    cold = otcore.sparse_ot(geom, a, b, k=20, gamma=small, tol=1e-9)
    assert cold.info["gamma_stages"] and cold.converged
    warm = otcore.sparse_ot(geom, a, b, k=20, gamma=small, tol=1e-9, init=(cold.alpha, cold.beta))
    assert warm.info["gamma_stages"] == [] and warm.converged and int(warm.n_iter) <= 2


def _moved_clouds(n, m, delta, seed=0):
    """Gaussian clouds (costs up to ~30) and the same with the sources moved by ``delta``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=F64)
    y = torch.randn(m, 2, generator=g, dtype=F64)
    a = torch.rand(n, generator=g, dtype=F64) + 0.1
    b = torch.rand(m, generator=g, dtype=F64) + 0.1
    moved = x + delta * torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    return otcore.PointCloud(x, y), otcore.PointCloud(moved, y), a / a.sum(), b / b.sum()


def test_warm_start_where_newton_stalls_runs_the_stages_from_there():
    """A nearby problem's duals at small gamma need not be near enough for Newton: where it
    stalls from them, the continuation runs from its best iterate (not L-BFGS: 1,210
    iterations here before, 135 now); the cold solve's stages, its plan and value."""
    geom, moved, a, b = _moved_clouds(40, 30, 1e-2)
    kw = dict(k=40, gamma=1e-4, tol=1e-9, max_iter=6000)
    near = otcore.sparse_ot(geom, a, b, **kw)
    cold = otcore.sparse_ot(moved, a, b, **kw)
    warm = otcore.sparse_ot(moved, a, b, init=(near.alpha, near.beta), **kw)
    assert warm.converged and warm.info["solver"].startswith("newton, then gamma stages")
    assert warm.info["gamma_stages"] == cold.info["gamma_stages"] and int(warm.n_iter) < 300
    torch.testing.assert_close(warm.to_dense(), cold.to_dense(), rtol=0, atol=1e-8)
    torch.testing.assert_close(warm.value, cold.value, rtol=1e-10, atol=0)
    # without stages to run (gamma_schedule=None) the stall goes to L-BFGS, as before
    plain = otcore.sparse_ot(moved, a, b, init=(near.alpha, near.beta), gamma_schedule=None, **kw)
    assert plain.info["solver"] == "newton, then L-BFGS" and plain.info["gamma_stages"] == []


def test_warm_start_rescue_cut_short_ends_no_worse_than_the_stall():
    """Cut short by max_iter, the stages can end above Newton's stall (a review: 0.84 against
    0.107): the result is the better end of the two by gradient norm, its stop max_iter."""
    geom, moved, a, b = _moved_clouds(24, 18, 1e-2)
    kw = dict(k=24, gamma=1e-3, tol=1e-9)
    start = otcore.sparse_ot(geom, a, b, **kw)
    init = (start.alpha, start.beta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        stall = otcore.sparse_ot(moved, a, b, init=init, max_iter=100, gamma_schedule=None, **kw)  # ends at the stall
        for max_iter in (80, 100, 120):
            r = otcore.sparse_ot(moved, a, b, init=init, max_iter=max_iter, **kw)
            assert r.info["solver"].startswith("newton, then gamma stages") and r.n_iter == max_iter
            assert r.info["stop"] == "max_iter reached" and not r.converged
            assert r.grad_norm <= 1.0001 * stall.grad_norm


def test_warm_start_at_the_float32_floor_goes_on_by_l_bfgs():
    """A warm start at the float32 solution with tol below float32's floor stalls near the
    optimum (gradient norm ~5e-4 here, below 1e-3 per unit of mass): L-BFGS goes on, as
    without stages (the stages would start over: 284 iterations against 68, a review)."""
    geom, _, a, b = _moved_clouds(40, 30, 0.0)
    g32, a32, b32 = otcore.PointCloud(geom.x[0].float(), geom.y[0].float()), a.float(), b.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sol = otcore.sparse_ot(g32, a32, b32, k=40, gamma=1e-3, max_iter=3000)
        warm = otcore.sparse_ot(g32, a32, b32, k=40, gamma=1e-3, max_iter=3000, init=(sol.alpha, sol.beta))
    assert not sol.converged and warm.info["solver"] == "newton, then L-BFGS" and warm.info["gamma_stages"] == []
    assert int(warm.n_iter) < 150 and warm.grad_norm <= sol.grad_norm


def test_warm_starts_in_a_batch_are_rescued_each_as_alone():
    """In a batch, only the problem whose warm start stalls runs the stages; the other keeps
    Newton's end; each takes the iterations and the plan it takes alone."""
    geom, near_moved, a, b = _moved_clouds(24, 18, 1e-3)
    _, far_moved, _, _ = _moved_clouds(24, 18, 1e-2)
    kw = dict(k=24, gamma=1e-3, tol=1e-9)
    start = otcore.sparse_ot(geom, a, b, **kw)
    init = (start.alpha, start.beta)
    alone = [otcore.sparse_ot(m, a, b, init=init, **kw) for m in (near_moved, far_moved)]
    assert alone[0].info["solver"] == "newton" and alone[1].info["solver"].startswith("newton, then gamma stages")
    both = otcore.sparse_ot(otcore.PointCloud(torch.stack([near_moved.x[0], far_moved.x[0]]), geom.y.expand(2, -1, -1)),
                            a.expand(2, -1), b.expand(2, -1), init=tuple(t.expand(2, -1) for t in init), **kw)
    assert bool(both.converged.all())
    assert both.n_iter.tolist() == [int(r.n_iter) for r in alone]
    for i, r in enumerate(alone):
        torch.testing.assert_close(both.to_dense()[i], r.to_dense(), rtol=0, atol=1e-9)


def test_gamma_schedule_in_a_batch_solves_each_problem():
    """One schedule for the batch (gamma is one number): from where the problem with the
    smallest gamma * mean weight / cost range starts; each problem's plan and value are its
    own solve's (to the tolerance), whatever its neighbours' scales."""
    geom, a, b = _clouds(30, 20, seed=2, batch=(3,))
    x, y = geom.x.clone(), geom.y.clone()
    x[1], y[1] = 10 * x[1], 10 * y[1]  # costs 100x: 100x further below the start
    x[2], y[2] = 0.1 * x[2], 0.1 * y[2]  # costs 1/100: 100x nearer it
    kw = dict(k=30, gamma=1e-3, tol=1e-9, max_iter=2000)
    batch = otcore.sparse_ot(otcore.PointCloud(x, y), a, b, **kw)
    assert bool(batch.converged.all())
    for i in range(3):
        alone = otcore.sparse_ot(otcore.PointCloud(x[i], y[i]), a[i], b[i], **kw)
        assert alone.converged and len(alone.info["gamma_stages"]) <= len(batch.info["gamma_stages"])
        torch.testing.assert_close(batch.to_dense()[i], alone.to_dense(), rtol=0, atol=1e-8)
        torch.testing.assert_close(batch.value[i], alone.value, rtol=1e-10, atol=1e-12)
    alone = [len(otcore.sparse_ot(otcore.PointCloud(x[i], y[i]), a[i], b[i], **kw).info["gamma_stages"])
             for i in (0, 1)]
    assert alone[1] == len(batch.info["gamma_stages"]) > alone[0]


def test_gamma_schedule_budgets_are_per_problem_in_a_batch():
    """In a batch, each problem's stages and Newton steps stay within its own ``max_iter``
    (a review: Newton took the batch's largest budget left, [12, 17] at max_iter 12), and a
    problem that needs no stage waits at its start: it takes the steps it takes alone (the
    review's easy problem took 65 where alone it takes 5, and was unconverged at max_iter 60)."""
    C = torch.stack([torch.rand(12, 9, generator=torch.Generator().manual_seed(s), dtype=F64) for s in (16, 13)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for max_iter in (12, 30, 35):
            r = otcore.sparse_ot(otcore.CostMatrix(C), k=12, gamma=1e-3, tol=1e-10, max_iter=max_iter)
            assert r.info["gamma_stages"]
            for its, stop in zip(r.n_iter.tolist(), r.info["stop"]):
                assert its == max_iter if stop == "max_iter reached" else its <= max_iter
    g = torch.Generator().manual_seed(7)
    n, m = 30, 40
    C = torch.stack([s * torch.rand(n, m, generator=g, dtype=F64) for s in (1e4, 1e-4)])
    a, b = torch.rand(2, n, generator=g, dtype=F64) + 0.1, torch.rand(2, m, generator=g, dtype=F64) + 0.1
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    alone = [otcore.sparse_ot(otcore.CostMatrix(C[i]), a[i], b[i], k=n, gamma=1e-3, tol=1e-9, max_iter=400)
             for i in range(2)]
    assert len(alone[0].info["gamma_stages"]) > 5 and alone[1].info["gamma_stages"] == [] and alone[1].converged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        r = otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=n, gamma=1e-3, tol=1e-9, max_iter=40)
    assert r.n_iter.tolist() == [40, int(alone[1].n_iter)] and r.converged.tolist() == [False, True]
    torch.testing.assert_close(r.to_dense()[1], alone[1].to_dense(), rtol=0, atol=1e-9)


def test_lbfgs_smooth_stall_rule_lets_an_improving_solve_go_on(monkeypatch):
    """A smooth problem (k >= the line length) stops as stationary only when the objective
    is flat over 10 iterations and the gradient norm has fallen 1% neither over those 10 nor
    below its best for 30. Each test alone stopped solves that go on to converge: the 10
    alone, float64 ones 2-26x above tol; the best alone (a review), this float32 one at 13x
    tol (its gradient rose for a while after an early low), converged when resumed."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(200, generator=g, dtype=F64) + 0.1
    b = torch.rand(150, generator=g, dtype=F64) + 0.1
    C = torch.rand(200, 150, generator=g, dtype=F64).float()
    monkeypatch.setattr(S, "_newton_applies", lambda pb: False)  # (Newton solves it by default)
    r = otcore.sparse_ot(otcore.CostMatrix(C), (a / a.sum()).float(), (b / b.sum()).float(), k=200, gamma=0.01,
                         tol=1e-3, max_iter=5000)
    assert r.info["solver"] == "L-BFGS" and r.converged and r.grad_norm <= 1e-3


def test_gamma_schedule_counts_in_max_iter_and_ends_at_gamma():
    """The stages' iterations count in ``n_iter`` and ``max_iter``; with the budget spent in
    the stages the result is still read at ``gamma`` itself: its plan is the projection of
    the returned potentials at ``gamma``, not at a stage's."""
    geom, a, b = _clouds(40, 30, seed=0)
    gamma = 1e-3
    with pytest.warns(ConvergenceWarning, match="max_iter reached"):
        r = otcore.sparse_ot(geom, a, b, k=40, gamma=gamma, tol=1e-9, max_iter=12)
    assert r.info["gamma_stages"] and int(r.n_iter) <= 12 and not r.converged
    T = geom.ksparse_columns(r.alpha[None], gamma, 40, 0, mass=b[None]).vals  # (1, m, k)
    plan = torch.zeros(30, 40, dtype=F64).scatter_(1, geom.ksparse_columns(r.alpha[None], gamma, 40, 0,
                                                                          mass=b[None]).idx[0], T[0])
    torch.testing.assert_close(r.to_dense(), plan.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("schedule, error, match", [
    ("geometric", ValueError, "gamma_schedule must be None, 'auto'"),
    (1.5, ValueError, r"gamma_schedule as a decay factor must be in \(0, 1\)"),
    (0.0, ValueError, "gamma_schedule"),
    ([0.5, 1.0], ValueError, "gamma_schedule as a sequence must be decreasing and > gamma"),
    ([1.0, 0.01], ValueError, "gamma_schedule as a sequence must be decreasing and > gamma"),  # 0.01 < gamma
    ([float("inf")], ValueError, r"gamma_schedule\[0\]"),
    ([1e305], ValueError, r"gamma_schedule\[0\]=1e\+305 is too large for float64"),
    (True, TypeError, "gamma_schedule must be None, 'auto', a float or a sequence, got bool"),
    ({"a": 1}, TypeError, "gamma_schedule must be None, 'auto', a float or a sequence, got dict"),
])
def test_gamma_schedule_bad_values(schedule, error, match):
    geom, a, b = _clouds(6, 5, seed=3)
    with pytest.raises(error, match=match):
        otcore.sparse_ot(geom, a, b, k=6, gamma=0.05, gamma_schedule=schedule)
    with pytest.raises(error, match=match):  # checked with a warm start too, which skips the stages
        otcore.sparse_ot(geom, a, b, k=6, gamma=0.05, gamma_schedule=schedule,
                         init=(torch.zeros(6, dtype=F64), torch.zeros(5, dtype=F64)))


def test_newton_is_used_only_where_it_applies():
    C = torch.rand(30, 20, generator=torch.Generator().manual_seed(9), dtype=F64)
    geom = otcore.CostMatrix(C)
    assert otcore.sparse_ot(geom, k=30, gamma=0.3).info["solver"] == "newton"  # columns see all 30 rows
    assert otcore.sparse_ot(geom, k=5, gamma=0.3, relaxed_start=False).info["solver"] == "L-BFGS"  # k can bind
    relaxed = "newton (relaxed start), then L-BFGS"  # Newton on the problem without k, L-BFGS from there
    assert otcore.sparse_ot(geom, k=5, gamma=0.3).info["solver"] == relaxed
    assert otcore.sparse_ot(geom, k=30, gamma=0.3, formulation="dual").info["solver"] == "newton (semi-dual)"
    assert otcore.sparse_ot(geom, k=5, gamma=0.3, formulation="dual", relaxed_start=False).info["solver"] == "L-BFGS"
    assert otcore.sparse_ot(geom, k=5, gamma=0.3, formulation="dual").info["solver"] == relaxed
    big = otcore.CostMatrix(torch.rand(300, 4, generator=torch.Generator().manual_seed(9), dtype=F64))
    assert otcore.sparse_ot(big, k=300, gamma=0.3).info["solver"] == "newton"  # 300 positions: by CG
    assert otcore.sparse_ot(big, k=4, gamma=0.3, axis=1).info["solver"] == "newton"  # 4 positions


@pytest.mark.parametrize("axis", [0, 1])
def test_dual_without_binding_k_is_its_semi_dual_solved_by_newton(axis):
    """The dual with k >= the line length (quadratically regularized OT) runs Newton on its
    semi-dual: the same plan, duals and value; its own gradient (both marginals) within tol;
    its value the dual objective at the returned duals, computed here from C; the plan POT's
    (l2-regularized dual); a warm start from the result ends at once."""
    geom, a, b = _clouds(50, 35, seed=3)
    C = ((geom.x[0, :, None] - geom.y[0, None]) ** 2).sum(-1)
    gamma, tol = 0.02, 1e-10
    k = 50 if axis == 0 else 35
    semi = otcore.sparse_ot(geom, a, b, k=k, gamma=gamma, axis=axis, tol=tol)
    dual = otcore.sparse_ot(geom, a, b, k=k, gamma=gamma, axis=axis, tol=tol, formulation="dual")
    assert dual.info["solver"] == "newton (semi-dual)" and dual.info["formulation"] == "dual"
    assert dual.converged and dual.grad_norm <= tol and dual.n_iter == semi.n_iter
    for f in ("alpha", "beta", "values", "value", "cost"):
        torch.testing.assert_close(getattr(dual, f), getattr(semi, f), rtol=0, atol=1e-12)
    X = torch.clamp(dual.alpha[:, None] + dual.beta[None, :] - C, min=0)
    objective = a @ dual.alpha + b @ dual.beta - (X**2).sum() / (2 * gamma)
    torch.testing.assert_close(dual.value, objective, rtol=1e-12, atol=0)
    torch.testing.assert_close(dual.to_dense(), X / gamma, rtol=0, atol=1e-9)
    pot = ot.smooth.smooth_ot_dual(a.numpy(), b.numpy(), C.numpy(), gamma, reg_type="l2", stopThr=1e-15,
                                   numItermax=50000)
    np.testing.assert_allclose(dual.to_dense().numpy(), pot, atol=1e-6)
    warm = otcore.sparse_ot(geom, a, b, k=k, gamma=gamma, axis=axis, tol=tol, formulation="dual",
                            init=(dual.alpha, dual.beta))
    assert warm.converged and warm.n_iter <= 1 and warm.info["gamma_stages"] == []


@pytest.mark.parametrize("k", [40, 6])  # k >= the line length (Newton), k = 6 (L-BFGS, k binds)
def test_dual_implicit_gradient_is_the_semi_duals_at_the_same_optimum(k, monkeypatch):
    """The dual's implicit system, its line block eliminated, is the semi-dual's: where both
    end at the same plan their plan gradients agree, by conjugate gradient (past DIRECT_MAX)
    and directly; the weights' up to a constant per side (what the null direction moves)."""
    geom, a, b = _clouds(40, 30, seed=5)
    W = torch.randn(30, min(k, 40), generator=torch.Generator().manual_seed(6), dtype=F64)

    def grads(formulation, direct):
        monkeypatch.setattr(S, "DIRECT_MAX", 10**9 if direct else 0)
        x, y, ar, br = (t.clone().requires_grad_() for t in (geom.x[0], geom.y[0], a, b))
        r = otcore.sparse_ot(otcore.PointCloud(x, y), ar, br, k=k, gamma=0.05, formulation=formulation,
                             tol=1e-11, ftol=1e-16, max_iter=5000)
        assert r.grad_norm <= 1e-9  # a smooth optimum (k = 6 does not bind here: the same as k = 40)
        g = torch.autograd.grad((r.values * W).sum(), (x, y, ar, br))
        return r, [g[0], g[1], g[2] - g[2].mean(), g[3] - g[3].mean()]

    semi, ref = grads("semi-dual", direct=True)
    for direct in (True, False):
        dual, got = grads("dual", direct)
        assert torch.equal(dual.indices, semi.indices)
        for d, s in zip(got, ref):
            torch.testing.assert_close(d, s, rtol=0, atol=1e-7 * max(1.0, float(s.abs().max())))


def test_newton_float32_below_the_objectives_resolution():
    """Where float32 no longer resolves the objective's decrease (small gamma, after stages),
    a step passes by the rounding slack only if the gradient norm falls: the solve ends near
    float64's plan (taken on the slack alone the steps wandered, ending at a gradient norm of
    1.9e-3 and 3.1e-3 off float64's plan in L1; now 1.0e-5 and 3.1e-5)."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(64, generator=g, dtype=F64) + 0.1
    b = torch.rand(200, generator=g, dtype=F64) + 0.1
    C = torch.rand(64, 200, generator=g, dtype=F64)
    a, b = a / a.sum(), b / b.sum()
    kw = dict(k=64, gamma=0.004, max_iter=5000, gamma_schedule=[4.1, 1.02, 0.256, 0.064, 0.016])
    exact = otcore.sparse_ot(otcore.CostMatrix(C), a, b, tol=1e-10, **kw)
    assert exact.converged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 1e-5 is at float32's floor here
        r = otcore.sparse_ot(otcore.CostMatrix(C.float()), a.float(), b.float(), tol=1e-5, **kw)
    assert r.grad_norm < 1e-4
    assert float((r.to_dense().double() - exact.to_dense()).abs().sum()) < 1e-4


def test_newton_steps_stay_off_the_constant_direction_in_float32(monkeypatch):
    """The semi-dual does not change when every potential moves by one constant; the damped
    system turned float32's rounding of the masses into steps along it (a review: mean
    potential -0.07 -> -2.6 in 3 steps, 11 of 30 problems converged against L-BFGS's 22).
    Which of these float32 problems meet ``tol`` is decided by rounding, for both solvers
    (Newton 9-11 of the 12 and L-BFGS 9-10 on different runs of the same machine): a margin
    of 2."""
    def solve(seed):
        g = torch.Generator().manual_seed(seed)
        C = torch.rand(30, 12, generator=g)
        a, b = torch.rand(30, generator=g) + 0.1, torch.rand(12, generator=g) + 0.1
        return otcore.sparse_ot(otcore.CostMatrix(C), a / a.sum(), b / b.sum(), k=30, gamma=0.01, tol=1e-5,
                                max_iter=1000), a / a.sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", otcore.ConvergenceWarning)
        newton = [solve(seed) for seed in range(12)]
        monkeypatch.setattr(S, "_newton_applies", lambda pb: False)
        lbfgs = [solve(seed)[0] for seed in range(12)]
    assert all(r.info["solver"].startswith("newton") for r, _ in newton)
    assert sum(r.converged for r, _ in newton) >= sum(r.converged for r in lbfgs) - 2
    assert max(abs(float((r.alpha * a).sum())) for r, a in newton) < 0.05  # the cold start's gauge, <a, alpha> = 0


def test_newton_then_lbfgs_budget_is_per_problem():
    """After Newton, each stalled problem's L-BFGS gets what its own Newton run left of
    ``max_iter``, not what the batch's longest one left (a review: [A, B] at ``max_iter=100``
    stopped A at 66 iterations, 'max_iter reached', without L-BFGS; at 120 A got 13 L-BFGS
    iterations and stopped unconverged, where alone it converges in ~100)."""
    C = torch.stack([torch.rand(12, 9, generator=torch.Generator().manual_seed(s), dtype=F64) for s in (16, 13)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", otcore.ConvergenceWarning)
        for max_iter in (80, 100, 120):
            r = otcore.sparse_ot(otcore.CostMatrix(C), k=12, gamma=1e-3, tol=1e-10, max_iter=max_iter,
                                 gamma_schedule=None)  # (with it, Newton does not stall here)
            assert r.info["solver"] == "newton, then L-BFGS" or max_iter < 100
            for its, stop in zip(r.n_iter.tolist(), r.info["stop"]):
                assert its == max_iter if stop == "max_iter reached" else its < max_iter and stop == "gradient norm <= tol"
    assert r.converged.all()  # both, at 120


def test_newton_by_conjugate_gradient_in_a_batch_steps_as_alone(monkeypatch):
    """Past DIRECT_MAX each problem of a batch gets its own conjugate-gradient tolerance and a
    finished problem runs no more conjugate-gradient iterations (a review: with one tolerance
    for the batch, the least advanced problem's, a problem that converges alone in 107 Newton
    steps stalled at 84 in a batch; a converged one ran 4,019 iterations where alone it ran 528)."""
    def clouds(seed):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(100, 2, generator=g, dtype=F64), torch.randn(80, 2, generator=g, dtype=F64) + 0.5
        C = torch.cdist(x, y) ** 2
        return C / C.max()

    products = []
    real_pcg = Q.pcg

    def pcg(*args, **kw):
        x, its = real_pcg(*args, **kw)
        products.append(its)
        return x, its

    monkeypatch.setattr(Q, "pcg", pcg)
    A, B = clouds(0), 0.05 * clouds(2)
    kw = dict(k=100, gamma=1e-3, tol=1e-9, gamma_schedule=None, max_iter=200)
    alone = otcore.sparse_ot(otcore.CostMatrix(B), **kw)
    alone_products = int(torch.stack(products).sum())
    products.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        both = otcore.sparse_ot(otcore.CostMatrix(torch.stack([A, B])), **kw)
    assert alone.info["solver"] == "newton" and alone.converged
    assert bool(both.converged[1]) and int(both.n_iter[1]) == int(alone.n_iter)
    torch.testing.assert_close(both.to_dense()[1], alone.to_dense(), rtol=0, atol=1e-12)
    assert int(torch.stack(products)[:, 1].sum()) == alone_products


def test_newton_goes_on_while_the_objective_falls():
    """Newton stops as stationary only where neither the gradient norm (1% below its best)
    nor the objective (2% of its fall so far, over the last 10 steps) moves. Here its first
    steps raise the gradient norm (0.6 -> 1.8 -> 0.6 in 10 steps) while the objective falls
    (a review: on the gradient alone Newton handed over to L-BFGS after 10 steps and the two
    took 117 iterations; Newton alone converges in 19)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, 2, generator=g, dtype=F64)
    y = torch.randn(800, 2, generator=g, dtype=F64) + 0.5
    C = torch.cdist(x, y) ** 2
    r = otcore.sparse_ot(otcore.CostMatrix(C / C.max()), k=1000, gamma=10.24, tol=1e-9, max_iter=3000,
                         gamma_schedule=None)
    assert r.info["solver"] == "newton" and r.converged and int(r.n_iter) <= 25


def test_newton_returns_its_best_iterate_and_the_better_end_after_lbfgs(monkeypatch):
    """A stalled Newton run returns its iterate of least gradient norm (its last can be
    worse: the support changes at every step near a linear program), and of Newton's end
    and L-BFGS's after it the result is the one of smaller gradient norm (a review: L-BFGS
    ended 20x above Newton's on weights spanning 1e-6), with L-BFGS's stop."""
    C = torch.rand(12, 9, generator=torch.Generator().manual_seed(8), dtype=F64)
    seen, ends = [], []

    class Recorder:  # a progress bar that takes every iteration's gradient norm
        def due(self):
            return True

        def update(self, it, gnorm, *_):
            seen.append(gnorm)

    real_newton, real_lbfgs = S.newton, S.run_lbfgs

    def newton(*args, progress=None, **kw):
        out = real_newton(*args, progress=Recorder(), **kw)
        ends.append(float(out[3]))
        return out

    def worse_lbfgs(pb, evaluate, theta, *args):  # L-BFGS that ends far off
        theta, out, n_iter, gnorm, conv, why = real_lbfgs(pb, evaluate, theta, *args)
        return theta, out, n_iter, gnorm + 1e3, conv & False, torch.ones_like(why)

    monkeypatch.setattr(S, "newton", newton)
    monkeypatch.setattr(S, "run_lbfgs", worse_lbfgs)
    with pytest.warns(ConvergenceWarning, match="max_iter reached"):
        r = otcore.sparse_ot(otcore.CostMatrix(C), k=12, gamma=1e-3, tol=1e-11, max_iter=200, gamma_schedule=None)
    assert r.info["solver"] == "newton, then L-BFGS" and r.info["stop"] == "max_iter reached"
    assert seen[-1] > min(seen)  # the last iterate was not the best: Newton went back
    assert ends == [pytest.approx(min(seen), rel=1e-12)]
    assert float(r.grad_norm) == pytest.approx(ends[0], rel=1e-6)  # Newton's end, not L-BFGS's


def test_newton_stalled_at_max_iter_reports_the_cap():
    """A Newton solve that stalls with no iteration left for L-BFGS stopped on max_iter, not on
    the dtype's resolution (float64, far from its floor)."""
    g = torch.Generator().manual_seed(8)
    C = torch.rand(12, 9, generator=g, dtype=F64)
    with pytest.warns(otcore.ConvergenceWarning, match="max_iter reached"):
        r = otcore.sparse_ot(otcore.CostMatrix(C), torch.full((12,), 1 / 12, dtype=F64), torch.full((9,), 1 / 9, dtype=F64),
                             k=12, gamma=1e-3, tol=1e-11, max_iter=39, gamma_schedule=None)  # stalls at its 39th
    assert not r.converged and r.info["stop"] == "max_iter reached" and r.info["solver"] == "newton"


@pytest.mark.parametrize("axis", [0, 1])
def test_a_cost_offset_is_taken_off_before_the_solve(axis):
    """With both marginals fixed an offset leaves the plan unchanged. Kept in a float32
    solve, ``C + 1e5`` made the pass form ``alpha - C`` at 1e5 (entries ~2^-24 1e5 / gamma
    off): ``converged=True`` with plans 0.2 off in L1 and row sums off by 0.022 of 0.05 (a
    review). The solve now sees ``C - min C``; the reference is float64 on the same
    float32-rounded costs, whose optimum is smooth for ``axis=0`` here."""
    C = torch.rand(20, 15, generator=torch.Generator().manual_seed(0), dtype=F64)
    Cq = (C + 1e5).float()
    r = otcore.sparse_ot(otcore.CostMatrix(Cq), k=3, gamma=0.3, axis=axis, backend="torch")
    ref = otcore.sparse_ot(otcore.CostMatrix(Cq.double()), k=3, gamma=0.3, axis=axis, **TIGHT)
    assert r.converged
    T, Tr = r.to_dense().double(), ref.to_dense()
    if axis == 0:  # smooth: one optimal plan
        assert float((T - Tr).abs().sum()) < 1e-4 and r.grad_norm < 1e-3
    # the value and cost in the caller's units (float32 resolves 1e5 to 0.008)
    assert abs(float(r.value) - float(ref.value)) < 0.02 and abs(float(r.cost) - float(ref.cost)) < 0.02


@pytest.mark.parametrize("formulation", ["semi-dual", "dual"])
def test_the_offset_taken_off_comes_back_in_duals_value_cost_and_gradients(formulation):
    """float64, ``C + 50`` (the offset dominates: taken off) against ``C`` (kept): the same
    plan; the value and cost 50 times the mass higher; ``alpha + beta - C`` unchanged on the
    support; the same gradient to ``C`` (the plan) and, to ``a``, one shifted by a constant
    (the balanced duals' gauge); a warm start from the offset problem's duals stops at once."""
    C, a, b = _problem(9, 7, seed=40)
    kw = dict(k=3, gamma=0.4, formulation=formulation, **TIGHT)
    out = []
    for off in (0.0, 50.0):
        Cs = (C + off).requires_grad_(True)
        aa = a.clone().requires_grad_(True)
        r = otcore.sparse_ot(otcore.CostMatrix(Cs), aa, b, **kw)
        gC, ga = torch.autograd.grad(r.value, (Cs, aa))
        out.append((r, gC, ga, Cs.detach()))
    (r0, gC0, ga0, C0), (r1, gC1, ga1, C1) = out
    assert S._offset_free(otcore.CostMatrix(C1))[1] is not None and S._offset_free(otcore.CostMatrix(C0))[1] is None
    torch.testing.assert_close(r1.to_dense(), r0.to_dense(), rtol=0, atol=1e-10)
    torch.testing.assert_close(r1.value, r0.value + 50.0, rtol=0, atol=1e-10)
    torch.testing.assert_close(r1.cost, r0.cost + 50.0, rtol=0, atol=1e-10)
    sup = r0.to_dense() > 0
    slack0 = r0.alpha[:, None] + r0.beta[None, :] - C0
    slack1 = r1.alpha[:, None] + r1.beta[None, :] - C1
    torch.testing.assert_close(slack1[sup], slack0[sup], rtol=0, atol=1e-9)
    torch.testing.assert_close(gC1, gC0, rtol=0, atol=1e-10)
    shift = ga1 - ga0
    assert float(shift.max() - shift.min()) < 1e-8
    warm = otcore.sparse_ot(otcore.CostMatrix(C1), a, b, init=(r1.alpha, r1.beta), **kw)
    assert warm.n_iter <= 2 and float((warm.to_dense() - r1.to_dense()).abs().max().detach()) < 1e-9


def test_only_the_problems_of_a_batch_with_an_offset_are_shifted():
    """Per problem: in a batch of ``C`` and ``C + 1e5`` (float32) only the second is shifted,
    and each problem gets the plan it has alone."""
    C, a, b = _problem(12, 10, seed=41, dtype=torch.float32)
    both = otcore.sparse_ot(otcore.CostMatrix(torch.stack([C, C + 1e5])), k=2, gamma=0.3, backend="torch")
    alone = [otcore.sparse_ot(otcore.CostMatrix(Ci), k=2, gamma=0.3, backend="torch") for Ci in (C, C + 1e5)]
    for i, r in enumerate(alone):
        torch.testing.assert_close(both.to_dense()[i], r.to_dense(), rtol=0, atol=1e-6)
    assert S._offset_free(otcore.CostMatrix(C))[1] is None


def test_the_offset_path_reads_the_matrix_once(monkeypatch):
    """The shifted matrix is made from the checked one without a second check (a review: its
    finiteness check was a second host read per call)."""
    from otcore import _validate

    C = torch.rand(9, 7, generator=torch.Generator().manual_seed(42), dtype=F64) + 100.0
    geom = otcore.CostMatrix(C)
    checked, real = [], _validate.tensor
    monkeypatch.setattr(_validate, "tensor", lambda name, *a, **k: checked.append(name) or real(name, *a, **k))
    r = otcore.sparse_ot(geom, k=3, gamma=0.5, backend="torch")
    assert r.converged and "C" not in checked


def test_a_tol_large_against_the_mass_warns_before_the_solve_and_not_before_an_error(monkeypatch):
    C, a, b = _problem(9, 7, seed=43)
    with pytest.warns(UserWarning, match="smallest total mass"):
        otcore.sparse_ot(otcore.CostMatrix(C), a * 1e-6, b * 1e-6, k=3, gamma=0.5, tol=1e-5)
    # before: an objective evaluation that raises stops the solve after the warning

    def reached(self, theta):
        raise RuntimeError("the solve began")

    with monkeypatch.context() as mp:
        mp.setattr(S._Problem, "evaluate", reached)
        with pytest.warns(UserWarning, match="smallest total mass"), pytest.raises(RuntimeError, match="began"):
            otcore.sparse_ot(otcore.CostMatrix(C), a * 1e-6, b * 1e-6, k=3, gamma=0.5, tol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="max_iter"):
            otcore.sparse_ot(otcore.CostMatrix(C), a * 1e-6, b * 1e-6, k=3, gamma=0.5, tol=1e-5, max_iter=0)


def test_a_history_beyond_max_iter_keeps_the_iterates_and_a_memory_beyond_reach_is_refused():
    """history=10**6 had asked torch for two (B, 10**6, 10**6) matrices and raised its
    RuntimeError (a review). At most one pair enters per iteration, so a memory of max_iter
    pairs is the same solve, bit for bit; a memory beyond the machine's even so is a ValueError
    naming history, before any pass."""
    g = torch.Generator().manual_seed(0)
    geom = otcore.CostMatrix(torch.rand(30, 40, generator=g, dtype=torch.float64))
    kw = dict(k=3, gamma=0.1, max_iter=20, tol=1e-14, ftol=1e-300, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", otcore.ConvergenceWarning)  # (the tol is out of reach in 20 iterations)
        short, long = (otcore.sparse_ot(geom, history=h, **kw) for h in (20, 10**6))
    assert short.n_iter == long.n_iter == 20 and torch.equal(short.beta, long.beta)
    with pytest.raises(ValueError, match=r"^history=10000000: the L-BFGS memory, .* exceeds the .* GiB of cpu"):
        otcore.sparse_ot(geom, history=10**7, **dict(kw, max_iter=10**9))
