"""Envelope-theorem gradients of ``OTResult.value`` / ``.cost`` (torch path, float64).

``torch.autograd.gradcheck`` compares the analytic gradient with central finite
differences of fresh, tightly converged solves. For balanced problems ``a`` and
``b`` live on a simplex (a perturbation must keep the masses equal), so their
gradient is checked by directional finite differences along zero-sum directions.
"""

import numpy as np
import pytest
import torch

import otcore

T = dict(backend="torch")
# a solve that does not converge must not pass silently: unexpected warnings fail the test
pytestmark = pytest.mark.filterwarnings("error::otcore.ConvergenceWarning")
F64 = torch.float64
SOLVE = dict(tol=1e-13, max_iter=50_000, **T)


def rand(*shape, seed=0, dtype=F64):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def simplex(n, seed):
    w = rand(n, seed=seed) + 0.3
    return w / w.sum()


def value_fn(cost="sqeuclidean", eps=0.1, rho=None, which="value", a=None, b=None):
    def f(x, y):
        res = otcore.sinkhorn(otcore.PointCloud(x, y, cost=cost), a, b, eps=eps, rho=rho, **SOLVE)
        assert res.converged
        return getattr(res, which)

    return f


@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean"])
@pytest.mark.parametrize("rho", [None, 0.5])
def test_gradcheck_value_wrt_points(cost, rho):
    x = rand(5, 2, seed=1).requires_grad_(True)
    y = rand(6, 2, seed=2).requires_grad_(True)
    a, b = simplex(5, 3), simplex(6, 4)
    assert torch.autograd.gradcheck(value_fn(cost, rho=rho, a=a, b=b), (x, y), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_value_wrt_cost_matrix():
    C = rand(4, 5, seed=1).requires_grad_(True)

    def f(C):
        return otcore.sinkhorn(otcore.CostMatrix(C), eps=0.1, **SOLVE).value

    assert torch.autograd.gradcheck(f, (C,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_unbalanced_value_wrt_everything():
    """Unbalanced: a and b are free (no mass constraint), so gradcheck applies directly."""
    x = rand(4, 2, seed=1).requires_grad_(True)
    y = rand(5, 2, seed=2).requires_grad_(True)
    a = (rand(4, seed=3) + 0.2).requires_grad_(True)
    b = (rand(5, seed=4) + 0.2).requires_grad_(True)

    def f(x, y, a, b):
        return otcore.sinkhorn(otcore.PointCloud(x, y), a, b, eps=0.1, rho=(0.3, 0.7), **SOLVE).value

    assert torch.autograd.gradcheck(f, (x, y, a, b), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_semi_unbalanced_weight_of_relaxed_side():
    C = rand(4, 5, seed=5)
    a = simplex(4, 1)
    b = (rand(5, seed=2) + 0.2).requires_grad_(True)

    def f(b):
        return otcore.sinkhorn(otcore.CostMatrix(C), a, b, eps=0.1, rho=(None, 0.5), **SOLVE).value

    assert torch.autograd.gradcheck(f, (b,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_balanced_weight_gradient_along_zero_sum_directions():
    n, m, eps, h = 6, 7, 0.1, 1e-5
    x, y = rand(n, 2, seed=1), rand(m, 2, seed=2)
    a0, b0 = simplex(n, 3), simplex(m, 4)
    a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    geom = otcore.PointCloud(x, y)
    res = otcore.sinkhorn(geom, a, b, eps=eps, **SOLVE)
    ga, gb = torch.autograd.grad(res.value, (a, b))
    assert ga.shape == (n,) and gb.shape == (m,)

    def val(aa, bb):
        return float(otcore.sinkhorn(geom, aa, bb, eps=eps, **SOLVE).value)

    for seed in range(3):
        da = rand(n, seed=10 + seed) - 0.5
        da -= da.mean()
        db = rand(m, seed=20 + seed) - 0.5
        db -= db.mean()
        fd_a = (val(a0 + h * da, b0) - val(a0 - h * da, b0)) / (2 * h)
        fd_b = (val(a0, b0 + h * db) - val(a0, b0 - h * db)) / (2 * h)
        assert float(ga @ da) == pytest.approx(fd_a, rel=1e-5, abs=1e-8)
        assert float(gb @ db) == pytest.approx(fd_b, rel=1e-5, abs=1e-8)
        # moving mass between both sides at once
        t = 0.5
        fd_ab = (val(a0 + h * da, b0 + h * t * db) - val(a0 - h * da, b0 - h * t * db)) / (2 * h)
        assert float(ga @ da + t * (gb @ db)) == pytest.approx(fd_ab, rel=1e-5, abs=1e-8)


def test_cost_gradient_wrt_cost_matrix_is_the_plan():
    C = rand(7, 9, seed=1).requires_grad_(True)
    res = otcore.sinkhorn(otcore.CostMatrix(C), eps=0.05, **SOLVE)
    (g,) = torch.autograd.grad(res.cost, C)
    torch.testing.assert_close(g, res.plan(), rtol=1e-12, atol=0)
    # the value's gradient w.r.t. C is the plan too (envelope theorem)
    res = otcore.sinkhorn(otcore.CostMatrix(C), eps=0.05, **SOLVE)
    (gv,) = torch.autograd.grad(res.value, C)
    torch.testing.assert_close(gv, res.plan(), rtol=1e-12, atol=0)


def test_cost_gradient_wrt_points_holds_the_plan_fixed():
    """d<P, C>/dx with P frozen: 2 (x_i (P1)_i - (P y)_i) for the squared Euclidean cost."""
    x = rand(6, 3, seed=1).requires_grad_(True)
    y = rand(8, 3, seed=2).requires_grad_(True)
    res = otcore.sinkhorn(otcore.PointCloud(x, y), eps=0.1, **SOLVE)
    gx, gy = torch.autograd.grad(res.cost, (x, y))
    P = res.plan()
    xd, yd = x.detach(), y.detach()
    torch.testing.assert_close(gx, 2 * (xd * P.sum(1, keepdim=True) - P @ yd))
    torch.testing.assert_close(gy, 2 * (yd * P.sum(0)[:, None] - P.T @ xd))


def test_value_gradient_matches_plan_formula_for_sqeuclidean():
    x = rand(6, 3, seed=1).requires_grad_(True)
    y = rand(8, 3, seed=2).requires_grad_(True)
    res = otcore.sinkhorn(otcore.PointCloud(x, y), eps=0.1, **SOLVE)
    (gx,) = torch.autograd.grad(res.value, x)
    P = res.plan()
    torch.testing.assert_close(gx, 2 * (x.detach() * P.sum(1, keepdim=True) - P @ y.detach()))


def test_batched_gradients_equal_per_problem_gradients():
    x = rand(2, 5, 2, seed=1).requires_grad_(True)
    y = rand(2, 6, 2, seed=2).requires_grad_(True)
    a = torch.stack([simplex(5, 3), simplex(5, 4)]).requires_grad_(True)
    res = otcore.sinkhorn(otcore.PointCloud(x, y), a, eps=0.1, **SOLVE)
    w = torch.tensor([1.0, -2.0], dtype=F64)
    gx, gy, ga = torch.autograd.grad((res.value * w).sum(), (x, y, a))
    for i in range(2):
        xi, yi = x[i].detach().clone().requires_grad_(True), y[i].detach().clone().requires_grad_(True)
        ai = a[i].detach().clone().requires_grad_(True)
        one = otcore.sinkhorn(otcore.PointCloud(xi, yi), ai, eps=0.1, **SOLVE)
        gxi, gyi, gai = torch.autograd.grad(one.value, (xi, yi, ai))
        torch.testing.assert_close(gx[i], w[i] * gxi)
        torch.testing.assert_close(gy[i], w[i] * gyi)
        torch.testing.assert_close(ga[i], w[i] * gai)


def test_value_and_cost_both_backpropagate():
    """d(value + cost)/dC = 2P."""
    C = rand(5, 5, seed=3).requires_grad_(True)
    res = otcore.sinkhorn(otcore.CostMatrix(C), eps=0.1, **SOLVE)
    (res.value + res.cost).backward()
    torch.testing.assert_close(C.grad, 2 * res.plan())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gradient_dtype_follows_the_input(dtype):
    x = rand(6, 2, seed=1).to(dtype).requires_grad_(True)
    y = rand(7, 2, seed=2).to(dtype)
    res = otcore.sinkhorn(otcore.PointCloud(x, y), eps=0.1, **T)
    res.value.backward()
    assert x.grad is not None and x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()
    # same numbers as the float32 solve on the rounded inputs
    x32 = x.detach().float().requires_grad_(True)
    otcore.sinkhorn(otcore.PointCloud(x32, y.float()), eps=0.1, **T).value.backward()
    torch.testing.assert_close(x.grad.float(), x32.grad.to(dtype).float())


def test_the_weights_gradient_of_the_cost_is_zero_where_the_value_s_is_minus_inf():
    """A zero weight on a relaxed side whose potential falls below -88 rho has a value
    gradient of -inf (conventions.md); times the cost's 0 it made the cost's weight gradient
    NaN, and in a batch the weights of a problem outside the objective NaN (a review)."""
    C = torch.rand(2, 10, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    C[:, 0] = -1000.0  # the zero-weight point's row: very cheap
    a = torch.full((2, 10), 1 / 9)
    a[:, 0] = 0.0
    a.requires_grad_()
    res = otcore.sinkhorn(otcore.CostMatrix(C), a, None, eps=0.1, rho=1.0, **T)
    assert res.converged.all()
    (gv,) = torch.autograd.grad(res.value.sum(), a, retain_graph=True)
    assert torch.isneginf(gv[:, 0]).all() and torch.isfinite(gv[:, 1:]).all()
    (gc,) = torch.autograd.grad(res.cost.sum(), a, retain_graph=True)
    assert torch.equal(gc, torch.zeros_like(gc))
    (g0,) = torch.autograd.grad(res.value[0], a)
    assert torch.isneginf(g0[0, 0]) and torch.equal(g0[1], torch.zeros_like(g0[1]))


def test_no_graph_without_requires_grad():
    res = otcore.sinkhorn(otcore.PointCloud(rand(4, 2), rand(5, 2, seed=1)), eps=0.1, **T)
    assert not res.value.requires_grad and not res.cost.requires_grad
    assert not res.f.requires_grad and not res.g.requires_grad


def test_only_some_inputs_require_grad():
    x = rand(4, 2, seed=1)
    y = rand(5, 2, seed=2).requires_grad_(True)
    b = simplex(5, 3)
    res = otcore.sinkhorn(otcore.PointCloud(x, y), None, b, eps=0.1, **SOLVE)
    (gy,) = torch.autograd.grad(res.value, y)
    P = res.plan()
    torch.testing.assert_close(gy, 2 * (y.detach() * P.sum(0)[:, None] - P.T @ x))
    assert x.grad is None


@pytest.mark.parametrize("solver", ["sinkhorn", "sparse_ot"])
def test_backward_after_an_in_place_change_of_the_inputs_raises(solver):
    """backward re-reads the geometry's inputs: after an in-place change it would mix the
    new points with the old solution, so it raises as torch does for saved tensors."""
    g = torch.Generator().manual_seed(11)
    x = torch.rand(6, 2, dtype=torch.float64, generator=g).requires_grad_()
    y = torch.rand(7, 2, dtype=torch.float64, generator=g)
    geom = otcore.PointCloud(x, y)
    res = otcore.sinkhorn(geom, eps=0.1) if solver == "sinkhorn" else otcore.sparse_ot(geom, k=2, gamma=0.5)
    with torch.no_grad():
        x.add_(0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        res.value.backward()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("geometry", ["points", "matrix"])
@pytest.mark.parametrize("rho", [None, 0.5, (0.5, None), (None, 0.5)])
def test_float32_value_and_weight_gradients_stay_accurate_at_large_eps(backend, geometry, rho):
    """A float32 softmin resolves ``s`` only to ~eps * 2^-24; the value and the weights'
    gradient, which carry ``eps (exp((f - s)/eps) - 1)``, take that pass in float64 once
    eps exceeds a quarter of the diameter. Without it: 9e-4 (value) and 9e-3 (gradient)
    relative error at eps = 1e4 here. Semi-relaxed (one ``rho`` None): the exact side's
    float32 potential also shifts the relaxed side's weight gradient, by about its error
    (1e-3 relative at eps = 1e4 on the unit square with only that pass): both potentials
    are refined in float64."""
    x, y = rand(37, 2, seed=3), rand(53, 2, seed=4)
    a, b = simplex(37, 5), simplex(53, 6)
    if rho is not None:  # the same problem in both dtypes (at eps = 1e4 the potentials move by eps * da / a)
        a, b = a.float().double(), b.float().double()
    out = {}
    for dt in (torch.float32, F64):
        A, Bw = a.to(dt), b.to(dt)
        if rho is None:
            Bw = (Bw * (A.sum() / Bw.sum())).detach()  # equal masses in float32 too
        A, Bw = A.requires_grad_(), Bw.requires_grad_()
        X, Y = x.to(dt).requires_grad_(), y.to(dt)
        geom = otcore.PointCloud(X, Y) if geometry == "points" else otcore.CostMatrix(torch.cdist(X, Y) ** 2)
        res = otcore.sinkhorn(geom, A, Bw, eps=1e4, rho=rho, backend=backend, tol=1e-6 if dt != F64 else 1e-12)
        assert res.converged
        grads = torch.autograd.grad(res.value, (A, Bw, X))
        # a balanced problem's weight gradients are defined up to a constant
        centre = lambda t, w: t if rho is not None else t - (t * w).sum()  # noqa: E731
        out[dt] = (res.value.double(), centre(grads[0], a.to(dt)).double(), centre(grads[1], b.to(dt)).double(),
                   grads[2].double())
    v32, v64 = out[torch.float32][0], out[F64][0]
    assert abs(v32 - v64) <= 2e-7 * abs(v64)
    for g32, g64 in zip(out[torch.float32][1:], out[F64][1:]):
        assert (g32 - g64).abs().max() <= 2e-6 * g64.abs().max()


@pytest.mark.parametrize("weights", [None, F64])
@pytest.mark.parametrize("eps", [10.0, 100.0, 1000.0])
def test_sinkhorn_loss_float32_at_large_eps_matches_float64(eps, weights):
    """The debiased loss cancels three values ~1e3 times its size (here: diameter ~ 2).
    Before the float64 value pass its float32 error was 4% at eps = 100; after it, while
    each term was still rounded to float32 and took the uniform weights' float32 ``1/n``
    (2e-8 off: the value's error), 2.6e-5 to 9.6e-5 here (1.6e-3 on another sample, a
    review). The terms are now combined before the one rounding, with ``1/n`` in float64:
    2.5e-7 to 3e-7. Float64 weights given on float32 points are read as given there (their
    float32 copies, the solve's, had left the loss 3e-4 off, a review)."""
    x, y = rand(200, 2, seed=7), rand(150, 2, seed=8)
    w = () if weights is None else (torch.full((200,), 1 / 200, dtype=F64), torch.full((150,), 1 / 150, dtype=F64))
    l64 = otcore.SinkhornLoss(eps=eps, tol=1e-10, backend="torch")(x, y)
    l32 = otcore.SinkhornLoss(eps=eps, backend="torch")(x.float(), y.float(), *w)
    assert l32.dtype == torch.float32
    assert abs(float(l32) - float(l64)) <= 2e-6 * abs(float(l64))


@pytest.mark.parametrize("solver", ["sinkhorn", "sparse_ot"])
def test_second_derivatives_raise_instead_of_dropping_terms(solver):
    """A gradient penalty through an OT value: the envelope gradients are first-order, so
    differentiating them raises (before, value + |grad|^2 backpropagated with the penalty's
    gradient silently missing: 0.0484 instead of 0.0656 by finite differences)."""
    def solve(geom):
        return otcore.sinkhorn(geom, eps=0.1, **T) if solver == "sinkhorn" else otcore.sparse_ot(geom, k=2, gamma=0.5)

    x, y = rand(8, 2, seed=1).requires_grad_(), rand(6, 2, seed=2)
    res = solve(otcore.PointCloud(x, y))
    (gx,) = torch.autograd.grad(res.value, x, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives of OT values are not supported"):
        (res.value + (gx**2).sum()).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives of OT values are not supported"):
        torch.autograd.grad((gx**2).sum(), x)  # (returned None or zeros when the mark hung on a detached copy)
    with pytest.raises(RuntimeError, match="second derivatives of OT values are not supported"):
        torch.autograd.functional.hessian(lambda p: solve(otcore.PointCloud(p, y)).value, x.detach())
    # create_graph for other parts of a model still works: only differentiating the OT part raises
    res = otcore.sinkhorn(otcore.PointCloud(x, rand(6, 2, seed=2)), eps=0.1, **T)
    (gx,) = torch.autograd.grad(res.value + (x**3).sum(), x, create_graph=True)
    assert gx.requires_grad


def test_result_methods_and_backward_ignore_autocast():
    """Under CPU autocast (bf16) the streamed plan products and the backward pass ran their
    matmuls in bf16 (3e-3 relative off at d = 12); they run in the solve's precision."""
    x, y = rand(40, 12, seed=3, dtype=torch.float32).requires_grad_(), rand(30, 12, seed=4, dtype=torch.float32)
    res = otcore.sinkhorn(otcore.PointCloud(x, y), eps=1.2, **T)
    v = rand(30, 5, seed=5, dtype=torch.float32)
    want_apply, (want_gx,) = res.apply(v), torch.autograd.grad(res.value, x, retain_graph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_apply, (got_gx,) = res.apply(v), torch.autograd.grad(res.value, x)
    torch.testing.assert_close(got_apply, want_apply, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_gx, want_gx, rtol=1e-6, atol=0)


def test_result_methods_refuse_inputs_changed_in_place_since_the_solve():
    """plan(), apply() and topk() re-read the geometry: after an optimizer step on x they
    mixed the new points with the old potentials (row sums 9% off, silently)."""
    x = rand(8, 2, seed=6).requires_grad_()
    for geom in (otcore.PointCloud(x, rand(6, 2, seed=7)), otcore.CostMatrix(rand(8, 6, seed=8))):
        res = otcore.sinkhorn(geom, eps=0.1, **T)
        res.plan(), res.topk(2)  # fine before
        with torch.no_grad():
            geom.inputs()[0].add_(0.1)
        for call in (res.plan, lambda: res.apply(torch.ones(6, dtype=F64)), lambda: res.topk(2)):
            with pytest.raises(RuntimeError, match="modified in place since the solve"):
                call()
    # an inference tensor on one side (no version counter) leaves the other side checked
    with torch.inference_mode():
        y_inf = rand(6, 2, seed=7)
    x2 = rand(8, 2, seed=6)
    res = otcore.sinkhorn(otcore.PointCloud(x2, y_inf), eps=0.1, **T)
    x2.add_(0.1)
    with pytest.raises(RuntimeError, match="modified in place since the solve"):
        res.plan()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_cost_matrix_sees_in_place_changes_in_every_dtype(dtype):
    """An fp16/bf16 matrix is held as a float32 copy, taken once: after ``C.mul_(2)`` a solve
    on the same geometry used the old cost (float32 and float64 ones, views, saw the new one;
    a review). The copy is made again when the input's version changes."""
    C = torch.rand(20, 30, generator=torch.Generator().manual_seed(0)).to(dtype)
    geom = otcore.CostMatrix(C)
    before = otcore.sinkhorn(geom, eps=0.1, **T).value
    C.mul_(2)
    after = otcore.sinkhorn(geom, eps=0.1, **T).value
    fresh = otcore.sinkhorn(otcore.CostMatrix(C), eps=0.1, **T).value
    assert float(after) > 1.2 * float(before)
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inference_tensors_changed_in_place_are_read_again_by_the_next_solve(backend):
    """Under torch.inference_mode() the inputs carry no version counter, and every load had
    recorded (None, None): a geometry reused after ``x.add_(5)`` solved its cached old cost
    on the torch backend (value 0.23 for 48, converged) while the Triton one read the new
    points, and an fp16 matrix kept its old float32 copy (a review). Such inputs are now
    read again at the start of every solve and result method, alike on both backends.
    The Triton path caches copies of fp16 points (their float32 copy) and of d > 8 points
    (centred): a stamp that did not change had kept serving them (fp16: the old value,
    0.23 for 18, converged; a mutation test), where float32 d = 2 points are views."""
    with torch.inference_mode():
        x, y = rand(8, 2, seed=80, dtype=torch.float32), rand(6, 2, seed=81, dtype=torch.float32)
        C = rand(8, 6, seed=82, dtype=torch.float32).half()
        xh, yh = rand(9, 2, seed=83, dtype=torch.float32).half(), rand(7, 2, seed=84, dtype=torch.float32).half()
        x17, y17 = rand(9, 17, seed=83, dtype=torch.float32), rand(7, 17, seed=84, dtype=torch.float32)
        for geom, inp in ((otcore.PointCloud(x, y), x), (otcore.CostMatrix(C), C), (otcore.PointCloud(xh, yh), xh),
                          (otcore.PointCloud(x17, y17), x17)):
            kw = dict(eps=0.1 if inp is not x17 else 0.5, backend=backend if geom.cost != "matrix" else "torch")
            res = otcore.sinkhorn(geom, **kw)
            inp.add_(5.0 if inp is x else 3.0)
            again = otcore.sinkhorn(geom, **kw)
            fresh = otcore.sinkhorn(type(geom)(*(t.clone() for t in geom.inputs())), **kw)
            assert float(again.value) > 2 * float(res.value)
            torch.testing.assert_close(again.value, fresh.value, rtol=1e-6, atol=0)
            # a result's methods read the inputs as they are now (nothing tells the change)
            if inp is x:
                live = torch.exp((res._F[0][:, None] + res._G[0][None] - torch.cdist(x, y) ** 2) / 0.1)
                torch.testing.assert_close(res.plan(), live, rtol=1e-5, atol=1e-30)
        # a sparse_ot solve re-reads them too
        geom = otcore.PointCloud(x, y)
        first = otcore.sparse_ot(geom, k=2, gamma=0.5, backend=backend)
        x.mul_(0.5)
        torch.testing.assert_close(otcore.sparse_ot(geom, k=2, gamma=0.5, backend=backend).value,
                                   otcore.sparse_ot(otcore.PointCloud(x.clone(), y), k=2, gamma=0.5,
                                                    backend=backend).value, rtol=1e-6, atol=0)
        assert float(first.value) != float(otcore.sparse_ot(geom, k=2, gamma=0.5, backend=backend).value)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_tracked_input_beside_an_inference_tensor_is_followed(backend):
    """A geometry of an inference tensor and a normal one: the normal one's in-place change
    is seen by the next primitive call, as before inference tensors got a stamp per load
    (the stamp had hidden it: the cached cost 4.8 off, Triton's centred features 16 off, a
    review). d = 17: the Triton path caches centred points."""
    with torch.inference_mode():
        x = rand(9, 17, seed=85, dtype=torch.float32)
    y = rand(7, 17, seed=86, dtype=torch.float32)
    geom = otcore.PointCloud(x, y)
    otcore.sinkhorn(geom, eps=0.1, backend=backend, tol=None, max_iter=5)
    y.add_(1.0)
    want = torch.cdist(x, y) ** 2
    torch.testing.assert_close(geom.cost_block()[0], want, rtol=1e-6, atol=1e-5)
    s = geom.softmin(torch.zeros(1, 7), 0.1, 1, backend=backend)[0]
    torch.testing.assert_close(s, -0.1 * torch.logsumexp(-want / 0.1, 1), rtol=1e-5, atol=1e-5)


def test_a_compiled_solve_sees_in_place_changes_of_its_inputs():
    """A compiled function solving on a geometry made outside it: the graph had read the
    small problem's cached cost and returned its first call's value forever after
    x.add_(0.5) (0.189 for 0.585, a review). While compiling the cache is not used."""
    x, y = rand(9, 2, seed=87, dtype=torch.float32), rand(7, 2, seed=88, dtype=torch.float32)
    geom = otcore.PointCloud(x, y)
    solve = torch.compile(lambda g: otcore.sinkhorn(g, eps=0.1, **T).value, backend="eager")
    before = solve(geom)
    x.add_(0.5)
    after = solve(geom)
    fresh = otcore.sinkhorn(otcore.PointCloud(x.clone(), y), eps=0.1, **T).value
    assert float(after) > 2 * float(before)
    torch.testing.assert_close(after, fresh, rtol=1e-5, atol=0)


_SOLVES = {
    "sinkhorn": lambda g: otcore.sinkhorn(g, eps=0.1, **T),
    "sinkhorn_newton": lambda g: otcore.sinkhorn_newton(g, eps=0.1, **T),
    "sparse_ot": lambda g: otcore.sparse_ot(g, k=3, gamma=0.1, **T),
}


@pytest.mark.parametrize("solver", sorted(_SOLVES))
def test_compiled_solvers_are_opaque_calls(solver):
    """The three solvers under torch.compile are one opaque call each, like the loss: the
    traced loop had failed a guard of torch's own on inference tensors (an AssertionError
    from every solver under torch.inference_mode()), and compiled for minutes. Values and
    gradients are the eager ones, bit for bit."""
    x, y = rand(11, 2, seed=89, dtype=torch.float32), rand(8, 2, seed=90, dtype=torch.float32)
    solve = _SOLVES[solver]
    compiled = torch.compile(lambda x, y: solve(otcore.PointCloud(x, y)).value, backend="eager")
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        assert torch.equal(compiled(xi, yi), solve(otcore.PointCloud(xi, yi)).value)
    xg = x.clone().requires_grad_()
    got = torch.autograd.grad(compiled(xg, y), xg)[0]
    want = torch.autograd.grad(solve(otcore.PointCloud(xg, y)).value, xg)[0]
    assert got.abs().max() > 0 and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_copied_geometry_reads_its_own_inputs(dtype, how):
    """A geometry copied after an in-place change of its inputs and before it re-read them
    kept its cached cost (and fp16 copies) with the loaded versions, which the copy's fresh
    counters could equal: the copy solved the old cost (0.18 for 50, a review)."""
    import copy
    import pickle

    x, y = rand(8, 2, seed=83, dtype=torch.float32).to(dtype), rand(6, 2, seed=84, dtype=torch.float32).to(dtype)
    x.mul_(1.0), y.mul_(1.0)  # version 1, as a copy's counters will be
    geom = otcore.PointCloud(x, y)
    otcore.sinkhorn(geom, eps=0.1, **T)  # caches the cost
    x.add_(5.0)
    twin = pickle.loads(pickle.dumps(geom)) if how == "pickle" else copy.deepcopy(geom)
    want = otcore.sinkhorn(otcore.PointCloud(x.clone(), y.clone()), eps=0.1, **T).value
    torch.testing.assert_close(otcore.sinkhorn(twin, eps=0.1, **T).value, want, rtol=1e-6, atol=0)


def test_backward_after_an_in_place_change_of_the_potentials_raises():
    """``res.f``, ``res.g`` are the potentials the weights' gradient is read from (views):
    centring them in place (``res.f -= res.f.mean()``) made the unbalanced weights'
    gradient silently wrong (0.229 against 0.298 by finite differences)."""
    x, y = rand(6, 2, seed=13), rand(7, 2, seed=14)
    for field, rho in (("f", 0.5), ("g", None)):
        a = simplex(6, 15).requires_grad_()
        res = otcore.sinkhorn(otcore.PointCloud(x, y), a, simplex(7, 16), eps=0.1, rho=rho, **SOLVE)
        getattr(res, field).sub_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            res.value.backward()


def test_results_copy_compare_by_identity_and_keep_their_staleness():
    """A deep copy, a pickle or a ``torch.save`` of a result gets input tensors whose
    version counters start again at 0: its methods refused to run ("modified in place
    since the solve") whenever the inputs had a nonzero counter at the solve. A copy now
    keeps whether the result was up to date. ``==``/``hash`` compared tensors field by
    field (and raised): results compare by identity."""
    import copy
    import io
    import pickle

    x = rand(8, 2, seed=17)
    x /= x.norm()  # a nonzero version counter at the solve
    res = otcore.sinkhorn(otcore.PointCloud(x, rand(6, 2, seed=18)), eps=0.1, **T)
    buf = io.BytesIO()
    torch.save(res, buf)
    buf.seek(0)
    copies = (copy.deepcopy(res), pickle.loads(pickle.dumps(res)), torch.load(buf, weights_only=False))
    for twin in copies:
        torch.testing.assert_close(twin.plan(), res.plan(), rtol=0, atol=0)
        torch.testing.assert_close(twin.topk(2)[0], res.topk(2)[0], rtol=0, atol=0)
    assert res == res and res != copies[0] and len({res, *copies}) == 4 and res not in copies
    with torch.no_grad():
        x.add_(0.1)  # stale: so are the copies made from now on
    for twin in (copy.deepcopy(res), pickle.loads(pickle.dumps(res))):
        with pytest.raises(RuntimeError, match="modified in place since the solve"):
            twin.plan()
    sparse = otcore.sparse_ot(otcore.CostMatrix(rand(5, 4, seed=19)), k=2, gamma=0.5)
    assert sparse == sparse and len({sparse, copy.deepcopy(sparse)}) == 2


def test_apply_under_torch_func_transforms_is_refused_by_name():
    res = otcore.sinkhorn(otcore.PointCloud(rand(8, 2, seed=9), rand(6, 2, seed=10)), eps=0.1, **T)
    v = rand(6, seed=20)
    with pytest.raises(TypeError, match="torch.func transforms"):
        torch.func.grad(lambda v: res.apply(v).sum())(v)
    with pytest.raises(TypeError, match="torch.func transforms"):
        torch.func.vmap(res.apply)(v.expand(3, 6))
    # the plan applied to a constant inside a transform is a constant: that works
    w = rand(8, seed=21)
    torch.testing.assert_close(torch.func.grad(lambda w: (w * res.apply(v)).sum())(w), res.apply(v))


def test_batched_gradients_through_sparse_ot_are_refused_by_name():
    """Autograd's vmap (jacobian(vectorize=True), grad(is_grads_batched=True)) through sparse_ot's
    value or plan had failed inside torch ("Batching rule not implemented for aten::is_nonzero",
    an in-place scatter; a review): a TypeError naming sparse_ot now. sinkhorn's backward takes
    them, equal to the loop; sparse_ot's loop (vectorize=False) works."""
    x0, y0 = rand(7, 2, seed=30), rand(5, 2, seed=31)
    sink = lambda x: otcore.sinkhorn(otcore.PointCloud(x, y0), eps=0.1, tol=1e-10, **T).value.reshape(1)
    torch.testing.assert_close(torch.autograd.functional.jacobian(sink, x0, vectorize=True),
                               torch.autograd.functional.jacobian(sink, x0), rtol=0, atol=0)
    for read in (lambda r: r.value.reshape(1), lambda r: (r.values ** 2).sum().reshape(1)):
        f = lambda x: read(otcore.sparse_ot(otcore.PointCloud(x, y0), k=3, gamma=0.5, tol=1e-10, **T))
        with pytest.raises(TypeError, match="sparse_ot's gradients cannot be batched"):
            torch.autograd.functional.jacobian(f, x0, vectorize=True)
        x = x0.clone().requires_grad_()
        out = f(x)
        with pytest.raises(TypeError, match="sparse_ot's gradients cannot be batched"):
            torch.autograd.grad(out, x, torch.ones(2, 1, dtype=out.dtype), is_grads_batched=True)
        loop = torch.autograd.functional.jacobian(f, x0)
        assert loop.shape == (1, 7, 2) and bool(torch.isfinite(loop).all()) and bool((loop != 0).any())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_apply_is_differentiable_in_v_on_every_backend(backend):
    """A barycentric map res.apply(y) trains y (the plan held fixed): the gradient is the
    product along the other axis. It did on the torch backend only (the kernel's output
    had no gradient)."""
    y = rand(6, 2, seed=10).requires_grad_()
    res = otcore.sinkhorn(otcore.PointCloud(rand(8, 2, seed=9), y.detach()), eps=0.1, backend=backend, tol=1e-12)
    w = rand(8, 2, seed=11)
    (res.apply(y) * w).sum().backward()
    torch.testing.assert_close(y.grad, res.plan().T @ w, rtol=1e-12, atol=1e-15)
    u = rand(8, 3, seed=12).requires_grad_()
    assert torch.autograd.gradcheck(lambda u: res.apply(u, axis=0), (u,))
    # linear in v: its second derivative is zero, not an error (a penalty on a barycentric map)
    assert torch.autograd.gradgradcheck(lambda u: res.apply(u, axis=0), (u,))


def test_apply_checks_v_and_axis():
    res = otcore.sinkhorn(otcore.PointCloud(rand(8, 2, seed=9), rand(6, 2, seed=10)), eps=0.1, **T)
    for bad, exc, match in ((torch.ones(6, dtype=torch.complex128), TypeError, "real floating-point"),
                            (torch.ones(6, dtype=torch.long), TypeError, "real floating-point"),
                            (torch.ones(6, dtype=F64, device="meta"), ValueError, "v is on meta")):
        with pytest.raises(exc, match=match):
            res.apply(bad)
    for axis in (True, 1.0):
        with pytest.raises(TypeError, match="axis must be an int"):
            res.apply(torch.ones(6, dtype=F64), axis=axis)
    with pytest.raises(ValueError, match="axis must be 0 or 1, got 2"):
        res.apply(torch.ones(6, dtype=F64), axis=2)
    torch.testing.assert_close(res.apply(torch.ones(8, dtype=F64), axis=np.int64(0)),
                               res.apply(torch.ones(8, dtype=F64), axis=0))  # a NumPy int too


def test_large_eps_float64_pass_is_decided_per_problem_of_a_batch():
    """The float64 value pass follows each problem's diameter, not the batch's largest:
    batched with a problem 300x wider, a unit-square problem at eps = 1e4 was 9e-4 off
    (3e-8 alone)."""
    x, y = rand(2, 40, 2, seed=13, dtype=torch.float32), rand(2, 30, 2, seed=14, dtype=torch.float32)
    x[1] *= 300
    y[1] *= 300
    batched = otcore.sinkhorn(otcore.PointCloud(x, y), eps=1e4, **T)
    alone = otcore.sinkhorn(otcore.PointCloud(x[0].double(), y[0].double()), eps=1e4, tol=1e-12, **T)
    assert abs(float(batched.value[0]) - float(alone.value)) <= 1e-7 * abs(float(alone.value))
