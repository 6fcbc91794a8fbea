"""ELL sparse-plan kernels against their torch twins and float64.

The float64 oracle forms the plan densely, ``P = exp((F_i + G_j - C_ij)/eps)``
with the cost from explicit coordinate differences, and ranks each row with
``torch.sort``; the matrix products are checked against torch's sparse CSR
product and a dense float64 matrix built from the ELL entries. Tensors live on
``DEVICE``: with CUDA the real kernels run, without it the Triton interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py).
"""

import math
import warnings

import pytest
import torch
from kernel_support import DEVICE, RUNTIME_WARNINGS_ARE_ERRORS

import otcore
from otcore import reference_sparse as RS
from otcore.kernels import sparse as KS

pytestmark = RUNTIME_WARNINGS_ARE_ERRORS

N, M = 37, 53
EPS = 0.05
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def rand(*shape, seed, dtype=torch.float32, normal=False):
    """Seeded draws (on a CPU generator, so the same numbers everywhere) on DEVICE."""
    draw = torch.randn if normal else torch.rand
    return draw(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(DEVICE)


def cost64(geom):
    if geom.is_dense:
        return geom.C.double()
    diff = geom.x.double()[:, :, None, :] - geom.y.double()[:, None, :, :]
    sq = (diff * diff).sum(-1)
    return sq if geom.cost == "sqeuclidean" else sq.sqrt()


def make(kind, dtype, batch, seed=0):
    """A geometry and potentials at the Sinkhorn scale (P sums to ~1), with a
    zero-weight row and column (``-inf`` potentials)."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch,) if batch else ()
    if kind == "dense":
        geom = otcore.CostMatrix(torch.rand(*shape, N, M, generator=g, dtype=torch.float64).to(DEVICE, dtype))
    else:
        d, cost = {"sq3": (3, "sqeuclidean"), "euc17": (17, "euclidean")}[kind]
        x = torch.rand(*shape, N, d, generator=g, dtype=torch.float64).to(DEVICE, dtype)
        y = torch.rand(*shape, M, d, generator=g, dtype=torch.float64).to(DEVICE, dtype)
        geom = otcore.PointCloud(x, y, cost=cost)
    C = cost64(geom)
    Bn = geom.batch
    G = torch.full((Bn, M), -EPS * math.log(M), dtype=torch.float64, device=DEVICE)
    F = -EPS * torch.logsumexp((G[:, None, :] - C) / EPS, dim=2) - EPS * math.log(N)
    G = -EPS * torch.logsumexp((F[:, :, None] - C) / EPS, dim=1)
    F[0, 3] = -float("inf")
    G[-1, 5] = -float("inf")
    return geom, C, F.to(dtype), G.to(dtype)


def check_topk(vals, idx, P64, s, tol):
    """``vals`` are the s largest entries of each row of P64, decreasing, at ``idx``."""
    ref = torch.sort(P64, dim=2, descending=True).values[:, :, :s]
    scale = float(P64.max())
    assert vals.shape == idx.shape == ref.shape
    assert idx.dtype == torch.int64
    assert float((vals.double() - ref).abs().max()) <= tol * scale
    assert float((torch.gather(P64, 2, idx) - vals.double()).abs().max()) <= tol * scale
    assert bool((vals[:, :, 1:] <= vals[:, :, :-1]).all())
    # distinct columns in every row where entries are nonzero
    nz = vals > 0
    for b in range(idx.shape[0]):
        for i in range(idx.shape[1]):
            cols = idx[b, i][nz[b, i]]
            assert cols.unique().numel() == cols.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind,batch", [("sq3", 2), ("euc17", 0), ("dense", 2)])
@pytest.mark.parametrize("s", [1, 5, 20])
def test_plan_sparse_rows_matches_twin_and_float64(kind, batch, dtype, s):
    geom, C, F, G = make(kind, dtype, batch)
    P64 = torch.exp((F.double()[:, :, None] + G.double()[:, None, :] - C) / EPS)
    vk, ik = KS.plan_sparse_rows(geom, F, G, EPS, s)
    vt, it = RS.plan_sparse_rows(geom, F, G, EPS, s)
    assert vk.dtype == vt.dtype == dtype
    check_topk(vk, ik, P64, s, TOL[dtype])
    check_topk(vt, it, P64, s, TOL[dtype])
    # the zero-weight row is all zeros; the zero-weight column is never kept
    assert float(vk[0, 3].abs().max()) == 0.0
    assert not bool((ik[-1][vk[-1] > 0] == 5).any())


@pytest.mark.parametrize("narrow", [torch.float16, torch.bfloat16])
def test_plan_sparse_rows_reads_narrow_potentials_in_the_compute_dtype(narrow):
    """fp16/bf16 potentials on a float32 geometry: the kernel had computed and returned in
    their dtype (bf16 rows 1.4e-2 off the twin's float32 ones, a review); both backends now
    read them in float32, as docs/api.md says."""
    geom, C, F, G = make("sq3", torch.float32, 2)
    F, G = F.to(narrow), G.to(narrow)
    P64 = torch.exp((F.double()[:, :, None] + G.double()[:, None, :] - C) / EPS)
    vk, ik = geom.plan_sparse_rows(F, G, EPS, 5, backend="triton")
    vt, it = geom.plan_sparse_rows(F, G, EPS, 5, backend="torch")
    assert vk.dtype == vt.dtype == torch.float32
    check_topk(vk, ik, P64, 5, TOL[torch.float32])
    check_topk(vt, it, P64, 5, TOL[torch.float32])


def test_plan_sparse_rows_full_width_equals_plan():
    """s = m keeps every entry: scattering the ELL rows back gives the dense plan
    (the zero-weight column's slot holds a zero)."""
    geom, C, F, G = make("sq3", torch.float64, 1)
    vals, idx = KS.plan_sparse_rows(geom, F, G, EPS, M)
    dense = torch.zeros(1, N, M, dtype=torch.float64, device=DEVICE).scatter_add_(2, idx, vals)
    P64 = torch.exp((F[:, :, None] + G[:, None, :] - C) / EPS)
    assert float((dense - P64).abs().max()) <= 1e-12 * float(P64.max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind", ["sq3", "dense"])
def test_plan_sparse_rows_past_one_column_tile_keeps_the_tile_offset(kind, dtype):
    """The extraction streams the columns in tiles of ``topk_blocks``' BLOCK_N (128): with
    m = 201 a row's largest entries also come from the second tile, whose column indices
    carry the tile's offset (a mutant storing the index within the tile passed every test,
    all with m = 53 < 128; its indices pointed at entries 0.87 max P off). Through the
    geometry primitive, against the twin and a float64 top-s of the dense plan."""
    m, s = 201, 5
    assert KS.topk_blocks(8, dtype == torch.float64)[1] < m  # the case: two column tiles
    g = torch.Generator().manual_seed(4)
    if kind == "dense":
        geom = otcore.CostMatrix(torch.rand(2, N, m, generator=g, dtype=torch.float64).to(DEVICE, dtype))
    else:
        geom = otcore.PointCloud(torch.rand(2, N, 3, generator=g, dtype=torch.float64).to(DEVICE, dtype),
                                 torch.rand(2, m, 3, generator=g, dtype=torch.float64).to(DEVICE, dtype))
    C = cost64(geom)
    G = torch.full((2, m), -EPS * math.log(m), dtype=torch.float64, device=DEVICE)
    F = -EPS * torch.logsumexp((G[:, None, :] - C) / EPS, dim=2) - EPS * math.log(N)
    G = -EPS * torch.logsumexp((F[:, :, None] - C) / EPS, dim=1)
    F, G = F.to(dtype), G.to(dtype)
    P64 = torch.exp((F.double()[:, :, None] + G.double()[:, None, :] - C) / EPS)
    top = P64.topk(s, dim=2).indices
    reach = (top >= 128).any(2)
    assert float(reach.double().mean()) > 0.5 and bool((top < 128).any())  # the case: most rows reach tile 2
    vk, ik = geom.plan_sparse_rows(F, G, EPS, s, backend="triton")
    vt, it = geom.plan_sparse_rows(F, G, EPS, s, backend="torch")
    check_topk(vk, ik, P64, s, TOL[dtype])
    check_topk(vt, it, P64, s, TOL[dtype])
    if dtype == torch.float64:  # (float32 may order near-ties otherwise: check_topk's values decide there)
        assert torch.equal(ik, it) and torch.equal(ik, top)


def test_geometry_dispatch_reaches_kernel_and_twin():
    geom, C, F, G = make("dense", torch.float64, 2)
    vk, ik = geom.plan_sparse_rows(F, G, EPS, 4, backend="triton")
    vt, it = geom.plan_sparse_rows(F, G, EPS, 4, backend="torch")
    assert float((vk - vt).abs().max()) <= 1e-12 * float(vt.max())
    u = rand(2, N, seed=2, dtype=torch.float64)
    assert torch.allclose(geom.ell_matvec(vk, ik, u, 0, backend="triton"), geom.ell_matvec(vt, it, u, 0), rtol=1e-12)


def test_batches_past_the_grid_limit_run_the_twins(monkeypatch):
    """CUDA caps the grid's batch axis at 65535 programs: larger batches (here: any batch,
    with the cap lowered to 1) run the torch twins instead of failing to launch."""
    geom, C, F, G = make("dense", torch.float64, 2)
    monkeypatch.setattr(KS, "BATCH_MAX", 1)
    monkeypatch.setattr(KS, "_topk_rows_kernel", None)  # any launch would fail
    monkeypatch.setattr(KS, "_ell_cols_kernel", None)
    vk, ik = KS.plan_sparse_rows(geom, F, G, EPS, 4)
    vt, it = RS.plan_sparse_rows(geom, F, G, EPS, 4)
    assert torch.equal(vk, vt) and torch.equal(ik, it)
    u = rand(2, N, seed=3, dtype=torch.float64)
    assert torch.equal(KS.ell_matvec(geom, vk, ik, u, 0), RS.ell_matvec(geom, vt, it, u, 0))


def test_transpose_product_skips_empty_slots_on_both_backends():
    """Empty slots (value 0) add nothing to S^T u even where u is not finite, in the kernel
    (which leaves them out of its atomics) and in the twin alike."""
    vals, idx = random_ell(torch.float64)
    u = rand(2, N, seed=4, dtype=torch.float64).to(DEVICE)
    u[:, 2] = float("inf")  # row 2 is empty
    geom = otcore.CostMatrix(torch.zeros(2, N, M, dtype=torch.float64, device=DEVICE))
    with warnings.catch_warnings():  # the interpreter evaluates 0 * inf before the mask drops it
        warnings.filterwarnings("ignore", "invalid value encountered in multiply", RuntimeWarning)
        got = KS.ell_matvec(geom, vals, idx, u, 0)
    want = RS.ell_matvec(geom, vals, idx, u, 0)
    assert bool(torch.isfinite(want).all())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_deterministic_mode_computes_the_transpose_product_without_atomics(monkeypatch, deterministic_algorithms):
    """Float atomics add in a varying order on a GPU; under
    ``torch.use_deterministic_algorithms(True)`` S^T u runs the twin's ``scatter_add_``
    (deterministic there) and S v (a gather, no atomics) still runs the kernel."""
    vals, idx = random_ell(torch.float32)
    geom = otcore.CostMatrix(torch.zeros(2, N, M, device=DEVICE))
    u, v = rand(2, N, seed=5).to(DEVICE), rand(2, M, seed=6).to(DEVICE)
    monkeypatch.setattr(KS, "_ell_cols_kernel", None)  # a launch would fail
    assert torch.equal(KS.ell_matvec(geom, vals, idx, u, 0), RS.ell_matvec(geom, vals, idx, u, 0))
    torch.testing.assert_close(KS.ell_matvec(geom, vals, idx, v, 1), RS.ell_matvec(geom, vals, idx, v, 1))


def random_ell(dtype, B=2, n=N, m=M, s=6, seed=1):
    """Random ELL matrix with repeated column indices inside rows (sums must add up)."""
    g = torch.Generator().manual_seed(seed)
    vals = torch.rand(B, n, s, generator=g, dtype=torch.float64).to(dtype)
    idx = torch.randint(0, m, (B, n, s), generator=g)
    if s > 1:
        idx[:, :, 1] = idx[:, :, 0]
    vals[:, 2, :] = 0  # an empty row
    return vals.to(DEVICE), idx.to(DEVICE)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("s", [1, 6, 33])
def test_ell_matvec_both_directions(dtype, s):
    geom = otcore.CostMatrix(rand(2, N, M, seed=3, dtype=dtype))
    vals, idx = random_ell(dtype, s=s)
    dense = torch.zeros(2, N, M, dtype=torch.float64, device=DEVICE).scatter_add_(2, idx, vals.double())
    v = rand(2, M, seed=4, dtype=dtype, normal=True)
    u = rand(2, N, seed=5, dtype=dtype, normal=True)
    ref_rows = torch.einsum("bij,bj->bi", dense, v.double())
    ref_cols = torch.einsum("bij,bi->bj", dense, u.double())
    csr = RS.ell_to_csr(vals, idx, M)
    csr_t = RS.ell_to_csr(vals, idx, M, transpose=True)
    csr_rows = (csr @ v.reshape(-1, 1)).reshape(2, N)
    csr_cols = (csr_t @ u.reshape(-1, 1)).reshape(2, M)
    tol = TOL[dtype] * 10
    for out, ref in (
        (KS.ell_matvec(geom, vals, idx, v, 1), ref_rows),
        (RS.ell_matvec(geom, vals, idx, v, 1), ref_rows),
        (csr_rows, ref_rows),
        (KS.ell_matvec(geom, vals, idx, u, 0), ref_cols),
        (RS.ell_matvec(geom, vals, idx, u, 0), ref_cols),
        (csr_cols, ref_cols),
    ):
        assert out.dtype == dtype
        assert float((out.double() - ref).abs().max()) <= tol * float(ref.abs().max())


def test_ell_matvec_rectangular_transpose_shape():
    """S^T u has the column count m of the geometry, not the ELL width."""
    geom = otcore.PointCloud(rand(N, 3, seed=6), rand(M + 8, 3, seed=7))
    vals, idx = random_ell(torch.float32, B=1, m=M + 8, s=3)
    out = KS.ell_matvec(geom, vals, idx, torch.ones(1, N, device=DEVICE), 0)
    assert out.shape == (1, M + 8)
    assert torch.allclose(out.sum(), vals.sum(), rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_geometry_ell_matvec_checks_shapes_and_index_range(backend):
    """The Triton kernels do not mask the column indices: an index out of [0, m) read or
    wrote past the vectors (returning garbage, or corrupting the heap), and a v with fewer
    problems than vals read uninitialised memory. The public primitive checks both."""
    geom, C, F, G = make("dense", torch.float64, 2)
    vals, idx = geom.plan_sparse_rows(F, G, EPS, 3, backend="torch")
    u, v = rand(2, N, seed=3, dtype=torch.float64), rand(2, M, seed=4, dtype=torch.float64)
    for bad in (M, -1):
        wrong = idx.clone()
        wrong[1, 2, 0] = bad
        for axis, vec in ((1, v), (0, u)):
            with pytest.raises(ValueError, match=r"idx must hold column indices in \[0, m="):
                geom.ell_matvec(vals, wrong, vec, axis, backend=backend)
    with pytest.raises(ValueError, match=rf"v must have {M} entries per problem for axis=1 \(m\), as a \(B=2, {M}\)"):
        geom.ell_matvec(vals, idx, v[:1], 1, backend=backend)
    with pytest.raises(ValueError, match="idx must be an int64 tensor"):
        geom.ell_matvec(vals, idx[:, :, :2], v, 1, backend=backend)
    torch.testing.assert_close(geom.ell_matvec(vals, idx, v, 1, backend=backend),
                               RS.ell_matvec(geom, vals, idx, v, 1))
