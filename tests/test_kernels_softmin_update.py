"""Sinkhorn's fused half-step on the streamed passes: the softmin kernel adding the
weights' bias as it reads ``h`` and writing the updated potential (``UPDATE``), and the
split passes' combine kernel.

Each case compares the Triton kernel (float32), its torch twin
(``otcore.reference.softmin_update`` / ``reference.sinkhorn_steps``) and a float64
loop on the dense cost (``steps64`` of the one-tile kernel's tests). Problems are larger
than one tile (``kernels.sinkhorn_steps.fits``), and the one-program tiled kernel is off
here (``TILES_MAX_WORK = 0``; it has its own tests), so the solver takes the streamed
passes; split passes (``S > 1``, chosen on GPUs only) are forced by patching ``num_splits``.
"""

import warnings

import pytest
import torch
from kernel_support import DEVICE, RUNTIME_WARNINGS_ARE_ERRORS
from torch.utils._python_dispatch import TorchDispatchMode
from test_kernels_sinkhorn_steps import assert_close, problem, resid64, steps64

import otcore
from otcore import reference, triton_ops
from otcore.kernels import sinkhorn_steps as one_tile
from otcore.kernels import softmin as K

pytestmark = RUNTIME_WARNINGS_ARE_ERRORS

ACTIVE = torch.tensor([True, False, True], device=DEVICE)
N, M = 70, 83  # past one tile (64 x 64): the streamed passes


@pytest.fixture(autouse=True)
def streamed(monkeypatch):
    """The streamed passes for every problem past one tile (no one-program tiled kernel)."""
    monkeypatch.setattr(one_tile, "TILES_MAX_WORK", 0)


@pytest.fixture(params=[1, 3], ids=["unsplit", "split"])
def splits(request, monkeypatch):
    """The passes unsplit, or cut into 3 slices combined by ``softmin_combine_kernel``."""
    s = request.param
    monkeypatch.setattr(K, "num_splits", lambda programs, tiles_oth, device, dense=False: s)
    return s


def half_step64(C64, h, bias, eps, axis, prev, active, tau, average, omega=None):
    """The update in float64 on the dense cost, with ``torch.logsumexp``."""
    z = (h + eps * bias).double()
    z = z[:, None, :] - C64 if axis == 1 else z[:, :, None] - C64
    s = -eps * torch.logsumexp(z / eps, dim=2 if axis == 1 else 1)
    if average:
        new = 0.5 * (prev.double() + tau * s)
    elif omega is not None:
        new = (1 - omega.double()[:, None]) * prev.double() + omega.double()[:, None] * tau * s
    else:
        new = tau * s
    return torch.where(active[:, None], new, prev.double())


@pytest.mark.parametrize("kind", ["sqeuclidean", "euclidean", "dense"])
@pytest.mark.parametrize("axis", [1, 0])
@pytest.mark.parametrize("mode", ["alternating", "averaged", "relaxed"])
def test_the_half_step_matches_its_twin_and_float64(kind, axis, mode, splits):
    """Zero weights (``-inf`` bias) on both sides, an inactive problem (its potential is
    returned bit for bit), ``tau < 1``, per-problem relaxation factors; both axes of point
    clouds and of a dense cost."""
    geom, C64, la, lb, f0, g0 = problem(kind, N, M, seed=3)
    h, bias, prev = (g0, lb, f0) if axis == 1 else (f0, la, g0)
    args = (h, bias, 0.05, axis, prev, ACTIVE, 0.8, mode == "averaged")
    omega = torch.tensor([1.5, 1.9, 0.7], device=DEVICE) if mode == "relaxed" else None
    got = triton_ops.softmin_update(geom, *args, omega=omega)
    twin = reference.softmin_update(geom, *args, omega=omega)
    exact = half_step64(C64, *args, omega=omega)
    assert torch.equal(got[1], prev[1]) and torch.equal(twin[1], prev[1])
    scale = float(C64.amax())
    assert_close(got, exact, scale, 1e-6)
    assert_close(twin, exact, scale, 1e-6)


def test_the_bias_is_added_as_h_is_read(splits):
    """``bias = log b`` in the kernel (added as ``log2 b`` to the scaled ``h``) gives what
    adding ``eps log b`` to ``h`` in torch first gives, to float32's rounding; zero weights
    (``log b = -inf``) drop out alike."""
    geom, C64, _, lb, _, g0 = problem("sqeuclidean", N, M, seed=4)
    op = triton_ops.operand(geom, 1, "fp32", 0.05)
    got, ref = K.launch_softmin(op, g0, 0.05, bias=lb), K.launch_softmin(op, g0 + 0.05 * lb, 0.05)
    assert bool(torch.isinf(lb).any())
    assert_close(got, ref, float(C64.amax()), 1e-6)


def test_the_shift_takes_prev_over_tau_as_its_hint_and_a_far_one_is_fixed_up(monkeypatch, splits):
    """The shifted sum (used at any size here): with ``prev`` the hint is ``prev / tau``.
    A ``prev`` 40 below the result (~1150 base-2 units at eps = 0.05) overflows every
    row's sum, so the FIXUP launch redoes them; the update is written from the redone rows."""
    monkeypatch.setattr(K, "SHIFT_MIN_ENTRIES", 0)
    kernel, first = K.softmin_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                if kw["FIXUP"]:  # the output as the shifted launch left it (NaN: rows to redo)
                    first.append(args[0].clone())
                return kernel[grid](*args, **kw)
            return launch

    monkeypatch.setattr(K, "softmin_kernel", Spy())
    geom, C64, la, lb, f0, g0 = problem("sqeuclidean", N, M, seed=5)
    s64 = half_step64(C64, g0, lb, 0.05, 1, f0, torch.ones_like(ACTIVE), 1.0, False).float()
    for prev, tau, far in ((s64 - 40.0, 1.0, True), (0.8 * s64, 0.8, False)):
        args = (g0, lb, 0.05, 1, prev, ACTIVE, tau, False)
        first.clear()
        with warnings.catch_warnings():  # the interpreter's NumPy reports the overflow the range check reads
            warnings.filterwarnings("ignore", "overflow encountered in exp2", RuntimeWarning)
            got = triton_ops.softmin_update(geom, *args)
        redo = first[0].isnan()
        assert bool(redo[ACTIVE].all()) if far else not bool(redo.any())
        assert_close(got, half_step64(C64, *args), float(C64.amax()), 1e-6)


def test_a_problem_with_every_weight_zero_gets_inf(splits):
    """All of one problem's ``h`` is ``-inf``: its softmin is ``+inf`` (the combine's
    empty sum), as the twin's."""
    geom, _, _, lb, f0, g0 = problem("sqeuclidean", N, M, seed=6)
    h = g0.clone()
    h[2] = -float("inf")
    ones = torch.ones(3, dtype=torch.bool, device=DEVICE)
    got = triton_ops.softmin_update(geom, h, lb, 0.05, 1, f0, ones, 1.0)
    twin = reference.softmin_update(geom, h, lb, 0.05, 1, f0, ones, 1.0)
    assert torch.isinf(got[2]).all() and torch.isinf(twin[2]).all()
    assert torch.isfinite(got[:2]).all()


@pytest.mark.parametrize("case", ["balanced", "unbalanced", "symmetric"])
def test_streamed_iterations_with_the_test_match_the_twin_and_float64(case, splits):
    """``k`` iterations and the convergence test on the streamed passes (``sinkhorn_steps``
    of the Triton backend): potentials and residuals against the twin and float64."""
    symmetric = case == "symmetric"
    rho = 2.0 if case == "unbalanced" else None
    eps, k = 0.05, 4
    tau = (1.0, 1.0) if rho is None else (rho / (rho + eps),) * 2
    geom, C64, la, lb, f0, g0 = problem("sqeuclidean", N, N if symmetric else M, seed=7)
    if symmetric:
        x = geom.x
        geom, C64 = otcore.PointCloud(x, x), torch.cdist(x.double(), x.double()) ** 2
        lb, g0 = la, f0
    assert not one_tile.fits(geom.n, geom.m)
    args = (la, lb, eps, tau, k, ACTIVE, symmetric, (1e-30, rho))
    fk, gk, rk = geom.sinkhorn_steps(f0, g0, *args, backend="triton")
    ft, gt, rt = geom.sinkhorn_steps(f0, g0, *args, backend="torch")
    f64, g64 = steps64(C64, f0, g0, la, lb, eps, tau, k, ACTIVE, symmetric)
    r64 = resid64(C64, f64, g64, la, lb, eps, rho, symmetric)
    f64, g64 = steps64(C64, f0, g0, la, lb, eps, tau, k + 1, ACTIVE, symmetric)  # tol 1e-30: one more
    scale = float(C64.amax())
    for got, want in ((fk, f64), (gk, g64), (ft, f64), (gt, g64)):
        live = torch.isfinite(want)
        assert_close(got[live], want[live], scale, 1e-5)
    assert torch.equal(fk[1], f0[1]) and torch.equal(gk[1], g0[1])
    assert rk[1].isnan() and rt[1].isnan()
    for r in (rk, rt):  # the kernel's and the twin's residuals (a review: the twin's went unchecked)
        assert torch.allclose(r[ACTIVE].double(), r64[ACTIVE], rtol=1e-3, atol=2e-7)


class Computing(TorchDispatchMode):
    """Counts the torch operations that compute (a kernel launch each on a GPU): not views,
    not allocations."""

    SKIP = ("empty", "view", "unsqueeze", "select", "slice", "expand", "alias", "detach", "lift_fresh")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.__name__.startswith(self.SKIP):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_an_iteration_is_one_launch_per_pass_and_one_more_per_split(monkeypatch, splits):
    """``k`` unchecked iterations: ``2 k`` softmin launches (plus ``2 k`` combines when
    split) and no torch operation (the passes read ``log a``, ``log b`` and scale them
    themselves: before, ``eps log a`` and ``eps log b`` cost two per block, and an
    eps-scaling stage is a block); the symmetric iteration one pass each, and one operation
    (the ``where`` that copies ``f`` to ``g`` once, after the block)."""
    launches, counter = [], Computing()
    for name in ("softmin_kernel", "softmin_combine_kernel"):
        kernel = getattr(K, name)

        class Spy:
            def __getitem__(self, grid, kernel=kernel, name=name):
                def launch(*args, **kw):
                    launches.append(name)
                    with _paused(counter):
                        return kernel[grid](*args, **kw)
                return launch

        monkeypatch.setattr(K, name, Spy())
    geom, _, la, lb, f0, g0 = problem("sqeuclidean", N, M, seed=8)
    sym = otcore.PointCloud(geom.x, geom.x)
    for g, lb_, g0_, passes, ops in ((geom, lb, g0, 2, 0), (sym, la, f0, 1, 1)):
        steps = (f0, g0_, la, lb_, 0.05, (1.0, 1.0), 5, ACTIVE, g is sym)
        g.sinkhorn_steps(*steps, backend="triton")  # the first call centres the clouds (cached)
        launches.clear()
        counter.count = 0
        with counter:
            g.sinkhorn_steps(*steps, backend="triton")
        assert launches.count("softmin_kernel") == 5 * passes
        assert launches.count("softmin_combine_kernel") == (5 * passes if splits > 1 else 0)
        assert counter.count == ops


class _paused:
    """The interpreter's own tensor copies inside a launch are not the library's operations."""

    def __init__(self, mode):
        self.mode = mode

    def __enter__(self):
        self.count = self.mode.count

    def __exit__(self, *exc):
        self.mode.count = self.count
        return False


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("check", [None, (1e-30, None)], ids=["unchecked", "checked"])
def test_a_symmetric_inactive_problem_keeps_its_own_g(backend, check):
    """The symmetric iteration sets ``g = f`` for the problems it runs only: an inactive
    one whose ``g`` differs from its ``f`` (a warm start, SNS's fallback) keeps both, as
    in the one-tile kernel."""
    geom, _, la, _, f0, _ = problem("sqeuclidean", N, N, seed=10)
    sym = otcore.PointCloud(geom.x, geom.x)
    g0 = f0 + 0.01
    out = sym.sinkhorn_steps(f0, g0, la, la, 0.05, (1.0, 1.0), 2, ACTIVE, True, check, backend=backend)
    assert torch.equal(out[0][1], f0[1]) and torch.equal(out[1][1], g0[1])
    assert torch.equal(out[0][ACTIVE], out[1][ACTIVE])


def test_a_strided_active_mask_is_read_by_problem():
    geom, _, la, lb, f0, g0 = problem("sqeuclidean", N, M, seed=11)
    strided = torch.tensor([True, True, False, True, True, True], device=DEVICE)[::2]  # [True, False, True]
    got = geom.sinkhorn_steps(f0, g0, la, lb, 0.05, (1.0, 1.0), 2, strided, backend="triton")
    want = geom.sinkhorn_steps(f0, g0, la, lb, 0.05, (1.0, 1.0), 2, ACTIVE, backend="triton")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got[0][1], f0[1]) and torch.equal(got[1][1], g0[1])


def test_bad_update_arguments_raise():
    geom, _, _, lb, f0, g0 = problem("sqeuclidean", N, M, seed=9)
    op = triton_ops.operand(geom, 1, "fp32", 0.05)
    with pytest.raises(ValueError, match="active"):
        K.launch_softmin(op, g0, 0.05, prev=f0)
    with pytest.raises(ValueError, match="active"):
        K.launch_softmin(op, g0, 0.05, prev=f0, active=ACTIVE.int())
    with pytest.raises(ValueError, match="prev"):
        K.launch_softmin(op, g0, 0.05, prev=g0, active=ACTIVE)
    with pytest.raises(ValueError, match="bias"):
        K.launch_softmin(op, g0, 0.05, bias=f0)
    with pytest.raises(ValueError, match="exclusive"):
        K.launch_softmin(op, g0, 0.05, prev=f0, active=ACTIVE, hint=f0)
    omega = torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match="omega"):
        K.launch_softmin(op, g0, 0.05, omega=omega)
    with pytest.raises(ValueError, match="omega"):
        K.launch_softmin(op, g0, 0.05, prev=f0, active=ACTIVE, average=True, omega=omega)
    with pytest.raises(ValueError, match="omega"):
        K.launch_softmin(op, g0, 0.05, prev=f0, active=ACTIVE, omega=omega[:2])
