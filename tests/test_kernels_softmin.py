"""The fused softmin kernels against otcore.reference and float64.

Every case compares three things: the Triton kernel on float32 inputs, the torch
reference (otcore.reference) and an independent float64 dense log-sum-exp
written out below. Shapes are small and odd (37 x 53) so that every tile is
partially masked. Tensors live on ``DEVICE``: with CUDA the real kernels run,
without it the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py).
"""

import warnings

import pytest
import torch
from kernel_support import DEVICE, INTERPRETED, RUNTIME_WARNINGS_ARE_ERRORS

import otcore
from otcore import reference, triton_ops
from otcore.kernels import softmin as K

pytestmark = RUNTIME_WARNINGS_ARE_ERRORS

B, N, M = 2, 37, 53
INF = float("inf")


def cost64(x, y, cost):
    """Dense cost in float64 from explicit coordinate differences, (B, n, m)."""
    diff = x.double()[:, :, None, :] - y.double()[:, None, :, :]
    sq = (diff * diff).sum(-1)
    return sq if cost == "sqeuclidean" else sq.sqrt()


def softmin64(C, h, eps, axis):
    """``-eps log sum exp((h - C)/eps)`` in float64 along the reduced axis."""
    C, h = C.double(), h.double()
    if axis == 1:
        return -eps * torch.logsumexp((h[:, None, :] - C) / eps, dim=2)
    return -eps * torch.logsumexp((h[:, :, None] - C) / eps, dim=1)


def relerr(a, b):
    """max |a - b| / max |b| over finite entries; +inf entries must agree exactly."""
    a, b = a.double(), b.double()
    assert torch.equal(torch.isinf(a), torch.isinf(b)), "inf pattern differs"
    fin = torch.isfinite(b)
    return float((a[fin] - b[fin]).abs().max() / b[fin].abs().max())


def clouds(d, scale=1.0, offset=0.0, batch=B, n=N, m=M, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, n, d, generator=g) * scale + offset
    y = (torch.rand(batch, m, d, generator=g) * 0.9 + 0.05) * scale + offset
    return x.to(DEVICE), y.to(DEVICE)


def potential(k, seed=1, scale=0.1, batch=B):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, k, generator=g) * scale).to(DEVICE)


@pytest.mark.parametrize("d", [3, 17])
@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean"])
@pytest.mark.parametrize("axis", [1, 0])
def test_softmin_pointcloud_matches_reference_and_float64(d, cost, axis):
    x, y = clouds(d)
    geom = otcore.PointCloud(x, y, cost=cost)
    h = potential(M if axis == 1 else N)
    h[0, 4] = -INF  # a zero-weight point
    out = geom.softmin(h, 0.05, axis, backend="triton")
    ref = geom.softmin(h, 0.05, axis, backend="torch")
    exact = softmin64(cost64(x, y, cost), h, 0.05, axis)
    assert out.shape == (B, N if axis == 1 else M) and out.dtype == torch.float32
    assert relerr(out, exact) < 1e-5
    assert relerr(out, ref) < 1e-5


@pytest.mark.parametrize("mode", [K.COST_DIRECT, K.COST_DOT])
@pytest.mark.parametrize("d", [3, 17])
@pytest.mark.parametrize("euclidean", [False, True])
def test_every_cost_mode_on_both_dtypes(mode, d, euclidean):
    """Both ways of computing distances, float32 and float64, forced explicitly."""
    x, y = clouds(d, seed=3)
    h = potential(M, seed=4)
    exact = softmin64(cost64(x, y, "euclidean" if euclidean else "sqeuclidean"), h, 0.05, 1)
    for dt, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        op = K.point_operand(x.to(dt) - 0.5, y.to(dt) - 0.5, euclidean, "fp32", mode=mode)
        out = K.launch_softmin(op, h.to(dt), 0.05)
        assert out.dtype == dt
        assert relerr(out, exact) < tol


def test_precision_modes_pick_documented_paths():
    assert K.point_cost_mode("fp32", 3, torch.float32) == (K.COST_DIRECT, "tf32x3")
    assert K.point_cost_mode("fp32", 64, torch.float32) == (K.COST_DOT, "tf32x3")
    assert K.point_cost_mode("tf32", 3, torch.float32) == (K.COST_DOT, "tf32")
    assert K.point_cost_mode("tf32", 64, torch.float64)[0] == K.COST_DIRECT
    # the expansion only while its rounding (2^-22 of the squared spread) is <= 1e-3 eps
    assert K.point_cost_mode("fp32", 64, torch.float32, sq_spread=32.0, eps=0.05)[0] == K.COST_DOT
    assert K.point_cost_mode("fp32", 64, torch.float32, sq_spread=5000.0, eps=1e-3)[0] == K.COST_DIRECT
    assert K.point_cost_mode("fp32", 64, torch.float32, sq_spread=32.0, eps=0.05, euclidean=True)[0] == K.COST_DIRECT
    # tf32 (opt-in) expands while its rounding bound, 2^-10 of the spread, is at most eps
    assert K.point_cost_mode("tf32", 64, torch.float32, sq_spread=32.0, eps=0.05)[0] == K.COST_DOT
    assert K.point_cost_mode("tf32", 3, torch.float32, sq_spread=2.0, eps=1e-2)[0] == K.COST_DOT
    assert K.point_cost_mode("tf32", 64, torch.float32, sq_spread=5000.0, eps=1e-3)[0] == K.COST_DIRECT
    assert K.point_cost_mode("tf32", 3, torch.float32, sq_spread=1e15, eps=0.05)[0] == K.COST_DIRECT  # far padding


def clusters(d, seed=31):
    """Two clusters of points 0.1 wide, 100 apart: an expansion |x|^2 + |y|^2 - 2 x.y rounds
    at ~2^-22 * 2500 there, against eps = 1e-3."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.cat([torch.zeros(B, 18, d), torch.full((B, 19, d), 100 / d**0.5)], 1)
    x = centres + 0.1 * torch.rand(B, N, d, generator=g)
    y = torch.cat([torch.zeros(B, 26, d), torch.full((B, 27, d), 100 / d**0.5)], 1) + 0.1 * torch.rand(B, M, d, generator=g)
    return x.to(DEVICE), y.to(DEVICE)


@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean"])
def test_fp32_keeps_direct_differences_where_the_expansion_would_round_badly(cost):
    """d = 17 > DIRECT_MAX_D: on the unit cube at eps = 0.05 the fp32 path expands (3xTF32);
    on clustered data at eps = 1e-3 it takes direct differences and stays float32-faithful
    (the forced expansion is ~3e-2 off there in the interpreter)."""
    x, y = clusters(17)
    geom = otcore.PointCloud(x, y, cost=cost)
    assert triton_ops.operand(geom, 1, "fp32", 1e-3).mode == K.COST_DIRECT
    h = potential(M, seed=32, scale=0.0)
    exact = softmin64(cost64(x, y, cost), h, 1e-3, 1)
    assert relerr(geom.softmin(h, 1e-3, 1, backend="triton"), exact) < 1e-5
    forced = K.launch_softmin(K.point_operand(*triton_ops.centred_points(geom), cost == "euclidean", "fp32",
                                              mode=K.COST_DOT), h, 1e-3)
    assert relerr(forced, exact) > 1e-3  # what the guard avoids
    unit = otcore.PointCloud(*clouds(17), cost="sqeuclidean")
    assert triton_ops.operand(unit, 1, "fp32", 0.05).mode == K.COST_DOT


def tf32_relerr_bound(x, y, exact):
    """A priori bound on ``relerr`` of the tf32 path: its cost is ``|x|^2 + |y|^2 - 2 x.y``
    on clouds centred on their joint mean, with the dot's operands cut to tf32's 10
    mantissa bits (relative error <= u = 2^-10, truncation or rounding). So
    ``|dC_ij| <= 2 (2u + u^2) sum_k |x_ik| |y_jk|`` (centred), a softmin moves by at most
    max_j |dC_ij|, and the float32 rest stays within the fp32 contract (1e-5)."""
    u = 2.0**-10
    mu = (x.double().sum(1, keepdim=True) + y.double().sum(1, keepdim=True)) / (x.shape[1] + y.shape[1])
    xc, yc = (x.double() - mu).abs(), (y.double() - mu).abs()
    dC = 2 * (2 * u + u * u) * float((xc @ yc.transpose(1, 2)).max())
    return dC / float(exact.abs().max()) + 1e-5


def test_tf32_mode_runs_the_same_algebra():
    """The interpreter computes tl.dot in full fp32, so there tf32 mode is held to the
    fp32 bound: that checks its algebra. On a GPU the tf32 dot rounds its operands and
    errs ~1e-3..1e-2 (docs/kernels.md): it is held to the a priori tf32 bound, which is
    still far below the error of any wrong formula."""
    x, y = clouds(3)
    geom = otcore.PointCloud(x, y)
    h = potential(M)
    out = geom.softmin(h, 0.05, 1, backend="triton", precision="tf32")
    exact = softmin64(cost64(x, y, "sqeuclidean"), h, 0.05, 1)
    err = relerr(out, exact)
    if INTERPRETED:
        assert err < 1e-5
    else:
        bound = tf32_relerr_bound(x, y, exact)
        assert bound < 5e-2  # the bound itself is tight enough to mean something
        assert err < bound
    # fp32 mode on the same inputs keeps the fp32 contract everywhere
    assert relerr(geom.softmin(h, 0.05, 1, backend="triton", precision="fp32"), exact) < 1e-5


def low_bits(t):
    """The 13 mantissa bits of float32 that tf32 drops."""
    return t.contiguous().view(torch.int32) & 0x1FFF


def test_dot_features_split_each_point_into_exact_tf32_head_and_tail():
    """``hi`` and ``lo`` are tf32 numbers (the tensor cores read them exactly), ``hi + lo``
    is the point to 2^-22, and the three products the kernel sums are ``x.y`` to ~2^-21:
    the accuracy of tl.dot's own 3xTF32, now fixed on the host."""
    x, y = clouds(17, offset=-0.5, seed=21)
    fx, fy = K.dot_features(x, "tf32x3"), K.dot_features(y, "tf32x3")
    dp = K.dot_padding(17)
    assert dp == 32 and fx.shape == (B, N, 2 * dp + 16) and fx.stride(1) % 16 == 0
    hi, lo = fx[..., :dp], fx[..., dp:2 * dp]
    assert not low_bits(hi).any() and not low_bits(lo).any()
    assert not fx[..., 17:dp].any() and not fx[..., dp + 17:2 * dp].any() and not fx[..., 2 * dp + 1:].any()
    x64 = x.double()
    assert float((hi[..., :17].double() + lo[..., :17].double() - x64).abs().max()) <= 2.0**-22 * float(x.abs().max())
    assert torch.allclose(fx[..., 2 * dp].double(), x64.square().sum(-1), rtol=1e-6)
    # the kernel's cross term, in float64: hi.hi' + hi.lo' + lo.hi'
    fx64, fy64 = fx.double(), fy.double()
    h1, l1, h2, l2 = fx64[..., :dp], fx64[..., dp:2 * dp], fy64[..., :dp], fy64[..., dp:2 * dp]
    cross = h1 @ h2.transpose(1, 2) + h1 @ l2.transpose(1, 2) + l1 @ h2.transpose(1, 2)
    exact = x64 @ y.double().transpose(1, 2)
    assert float((cross - exact).abs().max()) <= 2.0**-21 * float(x64.abs().amax() * y.abs().amax()) * 17
    # other precisions: the points themselves, no tail
    plain = K.dot_features(x, "tf32")
    assert torch.equal(plain[..., :17], x) and not plain[..., dp:2 * dp].any()


def test_round_tf32_rounds_to_nearest_with_carry_and_sign():
    u = 2.0**-10
    t = torch.tensor([1.0, 1 + u, 1 + u / 2 - 2.0**-23, 1 + u / 2, 2 - 2.0**-23, -(1 + 0.75 * u), 0.0, 3e-39])
    got = K._round_tf32(t)
    assert not low_bits(got).any()
    assert torch.equal(got[:7], torch.tensor([1.0, 1 + u, 1.0, 1 + u, 2.0, -(1 + u), 0.0]))
    assert abs(float(got[7]) - float(t[7])) <= 2.0**-137  # a subnormal: half of 2^13 spacings of 2^-149


def test_dot_features_are_cached_per_geometry_and_follow_in_place_changes():
    x, y = clouds(17, seed=22)
    geom = otcore.PointCloud(x, y)
    op = triton_ops.operand(geom, 1, "fp32", 0.05)
    assert op.mode == K.COST_DOT
    again = triton_ops.operand(geom, 0, "fp32", 0.05)
    assert again.own_feat is op.oth_feat and again.oth_feat is op.own_feat  # one split per cloud
    h = potential(M)
    before = geom.softmin(h, 0.05, 1, backend="triton")
    with torch.no_grad():
        x.mul_(0.5)
    after = geom.softmin(h, 0.05, 1, backend="triton")
    assert triton_ops.operand(geom, 1, "fp32", 0.05).own_feat is not op.own_feat
    assert relerr(after, softmin64(cost64(x, y, "sqeuclidean"), h, 0.05, 1)) < 1e-5
    assert not torch.equal(before, after)


@pytest.mark.parametrize("axis", [1, 0])
def test_softmin_cost_matrix_both_axes_and_strides(axis):
    x, y = clouds(5, seed=7)
    C = cost64(x, y, "sqeuclidean").float()
    h = potential(M if axis == 1 else N, seed=8)
    h[1, :3] = -INF
    exact = softmin64(C, h, 0.05, axis)
    geom = otcore.CostMatrix(C)
    assert relerr(geom.softmin(h, 0.05, axis, backend="triton"), exact) < 1e-6
    assert relerr(geom.softmin(h, 0.05, axis, backend="torch"), exact) < 1e-6
    # the same cost stored transposed (non-contiguous view): read through its strides
    geom_t = otcore.CostMatrix(C.transpose(1, 2).contiguous().transpose(1, 2))
    assert not geom_t.C.is_contiguous()
    assert relerr(geom_t.softmin(h, 0.05, axis, backend="triton"), exact) < 1e-6


def test_unbatched_cost_matrix_float64():
    g = torch.Generator().manual_seed(14)
    C = torch.rand(N, M, generator=g, dtype=torch.float64).to(DEVICE)
    h = torch.randn(1, M, generator=g, dtype=torch.float64).to(DEVICE)
    out = otcore.CostMatrix(C).softmin(h, 0.1, 1, backend="triton")
    assert out.dtype == torch.float64
    assert relerr(out, softmin64(C[None], h, 0.1, 1)) < 1e-13


def test_zero_weights_give_inf_exactly_where_reference_does():
    x, y = clouds(3)
    geom = otcore.PointCloud(x, y)
    h = potential(M)
    h[0] = -INF  # every point of problem 0 has zero weight: -eps log 0 = +inf
    h[1, ::2] = -INF
    out = geom.softmin(h, 0.05, 1, backend="triton")
    exact = softmin64(cost64(x, y, "sqeuclidean"), h, 0.05, 1)
    assert torch.isposinf(out[0]).all()
    assert not torch.isnan(out).any()
    assert relerr(out, exact) < 1e-5


def test_large_coordinates_are_centred():
    """Far from the origin the |x|^2 + |y|^2 - 2xy expansion cancels ~1e6-sized terms
    in float32; centring the clouds (the geometry layer does it) restores accuracy."""
    x, y = clouds(17, offset=1000.0, seed=11)
    geom = otcore.PointCloud(x, y)
    h = potential(M)
    exact = softmin64(cost64(x, y, "sqeuclidean"), h, 0.05, 1)
    assert relerr(geom.softmin(h, 0.05, 1, backend="triton"), exact) < 1e-5
    # the dot path is only faithful because of the centring: uncentred it is far off
    raw = K.launch_softmin(K.point_operand(x, y, False, "fp32", mode=K.COST_DOT), h, 0.05)
    assert relerr(raw, exact) > 1e-3
    # scaled by 1000 with eps scaled alike (cost x 1e6): same relative accuracy
    xs, ys = clouds(3, scale=1000.0, seed=12)
    geom = otcore.PointCloud(xs, ys)
    exact = softmin64(cost64(xs, ys, "sqeuclidean"), h * 1e6, 0.05e6, 1)
    assert relerr(geom.softmin(h * 1e6, 0.05e6, 1, backend="triton"), exact) < 1e-5


@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean"])
def test_tiny_eps_stays_finite_and_accurate(cost):
    x, y = clouds(3, seed=5)
    geom = otcore.PointCloud(x, y, cost=cost)
    h = potential(M)
    for axis in (1, 0):
        hh = h if axis == 1 else potential(N, seed=6)
        out = geom.softmin(hh, 1e-3, axis, backend="triton")
        assert torch.isfinite(out).all()
        assert relerr(out, softmin64(cost64(x, y, cost), hh, 1e-3, axis)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    x, y = clouds(3)
    x, y = x.to(dtype), y.to(dtype)
    geom = otcore.PointCloud(x, y)
    h = potential(M)
    out = geom.softmin(h, 0.05, 1, backend="triton")
    assert out.dtype == torch.float32
    assert relerr(out, softmin64(cost64(x, y, "sqeuclidean"), h, 0.05, 1)) < 1e-5


def test_split_reduction_matches_single_pass():
    """The split-K path (used on GPUs when there are few own tiles) combines partial
    log-sums; forced here with 3 slices of a 200-point reduced axis."""
    x, y = clouds(3, m=200, seed=9)
    h = potential(200, seed=10)
    h[0, 70:140] = -INF  # one slice of problem 0 is entirely zero-weight
    op = K.point_operand(x - 0.5, y - 0.5, False, "fp32")
    exact = softmin64(cost64(x, y, "sqeuclidean"), h, 0.05, 1)
    split = K.launch_softmin(op, h, 0.05, splits=3)
    assert relerr(split, exact) < 1e-5
    assert relerr(split, K.launch_softmin(op, h, 0.05, splits=1)) < 1e-6


@pytest.mark.parametrize("d,precision,euclidean", [(17, "fp32", False), (64, "fp32", True), (64, "tf32", False)])
def test_dot_path_tiles_of_128_rows(d, precision, euclidean):
    """``pass_tiles``: the tensor-core cost takes 128-row tiles from 128 own points on (up
    to d = 64); 130 rows make one full tile and one of 2 rows, hinted and split too."""
    assert K.pass_tiles(130, 37, K.COST_DOT, d)[0] == 128
    assert K.pass_tiles(130, 37, K.COST_DOT, 65)[0] == 64 and K.pass_tiles(130, 37, K.COST_DIRECT, d)[0] == 64
    x, y = clouds(d, n=130, m=37, seed=d)
    h = potential(37, seed=5)
    h[1, 3] = -INF
    op = K.point_operand(x - 0.5, y - 0.5, euclidean, precision, mode=K.COST_DOT)
    exact = softmin64(cost64(x, y, "euclidean" if euclidean else "sqeuclidean"), h, 0.05, 1)
    tol = 1e-5 if precision == "fp32" or INTERPRETED else 5e-2  # the interpreter's tl.dot is full fp32
    out = K.launch_softmin(op, h, 0.05)
    assert relerr(out, exact) < tol
    assert relerr(K.launch_softmin(op, h, 0.05, splits=2, hint=out + 0.3), exact) < tol


def test_dense_passes_split_only_with_many_tiles(monkeypatch):
    """``num_splits`` on a (faked) 132-SM GPU: a dense pass over fewer than
    ``DENSE_SPLIT_MIN_TILES`` tiles is not split; point clouds and longer dense axes are."""
    monkeypatch.setattr(K, "_sm_count", lambda index: 132)

    class Cuda:
        type, index = "cuda", 0

    assert K.num_splits(128, 128, Cuda(), dense=True) == 1  # 8192 x 8192: unsplit
    assert K.num_splits(128, 128, Cuda(), dense=False) > 1
    assert K.num_splits(10, K.DENSE_SPLIT_MIN_TILES, Cuda(), dense=True) > 1
    assert K.num_splits(10, 4096, torch.device("cpu"), dense=True) == 1


def test_tiny_problems_in_a_large_batch():
    x, y = clouds(2, batch=64, n=4, m=5, seed=13)
    h = potential(5, batch=64)
    geom = otcore.PointCloud(x, y)
    out = geom.softmin(h, 0.1, 0 + 1, backend="triton")
    assert relerr(out, softmin64(cost64(x, y, "sqeuclidean"), h, 0.1, 1)) < 1e-5


def test_bad_arguments_raise():
    geom = otcore.PointCloud(*clouds(3))
    with pytest.raises(ValueError, match="precision"):
        geom.softmin(potential(M), 0.05, 1, backend="triton", precision="fp16")
    with pytest.raises(ValueError, match="axis"):
        triton_ops.softmin(geom, potential(M), 0.05, 2)


def test_backend_triton_goes_through_triton_ops():
    from otcore import _dispatch

    assert _dispatch.primitive("softmin", "triton") is triton_ops.softmin
    assert _dispatch.primitive("softmin", "torch") is reference.softmin


# --- the shifted log-sum-exp (a hint of the result as a fixed shift) --------------------
@pytest.fixture
def shifted(monkeypatch):
    """Hints used at any size; returns ``run(op, h, hint, splits=None) -> (out, first)``
    where ``first`` is ``out`` as the shifted launch left it (NaN: rows for the FIXUP
    launch), captured by a spy around the kernel."""
    monkeypatch.setattr(K, "SHIFT_MIN_ENTRIES", 0)
    kernel = K.softmin_kernel
    seen = {}

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                if kw["FIXUP"]:
                    seen["first"] = args[0].clone()
                return kernel[grid](*args, **kw)
            return launch

    monkeypatch.setattr(K, "softmin_kernel", Spy())

    def run(op, h, hint, splits=None):
        seen.clear()
        out = K.launch_softmin(op, h, 0.05, splits=splits, hint=hint)
        return out, seen["first"]

    return run


@pytest.fixture
def exp2_may_overflow():
    """A hint far below the result overflows exp2 to inf on purpose (the range check reads
    that); the interpreter's NumPy reports it, which this file otherwise makes an error.
    (A filter set here: the module's mark would take precedence over a test's mark.)"""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "overflow encountered in exp2", RuntimeWarning)
        yield


@pytest.mark.parametrize("mode", [K.COST_DIRECT, K.COST_DOT, K.COST_DENSE])
@pytest.mark.parametrize("offset", [0.0, 3.0, -3.0], ids=["exact", "above", "below"])
def test_a_close_hint_needs_no_fixup(mode, offset, shifted):
    """A hint within the sum's range (the exact result +- 3, a shift of ~87 in base-2
    units at eps = 0.05) leaves no row for the FIXUP launch; the result equals float64's."""
    x, y = clouds(17 if mode == K.COST_DOT else 3, seed=21)
    h = potential(M, seed=22)
    h[1, :7] = -INF
    C64 = cost64(x, y, "sqeuclidean")
    exact = softmin64(C64, h, 0.05, 1)
    if mode == K.COST_DENSE:
        op = K.dense_operand(C64.float(), transposed=False)
    else:
        op = K.point_operand(x - 0.5, y - 0.5, False, "fp32", mode=mode)
    out, first = shifted(op, h, exact.float() + offset)
    assert not first.isnan().any()
    assert relerr(out, exact) < 1e-5
    assert relerr(first, exact) < 1e-5


@pytest.mark.parametrize("bad", [40.0, -40.0, float("nan")], ids=["far-above", "far-below", "nan"])
def test_a_far_or_nan_hint_is_fixed_up(bad, shifted, exp2_may_overflow):
    """A hint ~1150 base-2 units off (or NaN) under- or overflows the shifted sum: every
    row is left NaN and recomputed online by the FIXUP launch."""
    x, y = clouds(3, seed=23)
    h = potential(M, seed=24)
    exact = softmin64(cost64(x, y, "sqeuclidean"), h, 0.05, 1)
    out, first = shifted(K.point_operand(x - 0.5, y - 0.5, False, "fp32"), h, exact.float() + bad)
    assert first.isnan().all()
    assert relerr(out, exact) < 1e-5


def test_a_sum_below_its_flush_floor_is_redone(shifted):
    """The GPU's exp2 flushes terms below 2^-126 to zero; a shifted sum is accepted only
    above 2^-100 per point of its slice, so those terms stay below 2^-26 of it. A hint
    3.35 below the result (eps = 0.05) gives sums of ~2^-96.6: above the old floor of
    2^-100 for the whole row, below 53 x 2^-100, so the rows are redone online."""
    x, y = clouds(3, seed=23)
    h = potential(M, seed=24)
    exact = softmin64(cost64(x, y, "sqeuclidean"), h, 0.05, 1)
    out, first = shifted(K.point_operand(x - 0.5, y - 0.5, False, "fp32"), h, exact.float() - 3.35)
    assert first.isnan().all()
    assert relerr(out, exact) < 1e-5


def test_only_the_bad_row_is_redone_and_splits_take_hints(shifted, exp2_may_overflow):
    """One row's hint far off, a split reduction (200 points in slices of 128), one slice
    of zero weights: exactly that row's partial sums and the zero-weight slice (a sum of
    0) go to the FIXUP launch, and the result is exact."""
    x, y = clouds(3, m=200, seed=25)
    h = potential(200, seed=26)
    h[0, :128] = -INF
    exact = softmin64(cost64(x, y, "sqeuclidean"), h, 0.05, 1)
    hint = exact.float().clone()
    hint[1, 5] += 100.0
    out, first = shifted(K.point_operand(x - 0.5, y - 0.5, False, "fp32"), h, hint, splits=3)
    assert first.shape == (B, 2, N)  # base-2 partial log-sums per slice
    redo = first.isnan()
    assert redo[1, :, 5].all() and redo[0, 0].all()
    assert int(redo.sum()) == 2 + N
    assert relerr(out, exact) < 1e-5


def test_hints_only_for_large_passes_and_switched_off_by_the_environment(monkeypatch):
    x, y = clouds(3, seed=27)
    h = potential(M, seed=28)
    exact = softmin64(cost64(x, y, "sqeuclidean"), h, 0.05, 1)
    geom = otcore.PointCloud(x, y)
    assert N * M < K.SHIFT_MIN_ENTRIES  # ignored here: the hint below would need a FIXUP
    assert relerr(geom.softmin(h, 0.05, 1, backend="triton", hint=exact.float() + 1e3), exact) < 1e-5
    monkeypatch.setattr(K, "SHIFT_MIN_ENTRIES", 0)
    monkeypatch.setenv("OTCORE_LSE_SHIFT", "0")
    assert not K.lse_shift()
    monkeypatch.setattr(K, "lse_shifted", None)  # never reached with the switch off
    assert relerr(geom.softmin(h, 0.05, 1, backend="triton", hint=exact.float() + 1e3), exact) < 1e-5


@pytest.mark.parametrize("kind", ["points", "dense"])
def test_per_row_online_sum_rescales_when_the_running_max_grows(kind, monkeypatch):
    """OTCORE_LSE_LANES=0 selects the per-row online log-sum-exp (docs/kernels.md: to time it
    against the per-lane form), read at every launch. Each column tile that raises a row's
    running max must rescale the sum kept so far: here h grows along the columns so that
    every row's max grows from tile to tile (4 tiles of 64, checked in float64), and problem
    1's first tile is all zero weight (a running max of -inf). No other test ran this path
    (a mutant dropping the rescale was 3% off float64 here, with every test passing)."""
    monkeypatch.setenv("OTCORE_LSE_LANES", "0")
    assert not K.lse_lanes()
    m, eps = 200, 0.05
    x, y = clouds(3, scale=0.5, m=m, seed=31)
    h = (3.0 * torch.arange(m, dtype=torch.float32) / m).expand(B, m).clone().to(DEVICE)
    h[1, :64] = -INF
    C = cost64(x, y, "sqeuclidean")
    bj = K.pass_tiles(N, m, K.COST_DIRECT, 3)[1]
    z = (h.double()[:, None, :] - C) / eps
    tile_max = torch.stack([z[..., j:j + bj].amax(-1) for j in range(0, m, bj)], -1)  # (B, N, tiles)
    assert tile_max.shape[-1] >= 3 and bool((tile_max[..., 1:] > tile_max[..., :-1]).all())  # the case
    geom = otcore.PointCloud(x, y) if kind == "points" else otcore.CostMatrix(C.float())
    out = geom.softmin(h, eps, 1, backend="triton")
    exact = softmin64(C, h, eps, 1)
    assert relerr(out, exact) < 1e-5
    assert relerr(out, geom.softmin(h, eps, 1, backend="torch")) < 1e-5


def test_a_hint_of_the_wrong_shape_is_an_error():
    op = K.point_operand(*clouds(3, seed=29), False, "fp32")
    with pytest.raises(ValueError, match="hint must have the result's shape"):
        K.launch_softmin(op, potential(M), 0.05, hint=potential(M))


@pytest.mark.parametrize("rho", [None, 0.5])
def test_the_solver_hints_keep_the_shifted_sum_in_range(monkeypatch, rho):
    """otcore.sinkhorn hands each pass the previous one's result: after the first
    iterations (hints from zero potentials are far off) no row needs the FIXUP launch, so
    the fast path is the one that runs. Same potentials and counts as the torch backend."""
    from otcore.kernels import sinkhorn_steps

    monkeypatch.setattr(K, "SHIFT_MIN_ENTRIES", 0)  # hints at this size too
    monkeypatch.setattr(sinkhorn_steps, "SMALL_MAX_ELEMENTS", 0)  # streamed passes, not the one-tile kernel
    monkeypatch.setattr(sinkhorn_steps, "TILES_MAX_WORK", 0)  # nor the one-program tiled one
    kernel, redo = K.softmin_kernel, []

    class Spy:  # counts the rows each FIXUP launch finds left as NaN
        def __getitem__(self, grid):
            def launch(*args, **kw):
                if kw["FIXUP"]:
                    redo.append(int(args[0].isnan().sum()))
                return kernel[grid](*args, **kw)
            return launch

    monkeypatch.setattr(K, "softmin_kernel", Spy())
    x, y = clouds(3, n=21, m=30, seed=30)
    geom = otcore.PointCloud(x, y)
    # eps small enough that s * f ~ 100: a hint off by a sign or a factor would leave the range
    kw = dict(eps=0.005, rho=rho, tol=1e-12, max_iter=25)
    with pytest.warns(otcore.ConvergenceWarning):
        got = otcore.sinkhorn(geom, backend="triton", **kw)
    with pytest.warns(otcore.ConvergenceWarning):
        want = otcore.sinkhorn(geom, backend="torch", **kw)
    assert relerr(got.f, want.f) < 1e-5
    assert len(redo) == 2 * 25  # every pass was a shifted one (the tests read the next row pass)
    assert sum(redo[6:]) == 0, redo[:12]  # from the 4th iteration on, every hint was in range


def test_device_scalars_are_cached_per_key_and_bounded():
    """The kernels' constant tensors are made once per key (a copy to a GPU costs a
    launch, made without a host sync) and the cache keeps the newest ``size``."""
    cache = K.DeviceScalars(size=2)
    a = cache.get(("x", 0.5), [1.0, 2.0], torch.float64, torch.device("cpu"))
    assert a.tolist() == [1.0, 2.0] and a.dtype == torch.float64
    assert cache.get(("x", 0.5), [9.0, 9.0], torch.float64, torch.device("cpu")) is a  # values not re-read
    cache.get(("y",), [3.0], torch.float32, torch.device("cpu"))
    cache.get(("z",), [4.0], torch.float32, torch.device("cpu"))  # evicts the oldest, ("x", 0.5)
    assert cache.get(("x", 0.5), [5.0, 6.0], torch.float64, torch.device("cpu")).tolist() == [5.0, 6.0]
    eps = 0.07
    torch.testing.assert_close(K.scalars(eps, torch.float32, torch.device("cpu")),
                               torch.tensor([K.LOG2E / eps, eps * K.LN2, 1.0]))
    torch.testing.assert_close(K.scalars(eps, torch.float32, torch.device("cpu"), tau=0.25),
                               torch.tensor([K.LOG2E / eps, eps * K.LN2, 0.25]))


@pytest.mark.parametrize("bad", [float("nan"), INF])
def test_a_nan_or_inf_potential_gives_nan_not_a_finite_softmin(bad):
    """NaN or +inf in ``h``: the twin's softmin is NaN. The kernel's empty-sum test
    (``l > 0``) read a NaN sum as "no weight": +inf unsplit, and a split pass dropped the
    slice holding it and returned the other slices' finite softmin. Now NaN everywhere."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(1, 4, 3, generator=g), torch.rand(1, 200, 3, generator=g)
    op = K.point_operand(x.to(DEVICE), y.to(DEVICE), False, "fp32")
    h = 0.1 * torch.randn(1, 200, generator=g)
    h[0, 150] = bad
    assert bool(reference.softmin(otcore.PointCloud(x, y), h, 0.05, 1).isnan().all())
    for splits in (1, 2, 3):
        with warnings.catch_warnings():  # the interpreter's NumPy warns on inf - inf
            warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
            out = K.launch_softmin(op, h.to(DEVICE), 0.05, splits=splits)
        assert bool(out.isnan().all()), splits
    empty = torch.full((1, 200), -INF)  # every weight zero: +inf, as before (not NaN)
    assert bool((K.launch_softmin(op, empty.to(DEVICE), 0.05, splits=2) == INF).all())
