"""The fused k-sparse Triton kernel (kernels/ksparse.py) against its torch twin and float64.

Without CUDA the kernel runs in the Triton interpreter (TRITON_INTERPRET=1 is set
before Triton is imported when tests/conftest.py has not done it already), on small
odd shapes. The interpreter proves the algebra, not GPU speed or register limits.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from kernel_support import DEVICE, RUNTIME_WARNINGS_ARE_ERRORS

import otcore
from otcore import reference_ksparse as R
from otcore.kernels import ksparse as K

pytestmark = RUNTIME_WARNINGS_ARE_ERRORS


def _geom(kind, n, m, d, batch, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "matrix":
        return otcore.CostMatrix(torch.rand(batch, n, m, generator=g, dtype=dtype).to(DEVICE))
    x = torch.rand(batch, n, d, generator=g, dtype=dtype).to(DEVICE)
    y = torch.rand(batch, m, d, generator=g, dtype=dtype).to(DEVICE)
    return otcore.PointCloud(x, y, cost=kind)


def _inputs(geom, axis, mode, seed):
    g = torch.Generator().manual_seed(seed)
    N, L = (geom.n, geom.m) if axis == 0 else (geom.m, geom.n)
    dt = geom.dtype
    h = (0.2 * torch.randn(geom.batch, N, generator=g, dtype=dt)).to(DEVICE)
    line = torch.rand(geom.batch, L, generator=g, dtype=dt).to(DEVICE)
    kw = dict(mass=line) if mode == "semi" else dict(beta=0.5 * line - 0.1)
    return h, kw


def _as64(geom):
    if geom.is_dense:
        return otcore.CostMatrix(geom.C.double())
    return otcore.PointCloud(geom.x.double(), geom.y.double(), cost=geom.cost)


CASES = [
    # kind, n, m, d, k, axis, mode
    ("matrix", 37, 53, 0, 5, 0, "semi"),
    ("matrix", 37, 53, 0, 37, 1, "dual"),
    ("sqeuclidean", 37, 53, 3, 1, 1, "semi"),
    ("sqeuclidean", 53, 37, 17, 8, 0, "dual"),
    ("euclidean", 37, 53, 3, 33, 0, "semi"),
    ("euclidean", 53, 37, 17, 3, 1, "semi"),
    ("matrix", 37, 21, 0, 21, 1, "semi"),  # k = the line length: every position kept (the router's seed)
    ("sqeuclidean", 19, 37, 3, 19, 0, "dual"),
]


@pytest.mark.parametrize("kind,n,m,d,k,axis,mode", CASES)
def test_kernel_matches_twin_and_float64(kind, n, m, d, k, axis, mode):
    geom = _geom(kind, n, m, d, batch=2, dtype=torch.float32, seed=n + m + d + k)
    h, kw = _inputs(geom, axis, mode, seed=k)
    got = K.ksparse_columns(geom, h, 0.3, k, axis, **kw)
    twin = R.ksparse_columns(geom, h, 0.3, k, axis, **kw)
    ref = R.ksparse_columns(_as64(geom), h.double(), 0.3, k, axis, **{a: v.double() for a, v in kw.items()})
    assert torch.equal(got.idx, twin.idx) and torch.equal(got.idx, ref.idx)
    for field in ("beta", "reg", "vals", "cost", "line_sum", "cross_sum"):
        g_, t_, r_ = (getattr(o, field) for o in (got, twin, ref))
        assert g_.dtype == torch.float32
        torch.testing.assert_close(g_, t_, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_.double(), r_, rtol=1e-5, atol=2e-5)
    L = geom.m if axis == 0 else geom.n
    assert got.vals.shape == (2, L, k)
    if mode == "semi":  # exact line sums
        torch.testing.assert_close(got.line_sum, kw["mass"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,n,m,d,k,axis,mode", [("matrix", 37, 21, 0, 5, 0, "semi"),
                                                     ("euclidean", 21, 37, 3, 33, 1, "dual")])
def test_cuda_layout_one_line_per_program(monkeypatch, kind, n, m, d, k, axis, mode):
    """The launch layout used on CUDA (``block_sizes``: one line per program, chunks of 64)
    against the twin; the interpreter otherwise runs the multi-line layout (fewer programs)."""
    cuda_sizes = K.block_sizes(k, torch.device("cuda"))
    assert cuda_sizes[0] == 1 and cuda_sizes[1] == 64
    monkeypatch.setattr(K, "block_sizes", lambda k_, dev: cuda_sizes)
    geom = _geom(kind, n, m, d, batch=2, dtype=torch.float32, seed=n + k)
    h, kw = _inputs(geom, axis, mode, seed=k)
    got = K.ksparse_columns(geom, h, 0.3, k, axis, **kw)
    twin = R.ksparse_columns(geom, h, 0.3, k, axis, **kw)
    assert torch.equal(got.idx, twin.idx)
    for field in ("beta", "reg", "vals", "cost", "line_sum", "cross_sum"):
        torch.testing.assert_close(getattr(got, field), getattr(twin, field), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["interpreter", "cuda"])
@pytest.mark.parametrize("mode", ["semi", "dual"])
def test_a_last_chunk_of_one_position(monkeypatch, layout, mode):
    """Lines one position longer than the chunk (33 = 32 + 1 in the interpreter's layout, 65
    = 64 + 1 in CUDA's), that position in every line's top k: its chunk must be read in
    the first pass too (a loop bound of N - 1 lost it there: a wrong support, beta 1.05
    off, with the line sums still right, a review's mutant)."""
    sizes = K.block_sizes(4, torch.device("cuda" if layout == "cuda" else "cpu"))
    monkeypatch.setattr(K, "block_sizes", lambda k_, dev: sizes)
    N = sizes[1] + 1
    geom = _geom("sqeuclidean", N, 7, 2, batch=1, dtype=torch.float64, seed=N)
    h, kw = _inputs(geom, 0, mode, seed=N)
    h[:, -1] = h.max() + 1.0  # the last position leads every line
    got = K.ksparse_columns(geom, h, 0.3, 4, 0, **kw)
    twin = R.ksparse_columns(geom, h, 0.3, 4, 0, **kw)
    assert bool((got.idx == N - 1).any(-1).all())
    assert torch.equal(got.idx, twin.idx)
    for field in ("beta", "reg", "vals", "line_sum"):
        torch.testing.assert_close(getattr(got, field), getattr(twin, field), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["matrix", "sqeuclidean"])
def test_kernel_float64_is_exact(kind):
    geom = _geom(kind, 29, 41, 5, batch=1, dtype=torch.float64, seed=3)
    h, kw = _inputs(geom, 0, "semi", seed=4)
    got = K.ksparse_columns(geom, h, 0.05, 6, 0, **kw)
    ref = R.ksparse_columns(geom, h, 0.05, 6, 0, **kw)
    assert got.vals.dtype == torch.float64
    assert torch.equal(got.idx, ref.idx)
    for field in ("beta", "reg", "vals", "line_sum", "cross_sum"):
        torch.testing.assert_close(getattr(got, field), getattr(ref, field), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("narrow", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["semi", "dual"])
def test_narrow_inputs_are_read_in_the_compute_dtype(narrow, mode):
    """fp16/bf16 ``h`` (and mass or beta) on a float32 geometry: the kernel had run the pass
    in their dtype, and with bf16 the semi-dual plan's line sums came out 8.5e-22 for masses
    of 1/9 (a review); both backends now read them in float32, as docs/api.md says."""
    geom = _geom("sqeuclidean", 37, 9, 2, 1, torch.float32, seed=5)
    h, kw = _inputs(geom, 0, mode, seed=6)
    h, kw = h.to(narrow), {key: v.to(narrow) for key, v in kw.items()}
    got = geom.ksparse_columns(h, 0.5, 3, 0, backend="triton", **kw)
    want = geom.ksparse_columns(h, 0.5, 3, 0, backend="torch", **kw)
    assert got.vals.dtype == want.vals.dtype == torch.float32
    for a, b in zip(got, want):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if mode == "semi":
        torch.testing.assert_close(got.line_sum, kw["mass"].float(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", ["matrix", "sqeuclidean"])
def test_a_wider_h_than_the_geometry_gives_the_float64_pass(kind):
    """float64 ``h`` on a float32 geometry whose cost is held (a matrix, or small clouds): the
    twin computes in float64 with the cost as stored; its preallocated cost output had taken
    h's dtype and the gather into it raised (a review)."""
    geom = _geom(kind, 37, 21, 3, 2, torch.float32, seed=7)
    h, kw = _inputs(geom, 0, "semi", seed=8)
    got = R.ksparse_columns(geom, h.double(), 0.5, 5, 0, mass=kw["mass"].double())
    want = R.ksparse_columns(_as64(geom), h.double(), 0.5, 5, 0, mass=kw["mass"].double())
    assert got.vals.dtype == torch.float64 and got.cost.dtype == torch.float32
    assert torch.equal(got.idx, want.idx)  # (the float64 clouds' cost rounds otherwise than float32's)
    torch.testing.assert_close(got.vals, want.vals, rtol=1e-5, atol=1e-6)


def test_projection_unit_cases_in_the_kernel():
    x = torch.tensor([0.5, 0.4, 0.3, -1.0], dtype=torch.float64, device=DEVICE)
    want = {1: [1, 0, 0, 0], 2: [0.55, 0.45, 0, 0], 3: [13 / 30, 10 / 30, 7 / 30, 0]}
    geom = otcore.CostMatrix(-x[:, None])
    for k, expected in want.items():
        out = K.ksparse_columns(geom, torch.zeros(1, 4, dtype=torch.float64, device=DEVICE), 1.0, k, 0,
                                mass=torch.ones(1, 1, dtype=torch.float64, device=DEVICE))
        dense = torch.zeros(4, dtype=torch.float64, device=DEVICE).scatter(0, out.idx[0, 0], out.vals[0, 0])
        torch.testing.assert_close(dense.cpu(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_ties_take_exactly_k_distinct_positions_the_same_in_kernel_and_twin():
    """Integer costs: many scores tie at the k-th value. Any choice among the tied positions
    is a valid top k; the kernel takes the first ones in position order."""
    g = torch.Generator().manual_seed(5)
    C = torch.randint(0, 3, (1, 45, 19), generator=g).to(torch.float32).to(DEVICE)
    geom = otcore.CostMatrix(C)
    h = torch.zeros(1, 45, device=DEVICE)
    mass = torch.ones(1, 19, device=DEVICE)
    got = K.ksparse_columns(geom, h, 0.5, 7, 0, mass=mass)
    twin = R.ksparse_columns(geom, h, 0.5, 7, 0, mass=mass)
    for field in ("beta", "reg", "line_sum"):  # value-only quantities do not depend on the choice
        torch.testing.assert_close(getattr(got, field), getattr(twin, field))
    idx = got.idx[0]
    assert bool((idx[:, 1:] > idx[:, :-1]).all())  # distinct, ascending
    Cl = C[0].T  # (lines, positions)
    chosen = torch.gather(Cl, 1, idx)
    kth = torch.sort(Cl, dim=1).values[:, 6:7]  # the 7th smallest cost of each column
    assert bool((chosen <= kth).all())
    torch.testing.assert_close(got.cost, chosen[None])
    # among the tied costs, the first positions are taken
    for j in range(19):
        tied = (Cl[j] == kth[j]).nonzero().flatten()
        picked = idx[j][chosen[j] == kth[j]]
        assert torch.equal(picked, tied[: len(picked)])
    # and the twin takes the same ones (torch.topk alone picked others: CPU and GPU routed
    # tied tokens differently), both axes, both formulations
    for axis in (0, 1):
        hh = torch.zeros(1, C.shape[1 + axis], device=DEVICE)  # positions: rows for axis 0
        for kw in (dict(mass=torch.ones(1, C.shape[2 - axis], device=DEVICE)),
                   dict(beta=torch.ones(1, C.shape[2 - axis], device=DEVICE))):
            a, b = K.ksparse_columns(geom, hh, 0.5, 7, axis, **kw), R.ksparse_columns(geom, hh, 0.5, 7, axis, **kw)
            assert torch.equal(a.idx, b.idx)
            torch.testing.assert_close(a.vals, b.vals)


@pytest.mark.parametrize("bad", [float("nan"), -float("inf")], ids=["nan", "-inf"])
@pytest.mark.parametrize("mode", ["semi", "dual"])
def test_a_non_finite_cost_makes_its_line_as_in_the_twin(mode, bad):
    """A NaN (or -inf: a score of +inf) written into C in place, after the geometry's check:
    the kernel keeps it first, as torch.topk ranks it in the twin, and that line comes out
    as the twin's: NaN sums (inf for -inf in the dual), NaN entries (all of a semi-dual
    line, whose multiplier is NaN; the one in the dual, inf for -inf), the other lines as
    without it, and every index a real position in its line's k slots. (Compared as NaN the
    score had broken the sorting network: padding positions past N taken, an out-of-range
    index, or NaN-free sums, so sparse_ot said converged=True; tl.maximum(NaN, 0) is 0.)
    45 positions: two chunks of the interpreter's 32."""
    g = torch.Generator().manual_seed(13)
    C = torch.rand(1, 45, 19, generator=g).to(DEVICE)
    geom = otcore.CostMatrix(C)
    clean = otcore.CostMatrix(C.clone())
    C[0, 40, 5] = bad  # position 40 (second chunk) of line 5 (axis 0)
    for axis, line, pos in ((0, 5, 40), (1, 40, 5)):
        N, L = C.shape[1 + axis], C.shape[2 - axis]
        h = (0.1 * torch.randn(1, N, generator=g)).to(DEVICE)
        kw = dict(mass=torch.rand(1, L, generator=g).to(DEVICE)) if mode == "semi" else \
            dict(beta=torch.rand(1, L, generator=g).to(DEVICE) - 0.2)
        with warnings.catch_warnings():  # the interpreter's numpy warns of the NaN made on purpose
            warnings.simplefilter("ignore", RuntimeWarning)
            got, twin = K.ksparse_columns(geom, h, 0.5, 4, axis, **kw), R.ksparse_columns(geom, h, 0.5, 4, axis, **kw)
        base = K.ksparse_columns(clean, h, 0.5, 4, axis, **kw)
        assert bool(((got.idx >= 0) & (got.idx < N)).all())
        assert torch.equal(got.idx, twin.idx) and pos in got.idx[0, line].tolist()
        other = torch.arange(L, device=DEVICE) != line
        sums_nan = mode == "semi" or bad != bad
        for field in ("beta", "reg", "line_sum", "vals"):
            a = getattr(got, field)[0]
            torch.testing.assert_close(a, getattr(twin, field)[0], equal_nan=True)
            torch.testing.assert_close(a[other], getattr(base, field)[0][other])
        for field in ("reg", "line_sum"):
            v = float(getattr(got, field)[0, line])
            assert (v != v) if sums_nan else v == float("inf"), (field, v)
        slot = got.idx[0, line].tolist().index(pos)
        entries = got.vals[0, line]
        assert int(entries.isnan().sum()) == (4 if mode == "semi" else int(bad != bad))
        assert mode == "semi" or bad != bad or float(entries[slot]) == float("inf")


@pytest.mark.parametrize("mode", ["semi", "dual"])
def test_a_nan_score_beside_a_tie_at_the_kth_place_is_kept(mode):
    """A NaN score in a line whose k-th place is tied: the twin's tie-break (which runs on a
    CPU only then, on a GPU always) keeps the NaN position, as torch.topk and the kernel rank
    it first, and takes the first tied positions in order. (Its "score > k-th" test had
    dropped the NaN and taken a padding position instead: seen on an H200, where the
    kernel and the twin then differed in line 5 of the test above.)"""
    C = torch.rand(1, 45, 19, generator=torch.Generator().manual_seed(14)).to(DEVICE) + 1
    C[0, [3, 17, 30, 38, 44], 5] = 0.5  # five positions tied at the line's best finite score
    geom = otcore.CostMatrix(C)
    C[0, 40, 5] = float("nan")  # after the geometry's check, as in the test above
    h = torch.zeros(1, 45, device=DEVICE)
    kw = dict(mass=torch.ones(1, 19, device=DEVICE)) if mode == "semi" else dict(beta=torch.ones(1, 19, device=DEVICE))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got, twin = K.ksparse_columns(geom, h, 0.5, 4, 0, **kw), R.ksparse_columns(geom, h, 0.5, 4, 0, **kw)
    assert twin.idx[0, 5].tolist() == [3, 17, 30, 40] and torch.equal(got.idx, twin.idx)
    for field in ("beta", "reg", "line_sum", "vals", "cross_sum"):
        torch.testing.assert_close(getattr(got, field), getattr(twin, field), equal_nan=True)


def test_a_line_of_infinite_costs_is_nan_as_in_the_twin():
    """A semi-dual line whose costs are all +inf (a finite float32 point at 3e19 from the
    others: its squared distances overflow) has no multiplier: NaN throughout, as the
    twin's (the kernel's max over the threshold candidates skipped their NaNs: beta +inf and
    zero entries, a review); the other lines are untouched."""
    x = torch.rand(1, 37, 2, generator=torch.Generator().manual_seed(21)).to(DEVICE)
    y = torch.rand(1, 9, 2, generator=torch.Generator().manual_seed(22)).to(DEVICE)
    y[0, 4] = 3e19
    geom = otcore.PointCloud(x, y)
    h = torch.zeros(1, 37, device=DEVICE)
    mass = torch.full((1, 9), 1 / 9, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got, twin = K.ksparse_columns(geom, h, 0.5, 3, 0, mass=mass), R.ksparse_columns(geom, h, 0.5, 3, 0, mass=mass)
    for field in ("beta", "reg", "line_sum", "vals"):
        a = getattr(got, field)[0]
        assert bool(a[4].isnan().all()) and not bool(a[torch.arange(9) != 4].isnan().any()), field
        torch.testing.assert_close(a, getattr(twin, field)[0], equal_nan=True)


def test_strided_and_transposed_cost():
    """A non-contiguous C (a transposed view) is read through its strides."""
    g = torch.Generator().manual_seed(6)
    base = torch.rand(2, 41, 23, generator=g).to(DEVICE)
    geom = otcore.CostMatrix(base.transpose(1, 2))  # (2, 23, 41), not contiguous
    for axis in (0, 1):
        N, L = (23, 41) if axis == 0 else (41, 23)
        h = torch.randn(2, N, generator=g).to(DEVICE) * 0.1
        mass = torch.rand(2, L, generator=g).to(DEVICE)
        got = K.ksparse_columns(geom, h, 0.2, 4, axis, mass=mass)
        twin = R.ksparse_columns(geom, h, 0.2, 4, axis, mass=mass)
        assert torch.equal(got.idx, twin.idx)
        torch.testing.assert_close(got.vals, twin.vals, rtol=1e-5, atol=1e-6)


def test_large_k_falls_back_to_the_twin():
    geom = _geom("matrix", K.K_MAX + 5, 3, 0, batch=1, dtype=torch.float32, seed=7)
    h, kw = _inputs(geom, 0, "semi", seed=8)
    got = K.ksparse_columns(geom, h, 0.3, K.K_MAX + 1, 0, **kw)
    twin = R.ksparse_columns(geom, h, 0.3, K.K_MAX + 1, 0, **kw)
    assert torch.equal(got.idx, twin.idx) and torch.equal(got.vals, twin.vals)


def test_batches_past_the_grid_limit_run_the_twin(monkeypatch):
    """CUDA caps the grid's batch axis at 65535 programs: larger batches (here: any, with
    the cap lowered to 1) run the torch twin instead of failing to launch."""
    geom = _geom("sqeuclidean", 9, 7, 2, batch=2, dtype=torch.float32, seed=11)
    h, kw = _inputs(geom, 0, "semi", seed=12)
    monkeypatch.setattr(K, "BATCH_MAX", 1)
    monkeypatch.setattr(K, "_ksparse_kernel", None)  # any launch would fail
    got = K.ksparse_columns(geom, h, 0.3, 3, 0, **kw)
    twin = R.ksparse_columns(geom, h, 0.3, 3, 0, **kw)
    assert torch.equal(got.idx, twin.idx) and torch.equal(got.vals, twin.vals)


def test_solver_on_the_triton_backend_matches_torch():
    """The same L-BFGS iterates through the kernel and through the twin (float64)."""
    g = torch.Generator().manual_seed(9)
    x = torch.rand(13, 3, generator=g, dtype=torch.float64).to(DEVICE)
    y = torch.rand(11, 3, generator=g, dtype=torch.float64).to(DEVICE)
    kw = dict(k=3, gamma=0.2, tol=1e-30, ftol=1e-30, max_iter=6)
    with pytest.warns(otcore.ConvergenceWarning):
        tri = otcore.sparse_ot(otcore.PointCloud(x, y), backend="triton", **kw)
    with pytest.warns(otcore.ConvergenceWarning):
        ref = otcore.sparse_ot(otcore.PointCloud(x, y), backend="torch", **kw)
    assert tri.n_iter == ref.n_iter == 6
    assert torch.equal(tri.indices, ref.indices)
    torch.testing.assert_close(tri.value, ref.value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(tri.values, ref.values, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("regime", ["streamed", "tiled"])
@pytest.mark.parametrize("kind,axis,mode", [("sqeuclidean", 0, "semi"), ("euclidean", 1, "dual"), ("matrix", 0, "dual")])
def test_twin_in_many_blocks_equals_one_block(monkeypatch, regime, kind, axis, mode):
    """The torch twin reads the cost through the reference's reused tiles: cut into many
    ragged blocks (a streamed point cloud, or a held cost read tile by tile) it gives
    the one-block result exactly, since each line is selected and projected within its
    block."""
    from otcore import reference

    geom = _geom(kind, 37, 53, 3, batch=2, dtype=torch.float64, seed=7)
    h, kw = _inputs(geom, axis, mode, seed=8)
    whole = R.ksparse_columns(geom, h, 0.3, 4, axis, **kw)
    monkeypatch.setattr(reference, "TILE_ELEMENTS", 2 * 53 * 5 + 7)  # ~5 lines per tile, ragged
    if regime == "streamed":
        monkeypatch.setattr(reference, "BLOCK_ELEMENTS", 2 * 53 * 5 + 7)
    geom = _geom(kind, 37, 53, 3, batch=2, dtype=torch.float64, seed=7)  # no cached cost
    assert reference._is_streamed(geom) == (regime == "streamed" and kind != "matrix")
    parts = R.ksparse_columns(geom, h, 0.3, 4, axis, **kw)
    for field in ("idx", "beta", "reg", "vals", "cost", "line_sum", "cross_sum"):
        torch.testing.assert_close(getattr(parts, field), getattr(whole, field), rtol=1e-13, atol=1e-15)
