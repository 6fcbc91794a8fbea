"""``sinkhorn(..., tol=None)``: exactly ``max_iter`` iterations, no convergence test.

The iterations are those of a plain solve capped at ``max_iter`` with an unreachable ``tol``
(the same update rule, bit for bit on the torch backend), without its tests' host
reads and without a ``ConvergenceWarning``; ``converged`` says only that the result is
finite and ``marginal_error`` still reports.
"""

import warnings

import pytest
import torch
from kernel_support import DEVICE

import otcore
from otcore.solvers import _graph
from otcore.solvers import sinkhorn as sinkhorn_module
from test_cuda_graph import EmulatedGraphs, rand


def capped(geom, **kw):
    """The same iterations through the tested loop, with a tol no solve meets (plain: with
    a tol the default over-relaxes, which tol=None cannot adapt)."""
    with pytest.warns(otcore.ConvergenceWarning):
        return otcore.sinkhorn(geom, tol=1e-300, overrelax=False, **kw)


def fixed(geom, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConvergenceWarning, nothing else either
        return otcore.sinkhorn(geom, tol=None, **kw)


@pytest.mark.parametrize("case", ["balanced", "unbalanced", "symmetric", "eps scaling", "3 iterations"])
def test_the_iterations_of_a_capped_solve_without_its_tests(case):
    x = rand(3, 30, 2, seed=1)
    y = x if case == "symmetric" else rand(3, 41, 2, seed=2)
    a = rand(3, 30, seed=3) + 0.1
    a = a / a.sum(-1, keepdim=True)
    b = a if case == "symmetric" else torch.full((3, 41), 1 / 41, dtype=torch.float64)
    kw = dict(eps=0.02, max_iter=3 if case == "3 iterations" else 37, backend="torch",
              rho=0.5 if case == "unbalanced" else None, eps_schedule="geometric" if case == "eps scaling" else None)
    want = capped(otcore.PointCloud(x, y), a=a, b=b, **kw)
    got = fixed(otcore.PointCloud(x, y), a=a, b=b, **kw)
    assert torch.equal(got.f, want.f) and torch.equal(got.g, want.g)
    assert torch.equal(got.n_iter, want.n_iter) and (got.n_iter == kw["max_iter"]).all()
    assert bool(got.converged.all()) and not bool(want.converged.any())
    assert torch.equal(got.marginal_error, want.marginal_error) and bool((got.marginal_error > 0).all())
    assert torch.equal(got.value, want.value)


def test_no_host_read_per_iteration():
    """The loop reads nothing back: 5 and 45 iterations read the same number of values
    (those of the set-up and the result)."""
    reads = []

    class Reads(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__ == "_local_scalar_dense.default":
                reads[-1] += 1
            return func(*args, **(kwargs or {}))

    geom = otcore.PointCloud(rand(40, 3, seed=4), rand(50, 3, seed=5))
    for n in (5, 45):
        reads.append(0)
        with Reads():
            fixed(geom, eps=0.05, max_iter=n, backend="torch")
    assert reads[0] == reads[1]


def test_recorded_blocks_replay_the_fixed_iterations(monkeypatch):
    """With ``cuda_graph`` the iterations run in the tested loop's blocks (2, then up to the
    next multiple of ``check_every`` plus the test's iteration, then ``check_every``), the
    full ones replayed from one recording (emulated on the CPU), the others eagerly."""
    graphs = EmulatedGraphs()
    monkeypatch.setattr(sinkhorn_module, "graphed", lambda block, device, k: _graph.GraphedBlock(block, k, graphs.capture))
    geom = otcore.PointCloud(rand(2, 20, 2, seed=6), rand(2, 25, 2, seed=7))
    kw = dict(eps=0.01, max_iter=34, check_every=8, backend="torch")
    want = fixed(geom, **kw)
    got = fixed(geom, cuda_graph=True, **kw)
    assert torch.equal(got.f, want.f) and torch.equal(got.g, want.g) and (got.n_iter == 34).all()
    assert graphs.recorded == [8] and graphs.replays == 2  # blocks 2, 7 eager, 8 recorded, 8, 8 replayed, 1 eager


@pytest.mark.parametrize("streamed", [False, True], ids=["tiled", "streamed"])
def test_the_triton_backend_past_one_tile(streamed, monkeypatch):
    """Past one tile -- the tiled kernel, and with its budget at 0 the streamed, fused passes
    (a review: this test claimed the streamed passes and ran the tiled kernel) -- the kernels
    give the twin's iterations."""
    from otcore.kernels import sinkhorn_steps as K

    if streamed:
        monkeypatch.setattr(K, "TILES_MAX_WORK", 0)
    x, y = rand(70, 3, seed=8, dtype=torch.float32), rand(83, 3, seed=9, dtype=torch.float32)
    geom = otcore.PointCloud(x.to(DEVICE), y.to(DEVICE))
    got = fixed(geom, eps=0.05, max_iter=12, backend="triton")
    want = fixed(geom, eps=0.05, max_iter=12, backend="torch")
    assert got.n_iter == want.n_iter == 12 and got.converged
    assert torch.allclose(got.f, want.f, atol=2e-6) and torch.allclose(got.g, want.g, atol=2e-6)


def test_max_iter_must_get_past_the_eps_stages():
    """The result is read at the target eps: a fixed run that ends inside the stages
    would hand out the potentials of a larger eps there (values ~1e276 off were seen)."""
    geom = otcore.PointCloud(rand(30, 2, seed=12), rand(40, 2, seed=13))
    with pytest.raises(ValueError, match="max_iter=3 .* stages"):
        otcore.sinkhorn(geom, eps=1e-3, tol=None, max_iter=3, eps_schedule="geometric", backend="torch")
    with pytest.raises(ValueError, match="stages"):
        otcore.SinkhornLoss(eps=1e-3, tol=None, max_iter=3, backend="torch")(geom.x, geom.y)
    stages = len(otcore.solvers.sinkhorn.eps_stages("geometric", lambda: float(geom.diameter()), 1e-3))
    res = fixed(geom, eps=1e-3, max_iter=stages + 1, eps_schedule="geometric", backend="torch")
    assert res.n_iter == stages + 1 and res.converged


def test_the_mass_check_without_tol_is_the_dtypes_share():
    """No tolerance to meet: a float64 mass gap of 1e-12 (within 1e-8 relative) passes,
    1e-6 does not."""
    geom = otcore.PointCloud(rand(5, 2, seed=14), rand(6, 2, seed=15))
    a, b = torch.full((5,), 0.2, dtype=torch.float64), torch.full((6,), 1 / 6, dtype=torch.float64)
    assert fixed(geom, a=a, b=b * (1 + 1e-12), eps=0.1, max_iter=5, backend="torch").converged
    with pytest.raises(ValueError, match="same total mass"):
        otcore.sinkhorn(geom, a, b * (1 + 1e-6), eps=0.1, tol=None, max_iter=5, backend="torch")


def test_tol_is_still_checked():
    geom = otcore.PointCloud(rand(5, 2), rand(6, 2, seed=1))
    with pytest.raises(ValueError, match="tol"):
        otcore.sinkhorn(geom, eps=0.1, tol=0.0)
    with pytest.raises(TypeError, match="tol"):
        otcore.sinkhorn(geom, eps=0.1, tol="1e-5")


def test_the_loss_with_a_fixed_schedule():
    """``SinkhornLoss(tol=None)``: each of the three solves runs ``max_iter`` iterations;
    the same value as with a tol no solve meets, without the warnings, and a gradient."""
    x = rand(40, 2, seed=10).requires_grad_()
    y = rand(50, 2, seed=11)
    fixed_loss = otcore.SinkhornLoss(eps=0.01, tol=None, max_iter=12, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        val = fixed_loss(x, y)
    with pytest.warns(otcore.ConvergenceWarning):
        want = otcore.SinkhornLoss(eps=0.01, tol=1e-300, max_iter=12, backend="torch")(x, y)
    assert torch.equal(val, want)
    val.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
