"""Bad input fails fast with a ValueError/TypeError that names the argument.

Every case of DESIGN.md: NaN/inf, negative or all-zero weights, mass mismatch in
balanced mode, shape and device mismatches, eps/tol/max_iter out of range, unknown
cost/backend/precision, malformed init and eps_schedule, non-tensors and integer
tensors. Device mismatches are provoked with ``meta`` tensors, which exist on
every machine (and with CUDA when there is one).
"""

import inspect
import math
import warnings

import numpy as np
import pytest
import torch

import otcore

NAN, INF = float("nan"), float("inf")
N, M, D = 5, 6, 2


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def x_():
    return rand(N, D, seed=0, dtype=torch.float64)


def y_():
    return rand(M, D, seed=1, dtype=torch.float64)


def geom():
    return otcore.PointCloud(x_(), y_())


def uniform(k):
    return torch.full((k,), 1.0 / k, dtype=torch.float64)


def with_value(t, index, v):
    t = t.clone()
    t[index] = v
    return t


def solve(**kw):
    """A call with everything valid unless overridden."""
    args = dict(geom=geom(), a=None, b=None, eps=0.1)
    args.update(kw)
    g, a, b = args.pop("geom"), args.pop("a"), args.pop("b")
    return otcore.sinkhorn(g, a, b, **args)


# ----------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_points(bad):
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        otcore.PointCloud(with_value(x_(), (1, 0), bad), y_())
    with pytest.raises(ValueError, match="y contains NaN or inf"):
        otcore.PointCloud(x_(), with_value(y_(), (0, 1), bad))


def test_finiteness_check_names_the_first_bad_input_in_every_dtype():
    """x and y are checked together (one host read): the message names the one that is bad
    (x first when both are); fp16/bf16 infinities are caught, float64 values beyond
    float32's range are not taken for infinities."""
    bad_x, bad_y = with_value(x_(), (1, 0), NAN), with_value(y_(), (0, 1), INF)
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        otcore.PointCloud(bad_x, bad_y)
    with pytest.raises(ValueError, match="y contains NaN or inf"):
        otcore.PointCloud(x_(), bad_y)
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        otcore.PointCloud(bad_x, bad_x)  # one tensor, one check
    for dt in (torch.float16, torch.bfloat16):
        with pytest.raises(ValueError, match="y contains NaN or inf"):
            otcore.PointCloud(x_().to(dt), with_value(y_(), (0, 1), INF).to(dt))
    huge = x_().double() * 1e300
    otcore.PointCloud(huge, y_().double())  # finite: no error
    otcore.PointCloud(x_().half(), y_().double() * 1e300)  # mixed dtypes compared in float64
    # mixed dtypes are computed in the wider one (docs/api.md, PointCloud)
    assert otcore.PointCloud(x_().float(), y_().double()).dtype == torch.float64
    assert otcore.PointCloud(x_().bfloat16(), y_().half()).dtype == torch.float32


def test_finite_rows_flags_each_problem_on_its_own():
    from otcore import _validate
    f = torch.zeros(4, 5)
    g = torch.zeros(4, 3, dtype=torch.float64)
    value = torch.tensor([0.0, 1e300, 0.0, 0.0], dtype=torch.float64)  # finite in float64
    f[1, 2], g[2, 0], value[3] = NAN, -INF, NAN
    assert _validate.finite_rows(f, g, value).tolist() == [True, False, False, False]
    assert _validate.finite_rows(f[:1], g[:1]).tolist() == [True]
    assert _validate.finite_rows(torch.tensor([1.0, INF, NAN, -2.0])).tolist() == [True, False, False, True]
    # several per-problem numbers of one dtype are stacked into one reduction; a NaN or inf in
    # any of them flags its problem alone, as does one of another dtype checked on its own
    err, cost = torch.tensor([0.0, 0.0, NAN, 0.0]), torch.tensor([0.0, INF, 0.0, 0.0])
    wide = torch.tensor([1e300, 0.0, 0.0, NAN], dtype=torch.float64)
    rows = torch.zeros(4, 2)
    assert _validate.finite_rows(rows, err, cost).tolist() == [True, False, False, True]
    assert _validate.finite_rows(rows, err, cost, wide).tolist() == [True, False, False, False]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_geometry_primitives_check_eps_and_h(backend):
    """A negative eps gave silent nonsense (different on each backend), 0 a bare
    ZeroDivisionError, a wrong-length h a broadcasting error."""
    g = geom()
    h, F, G = torch.zeros(1, M, dtype=torch.float64), torch.zeros(1, N, dtype=torch.float64), torch.zeros(1, M, dtype=torch.float64)
    for eps in (-0.1, 0.0, NAN, INF):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            g.softmin(h, eps, 1, backend=backend)
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            g.marginals(F, G, eps, 1, backend=backend)
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            g.plan_cost(F, G, eps, backend=backend)
    with pytest.raises(ValueError, match=rf"h must be a \(B=1, m={M}\) tensor for axis=1"):
        g.softmin(torch.zeros(1, M + 1, dtype=torch.float64), 0.1, 1, backend=backend)
    with pytest.raises(ValueError, match=rf"h must be a \(B=1, n={N}\) tensor for axis=0"):
        g.softmin(h, 0.1, 0, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_plan_primitives_check_the_shapes_of_their_potentials_and_vectors(backend):
    """The Triton kernels index ``F``, ``G``, ``v``, ``h`` by the geometry's sizes: a
    shorter tensor was read past its end (NaN, inf or plausible values, no error), and the
    torch twin broadcast a batch of one. Both refuse, naming the argument."""
    g = otcore.PointCloud(rand(2, 7, 3), rand(2, 9, 3, seed=1))
    F, G = torch.zeros(2, 7), torch.zeros(2, 9)
    calls = {
        "F": [lambda: g.marginals(F[:, :5], G, 0.1, 1, backend=backend),
              lambda: g.plan_topk(F[:1], G, 0.1, 3, backend=backend),
              lambda: g.plan(F[0], G, 0.1, backend=backend)],
        "G": [lambda: g.plan_cost(F, G[:, :4], 0.1, backend=backend),
              lambda: g.plan_cost_grad(F, G[:1], 0.1, backend=backend),
              lambda: g.plan_sparse_rows(F, G.T, 0.1, 2, backend=backend)],
        "v": [lambda: g.apply_plan(F, G, 0.1, torch.ones(2, 8), 1, backend=backend),
              lambda: g.apply_plan(F, G, 0.1, torch.ones(1, 9), 1, backend=backend),
              lambda: g.apply_plan(F, G, 0.1, torch.ones(2, 9), 0, backend=backend),
              lambda: g.apply_plan(F, G, 0.1, torch.ones(2, 7, 2, 1), 0, backend=backend)],
        "h": [lambda: g.softmin(torch.zeros(1, 9), 0.1, 1, backend=backend),
              lambda: g.softmin(torch.zeros(2, 9, 1), 0.1, 1, backend=backend)],
    }
    for name, bad in calls.items():
        for call in bad:
            with pytest.raises(ValueError, match=f"^{name} must be a"):
                call()
    assert g.apply_plan(F, G, 0.1, torch.ones(2, 7, 2), 0, backend=backend).shape == (2, 9, 2)
    assert g.softmin(torch.zeros(2, 7), 0.1, 0, backend=backend).shape == (2, 9)


def test_torch_func_transforms_are_refused_by_name():
    """torch.func.grad / vmap cannot trace the host checks and the autograd.Functions of the
    gradients: a TypeError that says so, from every entry point (they failed inside torch)."""
    x, y = x_()[:8], y_()[:6]
    loss = otcore.SinkhornLoss(eps=0.1)
    router = otcore.SparseOTRouter(4)
    calls = [
        lambda: torch.func.grad(lambda p: loss(p, y))(x),
        lambda: torch.func.vmap(torch.func.grad(lambda p: loss(p, y)))(x.expand(2, -1, -1).clone()),
        lambda: torch.func.grad(lambda p: otcore.sinkhorn(otcore.PointCloud(p, y), eps=0.1).value)(x),
        lambda: torch.func.grad(lambda w: otcore.sinkhorn(otcore.PointCloud(x, y), w, eps=0.1).value)(uniform(8)),
        lambda: torch.func.grad(lambda s: router(s).combine_weights.pow(2).sum())(rand(16, 4)),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="does not support torch.func transforms"):
            call()

    # OT that only picks targets (under no_grad) inside a gradient transform, or on constants
    # from outside it, runs as usual and gives autograd's gradient
    # (the solvers' host reads of per-problem numbers see a wrapped tensor's values)
    for plan in (lambda g: otcore.sinkhorn(g, eps=0.1).plan(), lambda g: otcore.sinkhorn_newton(g, eps=0.1).plan(),
                 lambda g: otcore.sparse_ot(g, k=3, gamma=0.5).to_dense()):
        def matched(p):
            with torch.no_grad():
                P = plan(otcore.PointCloud(p.detach(), y))
            return ((p - (P / P.sum(1, keepdim=True)) @ y) ** 2).sum()

        xr = x.clone().requires_grad_()
        torch.testing.assert_close(torch.func.grad(matched)(x), torch.autograd.grad(matched(xr), xr)[0])
    assert torch.func.grad(lambda p: (p * loss(x, y).detach()).sum())(x).shape == x.shape
    # torch.autograd.functional.jacobian runs the forward outside any transform: allowed
    jac = torch.autograd.functional.jacobian(lambda p: loss(p, y), x)
    assert jac.shape == x.shape and bool(torch.isfinite(jac).all())


@pytest.mark.parametrize("bad", [NAN, INF])
def test_non_finite_cost_matrix(bad):
    with pytest.raises(ValueError, match="C contains NaN or inf"):
        otcore.CostMatrix(with_value(rand(N, M), (2, 3), bad))


@pytest.mark.parametrize("bad", [NAN, INF])
def test_non_finite_weights(bad):
    with pytest.raises(ValueError, match="a contains NaN or inf"):
        solve(a=with_value(uniform(N), 0, bad))
    with pytest.raises(ValueError, match="b contains NaN or inf"):
        solve(b=with_value(uniform(M), 0, bad))


# ----------------------------------------------------------------------------- weights
def test_negative_weights():
    a = with_value(uniform(N), 0, -0.1)
    a[1] += 0.1  # keep the total mass 1: the sign alone is at fault
    with pytest.raises(ValueError, match="a has negative entries"):
        solve(a=a)
    with pytest.raises(ValueError, match="b has negative entries"):
        solve(b=with_value(uniform(M), 2, -1e-9), rho=1.0)


def test_all_zero_weights():
    with pytest.raises(ValueError, match="a is all zero"):
        solve(a=torch.zeros(N, dtype=torch.float64), rho=1.0)
    with pytest.raises(ValueError, match="b is all zero"):
        solve(b=torch.zeros(M, dtype=torch.float64), rho=1.0)
    # one problem of a batch is enough
    g = otcore.PointCloud(rand(2, N, D), rand(2, M, D, seed=1))
    b = torch.full((2, M), 1.0 / M)
    b[1] = 0
    with pytest.raises(ValueError, match="b is all zero"):
        otcore.sinkhorn(g, None, b, eps=0.1, rho=1.0)


@pytest.mark.parametrize("solver", ["sinkhorn", "sparse_ot"])
def test_the_weights_of_both_sides_and_their_mass_check_read_the_host_once(solver, monkeypatch):
    """On a GPU each host read is a synchronisation: the weights' checks of both sides and
    the mass check take one (they took two per side and one more), counted as ``tolist``
    calls and scalar reads (``bool``, ``float``, ``item``) while the weights are checked."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from otcore import _validate

    reads = []

    class Scalars(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__ == "_local_scalar_dense.default":
                reads.append(func.__name__)
            return func(*args, **(kwargs or {}))

    tolist, checks, mass = torch.Tensor.tolist, _validate.weights, _validate.balanced_mass

    def counted(*args, **kw):
        monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append("tolist") or tolist(t))
        try:
            with Scalars():
                return checks(*args, **kw)
        finally:
            monkeypatch.setattr(torch.Tensor, "tolist", tolist)

    def mass_counted(*args, **kw):
        with Scalars():
            return mass(*args, **kw)

    monkeypatch.setattr(_validate, "weights", counted)
    monkeypatch.setattr(_validate, "balanced_mass", mass_counted)
    a, b = with_value(uniform(N), 0, 0.0), uniform(M)
    a = a / a.sum()
    geom = otcore.PointCloud(rand(N, D), rand(M, D, seed=1))
    if solver == "sinkhorn":
        otcore.sinkhorn(geom, a, b, eps=0.1, backend="torch")
    else:
        otcore.sparse_ot(geom, a, b, k=3, gamma=0.5, backend="torch")
    assert reads == ["tolist"]


def test_mass_mismatch_in_balanced_mode():
    with pytest.raises(ValueError, match="same total mass"):
        solve(a=2 * uniform(N))
    with pytest.raises(ValueError, match="same total mass"):
        solve(a=2 * uniform(N), rho=(None, None))
    # accepted when either marginal is relaxed
    for rho in (1.0, (1.0, None), (None, 1.0)):
        assert solve(a=2 * uniform(N), rho=rho, max_iter=5000).converged


@pytest.mark.parametrize("solver", ["sinkhorn", "sinkhorn_newton", "sparse_ot"])
def test_mass_mismatch_advice_names_only_what_the_solver_takes(solver):
    """The error advised ``rho=`` to solvers without it (a review: sinkhorn_newton then
    raised a TypeError); those name otcore.sinkhorn's instead."""
    geom = otcore.PointCloud(rand(12, 2, dtype=torch.float64), rand(9, 2, seed=1, dtype=torch.float64))
    kw = dict(k=3, gamma=1.0) if solver == "sparse_ot" else dict(eps=0.05)
    with pytest.raises(ValueError, match="same total mass") as err:
        getattr(otcore, solver)(geom, 2 * uniform(12), uniform(9), **kw)
    if solver == "sinkhorn":
        assert str(err.value).endswith("normalise them or pass rho= for unbalanced OT")
    else:
        assert "rho" not in inspect.signature(getattr(otcore, solver)).parameters
        assert str(err.value).endswith("normalise them (otcore.sinkhorn(..., rho=) solves unbalanced OT)")


@pytest.mark.parametrize("solver", ["sinkhorn", "sinkhorn_newton", "sparse_ot"])
def test_float32_mass_gap_that_tol_cannot_absorb_is_rejected(solver):
    """The marginal error cannot fall below |sum a - sum b|: in float32 a gap of 5e-5 used
    to pass the dtype's 1e-4 check, then the solve ran to max_iter. Now a gap above tol / 2
    is an error; rounding gaps of weights normalised in float32 still pass at any tol."""
    geom = otcore.PointCloud(rand(40, 2), rand(30, 2, seed=1))
    kw = dict(k=3, gamma=1.0) if solver == "sparse_ot" else dict(eps=0.05)
    fn = getattr(otcore, solver)
    a, b = torch.full((40,), 1 / 40), torch.full((30,), 1 / 30)
    with pytest.raises(ValueError, match=r"same total mass .* a gap of 5e-05; .* tol=1e-05"):
        fn(geom, a, b * 1.00005, tol=1e-5, **kw)
    fn(geom, a, b * 1.00005, tol=1e-3, **kw)  # within tol / 2 and the dtype's 1e-4: accepted
    with pytest.raises(ValueError, match="same total mass"):
        fn(geom, a, b * 1.0002, tol=1.0, **kw)  # above the dtype's 1e-4 whatever tol
    w = rand(30, seed=2) * 7
    w = w / w.sum()  # normalised in float32: a gap of a few rounding steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", otcore.ConvergenceWarning)
        fn(geom, a, w, tol=1e-9, max_iter=1, **kw)  # accepted (tol is out of float32's reach: it warns)


@pytest.mark.parametrize("solver", ["sinkhorn", "sinkhorn_newton", "sparse_ot"])
def test_float64_mass_gap_above_half_tol_is_rejected(solver):
    """docs/api.md: a balanced mass gap above ``tol / 2`` is a ValueError (the marginal error
    cannot fall below it). In float64 at tol = 1e-9 that bound binds (the dtype's share is
    1e-8 relative, 16 rounding steps 3.6e-15): a gap of 0.8 tol is refused, one of 0.3 tol
    accepted. The only other test used a gap of 5 tol, which a threshold of 2 tol (a mutant
    that passed every test) also refuses."""
    geom = otcore.PointCloud(rand(20, 2, dtype=torch.float64), rand(17, 2, seed=1, dtype=torch.float64))
    kw = dict(k=3, gamma=1.0) if solver == "sparse_ot" else dict(eps=0.05)
    fn = getattr(otcore, solver)
    tol = 1e-9
    a, b = uniform(20), uniform(17)
    assert abs(float(a.sum()) - float(b.sum())) <= 1e-15  # the gaps below are the scalings'
    with pytest.raises(ValueError, match=r"same total mass .* a gap of 8e-10; .* tol=1e-09"):
        fn(geom, a, b * (1 + 0.8 * tol), tol=tol, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", otcore.ConvergenceWarning)
        assert fn(geom, a, b * (1 + 0.3 * tol), tol=tol, **kw).converged  # within tol / 2: accepted, and met


@pytest.mark.parametrize("solver", ["sinkhorn", "sinkhorn_newton", "sparse_ot"])
def test_float32_weights_normalised_in_float32_pass_on_a_float64_geometry(solver):
    """The rounding gap allowed is that of the weights as given: float32 weights summing
    to 1 + 9e-8 were rejected on a float64 geometry (float64's 1e-8 after the cast)."""
    geom = otcore.PointCloud(rand(12, 2).double(), rand(10, 2, seed=1).double())
    a, b = rand(12, seed=2), rand(10, seed=3)
    a, b = a / a.sum(), b / b.sum()
    assert abs(float(a.double().sum()) - float(b.double().sum())) > 1e-8  # the case (the seeds give 5e-8)
    kw = dict(k=3, gamma=1.0) if solver == "sparse_ot" else dict(eps=0.05)
    assert bool(getattr(otcore, solver)(geom, a, b, **kw).converged)
    with pytest.raises(ValueError, match="same total mass"):  # a float64 gap of that size is no rounding
        getattr(otcore, solver)(geom, a.double(), b.double() * (1 + 5e-8), **kw)


def test_primitives_check_axis_and_sizes():
    geom = otcore.PointCloud(rand(6, 2).double(), rand(5, 2, seed=1).double())
    F, G = torch.zeros(1, 6, dtype=torch.float64), torch.zeros(1, 5, dtype=torch.float64)
    for bad, err in ((2, ValueError), (-1, ValueError), (True, TypeError), (1.0, TypeError), (np.bool_(True), TypeError)):
        with pytest.raises(err, match="axis must be"):
            geom.marginals(F, G, 0.1, bad)
        with pytest.raises(err, match="axis must be"):
            geom.softmin(G, 0.1, bad)
    torch.testing.assert_close(geom.marginals(F, G, 0.1, np.int64(1)), geom.marginals(F, G, 0.1, 1))
    with pytest.raises(ValueError, match="s must be >= 1"):
        geom.plan_sparse_rows(F, G, 0.1, 0)
    vals, idx = geom.plan_sparse_rows(F, G, 0.1, 3)
    with pytest.raises(ValueError, match="axis must be 0"):
        geom.ell_matvec(vals, idx, torch.ones(1, 6, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match=r"v must have 5 entries per problem for axis=1"):
        geom.ell_matvec(vals, idx, torch.ones(1, 6, dtype=torch.float64), 1)
    assert geom.ell_matvec(vals, idx, torch.ones(1, 5, dtype=torch.float64), 1).shape == (1, 6)


def test_result_topk_takes_the_ints_the_primitives_take():
    """``OTResult.topk`` checks ``k`` as ``plan_topk`` does: NumPy ints and one-element int
    tensors are ints; bools, floats and k outside [1, m] are refused, naming ``k``."""
    res = otcore.sinkhorn(otcore.PointCloud(rand(6, 2).double(), rand(5, 2, seed=1).double()), eps=0.1)
    want = res.topk(2)
    for k in (np.int64(2), torch.tensor(2)):
        for got, ref in zip(res.topk(k), want):
            torch.testing.assert_close(got, ref)
    for bad, err, msg in ((True, TypeError, "k must be"), (2.0, TypeError, "k must be"),
                          (0, ValueError, "k must be >= 1"), (6, ValueError, "k must be <= m = 5")):
        with pytest.raises(err, match=msg):
            res.topk(bad)


# ----------------------------------------------------------------------------- shapes
def test_point_cloud_shape_mismatches():
    with pytest.raises(ValueError, match="dimension d"):
        otcore.PointCloud(rand(N, 2), rand(M, 3, seed=1))
    with pytest.raises(ValueError, match="batch size"):
        otcore.PointCloud(rand(2, N, D), rand(3, M, D, seed=1))
    with pytest.raises(ValueError, match="both be batched"):
        otcore.PointCloud(rand(2, N, D), rand(M, D, seed=1))
    with pytest.raises(ValueError, match="x must have 2 or 3 dimensions"):
        otcore.PointCloud(rand(N), rand(M, D, seed=1))
    with pytest.raises(ValueError, match="y must have 2 or 3 dimensions"):
        otcore.PointCloud(rand(N, D), rand(1, 2, M, D, seed=1))
    with pytest.raises(ValueError, match="x must not be empty"):
        otcore.PointCloud(rand(0, D), rand(M, D, seed=1))
    with pytest.raises(ValueError, match="C must have 2 or 3 dimensions"):
        otcore.CostMatrix(rand(N))
    with pytest.raises(ValueError, match="C must not be empty"):
        otcore.CostMatrix(rand(N, 0))


def test_weight_shape_mismatches():
    with pytest.raises(ValueError, match="a must have shape"):
        solve(a=uniform(N + 1))
    with pytest.raises(ValueError, match="b must have shape"):
        solve(b=uniform(M - 1))
    with pytest.raises(ValueError, match="a must have 1 dimensions"):
        solve(a=uniform(N)[None])
    gb = otcore.PointCloud(rand(2, N, D), rand(2, M, D, seed=1))
    with pytest.raises(ValueError, match="a must have 2 dimensions"):  # batched geometry, unbatched a
        otcore.sinkhorn(gb, torch.full((N,), 1.0 / N), eps=0.1)
    with pytest.raises(ValueError, match="b must have shape"):  # wrong batch size
        otcore.sinkhorn(gb, None, torch.full((3, M), 1.0 / M), eps=0.1)
    with pytest.raises(ValueError, match="a must have shape"):  # a sized like b
        otcore.sinkhorn(gb, torch.full((2, M), 1.0 / M), eps=0.1)


# ----------------------------------------------------------------------------- devices
def test_device_mismatch_with_meta_tensors():
    meta = torch.device("meta")
    with pytest.raises(ValueError, match="y is on meta"):
        otcore.PointCloud(x_(), torch.empty(M, D, dtype=torch.float64, device=meta))
    with pytest.raises(ValueError, match="a is on meta"):
        solve(a=torch.empty(N, dtype=torch.float64, device=meta))
    with pytest.raises(ValueError, match="b is on meta"):
        solve(b=torch.empty(M, dtype=torch.float64, device=meta))
    with pytest.raises(ValueError, match=r"init\[0\]"):
        solve(init=(torch.empty(N, dtype=torch.float64, device=meta), torch.zeros(M, dtype=torch.float64)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a real cross-device mismatch")
def test_device_mismatch_cpu_cuda():
    with pytest.raises(ValueError, match="y is on cuda"):
        otcore.PointCloud(x_(), y_().cuda())
    with pytest.raises(ValueError, match="a is on cuda"):
        solve(a=uniform(N).cuda())


# ----------------------------------------------------------------------------- scalars
@pytest.mark.parametrize("eps", [0.0, -0.1, NAN, INF])
def test_bad_eps_value(eps):
    with pytest.raises(ValueError, match="eps"):
        solve(eps=eps)


@pytest.mark.parametrize("eps", ["0.1", None, [0.1], True])
def test_bad_eps_type(eps):
    with pytest.raises(TypeError, match="eps"):
        solve(eps=eps)


@pytest.mark.parametrize("tol", [0.0, -1e-5, NAN])
def test_bad_tol(tol):
    with pytest.raises(ValueError, match="tol"):
        solve(tol=tol)


@pytest.mark.parametrize("max_iter,exc", [(0, ValueError), (-3, ValueError), (10.0, TypeError), ("10", TypeError), (True, TypeError)])
def test_bad_max_iter(max_iter, exc):
    with pytest.raises(exc, match="max_iter"):
        solve(max_iter=max_iter)


def test_bad_check_every():
    with pytest.raises(ValueError, match="check_every"):
        solve(check_every=0)
    with pytest.raises(TypeError, match="check_every"):
        solve(check_every=2.5)


@pytest.mark.parametrize("rho,exc", [(0.0, ValueError), (-1.0, ValueError), (NAN, ValueError), ((1.0, 2.0, 3.0), ValueError), ("1", TypeError), ((1.0, -2.0), ValueError), (INF, ValueError), ((1.0, INF), ValueError)])
def test_bad_rho(rho, exc):
    with pytest.raises(exc, match="rho"):
        solve(rho=rho)


# ----------------------------------------------------------------------------- choices
def test_infinite_rho_points_to_none():
    """POT spells an exact marginal reg_m = inf; otcore's is None, which the error names."""
    for rho, name in ((INF, "rho"), ((INF, 0.5), r"rho\[0\]")):
        with pytest.raises(ValueError, match=rf"{name} must be a finite number > 0, got inf: an exact .* rho=None"):
            solve(rho=rho)


def test_bad_cost_name():
    with pytest.raises(ValueError, match="cost"):
        otcore.PointCloud(x_(), y_(), cost="l1")
    with pytest.raises(ValueError, match="cost"):
        otcore.SinkhornLoss(cost="cosine")


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        solve(backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        solve(backend=None)


def test_bad_precision():
    with pytest.raises(ValueError, match="precision"):
        solve(precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        solve(precision="FP32")


# ----------------------------------------------------------------------------- init
def test_bad_init():
    f, g = torch.zeros(N, dtype=torch.float64), torch.zeros(M, dtype=torch.float64)
    with pytest.raises(TypeError, match="init"):
        solve(init=f)
    with pytest.raises(TypeError, match="init"):
        solve(init=(f,))
    with pytest.raises(TypeError, match="init"):
        solve(init=(f, g, g))
    with pytest.raises(ValueError, match=r"init\[0\]"):
        solve(init=(torch.zeros(N + 1, dtype=torch.float64), g))
    with pytest.raises(ValueError, match=r"init\[1\]"):
        solve(init=(f, torch.zeros(N, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"init\[1\]"):
        solve(init=(f, with_value(g, 0, NAN)))
    with pytest.raises(TypeError, match=r"init\[0\]"):
        solve(init=(np.zeros(N), g))
    with pytest.raises(TypeError, match=r"init\[0\]"):
        solve(init=(torch.zeros(N, dtype=torch.long), g))
    gb = otcore.PointCloud(rand(2, N, D), rand(2, M, D, seed=1))
    with pytest.raises(ValueError, match=r"init\[0\]"):  # batched geometry needs (B, n)
        otcore.sinkhorn(gb, eps=0.1, init=(torch.zeros(N), torch.zeros(2, M)))
    with pytest.raises(ValueError, match=r"init\[1\]"):
        otcore.sinkhorn(gb, eps=0.1, init=(torch.zeros(2, N), torch.zeros(3, M)))


# ----------------------------------------------------------------------------- eps_schedule
@pytest.mark.parametrize(
    "schedule,exc",
    [
        ("linear", ValueError),
        (1.5, ValueError),
        (0.0, ValueError),
        (-0.5, ValueError),
        (1.0, ValueError),
        ([0.5, 1.0], ValueError),  # increasing
        ([1.0, 0.05], ValueError),  # below the target eps = 0.1
        ([1.0, 0.1], ValueError),  # equal to the target
        ([1.0, -2.0], ValueError),
        ([1.0, NAN], ValueError),
        (["a"], TypeError),
        ({"geometric": 1}, TypeError),
        (True, TypeError),
        (torch.tensor([[[0.5]]]), TypeError),  # one element, but not a number nor a sequence
    ],
)
def test_bad_eps_schedule(schedule, exc):
    with pytest.raises(exc, match="eps_schedule"):
        solve(eps_schedule=schedule)


# ----------------------------------------------------------------------------- types
def test_non_tensor_inputs():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        otcore.PointCloud([[0.0, 1.0]], y_())
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        otcore.PointCloud(x_(), np.zeros((M, D)))
    with pytest.raises(TypeError, match="C must be a torch.Tensor"):
        otcore.CostMatrix(np.zeros((N, M)))
    with pytest.raises(TypeError, match="a must be a torch.Tensor"):
        solve(a=[1.0 / N] * N)
    with pytest.raises(TypeError, match="b must be a torch.Tensor"):
        solve(b=np.full(M, 1.0 / M))
    with pytest.raises(TypeError, match="geom"):
        otcore.sinkhorn(x_(), eps=0.1)
    with pytest.raises(TypeError, match="geom"):
        otcore.sinkhorn(np.zeros((N, M)), eps=0.1)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_tensors(dtype):
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        otcore.PointCloud(torch.zeros(N, D, dtype=dtype), y_())
    with pytest.raises(TypeError, match="C must be a floating tensor"):
        otcore.CostMatrix(torch.zeros(N, M, dtype=dtype))
    with pytest.raises(TypeError, match="a must be a floating tensor"):
        solve(a=torch.ones(N, dtype=dtype))


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("to_sparse", [torch.Tensor.to_sparse, torch.Tensor.to_sparse_csr], ids=["coo", "csr"])
def test_sparse_tensors_are_refused_by_name(to_sparse):
    """Solvers read dense entries: a sparse input is a TypeError naming it (it used to get past
    the checks and fail inside torch, e.g. "Could not run 'aten::linalg_vector_norm'")."""
    with pytest.raises(TypeError, match=r"^C must be a dense \(strided\) tensor, got layout torch.sparse_"):
        otcore.CostMatrix(to_sparse(torch.rand(N, M)))
    with pytest.raises(TypeError, match=r"^x must be a dense \(strided\) tensor"):
        otcore.PointCloud(to_sparse(x_()), y_())
    with pytest.raises(TypeError, match=r"^a must be a dense \(strided\) tensor"):
        solve(a=torch.full((N,), 1.0 / N).to_sparse())  # (CSR needs two dimensions)
    with pytest.raises(TypeError, match=r"^x must be a dense \(strided\) tensor"):
        otcore.SinkhornLoss(eps=0.1)(to_sparse(x_()), y_())
    with pytest.raises(TypeError, match=r"^v must be a dense \(strided\) tensor"):
        solve().apply(to_sparse(torch.ones(M, 2)), axis=1)
    with pytest.raises(TypeError, match=r"^scores must be a dense \(strided\) tensor"):
        otcore.SparseOTRouter(n_experts=4)(to_sparse(torch.randn(16, 4)))


# ----------------------------------------------------------------------------- fail fast, loss layer
def test_checks_run_before_any_work(monkeypatch):
    """A bad scalar argument is reported before a single primitive runs."""
    g = geom()
    calls = []
    monkeypatch.setattr(g, "softmin", lambda *a, **k: calls.append(a))
    for kw, name in (
        (dict(tol=-1.0), "tol"),
        (dict(max_iter=0), "max_iter"),
        (dict(eps_schedule="fast"), "eps_schedule"),
        (dict(init=(torch.zeros(1), torch.zeros(1))), "init"),
    ):
        with pytest.raises((ValueError, TypeError), match=name):
            otcore.sinkhorn(g, eps=0.1, **kw)
    assert calls == []


def test_sinkhorn_loss_rejects_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="eps"):
        otcore.SinkhornLoss(eps=0.0)
    with pytest.raises(ValueError, match="reduction"):
        otcore.SinkhornLoss(reduction="avg")
    with pytest.raises(TypeError, match="^debias must be a bool, got str$"):  # "False" is truthy
        otcore.SinkhornLoss(eps=0.1, debias="False")
    with pytest.raises(ValueError, match="eps_schedule"):  # at construction, not at the first call
        otcore.SinkhornLoss(eps=0.1, eps_schedule="linear")
    loss = otcore.SinkhornLoss(eps=0.1)
    with pytest.raises(ValueError, match="x contains NaN"):
        loss(with_value(x_(), (0, 0), NAN), y_())
    with pytest.raises(ValueError, match="dimension d"):
        loss(rand(N, 2), rand(M, 3, seed=1))
    with pytest.raises(ValueError, match="a has negative"):
        loss(x_(), y_(), with_value(uniform(N), 0, -0.2))
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        loss(x_(), y_().tolist())


def test_tiny_positive_eps_is_accepted_not_clamped():
    """Tiny-but-positive values are valid: eps = 1e-300 runs as given (log domain)."""
    res = otcore.sinkhorn(otcore.CostMatrix(torch.zeros(2, 2, dtype=torch.float64)), eps=1e-300)
    assert res.converged  # a zero cost: the plan is a x b for any eps
    torch.testing.assert_close(res.plan(), torch.full((2, 2), 0.25, dtype=torch.float64))
    assert res._eps == 1e-300  # the eps its plan is read at: as given, not clamped (the plan alone cannot tell)


def test_eps_or_gamma_whose_reciprocal_overflows_is_rejected_before_any_work():
    x, y = rand(5, 2, seed=3), rand(7, 2, seed=4)
    with pytest.raises(ValueError, match="eps=1e-40 is too small for float32"):
        otcore.sinkhorn(otcore.PointCloud(x, y), eps=1e-40)
    with pytest.raises(ValueError, match="gamma=1e-300 is too small for float32"):
        otcore.sparse_ot(otcore.PointCloud(x, y), k=2, gamma=1e-300)
    # float64 takes it (its reciprocal is finite there); where it does not, no advice to use float64
    geom64 = otcore.PointCloud(x.double(), y.double())
    assert otcore.sinkhorn(geom64, eps=1e-3, max_iter=100_000).converged
    with pytest.raises(ValueError, match=r"is too small for float64: .*rescale the cost\)$"):
        otcore.sinkhorn(geom64, eps=1e-320)


def test_eps_tensor_requiring_grad_and_non_bool_verbose_are_type_errors():
    geom = otcore.PointCloud(rand(5, 2, seed=5), rand(7, 2, seed=6))
    with pytest.raises(TypeError, match="eps must be a number: a tensor that requires grad"):
        otcore.sinkhorn(geom, eps=torch.tensor(0.1, requires_grad=True))
    assert otcore.sinkhorn(geom, eps=torch.tensor(0.1)).converged  # a plain scalar tensor is fine
    with pytest.raises(TypeError, match="verbose"):
        otcore.sinkhorn(geom, eps=0.1, verbose="yes")


def test_rho_outside_the_dtype_is_rejected_before_any_work():
    """1/rho and rho scale exp(-f/rho) and its penalty: in float32, rho = 1e-60 or 1e39 gave a
    NaN value (with converged=False); now an error names rho and the bound."""
    geom = otcore.PointCloud(rand(5, 2, seed=3), rand(7, 2, seed=4))
    with pytest.raises(ValueError, match="rho=1e-60 is too small for float32"):
        otcore.sinkhorn(geom, eps=0.1, rho=1e-60)
    # the kernels scale by log2(e)/rho: 3e-39 passed a check of 1/rho, and the Triton kernel's
    # test read inf (101 iterations where the torch path took 1, a review); eps alike
    with pytest.raises(ValueError, match=r"rho=3e-39 is too small for float32: .* >= 4\.2e-39"):
        otcore.sinkhorn(geom, eps=0.1, rho=3e-39)
    with pytest.raises(ValueError, match=r"eps=3e-39 is too small for float32"):
        otcore.sinkhorn(geom, eps=3e-39)
    with pytest.raises(ValueError, match=r"rho=1e\+39 is too large for float32"):
        otcore.sinkhorn(geom, eps=0.1, rho=(None, 1e39))
    assert otcore.sinkhorn(otcore.PointCloud(rand(5, 2, seed=3).double(), rand(7, 2, seed=4).double()),
                           eps=0.1, rho=1e39).converged  # fine in float64


def test_sinkhorn_loss_takes_a_pair_of_equal_penalties():
    x, y = rand(6, 2, seed=1).double(), rand(5, 2, seed=2).double()
    a, b = torch.full((6,), 0.3, dtype=torch.float64), torch.full((5,), 0.2, dtype=torch.float64)
    one = otcore.SinkhornLoss(eps=0.1, rho=0.5, tol=1e-10)(x, y, a, b)
    assert otcore.SinkhornLoss(eps=0.1, rho=(0.5, 0.5), tol=1e-10)(x, y, a, b) == one
    assert otcore.SinkhornLoss(eps=0.1, rho=[None, None])(x, y).shape == ()


@pytest.mark.parametrize("kw, name", [(dict(rho=-1), "rho"), (dict(rho=(None, 0.5)), "rho"), (dict(tol=0), "tol"),
                                      (dict(max_iter=0), "max_iter"), (dict(backend="gpu"), "backend"),
                                      (dict(precision="fp16"), "precision")])
def test_sinkhorn_loss_checks_its_arguments_at_construction(kw, name):
    with pytest.raises(ValueError, match=name):
        otcore.SinkhornLoss(**kw)


@pytest.mark.parametrize("rho, err, msg", [((torch.ones(2), torch.ones(2)), TypeError, r"rho\[0\] must be a number"),
                                           ((np.ones(2), np.ones(2)), TypeError, r"rho\[0\] must be a number"),
                                           ((math.nan, math.nan), ValueError, r"rho\[0\] must be a finite number")])
def test_sinkhorn_loss_checks_each_entry_of_a_rho_pair(rho, err, msg):
    """Each entry is checked before the pair's equality: two arrays raised the ambiguous truth
    value error of torch or NumPy, and (nan, nan) was called a pair of unequal ones."""
    with pytest.raises(err, match=msg):
        otcore.SinkhornLoss(rho=rho)


@pytest.mark.parametrize("backend", ["auto", "cuda", "Torch"])
def test_geometry_primitives_take_a_resolved_backend_only(backend):
    """The primitives ran the torch path for any unknown backend string, silently."""
    geom = otcore.PointCloud(rand(5, 2, seed=1), rand(7, 2, seed=2))
    with pytest.raises(ValueError, match="backend must be 'torch' or 'triton' for a geometry primitive"):
        geom.softmin(torch.zeros(1, 7), 0.1, 1, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sinkhorn_steps_checks_its_potentials_weights_and_mask(backend):
    """The kernels index ``loga``, ``logb`` and ``active`` by the geometry's sizes (a short
    one was read past its end) while the twin broadcast a batch of one."""
    g = otcore.PointCloud(rand(2, 7, 3), rand(2, 9, 3, seed=1))
    f, gg, la, lb = torch.zeros(2, 7), torch.zeros(2, 9), torch.full((2, 7), -math.log(7)), torch.full((2, 9), -math.log(9))
    on = torch.ones(2, dtype=torch.bool)
    bad = {"f": dict(f=f[:1]), "g": dict(g=gg[:, :5]), "loga": dict(loga=la[:, :1]), "logb": dict(logb=lb[:1]),
           "active": dict(active=on[:1])}
    for name, change in bad.items():
        args = dict(dict(f=f, g=gg, loga=la, logb=lb, active=on), **change)
        with pytest.raises(ValueError, match=f"^{name} must be a"):
            g.sinkhorn_steps(args["f"], args["g"], args["loga"], args["logb"], 0.1, (1.0, 1.0), 2, args["active"],
                             backend=backend)
    with pytest.raises(ValueError, match="^active must be a"):
        g.sinkhorn_steps(f, gg, la, lb, 0.1, (1.0, 1.0), 2, on.float(), backend=backend)
    assert g.sinkhorn_steps(f, gg, la, lb, 0.1, (1.0, 1.0), 2, on, backend=backend)[0].shape == (2, 7)


def test_a_one_element_schedule_is_one_stage_whatever_its_type():
    """A 1-d tensor is a sequence at any length, as a 1-d array and a list are: a one-element
    tensor had been read as a decay factor (gamma_schedule=torch.tensor([5.0]) a ValueError
    where [5.0] is one stage; torch.tensor([0.5]) three stages where np.array([0.5]) is one,
    a review). A 0-d tensor is the factor."""
    C = otcore.CostMatrix(torch.rand(9, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    for stage in ([5.0], (5.0,), np.array([5.0]), torch.tensor([5.0])):
        assert otcore.sparse_ot(C, k=9, gamma=0.01, gamma_schedule=stage).info["gamma_stages"] == [5.0]
    assert otcore.sparse_ot(C, k=9, gamma=0.01, gamma_schedule=torch.tensor([0.5])).info["gamma_stages"] == [0.5]
    factor = otcore.sparse_ot(C, k=9, gamma=0.01, gamma_schedule=0.5).info["gamma_stages"]
    assert len(factor) > 1 and otcore.sparse_ot(C, k=9, gamma=0.01, gamma_schedule=torch.tensor(0.5)).info[
        "gamma_stages"] == factor
    for sched in ([0.5], np.array([0.5]), torch.tensor([0.5], dtype=torch.float64)):
        assert otcore.sinkhorn(C, eps=0.1, eps_schedule=sched).info["eps_stages"] == [0.5]
    assert otcore.sinkhorn(C, eps=0.01, eps_schedule=torch.tensor(0.5)).info["eps_stages"] == \
        otcore.sinkhorn(C, eps=0.01, eps_schedule=0.5).info["eps_stages"]


def test_zero_d_numpy_numbers_are_numbers():
    """A 0-d NumPy array (what ``np.asarray``, ``np.median`` and friends hand on) counts as its
    number wherever a number is asked for, as NumPy scalars and one-element tensors do, and a
    1-d array as a schedule's sequence; the results equal those of the plain floats. A 0-d
    bool or a longer array is still rejected, naming the argument."""
    C = otcore.CostMatrix(torch.rand(9, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    ref = otcore.sinkhorn(C, eps=0.05, tol=1e-8, eps_schedule=0.5, overrelax=1.5)
    got = otcore.sinkhorn(C, eps=np.array(0.05), tol=np.array(1e-8), eps_schedule=np.array(0.5),
                          overrelax=np.array(1.5))
    assert torch.equal(got.f, ref.f) and got.n_iter == ref.n_iter
    ref = otcore.sparse_ot(C, k=9, gamma=0.01, tol=1e-9, gamma_schedule=[0.08, 0.02])
    got = otcore.sparse_ot(C, k=np.array(9), gamma=np.array(0.01), tol=np.array(1e-9),
                           gamma_schedule=np.array([0.08, 0.02]))
    assert torch.equal(got.values, ref.values) and got.info["gamma_stages"] == [0.08, 0.02]
    got = otcore.sparse_ot(C, k=9, gamma=0.01, tol=1e-9, gamma_schedule=torch.tensor([0.08, 0.02], dtype=torch.float64))
    assert torch.equal(got.values, ref.values) and got.info["gamma_stages"] == [0.08, 0.02]
    with pytest.raises(TypeError, match="gamma must be a number"):
        otcore.sparse_ot(C, k=9, gamma=np.array([0.01, 0.02]))
    with pytest.raises(TypeError, match="eps must be a number"):
        otcore.sinkhorn(C, eps=np.array(True))
    with pytest.raises(TypeError, match="overrelax must be"):
        otcore.sinkhorn(C, eps=0.05, overrelax=np.array([1.5, 1.2]))
    # overrelax: NumPy bools are bools, a one-element tensor is a factor (as for other numbers)
    flags = [otcore.sinkhorn(C, eps=0.05, tol=1e-8, overrelax=v).info.get("overrelax") is not None
             for v in (np.bool_(True), np.array(False), torch.tensor(1.5))]
    assert flags == [True, False, True]
    with pytest.raises(ValueError, match="overrelax as a factor must be in"):
        otcore.sinkhorn(C, eps=0.05, overrelax=torch.tensor(2.5))
    with pytest.raises(ValueError, match="eps_schedule as a decay factor"):
        otcore.sinkhorn(C, eps=0.05, eps_schedule=np.array(1.5))


def test_warnings_name_the_callers_line():
    """Every warning of a solve names the line that called otcore, through whatever frames
    lie between: torch.compiler.disable's wrapper had moved the solvers' warnings to torch's
    eval_frame.py, and the router's went to torch's module.py (a review)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(30, 2, generator=g), torch.rand(20, 2, generator=g)
    scores = torch.randn(64, 8, generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        otcore.sinkhorn(otcore.PointCloud(x, y), eps=1e-3, max_iter=13)
        otcore.sinkhorn(otcore.PointCloud(x, y), eps=0.1, tol=0.5)  # tol against the mass
        otcore.sinkhorn_newton(otcore.PointCloud(x, y), eps=1e-3, max_iter=1, warmup_iter=1)
        otcore.sparse_ot(otcore.PointCloud(x, y), k=2, gamma=1e-3, max_iter=2)
        otcore.SinkhornLoss(eps=1e-3, max_iter=13)(x, y)
        otcore.SparseOTRouter(8, gamma=0.5, max_iter=1)(scores)  # unconverged
        otcore.SparseOTRouter(8)(torch.zeros(64, 8))  # tied scores
    what = [(w.category.__name__, str(w.message)[:40]) for w in caught]
    assert len({w.lineno for w in caught}) == 7, what  # one line or more from each of the seven calls
    assert all(w.filename == __file__ for w in caught), [(w.filename, w.lineno) for w in caught]
