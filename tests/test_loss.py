"""``otcore.SinkhornLoss``: the (debiased) Sinkhorn divergence as an ``nn.Module``.

Checked against its definition from three :func:`otcore.sinkhorn` values,
properties of the divergence (>= 0, zero on identical measures), finite
differences in float64, batching with every reduction, and a few steps of
gradient descent.
"""

import warnings

import pytest
import torch

import otcore

T = dict(backend="torch")
# a solve that does not converge must not pass silently: unexpected warnings fail the test
pytestmark = pytest.mark.filterwarnings("error::otcore.ConvergenceWarning")
F64 = torch.float64
TIGHT = dict(tol=1e-12, max_iter=5_000, backend="torch")


def rand(*shape, seed=0, dtype=F64):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def ot_value(x, y, a=None, b=None, eps=0.1, cost="sqeuclidean", **kw):
    return otcore.sinkhorn(otcore.PointCloud(x, y, cost=cost), a, b, eps=eps, **dict(TIGHT, **kw)).value


def test_debiased_loss_is_the_divergence_formula():
    x, y = rand(12, 2, seed=1), rand(9, 2, seed=2) + 0.3
    a = rand(12, seed=3) + 0.1
    a = a / a.sum()
    loss = otcore.SinkhornLoss(eps=0.1, **TIGHT)(x, y, a)
    want = ot_value(x, y, a) - 0.5 * (ot_value(x, x, a, a) + ot_value(y, y))
    assert float(loss) == pytest.approx(float(want), rel=1e-10, abs=1e-14)
    raw = otcore.SinkhornLoss(eps=0.1, debias=False, **TIGHT)(x, y, a)
    assert float(raw) == pytest.approx(float(ot_value(x, y, a)), rel=1e-10)


@pytest.mark.parametrize("cost,eps", [("sqeuclidean", 0.1), ("euclidean", 0.2)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_divergence_is_nonnegative_and_zero_on_identical_clouds(cost, eps, seed):
    loss = otcore.SinkhornLoss(eps=eps, cost=cost, **TIGHT)
    x = rand(15, 3, seed=seed)
    y = rand(11, 3, seed=seed + 10) * 0.5 + 0.2
    assert float(loss(x, y)) > 0
    assert abs(float(loss(x, x.clone()))) < 1e-12
    # permuting the points does not change the measure
    perm = torch.randperm(15, generator=torch.Generator().manual_seed(seed))
    assert abs(float(loss(x, x[perm]))) < 1e-8


def test_divergence_of_a_translation_is_its_squared_length():
    """Closed form: with C(x, x + t) = C(x, x) - 2<x, t> + 2<x + t, t> - |t|^2 separable,
    OT_eps(x, x + t) = OT_eps(x, x) + |t|^2 and OT_eps(x + t, x + t) = OT_eps(x, x),
    so S_eps(x, x + t) = |t|^2 for every eps."""
    loss = otcore.SinkhornLoss(eps=0.1, **TIGHT)
    x = rand(10, 2, seed=1)
    for t in ([0.05, 0.0], [0.2, -0.1], [0.5, 0.5]):
        t = torch.tensor(t, dtype=F64)
        assert float(loss(x, x + t)) == pytest.approx(float(t @ t), rel=1e-9)


def test_gradient_matches_finite_differences():
    x = rand(8, 2, seed=1).requires_grad_(True)
    y = rand(7, 2, seed=2) * 0.8 + 0.3
    loss_fn = otcore.SinkhornLoss(eps=0.1, **TIGHT)
    (gx,) = torch.autograd.grad(loss_fn(x, y), x)
    h = 1e-5
    for seed in range(3):
        d = rand(8, 2, seed=20 + seed) - 0.5
        fd = (float(loss_fn(x.detach() + h * d, y)) - float(loss_fn(x.detach() - h * d, y))) / (2 * h)
        assert float((gx * d).sum()) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_gradcheck_weights_and_points():
    """gradcheck over x and y; the weights by zero-sum directional differences (simplex)."""
    x = rand(5, 2, seed=1).requires_grad_(True)
    y = rand(4, 2, seed=2).requires_grad_(True)
    loss_fn = otcore.SinkhornLoss(eps=0.2, **TIGHT)
    assert torch.autograd.gradcheck(lambda x, y: loss_fn(x, y), (x, y), eps=1e-6, atol=1e-6, rtol=1e-4)
    a0 = rand(5, seed=3) + 0.2
    a0 = a0 / a0.sum()
    a = a0.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(loss_fn(x.detach(), y.detach(), a), a)
    d = rand(5, seed=4) - 0.5
    d -= d.mean()
    h = 1e-5
    fd = (float(loss_fn(x.detach(), y.detach(), a0 + h * d)) - float(loss_fn(x.detach(), y.detach(), a0 - h * d))) / (2 * h)
    assert float(ga @ d) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_batched_reductions_equal_the_loop():
    B = 3
    x = rand(B, 9, 2, seed=1)
    y = rand(B, 7, 2, seed=2) + torch.tensor([0.0, 0.3, 0.6], dtype=F64)[:, None, None]
    b = rand(B, 7, seed=3) + 0.1
    b = b / b.sum(-1, keepdim=True)
    per = otcore.SinkhornLoss(eps=0.1, reduction="none", **TIGHT)(x, y, None, b)
    assert per.shape == (B,)
    loop = torch.stack([otcore.SinkhornLoss(eps=0.1, reduction="none", **TIGHT)(x[i], y[i], None, b[i]) for i in range(B)])
    torch.testing.assert_close(per, loop, rtol=1e-9, atol=1e-13)
    total = otcore.SinkhornLoss(eps=0.1, reduction="sum", **TIGHT)(x, y, None, b)
    mean = otcore.SinkhornLoss(eps=0.1, reduction="mean", **TIGHT)(x, y, None, b)
    assert total.dim() == 0 and mean.dim() == 0
    assert float(total) == pytest.approx(float(loop.sum()), rel=1e-9)
    assert float(mean) == pytest.approx(float(loop.mean()), rel=1e-9)
    assert float(per[0]) < float(per[1]) < float(per[2])


def test_batched_gradients_equal_the_loop():
    x = rand(2, 6, 2, seed=1).requires_grad_(True)
    y = rand(2, 5, 2, seed=2)
    loss = otcore.SinkhornLoss(eps=0.1, reduction="sum", **TIGHT)
    (gx,) = torch.autograd.grad(loss(x, y), x)
    for i in range(2):
        xi = x[i].detach().clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(loss(xi, y[i]), xi)
        torch.testing.assert_close(gx[i], gi)
    mean = otcore.SinkhornLoss(eps=0.1, reduction="mean", **TIGHT)
    (gm,) = torch.autograd.grad(mean(x, y), x)
    torch.testing.assert_close(gm, gx / 2)


def test_unbatched_none_reduction_is_a_scalar():
    out = otcore.SinkhornLoss(eps=0.1, reduction="none")(rand(5, 2), rand(6, 2, seed=1))
    assert out.dim() == 0


def test_euclidean_cost_loss():
    x, y = rand(10, 3, seed=1), rand(12, 3, seed=2) + 0.5
    loss = otcore.SinkhornLoss(eps=0.2, cost="euclidean", **TIGHT)(x, y)
    want = ot_value(x, y, eps=0.2, cost="euclidean") - 0.5 * (
        ot_value(x, x, eps=0.2, cost="euclidean") + ot_value(y, y, eps=0.2, cost="euclidean")
    )
    assert float(loss) == pytest.approx(float(want), rel=1e-10)
    assert float(loss) > 0


def test_gradient_descent_moves_x_towards_y():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(30, 2, generator=g)
    y = torch.rand(25, 2, generator=g) * 0.5 + 1.0
    x = x0.clone().requires_grad_(True)
    loss_fn = otcore.SinkhornLoss(eps=0.05, **T)
    opt = torch.optim.SGD([x], lr=10.0)  # the gradient carries the weights 1/n
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(u > v for u, v in zip(losses, losses[1:]))
    assert losses[-1] < 0.2 * losses[0]
    gap0 = float((x0.mean(0) - y.mean(0)).norm())
    assert float((x.detach().mean(0) - y.mean(0)).norm()) < 0.3 * gap0


def test_float32_module_and_repr():
    loss_fn = otcore.SinkhornLoss(eps=0.1)
    assert "eps=0.1" in repr(loss_fn) and "debias=True" in repr(loss_fn)
    x = rand(20, 3, seed=1, dtype=torch.float32).requires_grad_()
    out = loss_fn(x, rand(15, 3, seed=2, dtype=torch.float32) + 0.2)
    assert out.dtype == torch.float32 and float(out.detach()) > 0
    out.backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("eps", [0.1, 1.0, 10.0])
def test_unbalanced_divergence_adds_the_mass_term_and_stays_nonnegative(eps):
    """Sejourne et al. (2019): with KL-relaxed marginals the divergence is
    OT(a, b) - OT(a, a)/2 - OT(b, b)/2 + eps (m(a) - m(b))^2 / 2, >= 0. Without the last
    term the value's + eps m(a) m(b) makes it negative at large eps (same points, masses
    1 and 3: -6.7 at eps = 10)."""
    x = rand(20, 2, seed=31)
    a = torch.full((20,), 1 / 20, dtype=F64)
    b = 3 * a
    kw = dict(rho=1.0, **TIGHT)
    loss = otcore.SinkhornLoss(eps=eps, **kw)
    got = loss(x, x.clone(), a, b)
    want = ot_value(x, x.clone(), a, b, eps=eps, **kw) - 0.5 * (ot_value(x, x, a, a, eps=eps, **kw)
                                                                 + ot_value(x, x, b, b, eps=eps, **kw)) + eps * 2.0
    assert float(got) == pytest.approx(float(want), rel=1e-9)
    assert float(got) > 0
    assert abs(float(loss(x, x.clone(), a, a.clone()))) < 1e-10  # same measure: zero


def test_loss_under_torch_compile_matches_eager():
    """The solves are opaque calls (torch.compiler.disable) with autograd.Function
    gradients: a compiled model gives the eager loss and gradients, bit for bit."""
    g = torch.Generator().manual_seed(16)
    lin = torch.nn.Linear(3, 3)
    torch.nn.init.normal_(lin.weight, generator=g)
    loss = otcore.SinkhornLoss(eps=0.1, backend="torch")

    def f(x, y):
        return loss(lin(x), y)

    compiled = torch.compile(f, backend="aot_eager")
    for _ in range(2):
        x, y = torch.rand(20, 3, generator=g), torch.rand(25, 3, generator=g)
        lin.zero_grad()
        want = f(x, y)
        want.backward()
        g_want = lin.weight.grad.clone()
        lin.zero_grad()
        got = compiled(x, y)
        got.backward()
        assert torch.equal(got, want) and torch.equal(lin.weight.grad, g_want)


def test_low_precision_weights_are_widened_once_for_the_three_terms():
    """bf16 weights of mass ~300: summed per term in bf16 both masses rounded to 306 and the
    mass term vanished (loss 28% off), and the three weight gradients, each ~300 and
    cast back to bf16 before they cancel, left rounding noise (off by 2.25). Now the
    inputs are widened once: the bf16 run matches float32 on the same values."""
    g = torch.Generator().manual_seed(25)
    x, y = torch.rand(60, 2, generator=g), torch.rand(45, 2, generator=g)
    a = (torch.rand(60, generator=g) * 10).bfloat16().requires_grad_()
    b = (torch.rand(45, generator=g) * 14).bfloat16()
    a32 = a.detach().float().requires_grad_()
    loss = otcore.SinkhornLoss(eps=1.0, rho=1.0, tol=1e-3, backend="torch")  # masses ~300
    l16, l32 = loss(x, y, a, b), loss(x, y, a32, b.float())
    (g16,), (g32,) = torch.autograd.grad(l16, a), torch.autograd.grad(l32, a32)
    assert l16.dtype == torch.float32 and g16.dtype == torch.bfloat16
    assert abs(float(l16.detach()) - float(l32.detach())) <= 1e-5 * abs(float(l32.detach()))
    assert (g16.float() - g32).abs().max() <= 2**-7 * g32.abs().max()  # one bf16 rounding of the result


@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("low", [None, torch.float16])
def test_the_loss_has_the_points_dtype_whatever_the_weights(debias, low):
    """float64 weights on float32 (or fp16) points: the solve is float32, and so is the loss,
    debiased or not (the mass term, in the weights' dtype, had made only the debiased loss
    float64, a review; fp16 points give a float32 loss, as documented)."""
    x, y = rand(9, 2, seed=60, dtype=torch.float32), rand(7, 2, seed=61, dtype=torch.float32)
    if low is not None:
        x, y = x.to(low), y.to(low)
    a, b = torch.full((9,), 1 / 9, dtype=F64), torch.full((7,), 1 / 7, dtype=F64)
    loss = otcore.SinkhornLoss(eps=0.1, debias=debias, **T)
    assert loss(x, y, a, b).dtype == torch.float32
    assert loss(x.to(F64), y, a, b).dtype == F64  # mixed points: the wider one


def test_loss_inside_non_reentrant_activation_checkpointing():
    """torch.utils.checkpoint(use_reentrant=False), PyTorch's recommended mode, allows one
    unpack of the saved tensors per backward; the envelope backward read them twice
    (CheckpointError). The sparse-OT value has the same backward shape."""
    from torch.utils.checkpoint import checkpoint

    x, y = rand(12, 2, seed=14), rand(10, 2, seed=15)
    lin = torch.nn.Linear(2, 2).double()
    loss = otcore.SinkhornLoss(eps=0.1, tol=1e-11)
    X = x.clone().requires_grad_()
    loss(lin(X), y).backward()
    for fn in (lambda z: loss(lin(z), y),
               lambda z: otcore.sparse_ot(otcore.PointCloud(lin(z), y), k=3, gamma=0.5).value):
        X1, X2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        fn(X1).backward()
        checkpoint(fn, X2, use_reentrant=False).backward()
        torch.testing.assert_close(X2.grad, X1.grad, rtol=0, atol=0)


def test_eps_set_after_construction_is_used():
    """An eps annealed during training: the solves kept the constructor's eps (copied into
    the solver's arguments) while the repr and the unbalanced mass term read the new one."""
    x, y = rand(15, 2, seed=16), rand(12, 2, seed=17)
    for rho in (None, 0.5):
        annealed = otcore.SinkhornLoss(eps=0.05, rho=rho, tol=1e-10)
        annealed.eps = 1.0
        fresh = otcore.SinkhornLoss(eps=1.0, rho=rho, tol=1e-10)
        torch.testing.assert_close(annealed(x, y), fresh(x, y), rtol=1e-12, atol=0)
        assert "eps=1.0" in repr(annealed)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        annealed.eps = 0.0


def test_low_precision_balanced_weights_get_an_actionable_error():
    """Weights normalised in fp16 carry ~1e-3 of rounding in their sums, more than balanced OT
    absorbs: the error says to normalise them in float32 (and that works)."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(40, 2, generator=g), torch.rand(30, 2, generator=g)
    w, v = torch.rand(40, generator=g).half(), torch.rand(30, generator=g).half()
    a, b = w / w.sum(), v / v.sum()
    assert abs(float(a.double().sum()) - float(b.double().sum())) > 1e-5  # the case
    with pytest.raises(ValueError, match=r"float16, whose rounding .* normalise them in float32"):
        otcore.SinkhornLoss(eps=0.1)(x, y, a, b)
    value = otcore.SinkhornLoss(eps=0.1)(x, y, w.float() / w.float().sum(), v.float() / v.float().sum())
    assert torch.isfinite(value)


def test_a_real_mass_gap_in_fp16_weights_is_not_blamed_on_rounding():
    x, y = rand(10, 2, seed=18, dtype=torch.float32), rand(8, 2, seed=19, dtype=torch.float32)
    a, b = torch.full((10,), 0.1).half(), torch.full((8,), 0.25).half()  # masses 1 and 2
    with pytest.raises(ValueError, match="same total mass") as exc:
        otcore.SinkhornLoss(eps=0.1)(x, y, a, b)
    assert "rounding" not in str(exc.value)


def test_a_module_pickled_before_eps_became_a_property_loads():
    import pickle

    loss = otcore.SinkhornLoss(eps=0.3, tol=1e-9)
    state = loss.__dict__.copy()  # the old layout: eps in __dict__ and in the solver's arguments
    state["eps"] = state.pop("_eps")
    state["cost"] = state.pop("_cost")  # (cost too: a plain attribute then)
    state["solver_kw"] = dict(state["solver_kw"], eps=0.3)
    old = otcore.SinkhornLoss.__new__(otcore.SinkhornLoss)
    old.__setstate__(state)
    x, y = rand(9, 2, seed=20), rand(7, 2, seed=21)
    assert old.eps == 0.3
    torch.testing.assert_close(old(x, y), loss(x, y), rtol=0, atol=0)
    torch.testing.assert_close(pickle.loads(pickle.dumps(loss))(x, y), loss(x, y), rtol=0, atol=0)


def _count_iterations(monkeypatch):
    """Record every solve's ``n_iter`` made by SinkhornLoss."""
    import otcore.nn as nn_module

    seen, solve = [], nn_module.sinkhorn

    def counted(*args, **kw):
        res = solve(*args, **kw)
        seen.append(int(res.n_iter))
        return res

    monkeypatch.setattr(nn_module, "sinkhorn", counted)
    return seen


def test_warm_start_gives_the_same_loss_and_gradient_in_fewer_iterations(monkeypatch):
    seen = _count_iterations(monkeypatch)
    y = rand(60, 3, seed=31)
    kw = dict(eps=0.005, tol=1e-8, max_iter=20000)
    warm, cold = otcore.SinkhornLoss(warm_start=True, **kw), otcore.SinkhornLoss(**kw)
    assert "warm_start=True" in repr(warm) and "warm_start" not in repr(cold)
    x = rand(50, 3, seed=30)
    iters = {"warm": 0, "cold": 0}
    for step in range(3):  # a training step moves the points a little
        x = x + 0.01 * (y[:50] - x)
        grads = []
        for name, module in (("warm", warm), ("cold", cold)):
            xs = x.clone().requires_grad_(True)
            del seen[:]
            value = module(xs, y)
            grads.append((value.detach(), torch.autograd.grad(value, xs)[0]))
            if step > 0:  # the first call starts cold in both
                iters[name] += sum(seen)
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-8)
    assert set(warm._last) == {"xy", "xx", "yy"}
    assert iters["warm"] < 0.8 * iters["cold"], iters


def test_warm_start_of_mixed_dtype_inputs_reuses_the_cross_term(monkeypatch):
    """x float32 and y float64 are solved in float64: the kept potentials were compared with
    x's dtype, and the cross term started cold at every call (36 iterations against 20
    warm, a review); the self terms were warm."""
    import otcore.nn as nn_module

    starts, solve = [], nn_module.sinkhorn

    def recorded(*args, **kw):
        starts.append(kw.get("init") is not None)
        return solve(*args, **kw)

    monkeypatch.setattr(nn_module, "sinkhorn", recorded)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(20, 2, generator=g), torch.rand(25, 2, generator=g, dtype=F64)
    loss = otcore.SinkhornLoss(eps=0.05, warm_start=True, backend="torch")
    loss(x, y)
    assert starts == [False, False, False]
    del starts[:]
    loss(x + 1e-4, y)
    assert starts == [True, True, True]  # the cross term, then the two self terms


def test_warm_start_falls_back_to_a_cold_start(monkeypatch):
    seen = _count_iterations(monkeypatch)
    loss = otcore.SinkhornLoss(eps=0.1, warm_start=True, tol=1e-6)
    x, y = rand(20, 2, seed=32), rand(15, 2, seed=33)
    loss(x, y)
    # other shapes, and another dtype: the kept potentials do not fit, the solve starts cold
    for xx, yy in ((rand(12, 2, seed=34), y), (x.float(), y.float())):
        torch.testing.assert_close(loss(xx, yy), otcore.SinkhornLoss(eps=0.1, tol=1e-6)(xx, yy), rtol=1e-4, atol=1e-7)
        assert loss._last["xy"]["fg"][0].shape == xx.shape[:-1] and loss._last["xy"]["fg"][0].dtype == xx.dtype
    # an unconverged solve keeps nothing, so it cannot seed the next call (after a
    # converged one, its entry is dropped)
    short = otcore.SinkhornLoss(eps=1e-3, warm_start=True, max_iter=1, eps_schedule=None)
    short._last["xy"] = loss._last["xy"]
    with pytest.warns(otcore.ConvergenceWarning):
        short(x, y)
    assert "xy" not in short._last
    with pytest.raises((TypeError, ValueError), match="warm_start"):
        otcore.SinkhornLoss(warm_start="yes")
    state = loss.__dict__.copy()  # a module pickled before warm starts existed (and checked properties)
    del state["_warm_start"], state["_last"]
    state["debias"], state["reduction"] = state.pop("_debias"), state.pop("_reduction")
    old = otcore.SinkhornLoss.__new__(otcore.SinkhornLoss)
    old.__setstate__(state)
    assert old.warm_start is False and old._last == {} and old.debias is True and old.reduction == "mean"

    # another eps, or another zero-weight pattern: cold, with eps scaling (more than one
    # pass before the first test), and the same value as a cold module
    cold = otcore.SinkhornLoss(eps=0.05, tol=1e-9)
    warm = otcore.SinkhornLoss(eps=0.1, tol=1e-9, warm_start=True)
    b = torch.full((15,), 1 / 15, dtype=torch.float64)
    warm(x, y, None, b)
    warm.eps = 0.05
    b0 = b.clone()
    b0[:3] = 0.0
    b0 = b0 / b0.sum()
    warm(x, y, None, b)  # keeps potentials at eps 0.05 with b's support
    for kept in (False, True):  # the support changes: cold; then it is the kept one: warm
        del seen[:]
        got = warm(x, y, None, b0)
        warm_iters = list(seen)
        del seen[:]
        torch.testing.assert_close(got, cold(x, y, None, b0), rtol=1e-7, atol=1e-12)
        if kept:
            assert sum(warm_iters) < sum(seen), (warm_iters, seen)
        else:  # the terms with b ("xy", "yy") solve cold, as the cold module does; "xx" stays warm
            assert warm_iters[0] == seen[0] and warm_iters[2] == seen[2] and warm_iters[1] < seen[1]
    warm.eps = 0.1  # another eps: cold again
    del seen[:]
    got = warm(x, y, None, b0)
    warm_iters = list(seen)
    del seen[:]
    otcore.SinkhornLoss(eps=0.1, tol=1e-9)(x, y, None, b0)
    assert warm_iters == seen


def test_warm_start_recovers_from_a_jump_and_keeps_the_gauge():
    """A warm start far from the new solution (the points jumped) that fails is redone cold,
    without a warning; the kept balanced pair is shifted to <a, f> = <b, g>, so its free
    constant cannot drift from call to call."""
    gen = torch.Generator().manual_seed(3)
    x, y = torch.rand(60, 2, generator=gen), torch.rand(50, 2, generator=gen)  # float32
    warm = otcore.SinkhornLoss(eps=0.01, tol=1e-5, warm_start=True)
    cold = otcore.SinkhornLoss(eps=0.01, tol=1e-5)
    warm(x, y)
    for moved in (x + 3, 5 * x):
        torch.testing.assert_close(warm(moved, y), cold(moved, y), rtol=1e-6, atol=1e-9)
        f, g = warm._last["xy"]["fg"]
        torch.testing.assert_close(f.mean(), g.mean(), rtol=0, atol=1e-6)


def _count_solves(monkeypatch):
    """Record the batch size of every solve SinkhornLoss makes."""
    import otcore.nn as nn_module

    seen, solve = [], nn_module.sinkhorn

    def counted(geom, *args, **kw):
        seen.append(geom.batch)
        return solve(geom, *args, **kw)

    monkeypatch.setattr(nn_module, "sinkhorn", counted)
    return seen


@pytest.mark.parametrize("batch,weights,rho", [(None, False, None), (3, True, None), (None, True, 0.5)])
def test_self_terms_of_one_shape_are_one_batched_solve(monkeypatch, batch, weights, rho):
    """Clouds of one shape: the two self-transport terms are one solve of two problems
    (per input problem), with the divergence and its gradients of three separate solves."""
    seen = _count_solves(monkeypatch)
    shape = (batch,) if batch else ()
    x, y = rand(*shape, 25, 2, seed=40), rand(*shape, 25, 2, seed=41) + 0.2
    a = b = None
    if weights:
        a, b = rand(*shape, 25, seed=42) + 0.1, rand(*shape, 25, seed=43) + 0.1
        a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    x.requires_grad_(True)
    loss = otcore.SinkhornLoss(eps=0.05, rho=rho, reduction="sum", **TIGHT)(x, y, a, b)
    assert seen == [batch or 1, 2 * (batch or 1)]
    (gx,) = torch.autograd.grad(loss, x)
    xr = x.detach().clone().requires_grad_(True)

    def ot(p, q, u, v):
        return ot_value(p, q, u, v, eps=0.05, rho=rho)

    want = ot(xr, y, a, b) - 0.5 * (ot(xr, xr, a, a) + ot(y, y, b, b))
    if rho is not None:  # the mass term (zero for normalised weights)
        want = want + 0.5 * 0.05 * (a.sum(-1) - b.sum(-1)) ** 2
    want = want.sum()
    (gw,) = torch.autograd.grad(want, xr)
    assert loss.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-13)
    torch.testing.assert_close(gx, gw, rtol=1e-7, atol=1e-10)


def test_self_terms_of_other_shapes_or_weights_solve_apart(monkeypatch):
    seen = _count_solves(monkeypatch)
    loss = otcore.SinkhornLoss(eps=0.05, tol=1e-6)
    x, y = rand(25, 2, seed=44), rand(20, 2, seed=45)
    loss(x, y)
    x2 = rand(20, 2, seed=46)
    loss(x2, y, torch.full((20,), 0.05, dtype=F64))  # b uniform, not given
    assert seen == [1, 1, 1] * 2
    loss(x2.float(), y)  # another dtype: both read in the wider (float64), so one joint batch again
    assert seen[6:] == [1, 2]


def test_warm_start_keeps_the_joint_self_terms():
    x, y = rand(30, 2, seed=47), rand(30, 2, seed=48)
    warm = otcore.SinkhornLoss(eps=0.02, tol=1e-9, warm_start=True)
    cold = otcore.SinkhornLoss(eps=0.02, tol=1e-9)
    for step in range(2):
        x = x + 0.01 * (y - x)
        torch.testing.assert_close(warm(x, y), cold(x, y), rtol=1e-7, atol=1e-12)
    assert set(warm._last) == {"xy", "xx+yy"} and warm._last["xx+yy"]["fg"][0].shape == (2, 30)


def test_kept_potentials_are_plain_tensors_with_weights_that_require_grad():
    """Balanced weights from a softmax: the potentials kept for the next warm start are
    detached (they were part of the weights' graph, and copy.deepcopy of the module failed)."""
    import copy

    x, y = rand(20, 2, seed=51), rand(15, 2, seed=52)
    la, lb = rand(20, seed=53).requires_grad_(), rand(15, seed=54).requires_grad_()
    loss_fn = otcore.SinkhornLoss(eps=0.05, warm_start=True)
    loss_fn(x, y, la.softmax(0), lb.softmax(0)).backward()
    assert all(t.grad_fn is None and not t.requires_grad for kept in loss_fn._last.values() for t in kept["fg"])
    twin = copy.deepcopy(loss_fn)
    torch.testing.assert_close(twin(x, y, la.softmax(0), lb.softmax(0)), loss_fn(x, y, la.softmax(0), lb.softmax(0)))


@pytest.mark.parametrize("rho", [None, 0.5])
def test_fixed_schedule_loss_reads_the_value_only(monkeypatch, rho):
    """With tol=None (GeomLoss's fixed schedule) each solve's result skips the column
    marginals and the transport cost (the loss reads neither): the same value and gradients
    as the full solves composed by hand, with one plan pass per solve instead of two."""
    x, y = rand(12, 2, seed=31), rand(9, 2, seed=32) + 0.3
    a, b = rand(12, seed=33) + 0.1, rand(9, seed=34) + 0.1
    a, b = a / a.sum(), b / b.sum()
    kw = dict(tol=None, max_iter=7, eps_schedule=0.25, backend="torch", rho=rho)
    xs, ys, ws, vs = (t.clone().requires_grad_() for t in (x, y, a, b))
    loss = otcore.SinkhornLoss(eps=0.05, **kw)(xs, ys, ws, vs)
    grads = torch.autograd.grad(loss, (xs, ys, ws, vs))
    xr, yr, wr, vr = (t.clone().requires_grad_() for t in (x, y, a, b))

    def full(p, q, u, v):
        return otcore.sinkhorn(otcore.PointCloud(p, q), u, v, eps=0.05, **kw)

    want = full(xr, yr, wr, vr).value - 0.5 * (full(xr, xr, wr, wr).value + full(yr, yr, vr, vr).value)
    want = want + 0.5 * 0.05 * (wr.sum() - vr.sum()) ** 2
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-12, abs=1e-15)
    for got, exp in zip(grads, torch.autograd.grad(want, (xr, yr, wr, vr))):
        assert torch.allclose(got, exp, rtol=1e-10, atol=1e-13)
    calls = []
    for name in ("plan_cost", "marginals", "marginals_and_cost"):
        method = getattr(otcore.PointCloud, name)
        monkeypatch.setattr(otcore.PointCloud, name, lambda *s, _m=method, _n=name, **k: calls.append(_n) or _m(*s, **k))
    otcore.SinkhornLoss(eps=0.05, **kw)(x, y, a, b)
    assert calls == []
    otcore.SinkhornLoss(eps=0.05, **dict(kw, tol=1e-3, max_iter=500))(x, y, a, b)  # with a tol: full results
    assert calls == ["marginals_and_cost"] * 3  # xy, xx, yy (shapes differ): the column marginals with the cost


def test_value_only_results_are_for_the_loss_own_solve_only():
    """The loss asks its solves for the value only; a solve that other code starts meanwhile
    (a warning hook, say) on another geometry still gets its marginals and cost."""
    from otcore.solvers._entropic import value_only_results

    x, y = rand(10, 2, seed=41), rand(8, 2, seed=42)
    geom, other = otcore.PointCloud(x, y), otcore.PointCloud(y, x)
    kw = dict(eps=0.1, tol=None, max_iter=20, backend="torch")
    with value_only_results(geom):
        inner = otcore.sinkhorn(other, **kw)
        own = otcore.sinkhorn(geom, **kw)
    assert torch.isfinite(torch.as_tensor(inner.marginal_error)) and torch.isfinite(inner.cost)
    assert torch.isnan(torch.as_tensor(own.marginal_error)) and torch.isnan(own.cost)
    assert float(own.value) == pytest.approx(float(otcore.sinkhorn(geom, **kw).value), rel=1e-14)


def test_settings_set_after_construction_are_checked():
    """``reduction``, ``debias``, ``cost`` and ``warm_start`` are checked when set, as ``eps``
    was: a review's ``loss.reduction = "avg"`` returned the unreduced (B,) tensor, ``loss.debias =
    "False"`` (a truthy string) kept the loss debiased, ``loss.cost = "l1"`` showed in the
    repr and raised only at the next call."""
    loss = otcore.SinkhornLoss(eps=0.1)
    for name, value, exc in (("reduction", "avg", ValueError), ("debias", "False", TypeError),
                             ("cost", "l1", ValueError),
                             ("warm_start", "yes", TypeError), ("eps", -1.0, ValueError)):
        with pytest.raises(exc, match=name):
            setattr(loss, name, value)
    loss.reduction, loss.debias = "sum", False
    x, y = rand(2, 9, 2, seed=70), rand(2, 7, 2, seed=71)
    plain = otcore.SinkhornLoss(eps=0.1, reduction="none", debias=False)(x, y)
    torch.testing.assert_close(loss(x, y), plain.sum())


def test_warm_start_needs_a_tol():
    """With ``tol=None`` nothing tells a failed warm solve, so it was kept: y translated by 3
    gave warm gradients 55% off the converged ones against 5% cold (a review)."""
    with pytest.raises(ValueError, match="warm_start=True needs a tol"):
        otcore.SinkhornLoss(eps=0.01, tol=None, max_iter=20, warm_start=True)
    loss = otcore.SinkhornLoss(eps=0.01, tol=None, max_iter=20)
    with pytest.raises(ValueError, match="warm_start=True needs a tol"):
        loss.warm_start = True
    assert loss.warm_start is False


@pytest.mark.parametrize("rho", [None, 1.0])
def test_a_tol_large_against_the_mass_warns(rho):
    """``tol`` bounds an absolute L1 marginal error: on weights of mass 1e-6 the default tol
    stopped the solve after one iteration at eps and the unbalanced loss came out -3.2e-6
    against 7.1e-8 (a review). Such a tol warns; scaled with the mass, the loss is right."""
    x, y = rand(30, 2, seed=72), rand(25, 2, seed=73)
    a, b = torch.full((30,), 1e-6 / 30, dtype=torch.float64), torch.full((25,), 1e-6 / 25, dtype=torch.float64)
    with pytest.warns(UserWarning, match="smallest total mass"):
        otcore.SinkhornLoss(eps=0.05, rho=rho)(x, y, a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled = otcore.SinkhornLoss(eps=0.05, rho=rho, tol=1e-12)(x, y, a, b)
        unit = otcore.SinkhornLoss(eps=0.05, rho=rho, tol=1e-6)(x, y, a * 1e6, b * 1e6)
    # the divergence formula on solves 1e4 times tighter (equal masses: no mass term)
    tight = dict(eps=0.05, rho=rho, tol=1e-16, max_iter=100_000, backend="torch")
    want = ot_value(x, y, a, b, **tight) - 0.5 * (ot_value(x, x, a, a, **tight) + ot_value(y, y, b, b, **tight))
    torch.testing.assert_close(scaled, want, rtol=1e-8, atol=0)
    if rho is None:  # balanced: S is linear in the (common) mass
        torch.testing.assert_close(scaled, unit * 1e-6, rtol=1e-5, atol=0)
    else:  # unbalanced the mass enters rho's terms: the unit-mass loss is not 1e6 times it
        assert abs(float(unit) * 1e-6 / float(scaled) - 1) > 0.1
    assert float(scaled) > 0


def test_warnings_of_warm_solves_are_shown_once_and_checks_come_first():
    """A warm-started loss passes on each of its solves' warnings once per module (a review:
    the tol warning 13 times over 5 calls: every catch_warnings resets Python's own
    once-per-line registries); a bad argument raises before any warning; an old pickle goes
    through the setters' checks."""
    x, y = rand(30, 2, seed=74), rand(25, 2, seed=75)
    a, b = torch.full((30,), 1e-6 / 30, dtype=torch.float64), torch.full((25,), 1e-6 / 25, dtype=torch.float64)
    loss = otcore.SinkhornLoss(eps=0.05, warm_start=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(2):
            loss(x, y, a, b)
        first = len([w for w in caught if "smallest total mass" in str(w.message)])
        for _ in range(4):
            loss(x, y, a, b)
    assert 1 <= first and len([w for w in caught if "smallest total mass" in str(w.message)]) == first
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning first would fail here instead of the ValueError
        with pytest.raises(ValueError, match="max_iter"):
            otcore.sinkhorn(otcore.PointCloud(x, y), a, b, eps=0.05, max_iter=0)
        with pytest.raises(ValueError, match="drop_tol"):
            otcore.sinkhorn_newton(otcore.PointCloud(x, y), a, b, eps=0.05, drop_tol=2.0)
    state = otcore.SinkhornLoss(eps=0.05).__dict__.copy()
    state["_reduction"] = "avg"  # as an unchecked assignment could leave it in an earlier pickle
    with pytest.raises(ValueError, match="reduction"):
        otcore.SinkhornLoss.__new__(otcore.SinkhornLoss).__setstate__(state)


def test_numpy_bools_are_bools():
    """``np.bool_`` (what a NumPy comparison gives, or a config read through NumPy) is a bool
    for every flag: ``debias``, ``warm_start`` and ``cuda_graph`` had refused it ("must be a
    bool, got bool"), ``verbose`` too, while ``overrelax`` took it (a review)."""
    import numpy as np

    x, y = rand(7, 2, seed=1), rand(6, 2, seed=2)
    want = otcore.SinkhornLoss(eps=0.1, debias=False, warm_start=True, **T)(x, y)
    for false, true in ((np.False_, np.True_), (np.array(False), np.array(True))):
        loss = otcore.SinkhornLoss(eps=0.1, debias=false, warm_start=true, cuda_graph=false, **T)
        assert loss.debias is False and loss.warm_start is True
        torch.testing.assert_close(loss(x, y), want, rtol=0, atol=0)
        res = otcore.sinkhorn(otcore.PointCloud(x, y), eps=0.1, verbose=false, cuda_graph=false, **T)
        assert bool(res.converged)
    with pytest.raises(TypeError, match="debias"):
        otcore.SinkhornLoss(debias="False")
    with pytest.raises(TypeError, match="verbose"):
        otcore.sinkhorn(otcore.PointCloud(x, y), eps=0.1, verbose=1)


def test_an_empty_schedule_is_no_stages():
    """An empty ``eps_schedule`` of any kind runs no stage, as None: an empty tensor had been
    a TypeError where ``[]``, ``()`` and an empty array were accepted (a review)."""
    import numpy as np

    geom = otcore.PointCloud(rand(9, 2, seed=3), rand(8, 2, seed=4))
    want = otcore.sinkhorn(geom, eps=0.05, eps_schedule=None, **T)
    for empty in ([], (), np.array([]), torch.tensor([]), torch.tensor([], dtype=F64)):
        res = otcore.sinkhorn(geom, eps=0.05, eps_schedule=empty, **T)
        assert res.info["eps_stages"] == [] and res.n_iter == want.n_iter
        torch.testing.assert_close(res.f, want.f, rtol=0, atol=0)


@pytest.mark.parametrize("wide_side", ["x", "y"])
def test_mixed_dtype_points_solve_every_term_in_the_wider_dtype(wide_side):
    """float32 and float64 point clouds: the loss is float64 (the wider, docs/api.md), with
    either side the wider one (only float64 x had been tested; a mutant taking x's dtype
    passed), and each term is solved in float64, the self terms too: equal to the loss of
    both clouds in float64, to its tol. (The float32 cloud's self term had been solved in
    float32, 1e-7 relative off, a review.) The float32 cloud gets a float32 gradient."""
    x64, y64 = rand(9, 2, seed=62), rand(7, 2, seed=63)
    x, y = (x64.float(), y64) if wide_side == "y" else (x64, y64.float())
    loss = otcore.SinkhornLoss(eps=0.1, tol=1e-12, max_iter=5000, **T)
    narrow = x if wide_side == "y" else y
    narrow.requires_grad_(True)
    got = loss(x, y)
    assert got.dtype == F64
    want = loss(x.detach().double(), y.detach().double())  # the float32 cloud's own coordinates
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-11, abs=1e-13)
    got.backward()
    assert narrow.grad.dtype == torch.float32 and bool(narrow.grad.isfinite().all())


def test_the_loss_of_clouds_with_a_far_pair_is_not_negative_in_float32():
    """A pair 1e4 units from the rest (float32, eps 0.01): the geometric stages lost the plan of
    OT(x, y) and the loss read -0.0286 where float64 reads 0.0417 (S >= 0, a review). The
    scheduled solve that fails runs again cold (otcore.sinkhorn); the loss matches float64's
    on the same float32 points."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(30, 2, generator=g), torch.rand(30, 2, generator=g)
    x[0] += 1e4
    y[0] += 1e4
    loss = otcore.SinkhornLoss(eps=0.01, **T)
    want = float(loss(x.double(), y.double()))
    got = float(loss(x, y))
    assert want > 0.02 and got == pytest.approx(want, rel=1e-4)
