"""The pure-torch primitives (otcore.reference) against dense float64 formulas.

The oracle below builds the whole cost matrix from explicit coordinate
differences in float64 and evaluates every primitive from its definition
(``P_ij = exp((F_i + G_j - C_ij)/eps)`` with biased potentials F, G). Three
regimes (the ``blocked`` fixture): one block; *streamed*, where shrinking
``reference.BLOCK_ELEMENTS`` makes the point clouds' cost computed tile by
tile in reused buffers and cut into many ragged blocks; and *tiled*, where
shrinking only ``reference.TILE_ELEMENTS`` reads a held cost (a cost matrix,
or a point cloud's cached cost) in many row and (transposed) column tiles.
"""

import math
import platform

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import otcore
from otcore import reference

N, M, EPS = 37, 53, 0.1
# where backend="triton" runs: the real kernels with CUDA, the interpreter without
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# a block limit that cuts 37 x 53 into several row (and column) blocks, the last one ragged
TINY_BLOCK = 400


# ----------------------------------------------------------------------------- oracle
def cost64(x, y, cost):
    """Dense (B, n, m) cost in float64 from explicit differences."""
    diff = x.double()[:, :, None, :] - y.double()[:, None, :, :]
    sq = (diff * diff).sum(-1)
    return sq if cost == "sqeuclidean" else sq.sqrt()


def make_case(kind, d, batch, dtype=torch.float64, seed=0, n=N, m=M, offset=0.0):
    """Geometry, dense float64 cost (B, n, m) and biased potentials F (B, n), G (B, m).

    ``offset`` shifts both clouds (the cost does not change); the oracle's cost is
    computed from the coordinates as the geometry holds them (rounded to ``dtype``).
    """
    g = torch.Generator().manual_seed(seed)
    B = batch or 1
    x = (torch.rand(B, n, d, generator=g, dtype=torch.float64) + offset).to(dtype).double()
    y = (torch.rand(B, m, d, generator=g, dtype=torch.float64) * 0.9 + 0.05 + offset).to(dtype).double()
    if kind == "matrix":
        C = torch.rand(B, n, m, generator=g, dtype=torch.float64)
        geom = otcore.CostMatrix((C if batch else C[0]).to(dtype))
        inputs = (C,)
    else:
        C = cost64(x, y, kind)
        geom = otcore.PointCloud((x if batch else x[0]).to(dtype), (y if batch else y[0]).to(dtype), cost=kind)
        inputs = (x, y)
    # potentials around the cost scale so that the plan has entries of many magnitudes
    F = (torch.randn(B, n, generator=g, dtype=torch.float64) * 0.1 + 0.2).to(dtype)
    G = (torch.randn(B, m, generator=g, dtype=torch.float64) * 0.1 + 0.2).to(dtype)
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


@pytest.fixture(params=["one-block", "streamed", "tiled"])
def blocked(request, monkeypatch):
    """``streamed``: point clouds too large to hold, cost computed tile by tile;
    ``tiled``: costs held whole (matrix, cached cloud cost) but read in small tiles."""
    if request.param == "streamed":
        monkeypatch.setattr(reference, "BLOCK_ELEMENTS", TINY_BLOCK)
    elif request.param == "tiled":
        monkeypatch.setattr(reference, "TILE_ELEMENTS", TINY_BLOCK)
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


def test_streamed_path_never_asks_for_a_cost_block(monkeypatch):
    """A streamed point cloud computes its cost itself, tile by tile; a held cost is read
    from ``geom.cost_block()`` (the geometry's cache), once per primitive call."""
    geom, *_ = make_case("sqeuclidean", 3, 2)
    F, G = torch.zeros(2, N, dtype=torch.float64), torch.zeros(2, M, dtype=torch.float64)
    calls = []
    orig = geom.cost_block

    def spy():
        calls.append(1)
        return orig()

    geom.cost_block = spy
    run = [
        lambda: geom.softmin(G, EPS, 1),
        lambda: geom.softmin(F, EPS, 0),
        lambda: geom.marginals(F, G, EPS, 0),
        lambda: geom.plan_cost(F, G, EPS),
        lambda: geom.plan_topk(F, G, EPS, 2),
    ]
    for f in run:
        f()
    assert calls == [1] * len(run)
    calls.clear()
    monkeypatch.setattr(reference, "BLOCK_ELEMENTS", TINY_BLOCK)
    for f in run:
        f()
    geom.plan_cost_grad(F, G, EPS)
    assert calls == []


class FreshAllocations(TorchDispatchMode):
    """Records the number of elements of every tensor an op creates (an output whose
    storage is none of the op's inputs'; ``out=`` and in-place results are not new)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = pytree.tree_leaves((args, kwargs))
        given = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                self.sizes.append(t.numel())
        return out


@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streamed_primitives_allocate_their_tiles_once_per_call(cost, dtype, monkeypatch):
    """Streaming 2 x 301 x 397 in ~13 ragged blocks per pass: each call allocates its 2-3
    work tiles once, every other tensor it creates is a vector-sized result, and the
    results still match the float64 oracle."""
    n, m, d, B, limit = 301, 397, 3, 2, 20_000
    monkeypatch.setattr(reference, "BLOCK_ELEMENTS", limit)
    geom, C, F, G, _ = make_case(cost, d, B, dtype=dtype, n=n, m=m)
    P = plan64(C, F, G, EPS)
    gen = torch.Generator().manual_seed(1)
    V = torch.rand(B, m, 4, generator=gen, dtype=torch.float64).to(dtype)  # >= 0: no cancellation in P V
    big = 5_000  # > any vector-sized tensor here (<= 2 * 397 * 4), < a full tile (~20,000)
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (2e-5, 1e-6)
    checks = [  # (name, call, tiles it may allocate, oracle)
        ("softmin rows", lambda: geom.softmin(G, EPS, 1), 2, softmin64(C, G, EPS, 1)),
        ("softmin cols", lambda: geom.softmin(F, EPS, 0), 2, softmin64(C, F, EPS, 0)),
        ("marginals", lambda: geom.marginals(F, G, EPS, 0), 2, P.sum(1)),
        ("apply_plan", lambda: geom.apply_plan(F, G, EPS, V, 1), 2, P @ V.double()),
        ("plan_cost", lambda: geom.plan_cost(F, G, EPS), 3, (P * C).sum((1, 2))),
        ("plan_topk", lambda: geom.plan_topk(F, G, EPS, 3)[0], 2, torch.topk(P, 3, dim=2).values),
    ]
    for name, call, tiles, want in checks:
        with FreshAllocations() as spy:
            got = call()
        large = [k for k in spy.sizes if k >= big]
        assert len(large) <= tiles, (name, large)
        assert max(spy.sizes) <= limit, name
        close(got, want, rtol=rtol, atol=atol)
    with FreshAllocations() as spy:
        geom.plan_cost_grad(F, G, EPS)
    # per side: the work tile, the streamed cost's difference tile, the kept cost (Euclidean:
    # W = P / C), the per-entry differences of the gradient
    assert len([k for k in spy.sizes if k >= big]) <= 2 * (4 if cost == "euclidean" else 3)
    assert max(spy.sizes) <= limit


@pytest.mark.parametrize("ties", [False, True])
def test_the_k_sparse_pass_allocates_its_tiles_once_per_call(ties, monkeypatch):
    """The k-sparse twin (sparse_ot's torch path) over ~13 blocks: it had allocated its
    tie-break's masks and ranks per block, and glibc's heap grew by up to 2.2 GiB on a
    20,000 x 20,000 pass, past the dense cost (a review). Now a fixed set of work tiles per
    call (the cost's three, the tie-break's four), whatever the number of blocks. (At k =
    the line length the outputs are themselves dense.)"""
    k = 5
    from otcore import reference_ksparse as RK

    n, m, B, limit = 301, 397, 2, 20_000
    monkeypatch.setattr(reference, "BLOCK_ELEMENTS", limit)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(B, n, 2, generator=g), torch.rand(B, m, 2, generator=g)
    if ties:  # duplicated points and a flat potential: ties at every line's k-th place
        x, y = (x * 4).round() / 4, (y * 4).round() / 4
    geom = otcore.PointCloud(x, y)
    h = torch.zeros(B, n) if ties else 0.1 * torch.randn(B, n, generator=g)
    mass = torch.full((B, m), 1.0 / m)
    with FreshAllocations() as spy:
        got = RK.ksparse_columns(geom, h, 0.5, k, 0, mass=mass)
    large = [size for size in spy.sizes if size >= 5_000]  # (the outputs: B * m * k = 3,970)
    assert math.ceil(m / (limit // (B * n))) >= 10 and len(large) <= 7, large
    monkeypatch.setattr(reference, "BLOCK_ELEMENTS", 10**9)  # one block (the cost held whole: rounds otherwise)
    want = RK.ksparse_columns(geom, h, 0.5, k, 0, mass=mass)
    assert torch.equal(got.idx, want.idx)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("N,L", [(600, 8), (8, 600)])
@pytest.mark.parametrize("damped", [False, True])
def test_the_direct_semi_dual_solve_builds_no_position_by_line_matrix(N, L, damped, monkeypatch):
    """sparse_ot's implicit gradient (and the relaxed start's Newton steps) with at most 64
    positions or lines: the dense float64 N x L incidence it built grew a backward on
    200,000 x 64 point clouds by 166 MiB, 3.4x the dense float32 cost (a review). Now no
    tensor it makes is larger than the inputs' (B max(N, L) k; its slices of M: 500), and
    the solution is K's, built here from the whole incidence: the minimum-norm one for a
    right-hand side in K's range, or the damped system's."""
    from otcore.solvers import _qot_newton as Q

    g = torch.Generator().manual_seed(5)
    k = 3
    idx = torch.stack([torch.randperm(N, generator=g)[:k].sort().values for _ in range(2 * L)]).reshape(2, L, k)
    support = torch.rand(2, L, k, generator=g) > 0.1
    M = torch.zeros(2, N, L, dtype=torch.float64).scatter_(1, idx.transpose(1, 2), support.transpose(1, 2).double())
    D, S = M.sum(2), M.sum(1)
    if damped:
        D = D * 1.1 + 0.1 * (D == 0)
    K = torch.diag_embed(D) - (M / S.clamp(min=1)[:, None, :]) @ M.transpose(1, 2)
    u = (K @ torch.randn(2, N, 1, generator=g, dtype=torch.float64))[..., 0] / 0.3  # in K's range
    lam = torch.full((2,), 0.1, dtype=torch.float64) if damped else None
    monkeypatch.setattr(Q, "SLICE_ENTRIES", 500)
    with FreshAllocations() as spy:
        got = Q.semi_dual_hessian_solve(0.3, idx, support, u, lam)
    assert max(spy.sizes) <= 2 * max(N, L) * k < 2 * N * L, max(spy.sizes)
    want = torch.linalg.solve(K, 0.3 * u) if damped else (torch.linalg.pinv(K, hermitian=True) @ (0.3 * u)[..., None])[..., 0]
    close(got, want, rtol=1e-7, atol=1e-7 * float(want.abs().max()))


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


@pytest.mark.parametrize("kind", ["sqeuclidean", "euclidean"])
def test_softmin_line_of_all_zero_weights_gives_inf(kind, blocked):
    """Every ``h`` of a line -inf (problem 1 has no mass at all): +inf, as -eps logsumexp gives."""
    geom, C, F, G, _ = make_case(kind, 3, 2)
    G = G.clone()
    G[1] = -float("inf")
    s = geom.softmin(G, EPS, 1)
    close(s[0], softmin64(C, G, EPS, 1)[0])
    assert (s[1] == float("inf")).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["sqeuclidean", "euclidean"])
def test_coordinates_far_from_the_origin_keep_their_accuracy(kind, dtype, blocked):
    """Clouds offset by 1000: differences are taken before squaring, so the float32 cost
    keeps ~1e-7 relative accuracy (the |x|^2 + |y|^2 - 2xy expansion loses ~all of it,
    checked below so that the tolerance means something)."""
    geom, C, F, G, _ = make_case(kind, 3, 2, dtype=dtype, offset=1000.0)
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-5, 1e-6)
    close(geom.softmin(G, EPS, 1), softmin64(C, G, EPS, 1), rtol=rtol, atol=atol)
    close(geom.softmin(F, EPS, 0), softmin64(C, F, EPS, 0), rtol=rtol, atol=atol)
    P = plan64(C, F, G, EPS)
    close(geom.marginals(F, G, EPS, 1), P.sum(2), rtol=10 * rtol, atol=atol)
    close(geom.plan_cost(F, G, EPS), (P * C).sum((1, 2)), rtol=10 * rtol, atol=atol)
    if dtype == torch.float32:
        x, y = geom.x, geom.y
        sq = (x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :] - 2 * x @ y.transpose(1, 2)
        naive = sq.clamp(min=0) if kind == "sqeuclidean" else sq.clamp(min=0).sqrt()
        assert float((naive.double() - C).abs().max()) > 1e-2


@pytest.mark.parametrize("n,m,d", [(1, 5, 3), (6, 1, 2), (1, 1, 1), (37, 53, 1)])
@pytest.mark.parametrize("kind", ["sqeuclidean", "euclidean"])
def test_degenerate_shapes(n, m, d, kind, blocked):
    """Single points and one-dimensional clouds, batched, in every regime (BLOCK_ELEMENTS
    below one line still processes one line per block)."""
    geom, C, F, G, inputs = make_case(kind, d, 2, n=n, m=m, seed=3)
    P = plan64(C, F, G, EPS)
    close(geom.softmin(G, EPS, 1), softmin64(C, G, EPS, 1))
    close(geom.softmin(F, EPS, 0), softmin64(C, F, EPS, 0))
    close(geom.marginals(F, G, EPS, 0), P.sum(1))
    close(geom.apply_plan(F, G, EPS, G, 1), (P @ G[..., None].double())[..., 0])
    close(geom.plan_cost(F, G, EPS), (P * C).sum((1, 2)))
    vals, idx = geom.plan_topk(F, G, EPS, 1)
    close(vals[..., 0], P.amax(2))
    x, y = (t.clone().requires_grad_(True) for t in inputs)
    (plan64(C, F, G, EPS) * cost64(x, y, kind)).sum().backward()
    gx, gy = geom.plan_cost_grad(F, G, EPS)
    close(gx, x.grad)
    close(gy, y.grad)


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
def test_float32_geometry_matches_float64_oracle(kind, blocked):
    geom, C, F, G, _ = make_case(kind, 3, 2, dtype=torch.float32)
    assert geom.dtype == torch.float32
    out = geom.softmin(G, EPS, 1)
    assert out.dtype == torch.float32
    close(out, softmin64(C, G, EPS, 1), rtol=1e-5, atol=1e-6)
    close(geom.marginals(F, G, EPS, 0), plan64(C, F, G, EPS).sum(1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype):
    g = torch.Generator().manual_seed(9)
    x = torch.rand(N, 3, generator=g).to(dtype)
    y = torch.rand(M, 3, generator=g).to(dtype)
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


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("streamed", [False, True])
def test_geometry_reads_its_inputs_live(monkeypatch, backend, dtype, streamed):
    """An in-place change of x (an optimizer step, say) is seen by the next call on the
    same geometry: the cached cost of a small problem, the float32 copy of half inputs
    and the Triton path's centred points are all refreshed."""
    if backend == "triton" and platform.system() != "Linux":  # a dependency on Linux: must not skip there
        pytest.importorskip("triton", reason="triton is a dependency on Linux only (pyproject.toml)")
    if streamed:
        monkeypatch.setattr(reference, "BLOCK_ELEMENTS", 64)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(9, 2, generator=g).to(DEVICE, dtype)
    y = torch.rand(7, 2, generator=g).to(DEVICE, dtype)
    geom = otcore.PointCloud(x, y)
    h = torch.zeros(1, 7, dtype=geom.dtype, device=DEVICE)
    geom.softmin(h, 0.1, 1, backend=backend)  # fills the caches
    with torch.no_grad():
        x.mul_(3).add_(1)
    got = geom.softmin(h, 0.1, 1, backend=backend)
    want = otcore.PointCloud(x, y).softmin(h, 0.1, 1, backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    C = torch.cdist(x[None].double(), y[None].double()) ** 2
    torch.testing.assert_close(got.double(), -0.1 * torch.logsumexp(-C / 0.1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,err,match", [(8, ValueError, r"^k must be <= m = 7"), (0, ValueError, r"^k must be >= 1"),
                                         (2.0, TypeError, r"^k must be an int")])
def test_plan_topk_rejects_bad_k_on_the_torch_backend(k, err, match):
    geom = otcore.PointCloud(torch.rand(5, 2, generator=torch.Generator().manual_seed(1)),
                             torch.rand(7, 2, generator=torch.Generator().manual_seed(2)))
    with pytest.raises(err, match=match):
        geom.plan_topk(torch.zeros(1, 5), torch.zeros(1, 7), 0.1, k, backend="torch")


@pytest.mark.parametrize("dtype,scale,eps", [(torch.float16, 1.0, 0.05), (torch.bfloat16, 1.0, 0.05),
                                             (torch.float16, 1000.0, 0.01)])
def test_softmin_takes_a_low_precision_h_in_the_compute_dtype(dtype, scale, eps):
    """An fp16/bf16 ``h`` is read in the geometry's dtype, as the kernel reads it: the twin
    formed ``h * log2(e) / eps`` in fp16 (overflow, NaN at |h| ~ 1e3 and eps = 0.01) and
    erred 5e-4 (fp16) and 3.5e-3 (bf16) at |h| ~ 1, against 2e-7 for the kernel."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(1, 12, 3, generator=g), torch.rand(1, 17, 3, generator=g)
    h = (scale * torch.randn(1, 17, generator=g)).to(dtype)
    geom = otcore.PointCloud(x, y)
    got = reference.softmin(geom, h, eps, 1)
    C = torch.cdist(x.double(), y.double()) ** 2
    want = -eps * torch.logsumexp((h.double()[:, None, :] - C) / eps, -1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * scale)
