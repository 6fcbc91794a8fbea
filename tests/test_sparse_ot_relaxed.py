"""sparse_ot's relaxed start: where k < the line length, Newton on the problem without the
cardinality constraint (quadratically regularized OT) first, L-BFGS from its optimum.

Checked against the problem without k (where k does not bind there, the same optimum), the
solve from zero, POT's sparsity-constrained solver, and each problem of a batch alone.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import ot
import pytest
import torch

import otcore
from otcore.result import ConvergenceWarning
from otcore.solvers import sparse as S

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # POT's SciPy calls

F64 = torch.float64
RELAXED = "newton (relaxed start), then L-BFGS"


def _clouds(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 2, generator=g, dtype=F64), torch.randn(m, 2, generator=g, dtype=F64)
    a, b = torch.rand(n, generator=g, dtype=F64) + 0.1, torch.rand(m, generator=g, dtype=F64) + 0.1
    return otcore.PointCloud(x, y), a / a.sum(), b / b.sum()


def _square(n, seed=0, scale=1.0):
    """The benchmark's problem (bench/bench_sparse_ot.py), smaller: uniform clouds in the unit
    square, squared Euclidean costs as a matrix, uniform weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=F64)
    y = 0.05 + 0.9 * torch.rand(n, 2, generator=g, dtype=F64)
    return scale**2 * torch.cdist(x, y) ** 2


def _pot_value(C, k, gamma):
    """POT's semi-dual solve (L-BFGS-B, its defaults) and its objective at POT's duals."""
    n, m = C.shape
    a, b = np.full(n, 1 / n), np.full(m, 1 / m)
    with contextlib.redirect_stdout(io.StringIO()):  # its projection prints shapes
        _, log = ot.smooth.smooth_ot_semi_dual(a, b, C.numpy(), gamma, reg_type="sparsity_constrained", max_nz=k,
                                               log=True)
        reg = ot.smooth.SparsityConstrained(max_nz=k, gamma=gamma)
        return ot.smooth.semi_dual_obj_grad(log["alpha"], a, b, C.numpy(), reg)[0]


@pytest.mark.parametrize("formulation", ["semi-dual", "dual"])
def test_where_k_does_not_bind_the_relaxed_optimum_is_the_answer(formulation):
    """No line of the unconstrained optimum uses more than 4 positions: with k = 8 it is the
    problem's optimum, and the L-BFGS from it stops at its first test (0 iterations), where
    from zero it took 513 (semi-dual; the dual had not converged in 1000)."""
    geom, a, b = _clouds(60, 50, seed=3)
    qot = otcore.sparse_ot(geom, a, b, k=60, gamma=0.2, tol=1e-10)
    assert int((qot.to_dense() > 0).sum(0).max()) <= 4
    r = otcore.sparse_ot(geom, a, b, k=8, gamma=0.2, tol=1e-10, formulation=formulation)
    assert r.info["solver"] == RELAXED and r.converged and r.info["relaxed_kept"] is True
    assert r.n_iter == r.info["relaxed_iter"] and r.info["relaxed_width"] == 16
    assert r.info["gamma_stages"] == qot.info["gamma_stages"] != []  # the relaxed Newton runs the continuation
    torch.testing.assert_close(r.to_dense(), qot.to_dense(), rtol=0, atol=1e-12)
    torch.testing.assert_close(r.value, qot.value, rtol=1e-12, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the dual's L-BFGS: 2.9e-8 after its 1000 iterations
        cold = otcore.sparse_ot(geom, a, b, k=8, gamma=0.2, tol=1e-10, formulation=formulation, relaxed_start=False)
    assert cold.info["solver"] == "L-BFGS" and cold.n_iter > 3 * r.n_iter
    torch.testing.assert_close(r.to_dense(), cold.to_dense(), rtol=0, atol=1e-8)


def test_float32_where_k_does_not_bind():
    """In float32 the relaxed solve stops at 1024 rounding steps of the mass (where its Newton
    can stall) and the L-BFGS goes on from there to tol: fewer iterations than from zero."""
    geom, a, b = _clouds(60, 50, seed=3)
    g32 = otcore.PointCloud(geom.x[0].float(), geom.y[0].float())
    r = otcore.sparse_ot(g32, a.float(), b.float(), k=8, gamma=0.2)
    cold = otcore.sparse_ot(g32, a.float(), b.float(), k=8, gamma=0.2, relaxed_start=False)
    ref = otcore.sparse_ot(geom, a, b, k=60, gamma=0.2, tol=1e-10)
    assert r.converged and r.info["solver"] == RELAXED and r.n_iter - r.info["relaxed_iter"] < cold.n_iter / 2
    assert float((r.to_dense().double() - ref.to_dense()).abs().sum()) < 1e-4


@pytest.mark.parametrize("k, gamma, width", [(4, 10.0, 16), (2, 60.0, 64)])
def test_where_k_binds_the_solve_goes_on_from_the_relaxed_optimum(k, gamma, width, monkeypatch):
    """The benchmark's problem at 120 x 120: the unconstrained optimum uses up to 14 (gamma 10)
    or 29 (gamma 60) positions per column, so k binds; past 16 the relaxed pass is widened
    (to 64) and its optimum is the unconstrained one. From there L-BFGS ends above POT's
    value in fewer iterations than from zero (368 against 620, 236 against 468)."""
    C = _square(120)
    qot = otcore.sparse_ot(otcore.CostMatrix(C), k=120, gamma=gamma, tol=1e-9)
    support = int((qot.to_dense() > 0).sum(0).max())
    assert k < support and (support > 16) == (width > 16)
    starts, real = [], S._relaxed_start
    monkeypatch.setattr(S, "_relaxed_start", lambda *args: starts.append(real(*args)) or starts[-1])
    r = otcore.sparse_ot(otcore.CostMatrix(C), k=k, gamma=gamma, tol=1e-9)
    assert r.info["solver"] == RELAXED and r.info["relaxed_width"] == width and r.info["relaxed_kept"] is True
    start = starts[0][0][0]
    torch.testing.assert_close(start - start.mean(), qot.alpha - qot.alpha.mean(), rtol=0, atol=1e-9)
    cold = otcore.sparse_ot(otcore.CostMatrix(C), k=k, gamma=gamma, tol=1e-9, relaxed_start=False)
    assert r.n_iter < cold.n_iter
    assert float(r.value) >= _pot_value(C, k, gamma) and float(r.value) == pytest.approx(float(cold.value), rel=1e-4)
    assert bool(((r.values > 0).sum(-1) <= k).all())


def test_a_batch_gives_each_problem_what_it_gets_alone():
    """One problem's relaxed pass is widened (its clouds shrunk: wider supports), the other's
    is not. Newton's steps do not depend on the batch: where a position enters a support (the
    hard c-transform, exact rather than a softmin at a batch-wide eps) and in the direct
    solve's results (contiguous: LAPACK's batched results are column-major, and a row's mean
    over them rounded otherwise than alone, 1e-18 that the L-BFGS at a kink turned into
    1.8e-9 in the plan)."""
    C = torch.stack([_square(40, seed=1, scale=0.4), _square(40, seed=2)])
    both = otcore.sparse_ot(otcore.CostMatrix(C), k=3, gamma=8.0, tol=1e-9)
    alone = [otcore.sparse_ot(otcore.CostMatrix(Ci), k=3, gamma=8.0, tol=1e-9) for Ci in C]
    assert [r.info["relaxed_width"] for r in alone] == [40, 16] and both.info["relaxed_width"] == 40
    for i, r in enumerate(alone):
        assert int(both.info["relaxed_iter"][i]) == r.info["relaxed_iter"] and int(both.n_iter[i]) == r.n_iter
        torch.testing.assert_close(both.to_dense()[i], r.to_dense(), rtol=0, atol=0)


@pytest.mark.parametrize("formulation", ["semi-dual", "dual"])
def test_a_float32_batch_with_zero_weights_on_rows(formulation):
    """A review's case: float32, k-sparse rows, zero weights in a and in b. In a batch the
    first problem stopped at a gradient norm of 3.0e-3, not converged, where alone it converged
    (9.8e-6); now the two are the same to the bit."""
    g = torch.Generator().manual_seed(0)
    n, m = 50, 40
    C1 = torch.cdist(torch.rand(n, 2, generator=g, dtype=F64), torch.rand(m, 2, generator=g, dtype=F64)) ** 2
    C2 = 0.3 * torch.cdist(torch.rand(n, 2, generator=g, dtype=F64), torch.rand(m, 2, generator=g, dtype=F64)) ** 2
    a, b = torch.rand(2, n, generator=g, dtype=F64), torch.rand(2, m, generator=g, dtype=F64)
    a[0, :5], b[1, :4] = 0, 0
    C, a, b = torch.stack([C1, C2]).float(), (a / a.sum(-1, keepdim=True)).float(), (b / b.sum(-1, keepdim=True)).float()
    kw = dict(k=4, gamma=0.05, axis=1, formulation=formulation)
    both = otcore.sparse_ot(otcore.CostMatrix(C), a, b, **kw)
    assert both.info["solver"] == RELAXED and bool(both.converged.all())
    for i in range(2):
        alone = otcore.sparse_ot(otcore.CostMatrix(C[i]), a[i], b[i], **kw)
        assert int(both.n_iter[i]) == alone.n_iter and float(both.grad_norm[i]) == alone.grad_norm
        torch.testing.assert_close(both.to_dense()[i], alone.to_dense(), rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 5])
def test_a_float64_batch_with_more_positions_than_lines(seed):
    """Newton's direct solve through the lines (positions outnumber them): its matrix-vector
    products as sums of elementwise products, since a batched product rounded 5e-18 otherwise
    than one alone (a review: 126 iterations in a batch against 98 alone, plans 3.2e-3 apart)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2, 40, 2, generator=g, dtype=F64), torch.randn(2, 30, 2, generator=g, dtype=F64)
    both = otcore.sparse_ot(otcore.PointCloud(x, y), k=4, gamma=0.5)
    for i in range(2):
        alone = otcore.sparse_ot(otcore.PointCloud(x[i], y[i]), k=4, gamma=0.5)
        assert int(both.n_iter[i]) == alone.n_iter and int(both.info["relaxed_iter"][i]) == alone.info["relaxed_iter"]
        torch.testing.assert_close(both.to_dense()[i], alone.to_dense(), rtol=0, atol=0)


def test_zero_weight_padding_keeps_the_relaxed_start():
    """Zero-weight, zero-cost padding rows were the cheapest in every column and tied: the
    check at the start called the problem degenerate (a review: 655 iterations against 381
    unpadded). They are pushed out of its pass; the padded problem solves as the unpadded."""
    C = _square(120)
    r = otcore.sparse_ot(otcore.CostMatrix(C), k=4, gamma=10.0)
    a = torch.cat([torch.full((120,), 1 / 120, dtype=F64), torch.zeros(8, dtype=F64)])
    b = torch.full((120,), 1 / 120, dtype=F64)
    padded = otcore.sparse_ot(otcore.CostMatrix(torch.cat([C, torch.zeros(8, 120, dtype=F64)])), a, b, k=4, gamma=10.0)
    assert r.info["relaxed_kept"] is True and padded.info["relaxed_kept"] is True
    assert float(padded.value) == pytest.approx(float(r.value), rel=1e-4) and float(padded.values[:, :].sum()) > 0
    assert float(padded.to_dense()[120:].abs().max()) == 0


def test_continuous_costs_are_not_called_degenerate_at_large_k_and_gamma():
    """The check at the start compares each line's k-th and (k+1)-th cheapest costs: any two of
    its k + 1 cheapest within 1e-4 gamma b_j flagged 84% of the lines of uniform clouds at
    k = 64, gamma = 100 (a review: 7.5x the time of the relaxed start it turned off)."""
    C = _square(300)
    r = otcore.sparse_ot(otcore.CostMatrix(C), k=64, gamma=100.0)
    assert r.info["relaxed_kept"] is True and r.converged and r.n_iter == r.info["relaxed_iter"]


def test_float32_keeps_the_relaxed_optimum_where_it_is_the_answer():
    """Where k does not bind at the relaxed optimum the L-BFGS after it ran on a float32
    objective flat to rounding and ended at a larger gradient norm (a review: 7.8e-5 -> 4.7e-4);
    the relaxed optimum is returned then."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 2, generator=g, dtype=F64), torch.randn(150, 2, generator=g, dtype=F64)
    a, b = torch.rand(200, generator=g, dtype=F64) + 0.1, torch.rand(150, generator=g, dtype=F64) + 0.1
    geom = otcore.PointCloud(x.float(), y.float())
    args = (geom, (a / a.sum()).float(), (b / b.sum()).float())
    starts, real = [], S._relaxed_start
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S, "_relaxed_start", lambda *ar: starts.append(real(*ar)) or starts[-1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # float32 cannot resolve tol here
            r = otcore.sparse_ot(*args, k=8, gamma=0.2)
    assert bool(starts[0][5]) and r.grad_norm <= float(starts[0][6]) and r.grad_norm < 1e-4


@pytest.mark.parametrize("noise", [0.0, 1e-9])
def test_tied_costs_start_from_zero(noise):
    """Integer costs (with or without 1e-9 of noise): the unconstrained optimum spreads each
    column over its many zero-cost rows, interchangeable, from where L-BFGS stopped 0.4-0.54%
    below its end from zero. Their k + 1 cheapest rows tie in most columns: such a problem
    takes no relaxed step and starts from zero, with all of max_iter (a review: 34 relaxed
    iterations counted left too few to converge in max_iter=60)."""
    g = torch.Generator().manual_seed(201)
    C = torch.randint(0, 4, (60, 40), generator=g).to(F64) + noise * torch.rand(60, 40, generator=g, dtype=F64)
    r = otcore.sparse_ot(otcore.CostMatrix(C), k=3, gamma=1.0, max_iter=60)
    cold = otcore.sparse_ot(otcore.CostMatrix(C), k=3, gamma=1.0, max_iter=60, relaxed_start=False)
    assert r.info["relaxed_kept"] is False and r.info["relaxed_iter"] == 0 and r.converged
    assert r.n_iter == cold.n_iter and float(r.value) == float(cold.value)


def test_ties_at_the_relaxed_optimum_start_from_zero(monkeypatch):
    """The check at the relaxed optimum (most lines where k binds hold near-equal costs in their
    support) discards a start the check at the start let through; its iterations are counted."""
    monkeypatch.setattr(S, "_tied", lambda pb, cost, on, lines: (on.shape[-1] > pb.k + 1) & torch.ones(
        cost.shape[0], dtype=torch.bool))  # ties only in the relaxed pass (wider than k + 1)
    C = _square(60)
    r = otcore.sparse_ot(otcore.CostMatrix(C), k=4, gamma=10.0)
    cold = otcore.sparse_ot(otcore.CostMatrix(C), k=4, gamma=10.0, relaxed_start=False)
    assert r.info["relaxed_kept"] is False and r.info["relaxed_iter"] > 0
    assert r.n_iter == cold.n_iter + r.info["relaxed_iter"] and float(r.value) == float(cold.value)


def test_where_it_applies():
    """"auto": where the lines' slots leave a spare per line (k L >= N + L) and gamma_schedule
    is not None; True forces it; a warm start, or k >= the line length, has none."""
    C = torch.rand(20, 10, generator=torch.Generator().manual_seed(5), dtype=F64)
    geom = otcore.CostMatrix(C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        assert otcore.sparse_ot(geom, k=2, gamma=0.3).info["solver"] == "L-BFGS"  # 20 slots for 20 rows
        assert otcore.sparse_ot(geom, k=2, gamma=0.3, relaxed_start=True).info["solver"] == RELAXED
        assert otcore.sparse_ot(geom, k=3, gamma=0.3).info["solver"] == RELAXED  # 30 >= 20 + 10
        assert otcore.sparse_ot(geom, k=3, gamma=0.3, relaxed_start=np.bool_(False)).info["solver"] == "L-BFGS"
        # without the continuation the relaxed Newton stalls at small gamma: "auto" then starts from zero
        assert otcore.sparse_ot(geom, k=3, gamma=0.3, gamma_schedule=None).info["solver"] == "L-BFGS"
        assert otcore.sparse_ot(geom, k=3, gamma=0.3, gamma_schedule=None, relaxed_start=True).info["solver"] == RELAXED
        init = (torch.zeros(20, dtype=F64), torch.zeros(10, dtype=F64))
        warm = otcore.sparse_ot(geom, k=3, gamma=0.3, relaxed_start=True, init=init)
    assert warm.info["solver"] == "L-BFGS" and "relaxed_iter" not in warm.info
    assert otcore.sparse_ot(geom, k=20, gamma=0.3, relaxed_start=True).info["solver"] == "newton"


def test_its_iterations_count_in_max_iter():
    C = _square(60)
    with pytest.warns(ConvergenceWarning):
        r = otcore.sparse_ot(otcore.CostMatrix(C), k=4, gamma=10.0, max_iter=3)
    assert r.n_iter == 3 and r.info["relaxed_iter"] == 3 and not r.converged and r.info["stop"] == "max_iter reached"


@pytest.mark.parametrize("value, error", [("yes", ValueError), (1, TypeError), (None, TypeError)])
def test_bad_relaxed_start(value, error):
    C = torch.rand(9, 7, generator=torch.Generator().manual_seed(0), dtype=F64)
    with pytest.raises(error, match="relaxed_start"):
        otcore.sparse_ot(otcore.CostMatrix(C), k=3, gamma=0.5, relaxed_start=value)


@pytest.mark.parametrize("geometry", ["matrix", "cloud"])
def test_hard_c_transform_is_the_minimum(geometry):
    """``min_l (C_rl - h_l)`` exactly, lines at -inf left out, for either axis."""
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(2, 9, 3, generator=g, dtype=F64), torch.randn(2, 7, 3, generator=g, dtype=F64)
    geom = otcore.PointCloud(x, y)
    C = geom.cost_block()
    if geometry == "matrix":
        geom = otcore.CostMatrix(C)
    for axis in (0, 1):
        Ct = C if axis == 0 else C.transpose(1, 2)  # (B, positions, lines)
        h = torch.randn(2, Ct.shape[2], generator=g, dtype=F64)
        h[0, 1] = h[1, -1] = -torch.inf
        hp = torch.randn(2, Ct.shape[1], generator=g, dtype=F64)
        pb = S._Problem(geom, axis, 2, 0.5, True, torch.ones_like(hp), torch.ones_like(h), None, None, "fixed", "torch",
                        "fp32")
        edge, _ = S._hard_c_transform(pb, h, hp, geom.diameters())
        torch.testing.assert_close(edge, (Ct - h[:, None, :]).amin(-1), rtol=0, atol=1e-12)
