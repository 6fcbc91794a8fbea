"""SparseOTRouter: capacities, balanced loads, the token-choice mode and gradients."""

from __future__ import annotations

import math

import pytest
import torch

import otcore

F64 = torch.float64


def _scores(T, E, seed, batch=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shape = (T, E) if batch is None else (batch, T, E)
    return torch.randn(*shape, generator=g, dtype=dtype)


def test_capacity_mode_caps_experts_and_balances_loads():
    T, E = 203, 7
    router = otcore.SparseOTRouter(E, capacity_factor=1.25, gamma=0.1, tol=1e-5, max_iter=500, backend="torch")
    out = router(_scores(T, E, seed=0, dtype=F64))
    cap = math.ceil(T * 1.25 / E)
    assert router.capacity(T) == cap
    assert out.combine_weights.shape == out.dispatch_index.shape == out.dispatch_mask.shape == (E, cap)
    assert int(out.dispatch_mask.sum(1).max()) <= cap
    # every expert receives exactly its share of the token mass (semi-dual: exact column sums)
    torch.testing.assert_close(out.expert_load, torch.full((E,), T / E, dtype=F64))
    D = out.combine_dense()
    assert D.shape == (T, E)
    torch.testing.assert_close(D.sum(0), out.expert_load)
    # gamma small enough that capacities do not bind: every token is fully routed
    assert out.result.converged
    torch.testing.assert_close(D.sum(1), torch.ones(T, dtype=F64), atol=1e-4, rtol=0)
    # dispatch indices agree with the dense plan
    for e in range(E):
        sel = out.dispatch_index[e][out.dispatch_mask[e]]
        torch.testing.assert_close(D[sel, e], out.combine_weights[e][out.dispatch_mask[e]])


def test_tokens_mode_top_experts_per_token():
    T, E, k = 150, 6, 2
    router = otcore.SparseOTRouter(E, mode="tokens", k=k, gamma=0.3, tol=1e-5, max_iter=500, backend="torch")
    out = router(_scores(T, E, seed=1, dtype=F64))
    assert out.combine_weights.shape == (T, k)
    assert int(out.dispatch_index.max()) < E
    torch.testing.assert_close(out.combine_weights.sum(1), torch.ones(T, dtype=F64))  # exact per token
    # loads balanced at the optimum, up to the relaxation's gap
    assert float((out.expert_load - T / E).abs().max()) < 0.05 * T / E
    D = out.combine_dense()
    assert int((D > 0).sum(1).max()) <= k


def test_batched_scores_route_each_problem():
    s = _scores(40, 4, seed=2, batch=3)
    router = otcore.SparseOTRouter(4, capacity_factor=1.5, gamma=0.2, backend="torch")
    out = router(s)
    assert out.combine_weights.shape == (3, 4, 15) and out.expert_load.shape == (3, 4)
    one = router(s[1])
    torch.testing.assert_close(one.combine_weights, out.combine_weights[1])
    assert out.combine_weights.dtype == torch.float32


def test_more_experts_than_tokens_per_capacity_and_k_capped():
    router = otcore.SparseOTRouter(3, mode="tokens", k=5, backend="torch")
    out = router(_scores(10, 3, seed=3))
    assert out.combine_weights.shape == (10, 3)  # k capped at the number of experts


@pytest.mark.parametrize("mode", ["capacity", "tokens"])
def test_gradient_wrt_scores_by_finite_differences(mode):
    T, E = 12, 3
    s = _scores(T, E, seed=4, dtype=F64)
    # gamma small enough that the capacity does not bind: a smooth optimum
    router = otcore.SparseOTRouter(E, mode=mode, k=2, capacity_factor=1.5, gamma=0.1 if mode == "capacity" else 0.5,
                                   tol=1e-13, max_iter=3000, backend="torch")
    sr = s.clone().requires_grad_()
    out = router(sr)
    assert out.result.grad_norm < 1e-9
    W = torch.randn(T, E, generator=torch.Generator().manual_seed(5), dtype=F64)
    (out.combine_dense() * W).sum().backward()
    ds = torch.randn(T, E, generator=torch.Generator().manual_seed(6), dtype=F64)
    h = 1e-6
    loss = lambda t: float((router(s + t * ds).combine_dense() * W).sum())  # noqa: E731
    fd = (loss(h) - loss(-h)) / (2 * h)
    assert abs(fd - float((sr.grad * ds).sum())) < 1e-5 * max(1.0, abs(fd))


@pytest.mark.filterwarnings("ignore::otcore.result.ConvergenceWarning")
def test_training_through_the_router_moves_scores_toward_a_target():
    """A few gradient steps on the gate reduce a loss defined on the combine weights."""
    torch.manual_seed(7)
    T, E, d = 32, 4, 5
    x = torch.randn(T, d)
    target = torch.eye(E)[torch.arange(T) % E]  # a balanced assignment
    gate = torch.nn.Linear(d, E)
    router = otcore.SparseOTRouter(E, capacity_factor=1.0, gamma=0.2, backend="torch", plan_grad="fixed")
    opt = torch.optim.SGD(gate.parameters(), lr=0.5)
    losses = []
    for _ in range(15):
        out = router(gate(x))
        loss = ((out.combine_dense() - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


def test_warm_start_reuses_the_duals():
    s = _scores(64, 4, seed=8, dtype=F64)
    router = otcore.SparseOTRouter(4, gamma=0.2, warm_start=True, tol=1e-6, backend="torch")
    first = router(s)
    second = router(s)
    assert second.result.n_iter < first.result.n_iter


@pytest.mark.parametrize(
    "kw,err,match",
    [
        (dict(n_experts=0), ValueError, "n_experts"),
        (dict(n_experts=4, capacity_factor=0.5), ValueError, "capacity_factor"),
        (dict(n_experts=4, mode="random"), ValueError, "mode"),
        (dict(n_experts=4, gamma=0.0), ValueError, "gamma"),
        (dict(n_experts=4, k=0), ValueError, "k"),
        (dict(n_experts=4, plan_grad="none"), ValueError, "plan_grad"),
    ],
)
def test_bad_router_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        otcore.SparseOTRouter(**kw)


def test_bad_scores():
    router = otcore.SparseOTRouter(4)
    with pytest.raises(ValueError, match="n_experts"):
        router(torch.randn(10, 5))
    with pytest.raises(ValueError, match="scores"):
        router(torch.full((10, 4), float("nan")))
    with pytest.raises(TypeError, match="scores"):
        router([[1.0, 2.0, 3.0, 4.0]])
