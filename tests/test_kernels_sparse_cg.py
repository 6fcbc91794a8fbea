"""The conjugate-gradient solve of SNS's Newton systems on the Triton backend -- the one-launch
kernel (kernels/sparse_cg.py) and, past its size limit, the host-issued sweeps
(kernels/sparse_cg_steps.py): every test runs on both paths -- against the torch twin
(reference_sparse.ell_pcg) and a float64 dense solve.

The system is ``[[diag(d_a), S], [S^T, diag(d_b)]] x = rhs`` with ``S`` an ELL matrix
of plan rows, as a Newton step builds it (diagonal = row/column sums of ``S`` times
``1 + lam``, so it is positive definite). Tensors live on ``DEVICE``: with CUDA the real
kernel runs, without it the Triton interpreter.
"""

import math

import pytest
import torch
from kernel_support import DEVICE, RUNTIME_WARNINGS_ARE_ERRORS, spy_launches

import otcore
from otcore import reference_sparse as RS
from otcore._cg import pcg
from otcore.kernels import sparse_cg as KC
from otcore.kernels import sparse_cg_steps as KS

pytestmark = RUNTIME_WARNINGS_ARE_ERRORS


@pytest.fixture(autouse=True, params=["one launch", "sweeps"])
def path(request, monkeypatch):
    """Each test on both Triton paths: ``"sweeps"`` sets ``FUSED_MAX_ENTRIES = 0``, so every
    system runs the host-issued sweeps."""
    if request.param == "sweeps":
        monkeypatch.setattr(KC, "FUSED_MAX_ENTRIES", 0)
    return request.param

TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def system(B, n, m, s, dtype=torch.float64, seed=0, lam=0.1, dead=False):
    """A Newton system of ``B`` problems: the top-``s`` plan rows of a random cost at
    eps 0.05, ``d = (row/column sums of S + a little) (1 + lam)``, a random right-hand
    side. ``dead``: row 2 and column 3 of every problem are left out (zero diagonal,
    preconditioner and right-hand side, no entries), as zero weights are."""
    g = torch.Generator().manual_seed(seed)
    geom = otcore.CostMatrix(torch.rand(B, n, m, generator=g, dtype=torch.float64).to(DEVICE, dtype))
    F, G = torch.zeros(B, n, dtype=dtype, device=DEVICE), torch.zeros(B, m, dtype=dtype, device=DEVICE)
    vals, idx = geom.plan_sparse_rows(F, G, 0.05, s)
    if dead:
        vals = torch.where((idx == 3) | (torch.arange(n, device=DEVICE) == 2)[None, :, None], 0.0, vals)
    r = vals.sum(2) + 0.05 * torch.rand(B, n, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    c = RS.ell_matvec(geom, vals, idx, torch.ones_like(r), 0) + 0.05 * torch.rand(B, m, generator=g,
                                                                                     dtype=torch.float64).to(DEVICE,
                                                                                                             dtype)
    diag = [r * (1 + lam), c * (1 + lam)]
    rhs = [torch.randn(B, n, generator=g, dtype=torch.float64).to(DEVICE, dtype),
           torch.randn(B, m, generator=g, dtype=torch.float64).to(DEVICE, dtype)]
    if dead:
        for part, i in ((0, 2), (1, 3)):
            diag[part][:, i] = 0.0
            rhs[part][:, i] = 0.0
    inv = tuple(torch.where(d > 0, 1 / torch.where(d > 0, d, 1.0), 0.0) for d in diag)
    return geom, vals, idx, tuple(diag), tuple(rhs), inv


def dense_solve(geom, vals, idx, diag, rhs):
    """The float64 solution by a dense solve of each problem's system (rows and columns
    with a zero diagonal left out: their solution is 0)."""
    B, n, s = vals.shape
    m = geom.m
    S = torch.zeros(B, n, m, dtype=torch.float64, device=vals.device)
    S.scatter_add_(2, idx, vals.double())
    K = torch.zeros(B, n + m, n + m, dtype=torch.float64, device=vals.device)
    K[:, :n, :n] = torch.diag_embed(diag[0].double())
    K[:, n:, n:] = torch.diag_embed(diag[1].double())
    K[:, :n, n:] = S
    K[:, n:, :n] = S.transpose(1, 2)
    rhs = torch.cat(rhs, 1).double()
    x = torch.zeros_like(rhs)
    for b in range(B):
        live = torch.cat(diag, 1)[b] > 0
        x[b, live] = torch.linalg.solve(K[b][live][:, live], rhs[b, live])
    return x[:, :n], x[:, n:]


def both(geom, vals, idx, diag, rhs, inv, rtol, max_iter, active):
    kernel = geom.ell_pcg(vals, idx, diag, rhs, inv, rtol, max_iter, active, backend="triton")
    twin = geom.ell_pcg(vals, idx, diag, rhs, inv, rtol, max_iter, active, backend="torch")
    return kernel, twin


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def close_counts(k, t):
    """The kernel and the twin run the same iteration; their sums are ordered differently, so
    a problem whose residual lands on its threshold may stop one iteration apart."""
    return int((k - t).abs().max()) <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,n,m,s", [(1, 37, 53, 5), (3, 40, 29, 8), (2, 17, 17, 1)])
def test_solve_matches_twin_and_float64(B, n, m, s, dtype):
    geom, vals, idx, diag, rhs, inv = system(B, n, m, s, dtype)
    active = torch.ones(B, dtype=torch.bool, device=DEVICE)
    rtol = 1e-6 if dtype == torch.float64 else 1e-4
    ((ka, kb), kits), ((ta, tb), tits) = both(geom, vals, idx, diag, rhs, inv, rtol, 500, active)
    # the same iteration: the same counts (per problem) and iterates up to rounding order
    assert close_counts(kits, tits) and int(kits.min()) >= 1
    assert rel(ka, ta) <= TOL[dtype] and rel(kb, tb) <= TOL[dtype]
    xa, xb = dense_solve(geom, vals, idx, diag, rhs)
    # stopped at r^T z <= rtol^2 r0^T z0: the error is within ~cond * rtol of the solution
    assert rel(ka, xa) <= 1e3 * rtol and rel(kb, xb) <= 1e3 * rtol
    assert kits.dtype == torch.int64 and ka.dtype == dtype


def test_tight_tolerance_reaches_the_dense_solution():
    geom, vals, idx, diag, rhs, inv = system(2, 23, 31, 4)
    (ka, kb), its = geom.ell_pcg(vals, idx, diag, rhs, inv, 1e-13, 500, torch.ones(2, dtype=torch.bool,
                                                                                        device=DEVICE),
                                 backend="triton")
    xa, xb = dense_solve(geom, vals, idx, diag, rhs)
    assert rel(ka, xa) <= 1e-9 and rel(kb, xb) <= 1e-9 and int(its.max()) < 500


def test_the_schur_complement_takes_fewer_iterations_than_the_whole_system():
    """The solve runs CG on the Schur complement ``diag(d_a) - S diag(1/d_b) S^T``: on a
    Newton system near an assignment-like optimum (eps 0.005 on U[0,1] costs, small damping)
    it needs under a third of the iterations of Jacobi-PCG on the whole system (eigenvalues
    ``1 - sigma^2`` against ``1 +- sigma``: 32-34 against 125-135 here) to the same
    tolerance, on both backends."""
    g = torch.Generator().manual_seed(4)
    B, n, m, s, eps = 2, 40, 40, 8, 0.005
    geom = otcore.CostMatrix(torch.rand(B, n, m, generator=g, dtype=torch.float64).to(DEVICE))
    res = otcore.sinkhorn(geom, eps=eps, tol=1e-3, max_iter=2000)  # potentials near the optimum
    F, G = res.f - eps * math.log(n), res.g - eps * math.log(m)
    vals, idx = geom.plan_sparse_rows(F, G, eps, s)
    r = vals.sum(2)
    c = RS.ell_matvec(geom, vals, idx, torch.ones_like(r), 0)
    diag = (r * (1 + 1e-6) + 1e-12, c * (1 + 1e-6) + 1e-12)
    inv = (1 / diag[0], 1 / diag[1])
    rhs = (torch.randn(B, n, generator=g, dtype=torch.float64).to(DEVICE),
           torch.randn(B, m, generator=g, dtype=torch.float64).to(DEVICE))
    rtol = 1e-8

    def whole(p):
        pa, pb = p[:, :n], p[:, n:]
        return torch.cat((diag[0] * pa + RS.ell_matvec(geom, vals, idx, pb, 1),
                          diag[1] * pb + RS.ell_matvec(geom, vals, idx, pa, 0)), 1)

    _, jacobi_its = pcg(whole, torch.cat(rhs, 1), rtol, 5000, inv_diag=torch.cat(inv, 1))
    xa, xb = dense_solve(geom, vals, idx, diag, rhs)
    active = torch.ones(B, dtype=torch.bool, device=DEVICE)
    for (ka, kb), its in both(geom, vals, idx, diag, rhs, inv, rtol, 5000, active):
        assert bool((3 * its < jacobi_its).all()), (its, jacobi_its)
        assert rel(ka, xa) <= 1e-5 and rel(kb, xb) <= 1e-5


def test_left_out_rows_columns_and_empty_columns():
    """A zero diagonal (zero weight) leaves that entry at 0; a column without entries is a
    zero-length segment of the by-column copy."""
    geom, vals, idx, diag, rhs, inv = system(2, 21, 26, 3, dead=True)
    assert int(RS.ell_matvec(geom, (vals != 0).double(), idx, torch.ones(2, 21, dtype=torch.float64,
                                                                          device=DEVICE), 0).eq(0).sum()) > 2
    active = torch.ones(2, dtype=torch.bool, device=DEVICE)
    ((ka, kb), kits), ((ta, tb), tits) = both(geom, vals, idx, diag, rhs, inv, 1e-10, 500, active)
    assert close_counts(kits, tits)
    assert float(ka[:, 2].abs().max()) == 0.0 and float(kb[:, 3].abs().max()) == 0.0
    xa, xb = dense_solve(geom, vals, idx, diag, rhs)
    assert rel(ka, xa) <= 1e-7 and rel(kb, xb) <= 1e-7 and rel(ka, ta) <= 1e-10


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_left_out_rows_right_hand_side_plays_no_part(bad):
    """A NaN or inf right-hand side on a row left out (inv_diag 0) had made the first
    <r, pre r> NaN: no iteration ran and x = 0, on both backends (a review). The docs say
    such an entry's right-hand side does not matter, as on the b side."""
    geom, vals, idx, diag, rhs, inv = system(2, 21, 26, 3, dead=True)
    active = torch.ones(2, dtype=torch.bool, device=DEVICE)
    ra = rhs[0].clone()
    ra[:, 2] = bad
    want = both(geom, vals, idx, diag, rhs, inv, 1e-10, 500, active)
    got = both(geom, vals, idx, diag, (ra, rhs[1]), inv, 1e-10, 500, active)
    for ((wa, wb), wits), ((ga, gb), gits) in zip(want, got):
        assert int(gits.min()) > 0 and torch.equal(gits, wits) and torch.equal(ga, wa) and torch.equal(gb, wb)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_left_out_rows_diagonal_plays_no_part(bad):
    """An inf or NaN diagonal on a row left out (inv_diag 0, as 1 / inf gives): 0 * inf in
    the products had stopped the solve after one iteration, 0.28 off (a review)."""
    geom, vals, idx, diag, rhs, inv = system(2, 21, 26, 3, dead=True)
    active = torch.ones(2, dtype=torch.bool, device=DEVICE)
    da = diag[0].clone()
    da[:, 2] = bad
    want = both(geom, vals, idx, diag, rhs, inv, 1e-10, 500, active)
    got = both(geom, vals, idx, (da, diag[1]), rhs, inv, 1e-10, 500, active)
    for ((wa, wb), wits), ((ga, gb), gits) in zip(want, got):
        assert torch.equal(gits, wits) and torch.equal(ga, wa) and torch.equal(gb, wb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_row_whose_diagonal_the_dtype_cannot_invert_is_left_out_on_both_backends(dtype):
    """A row of subnormal mass (a weight of 1e-310 in float64): its preconditioner 1 / k had
    been inf, <r, pre r> inf, and CG returned x = 0 for the whole problem (a review). Now that
    row gets 0, as a zero weight's, and the others solve as without it."""
    geom, vals, idx, diag, rhs, inv = system(1, 21, 26, 3, dtype=dtype, dead=True)
    tiny = torch.finfo(dtype).tiny / 64  # subnormal: 1 / tiny overflows
    vals = torch.where((torch.arange(21, device=DEVICE) == 2)[None, :, None], 0.0, vals)
    da = diag[0].clone()
    da[:, 2] = tiny
    ia = inv[0].clone()
    ia[:, 2] = 1.0  # (kept in the system: only its inverse's finiteness leaves it out)
    active = torch.ones(1, dtype=torch.bool, device=DEVICE)
    ((ka, kb), _), ((ta, tb), _) = both(geom, vals, idx, (da, diag[1]), rhs, (ia, inv[1]), TOL[dtype] / 100, 500,
                                        active)
    xa, xb = dense_solve(geom, vals, idx, diag, rhs)  # (row 2 left out: its diagonal 0 there)
    for a, b in ((ka, kb), (ta, tb)):
        assert torch.isfinite(a).all() and float(a[:, 2].abs().max()) == 0.0
        keep = torch.arange(21, device=DEVICE) != 2
        assert rel(a[:, keep], xa[:, keep]) <= 100 * TOL[dtype] and rel(b, xb) <= 100 * TOL[dtype]


def test_inactive_problems_and_a_zero_right_hand_side_run_no_iteration():
    geom, vals, idx, diag, rhs, inv = system(3, 19, 22, 4)
    rhs = (rhs[0].clone(), rhs[1].clone())
    rhs[0][2], rhs[1][2] = 0.0, 0.0  # problem 2: nothing to solve
    active = torch.tensor([True, False, True], device=DEVICE)
    ((ka, kb), kits), ((ta, tb), tits) = both(geom, vals, idx, diag, rhs, inv, 1e-8, 500, active)
    assert kits.tolist()[1:] == [0, 0] and int(kits[0]) > 0 and close_counts(kits, tits)
    assert float(ka[1:].abs().max()) == 0.0 and float(kb[1:].abs().max()) == 0.0
    assert rel(ka, ta) <= 1e-10


def test_iteration_cap_and_per_problem_tolerances():
    geom, vals, idx, diag, rhs, inv = system(2, 30, 30, 6)
    active = torch.ones(2, dtype=torch.bool, device=DEVICE)
    ((ka, _), kits), ((ta, _), tits) = both(geom, vals, idx, diag, rhs, inv, 1e-12, 3, active)
    assert kits.tolist() == [3, 3] and torch.equal(kits, tits) and rel(ka, ta) <= 1e-10
    rtol = torch.tensor([1e-2, 1e-10], dtype=torch.float64, device=DEVICE)
    ((ka, _), kits), ((ta, _), tits) = both(geom, vals, idx, diag, rhs, inv, rtol, 500, active)
    assert int(kits[0]) < int(kits[1]) and close_counts(kits, tits) and rel(ka, ta) <= 1e-10


@pytest.mark.parametrize("path", ["one launch"], indirect=True)  # the sweeps' count: test_sweeps_launch_...
def test_one_launch_and_no_host_read(monkeypatch, path):
    """The whole solve is one kernel launch; the host reads nothing (the torch loop reads
    its stopping test every 8 iterations) but the indices' range check, which SNS skips."""
    geom, vals, idx, diag, rhs, inv = system(2, 25, 18, 4)
    launches = spy_launches(monkeypatch, [(KC, "_ell_pcg_kernel")])
    reads = []
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(t) or 0)
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(t) or False)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t) or [])
    monkeypatch.setattr(torch.Tensor, "__int__", lambda t: reads.append(t) or 0)
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append(t) or 0.0)
    counts = []
    for check_idx in (False, True):
        geom.ell_pcg(vals, idx, diag, rhs, inv, 1e-8, 100, torch.ones(2, dtype=torch.bool, device=DEVICE),
                     backend="triton", check_idx=check_idx)
        counts.append(len(reads))
    monkeypatch.undo()
    assert launches == ["_ell_pcg_kernel"] * 2 and counts == [0, 1]


def test_deterministic():
    """Both products are gathers (no atomics): two runs agree bit for bit (a check for the
    GPU, where part t of bench/gpu_check.sh runs this file; the interpreter is sequential)."""
    geom, vals, idx, diag, rhs, inv = system(2, 33, 41, 7, dtype=torch.float32)
    active = torch.ones(2, dtype=torch.bool, device=DEVICE)
    (a1, b1), _ = geom.ell_pcg(vals, idx, diag, rhs, inv, 1e-5, 200, active, backend="triton")
    (a2, b2), _ = geom.ell_pcg(vals, idx, diag, rhs, inv, 1e-5, 200, active, backend="triton")
    assert torch.equal(a1, a2) and torch.equal(b1, b2)


@pytest.mark.parametrize("path", ["one launch"], indirect=True)
def test_large_systems_run_the_host_issued_sweeps(monkeypatch, path):
    """Past ``FUSED_MAX_ENTRIES`` the Triton op runs the host-issued sweeps: the same result."""
    geom, vals, idx, diag, rhs, inv = system(2, 24, 20, 5)
    active = torch.ones(2, dtype=torch.bool, device=DEVICE)
    (fa, fb), fits = geom.ell_pcg(vals, idx, diag, rhs, inv, 1e-9, 300, active, backend="triton")
    monkeypatch.setattr(KC, "FUSED_MAX_ENTRIES", 24 * 5 - 1)
    assert not KC.fused(24, 5) and KC.fused(23, 5)
    called = []
    monkeypatch.setattr(KC, "_ell_pcg_kernel", called)  # indexing a list fails the test if reached
    (ha, hb), hits = geom.ell_pcg(vals, idx, diag, rhs, inv, 1e-9, 300, active, backend="triton")
    assert close_counts(fits, hits) and rel(fa, ha) <= 1e-10 and rel(fb, hb) <= 1e-10


def test_by_column_copy_holds_every_entry_once():
    geom, vals, idx, *_ = system(2, 15, 12, 4, dead=True)
    vt, rt, off = KC._by_column(vals, idx, geom.m)
    nnz = (vals != 0).sum((1, 2))
    assert off[:, 0].eq(0).all() and torch.equal(off[:, -1], nnz) and bool((off[:, 1:] >= off[:, :-1]).all())
    for b in range(2):
        for j in range(geom.m):
            lo, hi = int(off[b, j]), int(off[b, j + 1])
            want = sorted((int(i), float(vals[b, i, k])) for i, k in ((vals[b] != 0) & (idx[b] == j)).nonzero())
            assert sorted(zip(rt[b, lo:hi].tolist(), vt[b, lo:hi].tolist())) == want


def test_an_ill_conditioned_system_meets_its_tolerance_on_both_backends():
    """Nearly a permutation (eps small against the cost's spread) and almost no damping:
    CG runs long, and rounding may part the two backends' iterates; each still meets the
    stopping rule on its true residual (within a small factor: CG's residual is updated,
    not recomputed)."""
    geom, vals, idx, diag, rhs, inv = system(2, 30, 30, 6, lam=1e-9)
    g = torch.Generator().manual_seed(9)
    vals = vals * torch.rand(vals.shape, generator=g, dtype=torch.float64).to(DEVICE) ** 8  # spread the entries
    r, c = vals.sum(2), RS.ell_matvec(geom, vals, idx, torch.ones(2, 30, dtype=torch.float64, device=DEVICE), 0)
    diag = ((1 + 1e-9) * r + 1e-12, (1 + 1e-9) * c + 1e-12)
    inv = (1 / diag[0], 1 / diag[1])
    active = torch.ones(2, dtype=torch.bool, device=DEVICE)
    rtol = 1e-8
    for (xa, xb), its in both(geom, vals, idx, diag, rhs, inv, rtol, 5000, active):
        assert int(its.min()) > 30  # a long solve
        res = (diag[0] * xa + RS.ell_matvec(geom, vals, idx, xb, 1) - rhs[0],
               diag[1] * xb + RS.ell_matvec(geom, vals, idx, xa, 0) - rhs[1])
        rz = sum((t * t * i).sum(-1) for t, i in zip(res, inv))
        rz0 = sum((t * t * i).sum(-1) for t, i in zip(rhs, inv))
        assert bool((rz <= 100 * rtol**2 * rz0).all()), (rz / rz0).sqrt()


def test_non_finite_systems_stop_at_the_last_finite_iterate_on_both_backends():
    """A NaN in a diagonal makes <p, Kp> NaN: that problem stops at the iterate before it
    (x_a = 0 here, one iteration; x_b = r_b / d_b, the eliminated side's value there); an
    inactive problem with a NaN right-hand side keeps x = 0; the others solve as usual."""
    geom, vals, idx, diag, rhs, inv = system(3, 14, 11, 3)
    diag = (diag[0].clone(), diag[1])
    diag[0][1, 4] = float("nan")
    rhs = (rhs[0].clone(), rhs[1])
    rhs[0][2, 0] = float("nan")
    active = torch.tensor([True, True, False], device=DEVICE)
    ((ka, kb), kits), ((ta, tb), tits) = both(geom, vals, idx, diag, rhs, inv, 1e-9, 300, active)
    assert kits.tolist()[1:] == [1, 0] and tits.tolist()[1:] == [1, 0] and close_counts(kits, tits)
    for xa, xb in ((ka, kb), (ta, tb)):
        assert bool(torch.isfinite(xa).all()) and bool(torch.isfinite(xb).all())
        assert float(xa[1:].abs().max()) == 0.0 and float(xb[2].abs().max()) == 0.0
        assert rel(xb[1], rhs[1][1] * inv[1][1]) <= 1e-15
    assert rel(ka[0], ta[0]) <= 1e-10


def test_an_indefinite_direction_stops_both_backends_alike():
    """A negative diagonal entry can make <p, Kp> <= 0 (K is then not positive definite):
    CG stops there, at the iterate before it, on both backends."""
    geom, vals, idx, diag, rhs, inv = system(2, 12, 10, 3)
    diag = (diag[0].clone(), diag[1])
    diag[0][:, :6] = -diag[0][:, :6]
    inv = (1 / diag[0].abs(), inv[1])
    active = torch.ones(2, dtype=torch.bool, device=DEVICE)
    ((ka, kb), kits), ((ta, tb), tits) = both(geom, vals, idx, diag, rhs, inv, 1e-12, 500, active)
    assert close_counts(kits, tits) and int(kits.max()) < 10
    assert torch.allclose(ka, ta, rtol=1e-8, atol=0) and torch.allclose(kb, tb, rtol=1e-8, atol=0)
    # stopped by the breakdown, far from a solution (tol 1e-12 was not met)
    assert float((diag[0] * ka + RS.ell_matvec(geom, vals, idx, kb, 1) - rhs[0]).abs().max()) > 1e-2


def test_strided_inputs_duplicate_indices_and_several_blocks():
    """Transposed (non-contiguous) inputs, a row naming one column twice (the entries add),
    and sizes past the kernel's 512-entry sweep blocks."""
    geom, vals, idx, diag, rhs, inv = system(2, 600, 530, 2)
    idx = idx.clone()
    idx[:, 7, 1] = idx[:, 7, 0]  # row 7: one column twice
    r = vals.sum(2) + 0.05
    c = RS.ell_matvec(geom, vals, idx, torch.ones(2, 600, dtype=torch.float64, device=DEVICE), 0) + 0.05
    diag, inv = (r, c), (1 / r, 1 / c)
    strided = tuple(t.t().contiguous().t() for t in rhs)  # same values, column-major storage
    assert not strided[0].is_contiguous()
    active = torch.ones(2, dtype=torch.bool, device=DEVICE)
    ((ka, kb), kits), ((ta, tb), tits) = both(geom, vals, idx, diag, strided, inv, 1e-10, 500, active)
    assert close_counts(kits, tits) and rel(ka, ta) <= 1e-9 and rel(kb, tb) <= 1e-9
    xa, xb = dense_solve(geom, vals, idx, diag, rhs)
    assert rel(ka, xa) <= 1e-6 and rel(kb, xb) <= 1e-6


def test_indices_off_the_matrix_are_ignored_by_the_kernel():
    """``idx`` must hold columns in [0, m) (plan_sparse_rows' output does; ell_pcg checks it
    unless ``check_idx=False``); the kernel reads nothing for one that is not (no
    out-of-bounds read), as if the entry were empty."""
    geom, vals, idx, diag, rhs, inv = system(1, 10, 8, 3)
    active = torch.ones(1, dtype=torch.bool, device=DEVICE)
    off = idx.clone()
    off[0, 3, 2] = geom.m  # one past the last column
    cut = vals.clone()
    cut[0, 3, 2] = 0.0
    (oa, ob), oits = geom.ell_pcg(vals, off, diag, rhs, inv, 1e-10, 200, active, backend="triton", check_idx=False)
    (ca, cb), cits = geom.ell_pcg(cut, idx, diag, rhs, inv, 1e-10, 200, active, backend="triton")
    assert torch.equal(oits, cits) and rel(oa, ca) <= 1e-12 and rel(ob, cb) <= 1e-12
    # its value plays no part either, even non-finite (inf * 0 made the whole solve NaN)
    for bad in (float("inf"), float("nan")):
        odd = vals.clone()
        odd[0, 3, 2] = bad
        (xa, xb), its = geom.ell_pcg(odd, off, diag, rhs, inv, 1e-10, 200, active, backend="triton",
                                     check_idx=False)
        assert torch.equal(its, cits) and rel(xa, ca) <= 1e-12 and rel(xb, cb) <= 1e-12


def test_non_finite_right_hand_sides_left_out_or_inactive_give_zeros():
    """A left-out column (``inv_diag`` 0) and an inactive problem get 0 in the solution on
    both backends, whatever their right-hand side holds (a review saw NaN: 0 * NaN)."""
    geom, vals, idx, diag, rhs, inv = system(2, 12, 10, 3, dead=True)  # column 3 left out
    rhs = (rhs[0].clone(), rhs[1].clone())
    rhs[1][0, 3] = float("nan")
    rhs[1][1, 5] = float("inf")
    active = torch.tensor([True, False], device=DEVICE)
    ((ka, kb), kits), ((ta, tb), tits) = both(geom, vals, idx, diag, rhs, inv, 1e-10, 200, active)
    for xa, xb in ((ka, kb), (ta, tb)):
        assert bool(torch.isfinite(xa).all()) and bool(torch.isfinite(xb).all())
        assert float(xb[0, 3]) == 0.0 and float(xa[1].abs().max()) == 0.0 and float(xb[1].abs().max()) == 0.0
    assert close_counts(kits, tits) and rel(ka[0], ta[0]) <= 1e-10 and int(kits[0]) > 0


def test_the_solution_is_the_system_of_diag_whatever_the_inverse_values():
    """The elimination divides by the system's own ``d_b`` (``diag``); ``inv_diag`` only marks
    entries in or out (a review saw a preconditioner of ``1 / (2 d_b)`` change the answer)."""
    geom, vals, idx, diag, rhs, inv = system(2, 15, 12, 4)
    active = torch.ones(2, dtype=torch.bool, device=DEVICE)
    xa, xb = dense_solve(geom, vals, idx, diag, rhs)
    for scale in (0.5, 3.0):
        odd = (inv[0] * scale, inv[1] * scale)
        for (ka, kb), _ in both(geom, vals, idx, diag, rhs, odd, 1e-12, 500, active):
            assert rel(ka, xa) <= 1e-8 and rel(kb, xb) <= 1e-8


def _bad(change):
    geom, vals, idx, diag, rhs, inv = system(3, 9, 7, 3)
    args = dict(vals=vals, idx=idx, diag=diag, rhs=rhs, inv_diag=inv, rtol=1e-8, max_iter=10,
                active=torch.ones(3, dtype=torch.bool, device=DEVICE))
    args.update(change(args))
    return geom, args


@pytest.mark.parametrize(
    "change,exc,name",
    [
        (lambda a: dict(diag=(a["diag"][0], a["diag"][1][:, :-1])), ValueError, "diag"),
        (lambda a: dict(diag=(a["diag"][0][:1], a["diag"][1])), ValueError, "diag"),  # a batch of 1 for 3
        (lambda a: dict(rhs=(a["rhs"][0][:, 1:], a["rhs"][1])), ValueError, "rhs"),
        (lambda a: dict(rhs=(a["rhs"][0].float(), a["rhs"][1])), ValueError, "rhs"),
        (lambda a: dict(inv_diag=(a["inv_diag"][0],)), ValueError, "inv_diag"),
        (lambda a: dict(vals=a["vals"][:, :5]), ValueError, "vals"),
        (lambda a: dict(idx=a["idx"].to(torch.int32)), ValueError, "idx"),
        # out of range: the kernel had solved another system, the twin raised torch's IndexError (a review)
        (lambda a: dict(idx=torch.where(a["idx"] == a["idx"].max(), a["idx"].max() + 1, a["idx"])), ValueError, "idx"),
        (lambda a: dict(idx=torch.where(a["idx"] == 0, -1, a["idx"])), ValueError, "idx"),
        (lambda a: dict(active=torch.ones(2, dtype=torch.bool, device=DEVICE)), ValueError, "active"),
        (lambda a: dict(rtol=-1.0), ValueError, "rtol"),
        (lambda a: dict(rtol=torch.ones(2, dtype=torch.float64, device=DEVICE)), ValueError, "rtol"),
        (lambda a: dict(max_iter=0), ValueError, "max_iter"),
        (lambda a: dict(max_iter=2.5), TypeError, "max_iter"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_arguments(change, exc, name, backend):
    geom, args = _bad(change)
    with pytest.raises(exc, match=name):
        geom.ell_pcg(**args, backend=backend)


def test_active_none_means_every_problem():
    geom, args = _bad(lambda a: {})
    (xa, _), its = geom.ell_pcg(**dict(args, active=None), backend="triton")
    (ya, _), its2 = geom.ell_pcg(**args, backend="triton")
    assert torch.equal(its, its2) and torch.equal(xa, ya) and int(its.min()) > 0


@pytest.mark.parametrize("path", ["sweeps"], indirect=True)
@pytest.mark.parametrize("programs", [KS.PROGRAMS_MAX, 2, 1])
def test_sweeps_launch_four_kernels_per_iteration_and_read_every_eighth(monkeypatch, path, programs):
    """The host-issued path: three set-up launches, four per iteration (columns, rows, step,
    direction), one for ``x_b``, no torch operation in the loop, and one host read every 8
    iterations, from the 8th on; several row, vector and column tiles per problem (1100 x
    900, s = 3), one program per tile or one or two programs looping over them (every sweep
    at most ``PROGRAMS_MAX`` programs per problem: CUDA allows 65535 on grid axis 1), give
    the twin's iteration counts and solution to rounding."""
    monkeypatch.setattr(KS, "PROGRAMS_MAX", programs)
    geom, vals, idx, diag, rhs, inv = system(2, 1100, 900, 3)
    active = torch.ones(2, dtype=torch.bool, device=DEVICE)
    names = ["_cg_setup_cols_kernel", "_cg_setup_rows_kernel", "_cg_start_kernel", "_cg_cols_kernel",
             "_cg_rows_kernel", "_cg_step_kernel", "_cg_direction_kernel"]
    grids = []
    launches = spy_launches(monkeypatch, [(KS, name) for name in names], grids)
    reads, real_bool = [], torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(1) or real_bool(t))
    (xa, xb), its = geom.ell_pcg(vals, idx, diag, rhs, inv, 1e-8, 300, active, backend="triton", check_idx=False)
    monkeypatch.undo()
    issued = launches.count("_cg_rows_kernel")
    assert launches[:3] == names[:3] and launches[-1] == "_cg_cols_kernel"
    assert launches[3:-1] == names[3:] * issued and issued % 8 == 0
    assert int(its.max()) <= issued < int(its.max()) + 8 + 1 and len(reads) == issued // 8
    assert all(grid[0] == 2 and (len(grid) == 1 or 1 <= grid[1] <= programs) for grid in grids)
    assert {grid for name, grid in zip(launches, grids) if name == "_cg_cols_kernel"} == {(2, min(programs, 2))}
    (ta, tb), tits = geom.ell_pcg(vals, idx, diag, rhs, inv, 1e-8, 300, active, backend="torch")
    assert close_counts(its, tits) and rel(xa, ta) <= 1e-10 and rel(xb, tb) <= 1e-10
