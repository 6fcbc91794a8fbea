"""The multi-iteration small-problem kernel (kernels/sinkhorn_steps.py) against its twins.

Every case compares the Triton kernel (float32 inputs), the torch twin
(``otcore.reference.sinkhorn_steps``) and an independent float64 loop written out
below with ``torch.logsumexp`` on the dense cost. Shapes are small and odd so that
the padded tile is partly masked; batches mix active and inactive problems.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_support import DEVICE, RUNTIME_WARNINGS_ARE_ERRORS

import otcore
import otcore.triton_ops  # noqa: F401  (otcore.triton_ops.operand below; imported lazily by the dispatch)
from otcore.kernels import sinkhorn_steps as K

pytestmark = RUNTIME_WARNINGS_ARE_ERRORS

B = 3
ACTIVE = torch.tensor([True, False, True], device=DEVICE)


def steps64(C, f, g, loga, logb, eps, tau, k, active, symmetric=False):
    """``k`` log-domain Sinkhorn iterations in float64 on a dense cost (B, n, m)."""
    C, f, g, loga, logb = (t.double() for t in (C, f, g, loga, logb))
    act = active[:, None]
    for _ in range(k):
        if symmetric:
            s = -eps * torch.logsumexp((f + eps * loga)[:, None, :] / eps - C / eps, dim=2)
            new = 0.5 * (f + tau[0] * s)
            f, g = torch.where(act, new, f), torch.where(act, new, g)
        else:
            f = torch.where(act, -tau[0] * eps * torch.logsumexp((g + eps * logb)[:, None, :] / eps - C / eps, 2), f)
            g = torch.where(act, -tau[1] * eps * torch.logsumexp((f + eps * loga)[:, :, None] / eps - C / eps, 1), g)
    return f, g


def problem(kind, n, m, d=3, seed=0, scale=1.0, offset=0.0, batch=B):
    """A geometry, its float64 dense cost, and log-weights with a zero weight on each side."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "dense":
        C = torch.rand(batch, n, m, generator=gen) * scale
        geom, C64 = otcore.CostMatrix(C.to(DEVICE)), C.double()
    else:
        x = torch.rand(batch, n, d, generator=gen) * scale + offset
        y = torch.rand(batch, m, d, generator=gen) * scale + offset
        geom = otcore.PointCloud(x.to(DEVICE), y.to(DEVICE), cost=kind)
        C64 = torch.cdist(x.double(), y.double()) ** (2 if kind == "sqeuclidean" else 1)
    a = torch.rand(batch, n, generator=gen) + 0.1
    b = torch.rand(batch, m, generator=gen) + 0.1
    a[0, n // 2] = 0.0
    b[-1, 0] = 0.0
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    f0 = (torch.randn(batch, n, generator=gen) * 0.01 * scale).to(DEVICE)
    g0 = (torch.randn(batch, m, generator=gen) * 0.01 * scale).to(DEVICE)
    return geom, C64.to(DEVICE), a.log().to(DEVICE), b.log().to(DEVICE), f0, g0


def assert_close(got, want, scale, tol):
    err = float((got.double() - want.double()).abs().max()) / scale
    assert err <= tol, f"error {err:.2e} relative to the cost scale {scale:.2e} > {tol:.0e}"


def check_run(ker, twin, ref, scale, f0, g0, tol=2e-6):
    """The kernel's ``(f, g)`` finite and within ``tol`` (of ``scale``) of the float64
    reference and of the twin; problem 1 (inactive) untouched, bit for bit."""
    for got, want in zip(ker, ref):
        assert torch.isfinite(got).all()
        assert_close(got, want, scale, tol)
    for got, want in zip(ker, twin):
        assert_close(got, want, scale, tol)
    assert torch.equal(ker[0][1], f0[1]) and torch.equal(ker[1][1], g0[1])


def run_all(geom, C64, la, lb, f0, g0, eps, tau, k, symmetric=False):
    args = (la, lb, eps, tau, k, ACTIVE[: geom.batch], symmetric)
    ker = geom.sinkhorn_steps(f0, g0, *args, backend="triton")
    twin = geom.sinkhorn_steps(f0, g0, *args, backend="torch")
    ref = steps64(C64, f0, g0, la, lb, eps, tau, k, ACTIVE[: geom.batch], symmetric)
    return ker, twin, ref


@pytest.mark.parametrize("kind,d", [("sqeuclidean", 3), ("sqeuclidean", 17), ("euclidean", 3), ("dense", 1)])
@pytest.mark.parametrize("n,m", [(5, 7), (37, 53)])
@pytest.mark.parametrize("tau", [(1.0, 1.0), (0.9, 0.75)], ids=["balanced", "unbalanced"])
def test_kernel_matches_twin_and_float64(kind, d, n, m, tau):
    geom, C64, la, lb, f0, g0 = problem(kind, n, m, d)
    eps = 0.05 * float(C64.amax())
    ker, twin, ref = run_all(geom, C64, la, lb, f0, g0, eps, tau, 6)
    check_run(ker, twin, ref, float(C64.amax()), f0, g0)


@pytest.mark.parametrize("check", [False, True], ids=["unchecked", "checked"])
@pytest.mark.parametrize("kind", ["sqeuclidean", "dense"])
def test_over_relaxed_blocks_match_the_twin(kind, check):
    """``omega`` (B,): the first ``k - 1`` iterations over-relaxed, the last and the
    test's plain, per problem, as the twin; the inactive problem untouched."""
    geom, C64, la, lb, f0, g0 = problem(kind, 37, 53)
    omega = torch.tensor([1.6, 1.9, 0.8], device=DEVICE)
    eps = 0.05 * float(C64.amax())
    args = (la, lb, eps, (0.9, 0.75), 6, ACTIVE, False, (1e-30, 2.0) if check else None)
    ker = geom.sinkhorn_steps(f0, g0, *args, backend="triton", omega=omega)
    twin = geom.sinkhorn_steps(f0, g0, *args, backend="torch", omega=omega)
    plain = geom.sinkhorn_steps(f0, g0, *args, backend="torch")
    scale = float(C64.amax())
    for got, want in zip(ker, twin):
        assert_close(got[ACTIVE], want[ACTIVE], scale, 2e-6)
    assert float((twin[0] - plain[0]).abs().max()) > 1e-3 * scale  # relaxation changed the iterates
    assert torch.equal(ker[0][1], f0[1]) and torch.equal(ker[1][1], g0[1])
    for backend in ("triton", "torch"):  # the symmetric update takes no factor
        with pytest.raises(ValueError, match="omega"):
            geom.sinkhorn_steps(f0, g0, la, lb, eps, (1.0, 1.0), 2, ACTIVE, True, backend=backend, omega=omega)


def test_inputs_untouched_and_zero_steps():
    geom, C64, la, lb, f0, g0 = problem("sqeuclidean", 6, 9)
    keep = (f0.clone(), g0.clone())
    f, g = geom.sinkhorn_steps(f0, g0, la, lb, 0.1, (1.0, 1.0), 4, ACTIVE, backend="triton")
    assert torch.equal(f0, keep[0]) and torch.equal(g0, keep[1])
    assert f.data_ptr() != f0.data_ptr() and not torch.equal(f[0], f0[0])
    f, g = geom.sinkhorn_steps(f0, g0, la, lb, 0.1, (1.0, 1.0), 0, ACTIVE, backend="triton")
    assert torch.equal(f, f0) and torch.equal(g, g0)


@pytest.mark.parametrize("n", [4, 21])
def test_symmetric_update(n):
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(B, n, 3, generator=gen).to(DEVICE)
    geom = otcore.PointCloud(x, x)
    C64 = (torch.cdist(x.double(), x.double()) ** 2)
    a = torch.rand(B, n, generator=gen).to(DEVICE) + 0.1
    la = (a / a.sum(-1, keepdim=True)).log()
    f0 = torch.randn(B, n, generator=gen).to(DEVICE) * 0.01
    ker, twin, ref = run_all(geom, C64, la, la, f0, f0, 0.02, (0.8, 0.8), 5, symmetric=True)
    assert torch.equal(ker[0], ker[1])
    for got, want in zip(ker, ref):
        assert_close(got, want, float(C64.amax()), 2e-6)
    assert_close(ker[0], twin[0], float(C64.amax()), 2e-6)


def test_float64_is_exact_to_rounding():
    geom, C64, la, lb, f0, g0 = problem("sqeuclidean", 11, 13)
    g64 = otcore.PointCloud(geom.x.double(), geom.y.double())
    f, g = g64.sinkhorn_steps(f0.double(), g0.double(), la.double(), lb.double(), 0.03, (1.0, 1.0), 8, ACTIVE,
                              backend="triton")
    assert f.dtype == torch.float64
    ref = steps64(C64, f0, g0, la, lb, 0.03, (1.0, 1.0), 8, ACTIVE)
    assert_close(f, ref[0], float(C64.amax()), 1e-13)
    assert_close(g, ref[1], float(C64.amax()), 1e-13)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    geom, C64, la, lb, f0, g0 = problem("sqeuclidean", 9, 14)
    half = otcore.PointCloud(geom.x.to(dtype), geom.y.to(dtype))
    C64 = torch.cdist(half.x.double(), half.y.double()) ** 2  # the rounded points' cost
    f, g = half.sinkhorn_steps(f0, g0, la, lb, 0.05, (1.0, 1.0), 5, ACTIVE, backend="triton")
    assert f.dtype == torch.float32
    ref = steps64(C64, f0, g0, la, lb, 0.05, (1.0, 1.0), 5, ACTIVE)
    assert_close(f, ref[0], float(C64.amax()), 2e-6)


def test_large_coordinates_and_tiny_eps():
    """x 1000 offset by 1e4 (direct differences keep the cost exact) and eps at 1e-4 of
    the cost: every exponent but the row's largest underflows, nothing becomes NaN."""
    geom, C64, la, lb, f0, g0 = problem("sqeuclidean", 13, 8, scale=1000.0, offset=1e4)
    eps = 1e-4 * float(C64.amax())
    ker, twin, ref = run_all(geom, C64, la, lb, f0, g0, eps, (1.0, 1.0), 3)
    for got, want in zip(ker, ref):
        assert torch.isfinite(got).all()
        assert_close(got, want, float(C64.amax()), 2e-6)


def test_larger_problems_stream(monkeypatch):
    """A problem that fits neither one tile nor the tiled kernel's budget runs the streamed
    passes (same result)."""
    monkeypatch.setattr(K, "SMALL_MAX_ELEMENTS", 16)
    monkeypatch.setattr(K, "TILES_MAX_WORK", 0)
    geom, C64, la, lb, f0, g0 = problem("euclidean", 5, 7)
    assert not K.fits(5, 7)
    ker, twin, ref = run_all(geom, C64, la, lb, f0, g0, 0.05, (1.0, 1.0), 4)
    assert_close(ker[0], ref[0], float(C64.amax()), 2e-6)
    assert_close(ker[1], twin[1], float(C64.amax()), 2e-6)


def resid64(C, f, g, loga, logb, eps, rho_a, symmetric):
    """The convergence test's residual of the state (f, g), float64, written out."""
    C, f, g, loga, logb = (t.double() for t in (C, f, g, loga, logb))
    h = (f + eps * loga) if symmetric else (g + eps * logb)
    s = -eps * torch.logsumexp(h[:, None, :] / eps - C / eps, 2)
    target = 1.0 if rho_a is None else torch.exp(-f / rho_a)
    return (2 if symmetric else 1) * (loga.exp() * (torch.exp((f - s) / eps) - target).abs()).sum(-1)


@pytest.mark.parametrize("case", ["balanced", "unbalanced", "symmetric", "dense"])
def test_the_convergence_test_stops_exactly_the_converged_problems(case):
    """With ``check``, the residual after ``k`` iterations matches the float64 one, the
    problem below ``tol`` stops after ``k`` and the one above runs ``k + 1``; the kernel
    agrees with the twin."""
    symmetric = case == "symmetric"
    rho = 2.0 if case == "unbalanced" else None
    eps, k = 0.05, 3
    tau = (1.0, 1.0) if rho is None else (rho / (rho + eps),) * 2
    if symmetric:
        gen = torch.Generator().manual_seed(8)
        x = torch.rand(B, 11, 3, generator=gen).to(DEVICE)
        geom, C64 = otcore.PointCloud(x, x), torch.cdist(x.double(), x.double()) ** 2
        la = torch.full((B, 11), -math.log(11), device=DEVICE)
        lb, f0 = la, torch.zeros(B, 11, device=DEVICE)
        g0 = f0
    else:
        geom, C64, la, lb, f0, g0 = problem("dense" if case == "dense" else "sqeuclidean", 9, 14)
    after = steps64(C64, f0, g0, la, lb, eps, tau, k, ACTIVE, symmetric)
    r64 = resid64(C64, *after, la, lb, eps, rho, symmetric)
    tol = float((r64[0] + r64[2]) / 2)  # between the two active problems' residuals
    args = (la, lb, eps, tau, k, ACTIVE, symmetric, (tol, rho))
    fk, gk, rk = geom.sinkhorn_steps(f0, g0, *args, backend="triton")
    ft, gt, rt = geom.sinkhorn_steps(f0, g0, *args, backend="torch")
    assert rk[1].isnan() and rt[1].isnan()  # the inactive problem
    live = ACTIVE  # float32 residuals: differences of terms near 1, so ~1e-6 absolute
    assert torch.allclose(rk[live].double(), r64[live], rtol=1e-3, atol=2e-7)  # (measured: <= 1.2e-4 relative)
    assert torch.allclose(rt[live].double(), r64[live], rtol=1e-3, atol=2e-7)
    more = steps64(C64, f0, g0, la, lb, eps, tau, k + 1, ACTIVE, symmetric)
    scale = float(C64.amax())
    for p in (0, 2):
        want = after if float(r64[p]) <= tol else more
        for got_k, got_t, w in ((fk, ft, want[0]), (gk, gt, want[1])):
            assert_close(got_k[p], w[p], scale, 2e-6)
            assert_close(got_t[p], w[p], scale, 2e-6)
    assert (float(r64[0]) <= tol) != (float(r64[2]) <= tol)  # one of each


@pytest.mark.parametrize("symmetric", [False, True])
def test_solver_on_the_kernel(symmetric):
    """``otcore.sinkhorn`` on the Triton backend (the kernel runs every block) gives the
    torch backend's potentials and iteration counts, and the marginals hold."""
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(2, 23, 2, generator=gen).to(DEVICE)
    y = x if symmetric else torch.rand(2, 31, 2, generator=gen).to(DEVICE)
    geom = otcore.PointCloud(x, y)
    kw = dict(eps=0.03, tol=1e-5, max_iter=2000, check_every=7)
    tri = otcore.sinkhorn(geom, backend="triton", **kw)
    tor = otcore.sinkhorn(geom, backend="torch", **kw)
    assert tri.converged.all() and tri.info["symmetric"] == symmetric
    # the interpreter's exp2 is NumPy's; a GPU's is approximate (~2 ulp), which may move a
    # float32 residual across tol at one check: one block more or less there
    slack = 0 if DEVICE == "cpu" else kw["check_every"]
    assert int((tri.n_iter - tor.n_iter).abs().max()) <= slack
    assert float((tri.f - tor.f).abs().max()) < 1e-5
    P = tri.plan()
    assert float((P.sum(2) - 1 / 23).abs().sum(1).max()) < 2e-5


def test_launch_errors(monkeypatch):
    dense, _, la, lb, f0, g0 = problem("dense", 5, 7)
    with pytest.raises(ValueError, match="row operand"):
        K.launch_sinkhorn_steps(otcore.triton_ops.operand(dense, 0, "fp32", 0.1), f0, g0, la, lb, 0.1, (1.0, 1.0), 2, ACTIVE)
    geom, _, la, lb, f0, g0 = problem("sqeuclidean", 5, 7)
    with pytest.raises(ValueError, match="f and g"):
        K.launch_sinkhorn_steps(otcore.triton_ops.operand(geom, 0, "fp32", 0.1), f0, g0, la, lb, 0.1, (1.0, 1.0), 2, ACTIVE)
    op = otcore.triton_ops.operand(geom, 1, "fp32", 0.1)
    with pytest.raises(ValueError, match="square"):
        K.launch_sinkhorn_steps(op, f0, g0, la, lb, 0.1, (1.0, 1.0), 2, ACTIVE, symmetric=True)
    big = otcore.PointCloud(torch.zeros(65, 2, device=DEVICE), torch.zeros(70, 2, device=DEVICE))
    assert K.tiles_fit(65, 70, 2, False)
    monkeypatch.setattr(K, "TILES_MAX_WORK", 65 * 70 * 4 - 1)  # past one tile and past the tiled kernel's budget
    with pytest.raises(ValueError, match="does not fit"):
        K.launch_sinkhorn_steps(otcore.triton_ops.operand(big, 1, "fp32", 0.1), torch.zeros(1, 65, device=DEVICE),
                                torch.zeros(1, 70, device=DEVICE), torch.full((1, 65), -math.log(65), device=DEVICE),
                                torch.full((1, 70), -math.log(70), device=DEVICE), 0.1, (1.0, 1.0), 1,
                                torch.ones(1, dtype=torch.bool, device=DEVICE))


@st.composite
def small_problems(draw):
    """Batches of 1-3 problems up to 9 x 9, float64: point clouds (either cost) or a cost
    matrix, weights with zeros, balanced or KL-relaxed on one or both sides, self-transport."""
    B, n, m, d = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    symmetric = draw(st.booleans())
    m = n if symmetric else m
    x = torch.randn(B, n, d, generator=gen, dtype=torch.float64)
    y = x if symmetric else torch.randn(B, m, d, generator=gen, dtype=torch.float64)

    def weights(k):
        vals = [draw(st.sampled_from([0.0, 0.2, 1.0, 3.0])) for _ in range(B * k)]
        w = torch.tensor(vals, dtype=torch.float64).reshape(B, k)
        w[:, 0] += (w.sum(1) == 0).double()  # no problem without mass
        return (w / w.sum(1, keepdim=True)).to(DEVICE)

    a = weights(n)
    b = a if symmetric else weights(m)
    kind = draw(st.sampled_from(["sqeuclidean", "euclidean", "dense"]))
    if kind == "dense":
        geom = otcore.CostMatrix((torch.cdist(x, y) ** 2).to(DEVICE))
    else:
        xd = x.to(DEVICE)
        geom = otcore.PointCloud(xd, xd if symmetric else y.to(DEVICE), cost=kind)
    rho = draw(st.sampled_from([None, 1.0, (None, 0.5)])) if not symmetric else draw(st.sampled_from([None, 1.0]))
    eps = draw(st.sampled_from([0.3, 1.0])) * max(geom.diameter(), 1e-3)
    return geom, a, b, eps, rho


@settings(max_examples=15, deadline=None, derandomize=True)
@given(small_problems())
def test_hypothesis_solver_on_the_kernel_equals_torch(prob):
    """otcore.sinkhorn on the Triton backend (every block and test in the one-tile
    kernel) stops each problem at the same iteration as the torch backend, with the same
    potentials to float64 rounding."""
    geom, a, b, eps, rho = prob
    kw = dict(eps=eps, rho=rho, tol=1e-9, max_iter=3000, check_every=4)
    tri = otcore.sinkhorn(geom, a, b, backend="triton", **kw)
    tor = otcore.sinkhorn(geom, a, b, backend="torch", **kw)
    assert torch.equal(tri.n_iter, tor.n_iter) and torch.equal(tri.converged, tor.converged)
    assert bool(tor.converged.all())
    scale = max(geom.diameter(), 1e-3)
    for got, want in ((tri.f, tor.f), (tri.g, tor.g)):
        fin = torch.isfinite(want)
        assert torch.equal(fin, torch.isfinite(got))
        assert float((got[fin] - want[fin]).abs().max()) <= 1e-10 * scale
