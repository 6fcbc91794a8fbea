"""The one-program tiled kernel (``sinkhorn_tiles_kernel`` of kernels/sinkhorn_steps.py):
problems past one 64 x 64 tile but within ``TILES_MAX_WORK`` run a block of Sinkhorn
iterations, test included, in one launch, one program per problem streaming the cost.

Each case compares the kernel, the torch twin (``otcore.reference.sinkhorn_steps``) and
the float64 loop of the one-tile kernel's tests; shapes are past one tile and odd, so
tiles are partly masked along both axes, and batches mix active and inactive problems.
"""

import pytest
import torch
from kernel_support import DEVICE, RUNTIME_WARNINGS_ARE_ERRORS, spy_launches
from test_kernels_sinkhorn_steps import ACTIVE, assert_close, check_run, problem, resid64, run_all, steps64

import otcore
from otcore.kernels import sinkhorn_steps as K
from otcore.kernels import softmin as S

pytestmark = RUNTIME_WARNINGS_ARE_ERRORS


@pytest.fixture
def launches(monkeypatch):
    """Names of the Triton kernels launched (the tiled, the one-tile and the streamed ones)."""
    return spy_launches(monkeypatch, ((K, "sinkhorn_tiles_kernel"), (K, "sinkhorn_steps_kernel"), (S, "softmin_kernel")))


@pytest.mark.parametrize("kind,d", [("sqeuclidean", 3), ("sqeuclidean", 17), ("euclidean", 3), ("dense", 1)])
@pytest.mark.parametrize("n,m", [(70, 83), (130, 66)])
@pytest.mark.parametrize("tau", [(1.0, 1.0), (0.9, 0.75)], ids=["balanced", "unbalanced"])
def test_kernel_matches_twin_and_float64(kind, d, n, m, tau, launches):
    geom, C64, la, lb, f0, g0 = problem(kind, n, m, d)
    assert not K.fits(n, m) and K.tiles_fit(n, m, d, kind == "dense")
    eps = 0.05 * float(C64.amax())
    ker, twin, ref = run_all(geom, C64, la, lb, f0, g0, eps, tau, 6)
    assert launches.count("sinkhorn_tiles_kernel") == 1 and "softmin_kernel" not in launches
    check_run(ker, twin, ref, float(C64.amax()), f0, g0)


@pytest.mark.parametrize("relax", [False, True], ids=["plain", "over-relaxed"])
@pytest.mark.parametrize("rho_a", [None, 0.5], ids=["balanced", "relaxed rows"])
def test_checked_block_matches_twin_and_float64(relax, rho_a, launches):
    """The convergence test after ``k`` iterations (its residual summed over every row
    block before any potential moves), and the iteration it adds where the test fails."""
    geom, C64, la, lb, f0, g0 = problem("sqeuclidean", 90, 71, seed=3)
    eps = 0.05 * float(C64.amax())
    tau = (1.0, 1.0) if rho_a is None else (rho_a / (rho_a + eps), 1.0)
    omega = torch.full((geom.batch,), 1.6, device=DEVICE) if relax else None
    resid_ref = resid64(C64, *steps64(C64, f0, g0, la, lb, eps, tau, 4, ACTIVE), la, lb, eps, rho_a, False)
    for tol, more in ((0.0, True), (1e3, False)):  # every active problem goes on / stops
        args = (f0, g0, la, lb, eps, tau, 4, ACTIVE, False, (tol, rho_a))
        fk, gk, rk = geom.sinkhorn_steps(*args, backend="triton", omega=omega)
        ft, gt, rt = geom.sinkhorn_steps(*args, backend="torch", omega=omega)
        scale = float(C64.amax())
        assert_close(fk, ft, scale, 2e-6)
        assert_close(gk, gt, scale, 2e-6)
        assert bool(torch.isnan(rk[1])) and bool(torch.isnan(rt[1]))  # inactive: no residual
        live = ACTIVE.nonzero()[:, 0]
        torch.testing.assert_close(rk[live].double(), rt[live].double(), rtol=1e-4, atol=1e-7)
        if not relax:
            torch.testing.assert_close(rk[live].double(), resid_ref[live], rtol=1e-4, atol=1e-7)
            want = steps64(C64, f0, g0, la, lb, eps, tau, 5 if more else 4, ACTIVE)
            assert_close(fk, want[0], scale, 2e-6)
            assert_close(gk, want[1], scale, 2e-6)
    assert launches.count("sinkhorn_tiles_kernel") == 2 and "softmin_kernel" not in launches


@pytest.mark.parametrize("check", [False, True], ids=["unchecked", "checked"])
def test_symmetric_update(check, launches):
    geom0, C64, la, _, f0, _ = problem("sqeuclidean", 77, 77, seed=5)
    geom = otcore.PointCloud(geom0.x, geom0.x)
    C64 = torch.cdist(geom.x.double(), geom.x.double()) ** 2
    eps = 0.05 * float(C64.amax())
    args = (f0, f0, la, la, eps, (1.0, 1.0), 5, ACTIVE, True) + (((0.0, None),) if check else ())
    ker = geom.sinkhorn_steps(*args, backend="triton")
    twin = geom.sinkhorn_steps(*args, backend="torch")
    ref = steps64(C64, f0, f0, la, la, eps, (1.0, 1.0), 6 if check else 5, ACTIVE, symmetric=True)
    scale = float(C64.amax())
    assert torch.equal(ker[0], ker[1])  # f = g
    assert_close(ker[0], ref[0], scale, 2e-6)
    assert_close(ker[0], twin[0], scale, 2e-6)
    if check:
        live = ACTIVE.nonzero()[:, 0]
        torch.testing.assert_close(ker[2][live].double(), twin[2][live].double(), rtol=1e-4, atol=1e-7)
    assert launches == ["sinkhorn_tiles_kernel"]


def test_float64_is_exact_to_rounding(launches):
    """float64 (32 x 64 tiles): exact to rounding."""
    geom, C64, la, lb, f0, g0 = problem("euclidean", 101, 67, seed=7)
    geom = otcore.PointCloud(geom.x.double(), geom.y.double(), cost="euclidean")
    assert K.tile_blocks(101, 67)[0] == 32
    eps = 0.02 * float(C64.amax())
    args = (la.double(), lb.double(), eps, (1.0, 1.0), 7, ACTIVE)
    ker = geom.sinkhorn_steps(f0.double(), g0.double(), *args, backend="triton")
    ref = steps64(C64, f0.double(), g0.double(), *args)
    for got, want in zip(ker, ref):
        assert_close(got, want, float(C64.amax()), 1e-12)
    assert launches == ["sinkhorn_tiles_kernel"]


def test_solver_runs_a_block_per_launch_and_agrees_with_torch(launches):
    """otcore.sinkhorn on a 100 x 90 cloud: each block of check_every iterations with its
    test is one launch (the eps stages one each), with the torch backend's iterations."""
    gen = torch.Generator().manual_seed(11)
    x, y = torch.rand(100, 2, generator=gen).to(DEVICE), torch.rand(90, 2, generator=gen).to(DEVICE)
    kw = dict(eps=0.01, tol=1e-5, eps_schedule="geometric", max_iter=2000)
    tri = otcore.sinkhorn(otcore.PointCloud(x, y), backend="triton", **kw)
    tor = otcore.sinkhorn(otcore.PointCloud(x, y), backend="torch", **kw)
    assert tri.converged and tor.converged
    assert abs(tri.n_iter - tor.n_iter) <= (0 if DEVICE == "cpu" else 10)
    assert float((tri.f - tor.f).abs().max()) < 1e-5 and float((tri.g - tor.g).abs().max()) < 1e-5
    stages = len(tri.info["eps_stages"])
    blocks = launches.count("sinkhorn_tiles_kernel") - stages
    assert "sinkhorn_steps_kernel" not in launches and 0 < blocks <= (tri.n_iter - stages) // 10 + 2
    assert launches.count("softmin_kernel") <= 4  # the result's passes, the diameter


def test_budget_switch_sends_larger_problems_to_the_streamed_passes(monkeypatch, launches):
    geom, C64, la, lb, f0, g0 = problem("sqeuclidean", 70, 83)
    monkeypatch.setattr(K, "TILES_MAX_WORK", 70 * 83 * 4 - 1)
    assert not K.tiles_fit(70, 83, 3, False) and K.tiles_fit(70, 82, 3, False)
    eps = 0.05 * float(C64.amax())
    ker, twin, _ = run_all(geom, C64, la, lb, f0, g0, eps, (1.0, 1.0), 3)
    assert "sinkhorn_tiles_kernel" not in launches and launches.count("softmin_kernel") >= 6
    assert_close(ker[0], twin[0], float(C64.amax()), 2e-6)


@pytest.mark.parametrize("kind,d", [("sqeuclidean", 3), ("dense", 1)])
@pytest.mark.parametrize("n,m", [(5, 1000), (1000, 5)])
def test_skinny_problems_run_long_tiles(kind, d, n, m, launches):
    """Past one tile through one long side: tiles longer along it (8 x 256 here), the same
    results as the twin and float64, with and without the test."""
    geom, C64, la, lb, f0, g0 = problem(kind, n, m, d, seed=13)
    assert not K.fits(n, m) and max(K.tile_blocks(n, m)[:2]) == 256
    eps = 0.05 * float(C64.amax())
    ker, twin, ref = run_all(geom, C64, la, lb, f0, g0, eps, (1.0, 1.0), 4)
    scale = float(C64.amax())
    for got, want, other in zip(ker, ref, twin):
        assert_close(got, want, scale, 2e-6)
        assert_close(got, other, scale, 2e-6)
    fk, gk, rk = geom.sinkhorn_steps(f0, g0, la, lb, eps, (1.0, 1.0), 4, ACTIVE, False, (0.0, None),
                                     backend="triton")
    ft, gt, rt = geom.sinkhorn_steps(f0, g0, la, lb, eps, (1.0, 1.0), 4, ACTIVE, False, (0.0, None))
    assert_close(fk, ft, scale, 2e-6)
    live = ACTIVE.nonzero()[:, 0]
    torch.testing.assert_close(rk[live].double(), rt[live].double(), rtol=1e-4, atol=1e-7)
    assert launches.count("sinkhorn_tiles_kernel") == 2 and "softmin_kernel" not in launches


def _stop_cases(geom, C64, la, lb, f0, g0, eps, symmetric, k):
    """The checked block at three tolerances: every problem goes on, every one stops, and
    a tol between the active problems' residuals (one stops, one goes on); against the twin,
    and a stopped problem against ``k`` plain steps, a continuing one against ``k + 1``."""
    tau = (1.0, 1.0)
    g_in = f0 if symmetric else g0
    base = geom.sinkhorn_steps(f0, g_in, la, lb, eps, tau, k, ACTIVE, symmetric, (0.0, None), backend="torch")[2]
    live = ACTIVE.nonzero()[:, 0]
    r = base[live].sort().values
    scale = float(C64.amax())
    for tol in (0.0, 1e3, float(r[0] + r[1]) / 2):
        args = (f0, g_in, la, lb, eps, tau, k, ACTIVE, symmetric, (tol, None))
        fk, gk, rk = geom.sinkhorn_steps(*args, backend="triton")
        ft, gt, rt = geom.sinkhorn_steps(*args, backend="torch")
        assert_close(fk, ft, scale, 2e-6)
        assert_close(gk, gt, scale, 2e-6)
        torch.testing.assert_close(rk[live].double(), rt[live].double(), rtol=1e-4, atol=1e-7)
        more = (rt > tol) & ACTIVE
        short = steps64(C64, f0, g_in, la, lb, eps, tau, k, ACTIVE, symmetric)
        long = steps64(C64, f0, g_in, la, lb, eps, tau, k + 1, ACTIVE, symmetric)
        for i in live.tolist():
            want = long if bool(more[i]) else short
            assert_close(fk[i], want[0][i], scale, 2e-6)
            assert_close(gk[i], want[1][i], scale, 2e-6)
        if symmetric:
            assert torch.equal(fk, gk)


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("symmetric", [False, True], ids=["alternating", "symmetric"])
def test_the_test_stops_some_problems_and_not_others(k, symmetric, launches):
    """A stopped problem keeps the state the test read (also symmetric, also after k = 0
    iterations, the blocks of check_every = 1); the others complete that iteration."""
    geom, C64, la, lb, f0, g0 = problem("sqeuclidean", 75, 75 if symmetric else 90, seed=17)
    if symmetric:
        geom = otcore.PointCloud(geom.x, geom.x)
        C64 = torch.cdist(geom.x.double(), geom.x.double()) ** 2
        lb = la
    _stop_cases(geom, C64, la, lb, f0, g0, 0.05 * float(C64.amax()), symmetric, k)
    assert set(launches) == {"sinkhorn_tiles_kernel"}


@pytest.mark.parametrize("kind,dtype", [("dense", torch.float32), ("euclidean", torch.float32),
                                        ("sqeuclidean", torch.float64)])
def test_checked_blocks_of_other_costs_and_float64(kind, dtype, launches):
    geom, C64, la, lb, f0, g0 = problem(kind, 70, 97, seed=19)
    if dtype == torch.float64:
        geom = otcore.PointCloud(geom.x.double(), geom.y.double())
        la, lb, f0, g0 = (t.double() for t in (la, lb, f0, g0))
    _stop_cases(geom, C64, la, lb, f0, g0, 0.05 * float(C64.amax()), False, 2)
    assert set(launches) == {"sinkhorn_tiles_kernel"}


def test_a_whole_tile_of_zero_weights():
    """Rows 32-63 (a whole row tile) and columns 64-127 (a whole column tile) weigh
    nothing: their potentials keep to the twin's, and the others are unaffected."""
    geom, C64, la, lb, f0, g0 = problem("sqeuclidean", 100, 150, seed=23)
    la, lb = la.clone(), lb.clone()
    la[:, 32:64] = float("-inf")
    lb[:, 64:128] = float("-inf")
    la = la - torch.logsumexp(la, -1, keepdim=True)
    lb = lb - torch.logsumexp(lb, -1, keepdim=True)
    eps = 0.05 * float(C64.amax())
    ker, twin, ref = run_all(geom, C64, la, lb, f0, g0, eps, (1.0, 1.0), 4)
    for got, want, other in zip(ker, ref, twin):
        assert torch.isfinite(got).all()
        assert_close(got, want, float(C64.amax()), 2e-6)
        assert_close(got, other, float(C64.amax()), 2e-6)
