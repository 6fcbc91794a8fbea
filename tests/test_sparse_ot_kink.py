"""The value's cost gradient where k binds at a tie (otcore/solvers/_kink.py): the plan
mixed over the tied supports, checked against central finite differences of the value
(tight solves) where it is differentiable, and against both one-sided ones where it is
not (a supergradient of the concave value lies between them). The returned plan, the
gradient before the mixing, fails each of these checks (asserted too, so that a mixing
that did nothing cannot pass)."""

import pytest
import torch

import otcore

H = 1e-4  # the value's finite-difference step (1e-6 left the tight solves' 1e-9 errors at 1e-3)


def _costs(n, m, seed, dtype=torch.float64):
    return torch.rand(n, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _value(C, k, gamma, formulation="semi-dual"):
    return float(otcore.sparse_ot(otcore.CostMatrix(C), k=k, gamma=gamma, tol=1e-13, ftol=1e-15, max_iter=20000,
                                  formulation=formulation).value)


def _gradient(C, k, gamma, **kw):
    Cg = C.clone().requires_grad_(True)
    r = otcore.sparse_ot(otcore.CostMatrix(Cg), k=k, gamma=gamma, **kw)
    (G,) = torch.autograd.grad(r.value.sum(), Cg)
    return G.double(), r


def _directions(n, m, count=3):
    g = torch.Generator().manual_seed(99)
    return [torch.randn(n, m, generator=g, dtype=torch.float64) for _ in range(count)]


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("formulation", ["semi-dual", "dual"])
def test_the_value_gradient_at_a_tie_matches_finite_differences(seed, formulation):
    """6 x 5 random costs, k = 2, gamma = 0.3, float64: two rows tie for a column's second
    place, the solve stops on ftol with the row sums off by 0.018-0.13 (the returned plan
    T). The gradient meets the row sums and matches the value's central differences to
    1e-4 in three directions; T missed them by 0.02-0.11 (seed 0) and 0.004-0.017
    (seed 3)."""
    C = _costs(6, 5, seed)
    G, r = _gradient(C, 2, 0.3, formulation=formulation)
    T = r.to_dense().detach().double()
    assert float(r.grad_norm) > 1e-2 and bool(r.converged)  # a kink: converged on ftol
    torch.testing.assert_close(G.sum(1), torch.full((6,), 1 / 6, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(G.sum(0), torch.full((5,), 1 / 5, dtype=torch.float64), atol=1e-12, rtol=0)
    assert int((G > 0).sum(0).max()) > 2  # a column mixes its tied supports: more than k entries
    v0, miss_T = _value(C, 2, 0.3, formulation), 0.0
    for D in _directions(6, 5):
        fd = (_value(C + H * D, 2, 0.3, formulation) - _value(C - H * D, 2, 0.3, formulation)) / (2 * H)
        assert abs(float((G * D).sum()) - fd) < 1e-4, (float((G * D).sum()), fd)
        miss_T = max(miss_T, abs(float((T * D).sum()) - fd))
    assert v0 == pytest.approx(float(r.value), abs=1e-6)  # the same optimum at the default tol
    assert miss_T > 3e-3


def test_where_the_value_has_a_kink_the_gradient_is_a_supergradient():
    """30 x 20 random costs, k = 3 (seed 0): two columns tie at their third place and the
    value is not differentiable there (its one-sided differences part). The concave
    value's supergradient lies between them in every direction; the returned plan falls
    outside in at least one (in three other directions, 0.2318 / 0.2321 against the
    plan's 0.2271 and the gradient's 0.2319, the plan fell outside in all three)."""
    C = _costs(30, 20, 0)
    G, r = _gradient(C, 3, 0.3)
    T = r.to_dense().detach().double()
    v0, outside_T = _value(C, 3, 0.3), 0
    for D in _directions(30, 20):
        up = (_value(C + H * D, 3, 0.3) - v0) / H
        down = (v0 - _value(C - H * D, 3, 0.3)) / H
        assert up - 2e-5 <= float((G * D).sum()) <= down + 2e-5, (up, float((G * D).sum()), down)
        outside_T += not (up - 2e-5 <= float((T * D).sum()) <= down + 2e-5)
    assert outside_T >= 1


def test_float32_point_clouds_batched_and_transposed_get_the_float64_gradient():
    """The same mixing through a float32 batch of two problems (one at a kink, one from
    another seed), on the rows (axis=1, the costs transposed), and through a point cloud's
    chain rule: each equals its float64 cost-matrix gradient."""
    C64 = _costs(6, 5, 0)
    want, _ = _gradient(C64, 2, 0.3)
    other = _costs(6, 5, 1)
    want_other, _ = _gradient(other, 2, 0.3)
    batch = torch.stack([C64, other]).float()
    got, r = _gradient(batch, 2, 0.3)
    torch.testing.assert_close(got[0], want, atol=2e-6, rtol=0)
    torch.testing.assert_close(got[1], want_other, atol=2e-6, rtol=0)
    got_t, _ = _gradient(C64.T.contiguous(), 2, 0.3, axis=1)
    torch.testing.assert_close(got_t.T, want, atol=1e-10, rtol=0)
    # a point cloud whose squared distances are these costs' shape: x in 2-D, y in 2-D
    g = torch.Generator().manual_seed(5)
    x = torch.rand(8, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    y = torch.rand(7, 2, generator=g, dtype=torch.float64)
    r = otcore.sparse_ot(otcore.PointCloud(x, y), k=2, gamma=0.05)
    (gx,) = torch.autograd.grad(r.value, x)
    Gc, _ = _gradient(torch.cdist(x.detach(), y) ** 2, 2, 0.05)
    torch.testing.assert_close(gx, 2 * (Gc.sum(1, keepdim=True) * x.detach() - Gc @ y), atol=1e-9, rtol=0)


def test_a_smooth_optimum_keeps_the_plan_as_its_gradient():
    """Where no tie straddles the k-th place (seed 1: the solve meets tol) nothing is mixed:
    the gradient is the returned plan, bit for bit."""
    C = _costs(6, 5, 1)
    G, r = _gradient(C, 2, 0.3)
    assert float(r.grad_norm) <= 1e-5
    assert torch.equal(G, r.to_dense().detach().double())


def test_the_kernel_backend_gets_the_same_mixed_gradient():
    """backend="triton": the candidates' pass is the k-sparse kernel (the interpreter here)
    with k + 8 slots; the gradient equals the torch twin's."""
    C = _costs(6, 5, 0)
    want, _ = _gradient(C, 2, 0.3)
    got, r = _gradient(C, 2, 0.3, backend="triton")
    assert r.info["backend"] == "triton"
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    assert not torch.equal(got, r.to_dense().detach().double())  # mixed, not the returned plan


def test_a_tie_across_whole_lines_reads_them_whole():
    """Equal costs (20 x 10, k = 2): every position of every column ties, past the first
    k + 8 candidates read; the pass is read again twice as wide up to the whole column,
    and the mixed gradient meets both marginals (cut at 10 candidates, rows 10-19 could
    get none: the row residual stayed 1.0 and the gradient was the returned plan)."""
    C = torch.zeros(20, 10, dtype=torch.float64)
    G, r = _gradient(C, 2, 0.1)
    assert float(r.grad_norm) > 1
    torch.testing.assert_close(G.sum(1), torch.full((20,), 1 / 20, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(G.sum(0), torch.full((10,), 1 / 10, dtype=torch.float64), atol=1e-12, rtol=0)


def test_past_the_largest_program_the_gradient_stays_the_plan(monkeypatch):
    """A problem whose linear program would exceed ``_kink.LP_MAX`` (candidates of all lines
    plus positions) is not mixed: its gradient is the returned plan, as before the mixing
    (the 6 x 5 kink above needs 5 lines * 6 candidates + 6 positions = 36)."""
    from otcore.solvers import _kink

    C = _costs(6, 5, 0)
    monkeypatch.setattr(_kink, "LP_MAX", 35)
    G, r = _gradient(C, 2, 0.3)
    assert torch.equal(G, r.to_dense().detach().double())
    monkeypatch.setattr(_kink, "LP_MAX", 36)
    G, r = _gradient(C, 2, 0.3)
    assert not torch.equal(G, r.to_dense().detach().double())
