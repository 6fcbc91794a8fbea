"""The one-launch conjugate-gradient solve of SNS's Newton systems (kernels/sparse_cg.py)
against its torch twin (reference_sparse.ell_pcg) and a float64 dense solve.

The system is ``[[diag(d_a), S], [S^T, diag(d_b)]] x = rhs`` with ``S`` an ELL matrix
of plan rows, as a Newton step builds it (diagonal = row/column sums of ``S`` times
``1 + lam``, so it is positive definite). Tensors live on ``DEVICE``: with CUDA the real
kernel runs, without it the Triton interpreter.
"""

import pytest
import torch
from kernel_support import DEVICE, RUNTIME_WARNINGS_ARE_ERRORS

import otcore
from otcore import reference_sparse as RS
from otcore.kernels import sparse_cg as KC

pytestmark = RUNTIME_WARNINGS_ARE_ERRORS

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,n,m,s", [(1, 37, 53, 5), (3, 40, 29, 8), (2, 17, 17, 1)])
def test_solve_matches_twin_and_float64(B, n, m, s, dtype):
    geom, vals, idx, diag, rhs, inv = system(B, n, m, s, dtype)
    active = torch.ones(B, dtype=torch.bool, device=DEVICE)
    rtol = 1e-6 if dtype == torch.float64 else 1e-4
    ((ka, kb), kits), ((ta, tb), tits) = both(geom, vals, idx, diag, rhs, inv, rtol, 500, active)
    # the same iteration: the same counts (per problem) and iterates up to rounding order
    assert torch.equal(kits, tits) and int(kits.min()) >= 1
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


def test_left_out_rows_columns_and_empty_columns():
    """A zero diagonal (zero weight) leaves that entry at 0; a column without entries is a
    zero-length segment of the by-column copy."""
    geom, vals, idx, diag, rhs, inv = system(2, 21, 26, 3, dead=True)
    assert int(RS.ell_matvec(geom, (vals != 0).double(), idx, torch.ones(2, 21, dtype=torch.float64,
                                                                          device=DEVICE), 0).eq(0).sum()) > 2
    active = torch.ones(2, dtype=torch.bool, device=DEVICE)
    ((ka, kb), kits), ((ta, tb), tits) = both(geom, vals, idx, diag, rhs, inv, 1e-10, 500, active)
    assert torch.equal(kits, tits)
    assert float(ka[:, 2].abs().max()) == 0.0 and float(kb[:, 3].abs().max()) == 0.0
    xa, xb = dense_solve(geom, vals, idx, diag, rhs)
    assert rel(ka, xa) <= 1e-7 and rel(kb, xb) <= 1e-7 and rel(ka, ta) <= 1e-10


def test_inactive_problems_and_a_zero_right_hand_side_run_no_iteration():
    geom, vals, idx, diag, rhs, inv = system(3, 19, 22, 4)
    rhs = (rhs[0].clone(), rhs[1].clone())
    rhs[0][2], rhs[1][2] = 0.0, 0.0  # problem 2: nothing to solve
    active = torch.tensor([True, False, True], device=DEVICE)
    ((ka, kb), kits), ((ta, tb), tits) = both(geom, vals, idx, diag, rhs, inv, 1e-8, 500, active)
    assert kits.tolist()[1:] == [0, 0] and int(kits[0]) > 0 and torch.equal(kits, tits)
    assert float(ka[1:].abs().max()) == 0.0 and float(kb[1:].abs().max()) == 0.0
    assert rel(ka, ta) <= 1e-10


def test_iteration_cap_and_per_problem_tolerances():
    geom, vals, idx, diag, rhs, inv = system(2, 30, 30, 6)
    active = torch.ones(2, dtype=torch.bool, device=DEVICE)
    ((ka, _), kits), ((ta, _), tits) = both(geom, vals, idx, diag, rhs, inv, 1e-12, 3, active)
    assert kits.tolist() == [3, 3] and torch.equal(kits, tits) and rel(ka, ta) <= 1e-10
    rtol = torch.tensor([1e-2, 1e-10], dtype=torch.float64, device=DEVICE)
    ((ka, _), kits), ((ta, _), tits) = both(geom, vals, idx, diag, rhs, inv, rtol, 500, active)
    assert int(kits[0]) < int(kits[1]) and torch.equal(kits, tits) and rel(ka, ta) <= 1e-10


def test_one_launch_and_no_host_read(monkeypatch):
    """The whole solve is one kernel launch; the host reads nothing (the torch loop reads
    its stopping test every 8 iterations)."""
    geom, vals, idx, diag, rhs, inv = system(2, 25, 18, 4)
    launches = []
    kernel = KC._ell_pcg_kernel

    class Counted:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(KC, "_ell_pcg_kernel", Counted())
    reads = []
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(t) or 0)
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(t) or True)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t) or [])
    geom.ell_pcg(vals, idx, diag, rhs, inv, 1e-8, 100, torch.ones(2, dtype=torch.bool, device=DEVICE),
                 backend="triton")
    monkeypatch.undo()
    assert launches == [(2,)] and reads == []


def test_deterministic():
    """Both products are gathers (no atomics): two runs agree bit for bit."""
    geom, vals, idx, diag, rhs, inv = system(2, 33, 41, 7, dtype=torch.float32)
    active = torch.ones(2, dtype=torch.bool, device=DEVICE)
    (a1, b1), _ = geom.ell_pcg(vals, idx, diag, rhs, inv, 1e-5, 200, active, backend="triton")
    (a2, b2), _ = geom.ell_pcg(vals, idx, diag, rhs, inv, 1e-5, 200, active, backend="triton")
    assert torch.equal(a1, a2) and torch.equal(b1, b2)


def test_large_systems_run_the_host_loop_on_the_product_kernels(monkeypatch):
    """Past ``FUSED_MAX_ENTRIES`` the Triton op runs the twin's loop with the Triton ELL
    products: the same result."""
    geom, vals, idx, diag, rhs, inv = system(2, 24, 20, 5)
    active = torch.ones(2, dtype=torch.bool, device=DEVICE)
    (fa, fb), fits = geom.ell_pcg(vals, idx, diag, rhs, inv, 1e-9, 300, active, backend="triton")
    monkeypatch.setattr(KC, "FUSED_MAX_ENTRIES", 24 * 5 - 1)
    assert not KC.fused(2, 24, 5) and KC.fused(2, 23, 5)
    called = []
    monkeypatch.setattr(KC, "_ell_pcg_kernel", called)  # indexing a list fails the test if reached
    (ha, hb), hits = geom.ell_pcg(vals, idx, diag, rhs, inv, 1e-9, 300, active, backend="triton")
    assert torch.equal(fits, hits) and rel(fa, ha) <= 1e-10 and rel(fb, hb) <= 1e-10


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


@pytest.mark.parametrize(
    "change,exc,name",
    [
        (dict(diag=lambda d: (d[0], d[1][:, :-1])), ValueError, "diag"),
        (dict(rhs=lambda r: (r[0][:, 1:], r[1])), ValueError, "rhs"),
        (dict(inv=lambda i: (i[0],)), ValueError, "inv_diag"),
        (dict(max_iter=0), ValueError, "max_iter"),
        (dict(max_iter=2.5), TypeError, "max_iter"),
    ],
)
def test_bad_arguments(change, exc, name):
    geom, vals, idx, diag, rhs, inv = system(1, 9, 7, 3)
    diag = change.get("diag", lambda d: d)(diag)
    rhs = change.get("rhs", lambda r: r)(rhs)
    inv = change.get("inv", lambda i: i)(inv)
    with pytest.raises(exc, match=name):
        geom.ell_pcg(vals, idx, diag, rhs, inv, 1e-8, change.get("max_iter", 10),
                     torch.ones(1, dtype=torch.bool, device=DEVICE), backend="triton")
