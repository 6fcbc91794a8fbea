"""SparseOTRouter: capacities, balanced loads, the token-choice mode and gradients."""

from __future__ import annotations

import math
import warnings

import numpy as np
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
    # the mask marks the slots that carry mass (docs/api.md), not every slot: here some hold
    # no token (a mutant marking them all passed; a MoE layer dispatching by it ran each
    # expert on its whole capacity)
    assert torch.equal(out.dispatch_mask, out.combine_weights > 0)
    assert int(out.dispatch_mask.sum()) < E * cap
    # every expert receives exactly its share of the token mass (semi-dual: exact column sums)
    torch.testing.assert_close(out.expert_load, torch.full((E,), T / E, dtype=F64))
    D = out.combine_dense()
    assert D.shape == (T, E)
    torch.testing.assert_close(D.sum(0), out.expert_load)
    assert torch.equal(out.dispatch_mask.sum(1), (D > 0).sum(0))
    # gamma small enough that capacities do not bind: every token is fully routed, to the
    # router's tolerance (per token; the L1 gradient norm of the solve is at most tol * T)
    assert out.result.converged
    assert float((D.sum(1) - 1).abs().sum()) <= router.tol * T
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
    # more experts than tokens: capacity ceil(3 * 1.25 / 5) = 1 token per expert, and each
    # expert still receives exactly its share 3/5 of the token mass
    router = otcore.SparseOTRouter(5, capacity_factor=1.25, backend="torch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = router(_scores(3, 5, seed=3, dtype=F64))
    assert router.capacity(3) == 1 and out.combine_weights.shape == (5, 1)
    # no seed at capacity 1: started from the unconstrained routing, this solve ended at a more
    # lopsided optimum of the relaxation (token masses 0.6-1.8, against 0.6-1.2) and warned
    assert out.result.converged and "seed_iter" not in out.result.info and not caught
    assert float(out.result.grad_norm) < 1.0
    torch.testing.assert_close(out.expert_load, torch.full((5,), 3 / 5, dtype=F64))
    assert int((out.combine_dense() > 0).sum(0).max()) <= 1
    # a capacity above the token count is capped at it: ceil(10 * 4 / 3) = 14 > 10 tokens
    router = otcore.SparseOTRouter(3, capacity_factor=4.0, backend="torch")
    out = router(_scores(10, 3, seed=3, dtype=F64))
    assert math.ceil(10 * 4.0 / 3) > 10 and router.capacity(10) == 10
    assert out.combine_weights.shape == (3, 10)
    assert all(len(set(row.tolist())) == 10 for row in out.dispatch_index)  # each slot a distinct token
    torch.testing.assert_close(out.expert_load, torch.full((3,), 10 / 3, dtype=F64))
    # k capped at the number of experts: every token lists each of the 3 experts once
    router = otcore.SparseOTRouter(3, mode="tokens", k=5, backend="torch")
    out = router(_scores(10, 3, seed=3))
    assert out.combine_weights.shape == out.dispatch_index.shape == (10, 3)
    assert torch.equal(out.dispatch_index.sort(1).values, torch.arange(3).expand(10, 3))
    torch.testing.assert_close(out.combine_weights.sum(1), torch.ones(10))  # exact per token
    D = out.combine_dense()
    torch.testing.assert_close(torch.gather(D, 1, out.dispatch_index), out.combine_weights)


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


def test_capacity_solve_is_seeded_by_the_expert_duals():
    """Capacity mode starts from the routing without the capacity, solved through its E expert
    duals (``info["seed_iter"]``). Where the capacity does not bind, that routing is the
    capacity problem's optimum: the capacity solve stops at its first test, with the plan
    of a cold solve of the same problem; where it binds, the capacity solve still runs to
    the same optimum's tolerance."""
    for gamma, binds in ((0.1, False), (0.5, True)):
        s = _scores(256, 4, seed=3, dtype=F64)
        router = otcore.SparseOTRouter(4, gamma=gamma, tol=1e-7, max_iter=500, backend="torch")
        out = router(s)
        res = out.result
        centred = s - s.mean(0) - s.mean(1, keepdim=True) + s.mean()
        cold = otcore.sparse_ot(otcore.CostMatrix(-centred), torch.ones(256, dtype=F64), torch.full((4,), 64.0, dtype=F64),
                                k=router.capacity(256), gamma=gamma, tol=1e-7 * 256, max_iter=500, relaxed_start=False)
        assert res.converged and cold.converged and res.info["seed_iter"] > 0
        support = (cold.to_dense() > 0).sum(0)  # tokens per expert at the optimum
        assert bool((support >= router.capacity(256)).any()) == binds
        if binds:
            assert res.n_iter > 0
            assert float(res.value) == pytest.approx(float(cold.value), rel=1e-6)
        else:
            assert res.n_iter == 0 and cold.n_iter > 10
            assert float(res.value) == pytest.approx(float(cold.value), rel=1e-9)
            torch.testing.assert_close(out.combine_dense(), cold.to_dense(), rtol=0, atol=1e-6)
        torch.testing.assert_close(out.expert_load, torch.full((4,), 64.0, dtype=F64))
        assert 0 < res.info["seed_time_s"] <= res.info["time_s"]
    # no spare slot (capacity_factor=1, 256 = 4 x 64): no seed, the capacity solve from zero
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", otcore.ConvergenceWarning)  # (whether it converges is not the point)
        tight = otcore.SparseOTRouter(4, capacity_factor=1.0, max_iter=20, backend="torch")(_scores(256, 4, seed=3))
    assert "seed_iter" not in tight.result.info and tight.result.n_iter > 0


def test_router_solves_without_the_continuation_in_gamma(monkeypatch):
    """The seed (k = n_experts) and token mode with k = n_experts are quadratically regularized
    OT, where sparse_ot runs stages at larger gammas by default; at the router's loose tol
    each stage is a solve of its own (a review: the seed 1.3-2x slower, out of max_iter at
    1024 x 128, gamma 1e-3), so the router asks for none."""
    import otcore.router as R
    calls = []
    solve = R.sparse_ot
    monkeypatch.setattr(R, "sparse_ot", lambda *a, **kw: calls.append(kw) or solve(*a, **kw))
    s = 10 * _scores(256, 8, seed=4)  # a score range where "auto" would run stages at gamma 0.01
    out = otcore.SparseOTRouter(8, gamma=0.01, backend="torch")(s)
    tok = otcore.SparseOTRouter(8, mode="tokens", k=8, gamma=0.01, backend="torch")(s)
    assert len(calls) == 3 and all(kw["gamma_schedule"] is None for kw in calls)  # seed, capacity, tokens
    assert out.result.info["seed_iter"] > 0 and tok.result.info["gamma_stages"] == []
    auto = otcore.sparse_ot(otcore.CostMatrix(-s), k=8, axis=1, gamma=0.01, tol=1e-4 * 256)
    assert auto.info["gamma_stages"]  # (what the default would have done)


def test_warm_start_reuses_the_duals():
    s = _scores(64, 4, seed=8, dtype=F64)
    router = otcore.SparseOTRouter(4, gamma=0.1, warm_start=True, tol=1e-6, backend="torch")
    first = router(s)  # a cold start: no duals stored yet
    second = router(s)
    # capacity mode: the previous expert duals seed the next solve (already optimal here)
    assert first.result.info["seed_iter"] > 0 and second.result.info["seed_iter"] == 0
    assert first.result.n_iter == second.result.n_iter == 0  # the capacity does not bind
    cold, warm = first.result, second.result
    assert cold.converged and warm.converged and warm.info["warm_start"] == "used"
    assert float(warm.value) == pytest.approx(float(cold.value), rel=1e-10)
    torch.testing.assert_close(warm.alpha, cold.alpha, rtol=0, atol=1e-6)
    torch.testing.assert_close(warm.beta, cold.beta, rtol=0, atol=1e-6)
    torch.testing.assert_close(second.combine_dense(), first.combine_dense(), rtol=0, atol=1e-6)
    # the expert duals also serve a fresh batch of tokens, of another count
    fresh = router(_scores(100, 4, seed=3, dtype=F64))
    assert fresh.result.info["warm_start"] == "used" and fresh.result.converged
    # no spare slot (capacity_factor=1: no seed): the capacity solve starts from both stored
    # duals, so only for the same token count (another count once raised on alpha's shape)
    tight = otcore.SparseOTRouter(4, capacity_factor=1.0, warm_start=True, max_iter=300, backend="torch")
    t64 = tight(s)
    assert tight(s).result.n_iter < t64.result.n_iter and "seed_iter" not in t64.result.info
    assert tight(_scores(128, 4, seed=4, dtype=F64)).result.info["warm_start"] == "none"
    # token mode: the duals are per expert; a warm solve of the same scores stops at once
    tokens = otcore.SparseOTRouter(4, mode="tokens", gamma=0.2, warm_start=True, tol=1e-6, backend="torch")
    t1, t2 = tokens(s), tokens(s)
    assert t1.result.n_iter > 0 and t2.result.n_iter == 0 and "seed_iter" not in t2.result.info
    torch.testing.assert_close(t2.combine_dense(), t1.combine_dense(), rtol=0, atol=1e-6)


def test_a_failed_warm_solve_is_redone_cold_and_the_better_kept():
    """One batch of outlier scores (a loss spike): its duals must not keep misrouting the
    next calls. Before, they seeded the next call, whose failed duals seeded the next, and
    calls ran to max_iter misrouting a token's worth of mass for 13 calls after a 1e4
    spike. A warm solve that fails is redone cold, and the better of the two is kept, with
    its duals; a warm solve cut short by max_iter but ahead of the cold one is kept."""
    s = _scores(64, 4, seed=0)
    router = otcore.SparseOTRouter(4, warm_start=True, max_iter=7)  # each solve: cold 3 (seed) + 6
    cold = otcore.SparseOTRouter(4, max_iter=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        router(1e4 * s)
        for step in range(3):
            st = s + 0.01 * step * _scores(64, 4, seed=step + 1)
            out, ref = router(st), cold(st)
            assert out.result.converged
            assert out.result.info["warm_start"] == ("retried cold" if step == 0 else "used")
            torch.testing.assert_close(out.combine_dense(), ref.combine_dense(), rtol=0, atol=0.05)
        router._init = (router._init[0], 1e6 * router._init[1])  # expert duals far from the optimum
        out = router(s)
        assert out.result.converged and out.result.info["warm_start"] == "retried cold"
        assert out.result.n_iter == cold(s).result.n_iter and out.result.info["retry_iter"] == router.max_iter
        assert router(s).result.info["warm_start"] == "used"
        # max_iter too small for either: the warm solve, near the optimum already, stays ahead
        # (token mode, whose solve starts from the stored duals themselves)
        short = otcore.SparseOTRouter(4, mode="tokens", warm_start=True, max_iter=3, tol=1e-9)
        short(s)
        s2 = s + 1e-3 * _scores(64, 4, seed=9)
        again = short(s2)
        short_cold = otcore.SparseOTRouter(4, mode="tokens", max_iter=3, tol=1e-9)(s2)
    assert not again.result.converged and again.result.info["warm_start"] == "retried cold, warm kept"
    assert again.result.info["retry_iter"] == short_cold.result.n_iter == 3
    assert float(again.result.grad_norm) < float(short_cold.result.grad_norm)


def test_capacity_takes_a_positive_token_count_only():
    router = otcore.SparseOTRouter(4)
    for bad, err in ((-3, ValueError), (0, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(err, match="n_tokens"):
            router.capacity(bad)


def test_warm_start_survives_a_change_of_dtype():
    """The stored duals are reused only for scores of the same shape, device and dtype
    (a module moved with .to() solves cold once instead of failing)."""
    router = otcore.SparseOTRouter(4, gamma=0.2, warm_start=True, tol=1e-6, backend="torch")
    s = _scores(64, 4, seed=9, dtype=F64)
    router(s)
    out32 = router(s.float())  # float32 scores: the float64 duals are not reused
    cold32 = otcore.SparseOTRouter(4, gamma=0.2, tol=1e-6, backend="torch")(s.float())
    assert out32.result.alpha.dtype == torch.float32
    assert out32.result.n_iter == cold32.result.n_iter


@pytest.mark.parametrize(
    "kw,err,match",
    [
        (dict(n_experts=0), ValueError, "n_experts"),
        (dict(n_experts=4, capacity_factor=0.5), ValueError, "capacity_factor"),
        (dict(n_experts=4, mode="random"), ValueError, "mode"),
        (dict(n_experts=4, gamma=0.0), ValueError, "gamma"),
        (dict(n_experts=4, k=0), ValueError, "^k must be >= 1, got 0$"),
        (dict(n_experts=4, plan_grad="none"), ValueError, "plan_grad"),
        (dict(n_experts=4, warm_start="no"), TypeError, "^warm_start must be a bool, got str$"),
    ],
)
def test_bad_router_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        otcore.SparseOTRouter(**kw)


def test_settings_set_after_construction_are_checked():
    """A later ``router.mode = "Tokens"`` ran token mode, ``capacity_factor = 0.5`` failed in
    the solver about ``k``, ``tol = -1`` as ``got -2.0`` (a review): each setting goes
    through the constructor's check, whose error names it."""
    router = otcore.SparseOTRouter(4, backend="torch")
    for name, value, err, match in [("mode", "Tokens", ValueError, "^mode must be one of"),
                                    ("capacity_factor", 0.5, ValueError, "^capacity_factor must be >= 1"),
                                    ("tol", -1.0, ValueError, "^tol must be"),
                                    ("k", 0, ValueError, "^k must be >= 1"),
                                    ("warm_start", "yes", TypeError, "^warm_start must be a bool")]:
        with pytest.raises(err, match=match):
            setattr(router, name, value)
    assert (router.mode, router.capacity_factor, router.tol, router.k, router.warm_start) == (
        "capacity", 1.25, 1e-3, 2, False)
    router.mode, router.k = "tokens", 1
    out = router(_scores(20, 4, seed=3))
    assert out.result.axis == 1 and int((out.combine_dense() > 0).sum(1).max()) == 1
    with pytest.warns(UserWarning, match="tol=0.2 .a fraction of the token mass") as caught:
        router.tol = 0.2
    assert caught[0].filename == __file__  # the user's line


@pytest.mark.parametrize("factor", [np.float32(1.1), torch.tensor(1.1), torch.tensor(1.2, dtype=torch.float16),
                                    np.array(np.float32(1.1)), np.float16(1.1),
                                    torch.tensor(1.1, dtype=torch.bfloat16), torch.tensor(1.3, dtype=torch.bfloat16)])
def test_a_float32_capacity_factor_is_taken_as_written(factor):
    """``np.float32(1.1)`` is 1.100000023841858: its capacity of 100 tokens over 10 experts
    came out 12 (a review); the shortest decimal of its dtype is 1.1, capacity 11. bf16's
    1.1 (1.1015625) had still given 12 (a later review)."""
    router = otcore.SparseOTRouter(10, capacity_factor=factor)
    want = round(float(factor), 2)
    assert router.capacity_factor == want
    assert router.capacity(100) == math.ceil(round(100 * want / 10, 9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_capacity_factor_that_requires_grad_is_refused(dtype):
    """As any setting: it would get no gradient (float32 and bf16 ones had been read as
    numbers, a review)."""
    with pytest.raises(TypeError, match="^capacity_factor must be a number"):
        otcore.SparseOTRouter(10, capacity_factor=torch.tensor(1.1, dtype=dtype, requires_grad=True))


def test_scores_whose_centring_overflows_are_named():
    s = torch.full((20, 4), 2e38)
    s[:, 0] = -2e38
    with pytest.raises(ValueError, match="^scores overflow float32 when centred"):
        otcore.SparseOTRouter(4, backend="torch")(s)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_scores_with_nan_or_inf_are_named(bad, dtype):
    """(Their finiteness is read through the cost's check; the scores are named, not C.)"""
    s = torch.randn(20, 4).to(dtype)
    s[3, 1] = bad
    with pytest.raises(ValueError, match="^scores contains NaN or inf$"):
        otcore.SparseOTRouter(4, backend="torch")(s)


def test_a_capacity_of_one_token_per_expert_is_not_called_a_tie():
    """3 tokens over 5 experts, N(0, 1) scores (no two within 0.029): the relaxation's gap at
    a capacity of 1 missed 0.53 of the token mass, which the router blamed on tied scores."""
    s = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    router = otcore.SparseOTRouter(5, backend="torch")
    assert router.capacity(3) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out = router(s)
    assert float(out.result.grad_norm) / 3 > 0.5  # the gap the tie check reads


@pytest.mark.parametrize("mode", ["capacity", "tokens"])
def test_a_common_offset_of_the_scores_changes_nothing(mode):
    """Scores + 1e6 in float32 (a constant: the same routing) gave token weights summing to
    1.25 in tokens mode and loads of [0, 33, 2, 5] for 8 each, reported converged. The
    solve now sees centred scores, and the line sums are computed below the top score."""
    s = _scores(32, 4, seed=12)
    # s + 1e6 is s rounded to float32's step there (1/16); subtracting 1e6 again is exact
    rounded = (s + 1e6) - 1e6
    ref = otcore.SparseOTRouter(4, mode=mode, tol=1e-10, backend="torch")(rounded.double())
    out = otcore.SparseOTRouter(4, mode=mode, backend="torch")(s + 1e6)
    D = out.combine_dense()
    if mode == "tokens":
        torch.testing.assert_close(D.sum(1), torch.ones(32), rtol=1e-6, atol=0)
    else:
        torch.testing.assert_close(out.expert_load, torch.full((4,), 8.0), rtol=1e-6, atol=0)
    # the routing of the rounded scores, solved in float64: measured 2.2e-4 and 1.9e-4 apart
    # in the weights, 1e-6 and 3.7e-4 in the loads (the float32 solve's own tol)
    assert float((D.double() - ref.combine_dense()).abs().max()) < 1e-3
    assert float((out.expert_load.double() - ref.expert_load).abs().max()) < 2e-3


def test_result_value_gradient_matches_finite_differences():
    """result.value is the centred scores' value; its gradient must be that value's (with a
    detached centre it was off by 1/E in every entry)."""
    s = _scores(16, 4, seed=17, dtype=torch.float64)
    # k = E: no sparsity binds, the value is smooth and finite differences are meaningful
    router = otcore.SparseOTRouter(4, mode="tokens", k=4, gamma=0.5, tol=1e-10, max_iter=2000, backend="torch")
    ss = s.clone().requires_grad_()
    (gv,) = torch.autograd.grad(router(ss).result.value, ss)
    h = 1e-6
    for i, j in ((0, 0), (3, 2), (7, 1)):
        e = torch.zeros_like(s)
        e[i, j] = h
        fd = (float(router(s + e).result.value) - float(router(s - e).result.value)) / (2 * h)
        assert float(gv[i, j]) == pytest.approx(fd, abs=1e-5)


def test_router_is_one_opaque_call_under_torch_compile():
    """The routing (an L-BFGS loop with host checks) is excluded from tracing, as
    SinkhornLoss's solve: one graph break (tracing it broke the graph 54 times here) and
    the eager values and gradients, bit for bit."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    gate = torch.nn.Linear(8, 4)
    torch.nn.init.normal_(gate.weight, generator=torch.Generator().manual_seed(13))
    router = otcore.SparseOTRouter(4, backend="torch")

    def f(x):
        return (router(gate(x)).combine_weights ** 2).sum()

    compiled = torch.compile(f, backend="aot_eager")
    for seed in (14, 15):
        x = _scores(32, 8, seed=seed)
        gate.zero_grad()
        want = f(x)
        want.backward()
        g_want = gate.weight.grad.clone()
        gate.zero_grad()
        got = compiled(x)
        got.backward()
        assert torch.equal(got, want) and torch.equal(gate.weight.grad, g_want)
    assert sum(counters["graph_break"].values()) == 1


def test_bad_scores():
    router = otcore.SparseOTRouter(4)
    with pytest.raises(ValueError, match="n_experts"):
        router(_scores(10, 5, seed=9))
    with pytest.raises(ValueError, match="scores"):
        router(torch.full((10, 4), float("nan")))
    with pytest.raises(TypeError, match="scores"):
        router([[1.0, 2.0, 3.0, 4.0]])


def test_capacity_takes_the_factor_as_written():
    """ceil(100 * 1.1 / 10) = 11, although 100 * 1.1 / 10 is 11.000000000000002 in binary."""
    router = otcore.SparseOTRouter(n_experts=10, capacity_factor=1.1)
    assert router.capacity(100) == 11
    assert otcore.SparseOTRouter(n_experts=8, capacity_factor=1.25).capacity(100) == 16  # 15.625
    with pytest.raises(ValueError, match="backend"):
        otcore.SparseOTRouter(n_experts=4, backend="gpu")


def test_tied_scores_warn_once():
    """All-zero scores (a gate initialised at zero): every expert ranks the tokens alike
    whatever the duals, so the relaxation's routing misplaces most of the token mass while
    its solve stops normally. The router says so, once."""
    router = otcore.SparseOTRouter(8, backend="torch")
    with pytest.warns(UserWarning, match=r"misses its token masses by 1\.\d+ of the token mass.*tied across experts"):
        out = router(torch.zeros(256, 8))
    assert out.result.grad_norm > 0.5 * 256
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        router(torch.zeros(256, 8))  # once per router
        otcore.SparseOTRouter(8, backend="torch")(_scores(256, 8, seed=40))  # untied scores: no warning


def test_tokens_mode_needs_room_for_every_expert():
    """(One token per call, as in decoding, cannot balance 8 experts: a clear error, not a
    solve whose duals diverge to max_iter.)"""
    for n_tokens, k in ((5, 1), (1, 2), (3, 2)):
        with pytest.raises(ValueError, match=rf"needs n_tokens \* k >= n_experts .* got {n_tokens} token\(s\), k={k}"):
            otcore.SparseOTRouter(8, mode="tokens", k=k, backend="torch")(_scores(n_tokens, 8, seed=41))
    otcore.SparseOTRouter(8, mode="tokens", k=2, backend="torch")(_scores(4, 8, seed=41))  # 4 * 2 = 8: room


def test_bf16_scores_are_centred_after_widening():
    """bf16 scores with a large common offset: centring in bf16 rounded them (combine
    weights 0.022 off those of the same values given in float32)."""
    s = (_scores(64, 4, seed=42) + 20.0).to(torch.bfloat16)
    for mode in ("capacity", "tokens"):
        got = otcore.SparseOTRouter(4, mode=mode, backend="torch")(s).combine_dense()
        want = otcore.SparseOTRouter(4, mode=mode, backend="torch")(s.float()).combine_dense()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_per_token_and_per_expert_score_offsets_leave_the_float32_routing_alone():
    """Both marginals are fixed, so a constant per expert (a gate bias) or per token leaves
    the optimal routing unchanged. With only the global mean taken off, per-expert offsets
    of ~1e5 cost the float32 duals their resolution: the plan moved by up to 0.55 with
    converged True (adversarial review). The solve sees the double-centred scores."""
    g = torch.Generator().manual_seed(0)
    T, E = 48, 4
    s = (torch.randn(T, E, generator=g) * 128).round() / 128  # s + offsets below 2^17: exact in float32
    per_expert = torch.tensor([0.0, 1.0, 2.0, 3.0]) * 2.0**14
    per_token = (torch.rand(T, 1, generator=g) * 64).floor() * 2.0**9
    kw = dict(mode="tokens", backend="torch", tol=1e-5)
    ref = otcore.SparseOTRouter(E, **kw)(s.double()).combine_dense()
    for offset in (per_expert, per_token, per_expert + per_token):
        out = otcore.SparseOTRouter(E, **kw)(s + offset)
        assert torch.equal((s + offset) - offset, s)
        assert out.result.converged and out.result.grad_norm <= 1e-5 * T
        assert float((out.combine_dense().double() - ref).abs().max()) <= 1e-3  # it was 1.3e-2 to 5.6e-2


def test_at_capacity_factor_1_the_exact_plan_gradient_is_zero_and_fixed_gives_one():
    """``capacity_factor=1`` (n_tokens / E slots per expert, all needed): the supports leave no
    free entry once the marginals are fixed, so the optimal routing (near an assignment) is
    locally constant in the scores, ``plan_grad="implicit"`` (exact) is 0 through the
    combine weights, and ``"fixed"`` gives the gate a gradient (docs/router.md)."""
    s = _scores(64, 4, seed=0, dtype=F64).requires_grad_()
    W = torch.randn(4, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    grads = {}
    for pg in ("implicit", "fixed"):
        out = otcore.SparseOTRouter(4, capacity_factor=1.0, plan_grad=pg, max_iter=500, backend="torch")(s)
        assert out.result.converged
        vals = out.combine_weights.detach()
        assert bool(((vals - 1).abs() < 1e-2).all())  # every slot full, near an assignment
        (grads[pg],) = torch.autograd.grad((out.combine_weights * W).sum(), s)
    assert float(grads["implicit"].abs().max()) < 1e-9 < 1.0 < float(grads["fixed"].abs().max())


def test_a_capacity_of_one_token_per_expert_routes_multiples_of_the_expert_share():
    """5 tokens over 8 experts: capacity 1, each expert's 5/8 goes to one token, so token
    masses are multiples of 5/8 (no routing gives every token 1); loads stay exact."""
    out = otcore.SparseOTRouter(8, backend="torch")(_scores(5, 8, seed=0, dtype=F64))
    masses = out.combine_dense().sum(1)
    torch.testing.assert_close(masses / (5 / 8), (masses / (5 / 8)).round(), rtol=0, atol=1e-9)
    assert float(masses.min()) < 1 < float(masses.max())
    torch.testing.assert_close(out.expert_load, torch.full((8,), 5 / 8, dtype=F64))


def test_a_loose_router_tol_warns_once_at_construction():
    """``tol`` is a fraction of the token mass: above a tenth the router says so once, in its
    own units, and its calls do not repeat the solver's warning (which quoted tol * n_tokens)."""
    import warnings

    with pytest.warns(UserWarning, match="tol=0.2 .a fraction of the token mass"):
        router = otcore.SparseOTRouter(8, tol=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.simplefilter("ignore", otcore.ConvergenceWarning)
        for seed in range(3):
            router(torch.randn(64, 8, generator=torch.Generator().manual_seed(seed)))


def test_the_moe_example_trains_both_routers_and_the_ot_one_keeps_its_capacity():
    """``examples/moe_router.py`` (docs/router.md's example; not run by the other tests): both
    MoEs learn the task (far below predicting 0), and the OT router's busiest expert stays
    within the capacity factor 1.25 of the mean load (balanced by construction), where the
    softmax router's balance loss only discourages overload."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "moe_router.py"
    spec = importlib.util.spec_from_file_location("moe_router_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    try:
        rows = {r["router"]: r for r in example.main(["--steps", "60", "--tokens", "128"])}
    finally:
        torch.set_num_threads(threads)  # (the example pins one thread)
    assert set(rows) == {"softmax-top1", "ot-capacity"}
    for r in rows.values():
        assert math.isfinite(r["test_mse"]) and r["test_mse"] < 0.25 * r["mse_of_zero"], r
    assert rows["ot-capacity"]["max_load"] <= 1.25, rows
