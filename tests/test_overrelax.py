"""``sinkhorn(..., overrelax=...)``: over-relaxed alternating updates, adaptive or fixed.

Same fixed point as plain Sinkhorn, so the same plan and value to the tolerance, in far
fewer iterations at small eps; the factor adapts per problem from the residuals of the
tests (Young's SOR relations, otcore/solvers/_overrelax.py).
"""

import math

import pytest
import torch
from kernel_support import DEVICE

import otcore
from otcore.solvers import _graph, _overrelax
from otcore.solvers import sinkhorn as sinkhorn_module
from test_cuda_graph import F64, EmulatedGraphs, rand


def pair(case):
    if case == "assignment":  # the SNS paper's random assignment problem, C ~ U[0, 1]
        return otcore.CostMatrix(rand(100, 100, seed=1)), dict(eps=1 / 1200, tol=1e-5)
    if case == "unbalanced":
        return otcore.PointCloud(rand(120, 3, seed=2), rand(130, 3, seed=3)), dict(eps=0.0025, tol=1e-6, rho=1.0)
    return otcore.PointCloud(rand(120, 3, seed=2), rand(130, 3, seed=3)), dict(eps=0.0025, tol=1e-6)


@pytest.mark.parametrize("case", ["clouds", "assignment", "unbalanced"])
def test_same_solution_in_far_fewer_iterations(case):
    geom, kw = pair(case)
    plain = otcore.sinkhorn(geom, max_iter=50000, backend="torch", overrelax=False, **kw)
    fast = otcore.sinkhorn(geom, max_iter=50000, backend="torch", overrelax=True, **kw)
    assert plain.converged and fast.converged
    assert fast.n_iter * 2 <= plain.n_iter, (fast.n_iter, plain.n_iter)
    assert 1.0 < fast.info["overrelax"] <= _overrelax.CAP
    # both within tol of the optimum's marginals: values and plans agree to ~tol
    assert math.isclose(fast.value, plain.value, rel_tol=10 * kw["tol"])
    assert fast.info["residual"] <= kw["tol"] * 1.01
    # the plan, not the potentials (a balanced pair is defined up to f + c, g - c)
    assert torch.allclose(fast.plan(), plain.plan(), atol=10 * kw["tol"] * float(plain.plan().max()))


def test_a_batch_adapts_each_problem_and_a_fixed_factor_also_works():
    x = rand(3, 80, 2, seed=4) * torch.tensor([1.0, 2.0, 4.0], dtype=F64)[:, None, None]
    geom = otcore.PointCloud(x, rand(3, 90, 2, seed=5))
    plain = otcore.sinkhorn(geom, eps=0.003, tol=1e-7, max_iter=50000, backend="torch", overrelax=False)
    fast = otcore.sinkhorn(geom, eps=0.003, tol=1e-7, max_iter=50000, backend="torch", overrelax=True)
    fixed = otcore.sinkhorn(geom, eps=0.003, tol=1e-7, max_iter=50000, backend="torch", overrelax=1.5)
    assert bool(plain.converged.all() & fast.converged.all() & fixed.converged.all())
    assert bool((fast.n_iter < plain.n_iter).all()) and bool((fixed.n_iter < plain.n_iter).all())
    assert len(set(fast.info["overrelax"].tolist())) == 3  # one factor per problem
    assert torch.equal(fixed.info["overrelax"], torch.full((3,), 1.5, dtype=F64))
    assert torch.allclose(fast.value, plain.value, rtol=1e-9) and torch.allclose(fixed.value, plain.value, rtol=1e-9)


def test_fixed_factor_with_a_fixed_number_of_iterations():
    geom = otcore.PointCloud(rand(40, 2, seed=6), rand(50, 2, seed=7))
    res = otcore.sinkhorn(geom, eps=0.01, tol=None, max_iter=40, overrelax=1.6, backend="torch")
    ref = otcore.sinkhorn(geom, eps=0.01, tol=None, max_iter=40, backend="torch")
    assert res.n_iter == 40 and res.converged and res.marginal_error < ref.marginal_error


def test_the_adaptation_follows_youngs_relations():
    """Synthetic residuals decaying by ``lam`` per iteration: relaxation starts at the test
    where two plain decays agree and the residual is below a tenth of the first test's,
    with ``w = 2 / (1 + sqrt(1 - lam))``; a relaxed decay of ``w - 1`` (the theory's at
    that factor) keeps it; one no better than plain puts the problem back to 1; a NaN
    residual (a stopped problem) leaves it."""
    relax = _overrelax.Overrelaxation(True, 3, torch.device("cpu"), F64)
    lam = torch.tensor([0.8, 0.85, 0.9], dtype=F64)
    for it in (1, 30):
        relax.after_test(lam**it, it)
        assert bool((relax.omega == 1).all())  # a first decay: nothing to compare it with yet
    relax.after_test(lam**60, 60)
    w = 2 / (1 + torch.sqrt(1 - lam))
    assert torch.allclose(relax.omega, w)
    nan = torch.tensor(float("nan"), dtype=F64)
    relaxed = lam**60 * torch.stack([(w[0] - 1) ** 10, lam[1] ** 10, nan])
    relax.after_test(relaxed, 70)
    one = torch.tensor(1.0, dtype=F64)
    assert torch.allclose(relax.omega, torch.stack([w[0], one, w[2]]))
    # the plain block after that return: as fast as the relaxed one was, so a failure
    r80 = relaxed * torch.stack([(w[0] - 1) ** 10, lam[1] ** 10, one])
    relax.after_test(r80, 80)
    assert relax.failures.tolist() == [0, 1, 0] and relax.omega[1] == 1


def test_a_slower_plain_phase_restarts_the_relaxation_at_once():
    """Relaxed at 0.9 per iteration against a plain 0.85 (no better): back to plain, whose
    block then decays at 0.99 (the problem entered a slower phase): no failure, and the
    relaxation restarts right there from the new rate."""
    relax = _overrelax.Overrelaxation(True, 1, torch.device("cpu"), F64)
    r = torch.ones(1, dtype=F64)
    for it in (1, 30, 60):
        relax.after_test(r * 0.85**it, it)
    assert relax.omega[0] > 1
    relax.after_test(r * 0.85**60 * 0.9**10, 70)
    assert relax.omega[0] == 1
    relax.after_test(r * 0.85**60 * 0.9**10 * 0.99**10, 80)
    assert relax.failures.tolist() == [0]
    assert torch.isclose(relax.omega[0], torch.tensor(2 / (1 + 0.1), dtype=F64))


def test_no_start_on_an_early_plateau_and_plain_after_two_failures():
    relax = _overrelax.Overrelaxation(True, 2, torch.device("cpu"), F64)
    flat = torch.tensor([1.0, 1.0], dtype=F64)
    for it in (1, 10, 20, 30, 40):  # a steady but slow decay near the start: no start
        relax.after_test(flat * 0.999**it, it)
    assert bool((relax.omega == 1).all())
    relax.failures[1] = _overrelax.MAX_FAILURES  # problem 1 has failed twice: it stays plain
    for it in (50, 100):  # a fast steady decay, well below the first residual: problem 0 starts
        relax.after_test(flat * 0.999**40 * 0.9 ** (it - 40), it)
    assert relax.omega[0] > 1 and relax.omega[1] == 1


def test_the_factor_is_capped():
    relax = _overrelax.Overrelaxation(True, 1, torch.device("cpu"), F64)
    for it, r in ((1, 1.0), (10, 1e-3), (20, 1e-3 * 0.99999**10), (30, 1e-3 * 0.99999**20)):
        relax.after_test(torch.tensor([r], dtype=F64), it)
    assert float(relax.omega) == _overrelax.CAP


def test_self_transport_ignores_it():
    x = rand(60, 2, seed=8)
    geom = otcore.PointCloud(x, x)
    a = otcore.sinkhorn(geom, eps=0.01, backend="torch")
    b = otcore.sinkhorn(geom, eps=0.01, backend="torch", overrelax=True)
    assert torch.equal(a.f, b.f) and a.n_iter == b.n_iter and "overrelax" not in b.info


@pytest.mark.parametrize("n, streamed", [(40, False), (70, False), (70, True)],
                         ids=["one-tile size", "tiled", "streamed"])
def test_the_triton_backend_runs_the_same_iterations(n, streamed, monkeypatch):
    """On the Triton backend the one-tile kernel (``RELAX``), the tiled kernel and the
    streamed passes (``UPDATE=3``; the tiled kernel's budget at 0: a review found the 70-point
    case ran the tiled kernel) read the factor per problem: the twin's iterations."""
    from otcore.kernels import sinkhorn_steps as K

    if streamed:
        monkeypatch.setattr(K, "TILES_MAX_WORK", 0)
    x, y = rand(2, n, 3, seed=9, dtype=torch.float32), rand(2, n + 9, 3, seed=10, dtype=torch.float32)
    geom = otcore.PointCloud(x.to(DEVICE), y.to(DEVICE))
    kw = dict(eps=0.01, tol=None, max_iter=25, overrelax=1.7)
    got = otcore.sinkhorn(geom, backend="triton", **kw)
    want = otcore.sinkhorn(geom, backend="torch", **kw)
    assert torch.allclose(got.f, want.f, atol=5e-6) and torch.allclose(got.g, want.g, atol=5e-6)


def test_recorded_blocks_read_the_adapted_factors(monkeypatch):
    graphs = EmulatedGraphs()
    monkeypatch.setattr(sinkhorn_module, "graphed", lambda block, device, k: _graph.GraphedBlock(block, k, graphs.capture))
    geom = otcore.PointCloud(rand(2, 50, 2, seed=11), rand(2, 60, 2, seed=12))
    kw = dict(eps=0.002, tol=1e-8, max_iter=20000, backend="torch", overrelax=True)
    want = otcore.sinkhorn(geom, **kw)
    got = otcore.sinkhorn(geom, cuda_graph=True, **kw)
    assert graphs.replays > 3 and bool((want.info["overrelax"] > 1).all())
    assert torch.equal(got.f, want.f) and torch.equal(got.n_iter, want.n_iter)


def test_bad_values():
    geom = otcore.PointCloud(rand(5, 2), rand(6, 2, seed=1))
    with pytest.raises(ValueError, match="overrelax=True .* tol=None"):
        otcore.sinkhorn(geom, eps=0.1, tol=None, overrelax=True)
    for bad in (0.0, 2.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="overrelax"):
            otcore.sinkhorn(geom, eps=0.1, overrelax=bad)
    with pytest.raises(ValueError, match="overrelax must be 'auto'"):
        otcore.sinkhorn(geom, eps=0.1, overrelax="fast")
    for bad in (None, [1.5]):
        with pytest.raises(TypeError, match="overrelax"):
            otcore.sinkhorn(geom, eps=0.1, overrelax=bad)
    for ce in (1, 2):  # the iteration before each test is plain: nothing would be relaxed
        with pytest.raises(ValueError, match="check_every >= 3"):
            otcore.sinkhorn(geom, eps=0.1, overrelax=True, check_every=ce)


def test_the_loss_passes_it_to_its_solves():
    """``SinkhornLoss(overrelax=True)``: the value and the gradient of the plain loss, to
    the tolerance; checked when the module is built."""
    x = rand(60, 2, seed=13).requires_grad_()
    y = rand(70, 2, seed=14)
    vals, grads = [], []
    for ov in (False, True):
        val = otcore.SinkhornLoss(eps=0.002, tol=1e-8, max_iter=20000, backend="torch", overrelax=ov)(x, y)
        (grad,) = torch.autograd.grad(val, x)
        vals.append(val)
        grads.append(grad)
    assert torch.allclose(vals[1], vals[0], rtol=1e-6) and torch.allclose(grads[1], grads[0], atol=1e-6)
    with pytest.raises(ValueError, match="overrelax"):
        otcore.SinkhornLoss(tol=None, overrelax=True)


def test_auto_is_the_default_and_relaxes_only_where_there_are_tests():
    """``overrelax="auto"`` (the default): adaptive with a ``tol`` (the iterations of
    ``overrelax=True``), plain with ``tol=None`` or ``check_every < 3`` (no error)."""
    geom = otcore.PointCloud(rand(80, 2, seed=15), rand(90, 2, seed=16))
    kw = dict(eps=0.003, max_iter=20000, backend="torch")
    default = otcore.sinkhorn(geom, tol=1e-8, **kw)
    relaxed = otcore.sinkhorn(geom, tol=1e-8, overrelax=True, **kw)
    plain = otcore.sinkhorn(geom, tol=1e-8, overrelax=False, **kw)
    assert torch.equal(default.f, relaxed.f) and default.n_iter == relaxed.n_iter < plain.n_iter
    assert default.info["overrelax"] > 1 and "overrelax" not in plain.info
    for extra in (dict(tol=None, max_iter=30), dict(tol=1e-8, check_every=2)):
        got = otcore.sinkhorn(geom, **dict(kw, **extra))
        want = otcore.sinkhorn(geom, **dict(kw, overrelax=False, **extra))
        assert torch.equal(got.f, want.f) and "overrelax" not in got.info


def test_the_adaptation_runs_on_the_host():
    """The factors are adapted from the residuals the solver reads anyway: no device
    operation per test but the copy of factors that changed (each was a kernel launch on
    a GPU; ~90 of them cost more than a small problem's block of iterations)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__ != "lift_fresh.default":  # wrapping a host array: no computation
                self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    relax = _overrelax.Overrelaxation(True, 2, torch.device("cpu"), torch.float32)
    lam = torch.tensor([0.8, 0.9], dtype=F64)
    w = 2 / (1 + torch.sqrt(1 - lam))
    # plain decays, the start of relaxation (at 60), a relaxed block decaying as the theory says
    for it, resid in ((1, lam), (30, lam**30), (60, lam**60), (70, lam**60 * (w - 1) ** 10)):
        before, host = relax.omega.clone(), resid.numpy()  # host values, as the solver reads them
        with Ops() as ops:
            relax.after_test(host, it)
        assert ops.names == ["copy_.default"] * int(not torch.equal(before, relax.omega)), ops.names
    assert torch.allclose(relax.omega, w.float())
