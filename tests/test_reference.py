"""The pure-torch primitives (otcore.reference) against dense float64 formulas.

The oracle below builds the whole cost matrix from explicit coordinate
differences in float64 and evaluates every primitive from its definition
(``P_ij = exp((F_i + G_j - C_ij)/eps)`` with biased potentials F, G). The
blocked path is exercised by shrinking ``reference.BLOCK_ELEMENTS`` so that
the 37 x 53 problems are cut into many (ragged) blocks.
"""

import math

import pytest
import torch

import otcore
from otcore import reference

N, M, EPS = 37, 53, 0.1
# a block limit that cuts 37 x 53 into several row (and column) blocks, the last one ragged
TINY_BLOCK = 400


# ----------------------------------------------------------------------------- oracle
def cost64(x, y, cost):
    """Dense (B, n, m) cost in float64 from explicit differences."""
    diff = x.double()[:, :, None, :] - y.double()[:, None, :, :]
    sq = (diff * diff).sum(-1)
    return sq if cost == "sqeuclidean" else sq.sqrt()


def make_case(kind, d, batch, dtype=torch.float64, seed=0):
    """Geometry, dense float64 cost (B, n, m) and biased potentials F (B, n), G (B, m)."""
    g = torch.Generator().manual_seed(seed)
    B = batch or 1
    x = torch.rand(B, N, d, generator=g, dtype=torch.float64)
    y = torch.rand(B, M, d, generator=g, dtype=torch.float64) * 0.9 + 0.05
    if kind == "matrix":
        C = torch.rand(B, N, M, generator=g, dtype=torch.float64)
        geom = otcore.CostMatrix((C if batch else C[0]).to(dtype))
        inputs = (C,)
    else:
        C = cost64(x, y, kind)
        geom = otcore.PointCloud((x if batch else x[0]).to(dtype), (y if batch else y[0]).to(dtype), cost=kind)
        inputs = (x, y)
    # potentials around the cost scale so that the plan has entries of many magnitudes
    F = (torch.randn(B, N, generator=g, dtype=torch.float64) * 0.1 + 0.2).to(dtype)
    G = (torch.randn(B, M, generator=g, dtype=torch.float64) * 0.1 + 0.2).to(dtype)
    return geom, C, F, G, inputs


def plan64(C, F, G, eps):
    return torch.exp((F.double()[:, :, None] + G.double()[:, None, :] - C) / eps)


def softmin64(C, h, eps, axis):
    h = h.double()
    if axis == 1:
        return -eps * torch.logsumexp((h[:, None, :] - C) / eps, dim=2)
    return -eps * torch.logsumexp((h[:, :, None] - C) / eps, dim=1)


def close(a, b, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


KINDS = ["sqeuclidean", "euclidean", "matrix"]
# (cost, d, batch): both costs with d = 3 and d = 17, unbatched and batched, and dense matrices
CASES = [
    ("sqeuclidean", 3, None),
    ("sqeuclidean", 17, 2),
    ("euclidean", 3, 2),
    ("euclidean", 17, None),
    ("matrix", 3, None),
    ("matrix", 3, 2),
]


@pytest.fixture(params=[False, True], ids=["one-block", "blocked"])
def blocked(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(reference, "BLOCK_ELEMENTS", TINY_BLOCK)
    return request.param


# ----------------------------------------------------------------------------- primitives
@pytest.mark.parametrize("kind,d,batch", CASES)
def test_softmin_both_axes(kind, d, batch, blocked):
    geom, C, F, G, _ = make_case(kind, d, batch)
    close(geom.softmin(G, EPS, 1, backend="torch"), softmin64(C, G, EPS, 1))
    close(geom.softmin(F, EPS, 0, backend="torch"), softmin64(C, F, EPS, 0))


@pytest.mark.parametrize("kind,d,batch", CASES)
def test_apply_plan_vectors_and_matrices(kind, d, batch, blocked):
    geom, C, F, G, _ = make_case(kind, d, batch)
    P = plan64(C, F, G, EPS)
    gen = torch.Generator().manual_seed(5)
    B = geom.batch
    v, V = torch.randn(B, M, generator=gen, dtype=torch.float64), torch.randn(B, M, 4, generator=gen, dtype=torch.float64)
    u, U = torch.randn(B, N, generator=gen, dtype=torch.float64), torch.randn(B, N, 3, generator=gen, dtype=torch.float64)
    close(geom.apply_plan(F, G, EPS, v, 1, backend="torch"), (P @ v[..., None])[..., 0])
    close(geom.apply_plan(F, G, EPS, V, 1, backend="torch"), P @ V)
    close(geom.apply_plan(F, G, EPS, u, 0, backend="torch"), (P.transpose(1, 2) @ u[..., None])[..., 0])
    close(geom.apply_plan(F, G, EPS, U, 0, backend="torch"), P.transpose(1, 2) @ U)


@pytest.mark.parametrize("kind,d,batch", CASES)
def test_marginals_plan_and_cost(kind, d, batch, blocked):
    geom, C, F, G, _ = make_case(kind, d, batch)
    P = plan64(C, F, G, EPS)
    close(geom.marginals(F, G, EPS, 1, backend="torch"), P.sum(2))
    close(geom.marginals(F, G, EPS, 0, backend="torch"), P.sum(1))
    close(geom.plan(F, G, EPS, backend="torch"), P)
    close(geom.plan_cost(F, G, EPS, backend="torch"), (P * C).sum((1, 2)))


@pytest.mark.parametrize("kind,d,batch", CASES)
@pytest.mark.parametrize("k", [1, 5])
def test_plan_topk(kind, d, batch, k, blocked):
    geom, C, F, G, _ = make_case(kind, d, batch)
    P = plan64(C, F, G, EPS)
    vals, idx = geom.plan_topk(F, G, EPS, k, backend="torch")
    want_vals, want_idx = torch.topk(P, k, dim=2)
    close(vals, want_vals)
    assert torch.equal(idx, want_idx)  # random continuous data: no ties


@pytest.mark.parametrize("kind,d,batch", CASES)
def test_plan_cost_grad_matches_autograd_of_dense_formula(kind, d, batch, blocked):
    """<P, C(inputs)> differentiated with P frozen, by torch autograd on the dense float64 formula."""
    geom, _, F, G, inputs = make_case(kind, d, batch)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    C = leaves[0] if kind == "matrix" else cost64(leaves[0], leaves[1], kind)
    P = plan64(C.detach(), F, G, EPS)
    torch.autograd.backward((P * C).sum())
    got = geom.plan_cost_grad(F, G, EPS, backend="torch")
    assert len(got) == len(leaves)
    for g_got, leaf in zip(got, leaves):
        close(g_got, leaf.grad)


def test_blocked_path_never_builds_the_full_cost(monkeypatch):
    """With a tiny block limit every cost block of a point cloud stays within it."""
    monkeypatch.setattr(reference, "BLOCK_ELEMENTS", TINY_BLOCK)
    geom, C, F, G, _ = make_case("sqeuclidean", 3, 2)
    sizes = []
    orig = geom.cost_block

    def spy(rows=slice(None), cols=slice(None)):
        out = orig(rows, cols)
        sizes.append(out.numel())
        return out

    geom.cost_block = spy
    geom.softmin(G, EPS, 1)
    geom.softmin(F, EPS, 0)
    geom.marginals(F, G, EPS, 1)
    geom.plan_cost(F, G, EPS)
    geom.plan_cost_grad(F, G, EPS)
    assert len(sizes) > 8
    # a block holds at most one row (column) per problem beyond the limit: max(limit, B * other)
    assert max(sizes) <= max(TINY_BLOCK, 2 * max(N, M)) < 2 * N * M


# ----------------------------------------------------------------------------- special values
@pytest.mark.parametrize("kind", KINDS)
def test_zero_weight_biases_give_zero_rows_and_are_ignored_by_softmin(kind, blocked):
    """A point of zero weight has bias -inf: its plan row/column is 0 and softmin skips it."""
    geom, C, F, G, _ = make_case(kind, 3, 2)
    F, G = F.clone(), G.clone()
    F[:, [0, 7]] = -float("inf")
    G[:, [3, M - 1]] = -float("inf")
    P = geom.plan(F, G, EPS)
    assert torch.isfinite(P).all()
    assert (P[:, [0, 7], :] == 0).all() and (P[:, :, [3, M - 1]] == 0).all()
    close(P, plan64(C, F, G, EPS))
    keep = [j for j in range(M) if j not in (3, M - 1)]
    s = geom.softmin(G, EPS, 1)
    assert torch.isfinite(s).all()
    close(s, softmin64(C[:, :, keep], G[:, keep], EPS, 1))
    close(geom.marginals(F, G, EPS, 1), P.sum(2))
    close(geom.plan_cost(F, G, EPS), (P * C).sum((1, 2)))


def test_softmin_is_stable_for_tiny_eps():
    """Log-domain: eps far below the cost scale gives the hard minimum, not inf/nan."""
    geom, C, F, G, _ = make_case("sqeuclidean", 3, None)
    eps = 1e-4
    s = geom.softmin(G, eps, 1)
    assert torch.isfinite(s).all()
    close(s, softmin64(C, G, eps, 1))
    hard = (C - G[:, None, :]).amin(2)
    assert float((s - hard).abs().max()) <= eps * torch.log(torch.tensor(float(M))) + 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_float32_geometry_matches_float64_oracle(kind):
    geom, C, F, G, _ = make_case(kind, 3, 2, dtype=torch.float32)
    assert geom.dtype == torch.float32
    out = geom.softmin(G, EPS, 1)
    assert out.dtype == torch.float32
    close(out, softmin64(C, G, EPS, 1), rtol=1e-5, atol=1e-6)
    close(geom.marginals(F, G, EPS, 0), plan64(C, F, G, EPS).sum(1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype):
    x = torch.rand(N, 3).to(dtype)
    y = torch.rand(M, 3).to(dtype)
    geom = otcore.PointCloud(x, y)
    assert geom.dtype == torch.float32
    C = cost64(x[None], y[None], "sqeuclidean")  # oracle on the rounded inputs
    close(geom.cost_block(), C, rtol=1e-6, atol=1e-6)
    Cm = otcore.CostMatrix(C[0].to(dtype))
    assert Cm.dtype == torch.float32


def test_euclidean_gradient_is_zero_where_points_coincide():
    """The Euclidean cost is not differentiable at x_i = y_j; the documented choice is 0 there."""
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    geom = otcore.PointCloud(x, x.clone(), cost="euclidean")
    F = torch.zeros(1, 2, dtype=torch.float64)
    gx, gy = geom.plan_cost_grad(F, F, 1.0)
    # off-diagonal terms only: P_01 (x0 - x1)/|x0 - x1| and P_10 (x1 - x0)/|.|
    p = math.exp(-1.0)
    close(gx[0], torch.tensor([[-p, 0.0], [p, 0.0]], dtype=torch.float64))
    close(gy[0], torch.tensor([[-p, 0.0], [p, 0.0]], dtype=torch.float64))
