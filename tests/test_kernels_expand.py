"""The FMA expansion of the squared Euclidean cost (``COST_EXPAND``) against its torch
twin and float64.

For large float32 passes at d <= 8 the kernels sum the base-2 exponent as
``(v_i - s|x_i|^2) + (s h_j - s|y_j|^2) + sum_k (2 s x_ik) y_jk`` on centred clouds
instead of forming direct differences (half the FP32 work per entry at d = 3), under a
guard on its rounding (``EXPAND_MAX_ERROR``). Each case compares the Triton kernel, a torch
twin of the same float32 algebra (below) and a float64 dense reference. Shapes are small
and odd (37 x 53); ``EXPAND_MIN_ENTRIES`` is lowered so that they take the path. Tensors live
on ``DEVICE``: with CUDA the real kernels run, without it the Triton interpreter.
"""

import math

import pytest
import torch
from kernel_support import DEVICE, RUNTIME_WARNINGS_ARE_ERRORS

import otcore
from otcore import triton_ops
from otcore.kernels import sinkhorn_steps as KS
from otcore.kernels import softmin as K

pytestmark = RUNTIME_WARNINGS_ARE_ERRORS

B, N, M = 2, 37, 53
INF = float("inf")


@pytest.fixture
def large(monkeypatch):
    """Every pass counts as large: the geometry primitives take the expansion where its guard allows."""
    monkeypatch.setattr(K, "EXPAND_MIN_ENTRIES", 0)


def clouds(d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, N, d, generator=g, dtype=torch.float64)
    y = torch.rand(B, M, d, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return x.to(DEVICE, dtype), y.to(DEVICE, dtype)


def potential(k, seed=1, scale=0.1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, k, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)


def softmin64(x, y, h, eps, axis):
    """``-eps log sum exp((h - C)/eps)`` in float64 from explicit coordinate differences."""
    C = ((x.double()[:, :, None, :] - y.double()[:, None, :, :]) ** 2).sum(-1)
    if axis == 1:
        return -eps * torch.logsumexp((h.double()[:, None, :] - C) / eps, dim=2)
    return -eps * torch.logsumexp((h.double()[:, :, None] - C) / eps, dim=1)


def expand_twin(own, oth, h, eps):
    """The kernel's algebra in torch, in the clouds' dtype: ``own``/``oth`` centred,
    ``z_ij = -s|o_i|^2 + (s h_j - s|t_j|^2) + sum_k (2 s o_ik) t_jk`` with ``s = log2(e)/eps``,
    then ``-(log2 sum_j 2^z_ij) / s``."""
    s = K.LOG2E / eps
    z = (-s * own.square().sum(-1))[:, :, None] + (s * h - s * oth.square().sum(-1))[:, None, :]
    z = z + (2 * s * own) @ oth.transpose(1, 2)
    return -(torch.logsumexp(z * K.LN2, dim=2) / K.LN2) / s


def relerr(a, b):
    """max |a - b| / max |b| over finite entries; +inf entries must agree exactly."""
    a, b = a.double(), b.double()
    assert torch.equal(torch.isinf(a), torch.isinf(b)), "inf pattern differs"
    fin = torch.isfinite(b)
    return float((a[fin] - b[fin]).abs().max() / b[fin].abs().max())


@pytest.mark.parametrize("d", [1, 3, 8])
@pytest.mark.parametrize("axis", [1, 0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shift", [False, True])
def test_expanded_softmin_matches_its_twin_and_float64(monkeypatch, d, axis, dtype, shift):
    """Both reductions, online and shifted (a hint given), a zero-weight point, a batch."""
    if shift:
        monkeypatch.setattr(K, "SHIFT_MIN_ENTRIES", 0)
    x, y = clouds(d, seed=d, dtype=dtype)
    geom = otcore.PointCloud(x, y)
    xc, yc = triton_ops.centred_points(geom)
    own, oth = (xc, yc) if axis == 1 else (yc, xc)
    h = potential(oth.shape[1], seed=2, dtype=dtype)
    h[0, 4] = -INF
    exact = softmin64(x, y, h, 0.05, axis)
    op = K.point_operand(own, oth, False, "fp32", mode=K.COST_EXPAND)
    assert op.own_feat.shape == (B, own.shape[1], d + 1)
    out = K.launch_softmin(op, h, 0.05, hint=exact.to(dtype) + 0.01 if shift else None)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert relerr(out, exact) < tol
    assert relerr(out, expand_twin(own, oth, h, 0.05)) < tol


def test_the_expansion_is_for_the_squared_euclidean_cost_only():
    x, y = clouds(3)
    with pytest.raises(ValueError, match="squared Euclidean"):
        K.point_operand(x, y, True, "fp32", mode=K.COST_EXPAND)


def test_cost_modes_for_small_d():
    """Below DIRECT_MAX_D, fp32 expands only for a large pass (``expand``), the squared
    Euclidean cost, and d + 2 times a rounding bound (2^-22 of the squared spread) <= 4e-5 eps."""
    mode = K.point_cost_mode
    assert mode("fp32", 3, torch.float32, sq_spread=1.5, eps=0.05, expand=True)[0] == K.COST_EXPAND  # 1.8e-6 <= 2e-6
    assert mode("fp32", 3, torch.float32, sq_spread=1.5, eps=0.05)[0] == K.COST_DIRECT  # not large
    assert mode("fp32", 3, torch.float32, sq_spread=1.5, eps=0.03, expand=True)[0] == K.COST_DIRECT  # > 1.2e-6
    assert mode("fp32", 8, torch.float32, sq_spread=1.5, eps=0.05, expand=True)[0] == K.COST_DIRECT  # 3.6e-6 > 2e-6
    assert mode("fp32", 8, torch.float32, sq_spread=1.5, eps=0.1, expand=True)[0] == K.COST_EXPAND
    assert mode("fp32", 3, torch.float32, sq_spread=1.5, eps=0.05, euclidean=True, expand=True)[0] == K.COST_DIRECT
    assert mode("fp32", 3, torch.float64, sq_spread=1.5, eps=0.05, expand=True)[0] == K.COST_DIRECT
    assert mode("fp32", 9, torch.float32, sq_spread=1.5, eps=0.05, expand=True)[0] == K.COST_DOT  # the tensor cores


def test_geometry_takes_the_expansion_only_for_large_guarded_passes(monkeypatch):
    x, y = clouds(3)
    unit = otcore.PointCloud(x, y)
    assert triton_ops.operand(unit, 1, "fp32", 0.05).mode == K.COST_DIRECT  # 37 x 53: below EXPAND_MIN_ENTRIES
    monkeypatch.setattr(K, "EXPAND_MIN_ENTRIES", N * M)
    for axis in (1, 0):
        assert triton_ops.operand(unit, axis, "fp32", 0.05).mode == K.COST_EXPAND
    assert triton_ops.operand(unit, 1, "fp32", 1e-2).mode == K.COST_DIRECT  # eps below the guard
    assert triton_ops.operand(unit, 1, "tf32", 0.05).mode == K.COST_DOT
    assert triton_ops.operand(otcore.PointCloud(x, y, cost="euclidean"), 1, "fp32", 0.05).mode == K.COST_DIRECT
    assert triton_ops.operand(otcore.PointCloud(x.double(), y.double()), 1, "fp32", 0.05).mode == K.COST_DIRECT
    # far zero-weight padding counts in the centring and the spread: direct differences
    padded = otcore.PointCloud(torch.cat([x, 1e4 + x[:, :3]], 1), y)
    assert triton_ops.operand(padded, 1, "fp32", 0.05).mode == K.COST_DIRECT


def test_clustered_data_keeps_direct_differences(large):
    """Two clusters 100 apart: the expansion would round at ~2^-22 * 5000 against eps = 1e-2;
    the guard keeps direct differences and float32 digits (forced, the expansion is off)."""
    g = torch.Generator().manual_seed(31)
    centres = torch.cat([torch.zeros(B, 18, 3), torch.full((B, 19, 3), 100 / 3**0.5)], 1)
    x = (centres + 0.1 * torch.rand(B, N, 3, generator=g)).to(DEVICE)
    y = (torch.cat([torch.zeros(B, 26, 3), torch.full((B, 27, 3), 100 / 3**0.5)], 1)
         + 0.1 * torch.rand(B, M, 3, generator=g)).to(DEVICE)
    geom = otcore.PointCloud(x, y)
    assert triton_ops.operand(geom, 1, "fp32", 1e-2).mode == K.COST_DIRECT
    h = potential(M, seed=32, scale=0.0)
    exact = softmin64(x, y, h, 1e-2, 1)
    assert relerr(geom.softmin(h, 1e-2, 1, backend="triton"), exact) < 1e-5
    forced = K.launch_softmin(K.point_operand(*triton_ops.centred_points(geom), False, "fp32",
                                              mode=K.COST_EXPAND), h, 1e-2)
    assert relerr(forced, exact) > 1e-3  # what the guard avoids (1.0e-2 in the interpreter)


def test_one_far_pair_sets_the_spread_of_the_guard():
    """The guard reads the largest squared norm of the centred points, not a typical one: one
    pair 30 out (of 40 x 41 points, d = 9, eps 0.1) puts the spread at 1.5e4, where the dot
    product's rounding is past the guard and the kernel takes direct differences; by the mean
    norm (3.9e2) it took the dot product and the far pair's row came out 1.5e-2 eps off
    (a mutation test)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(1, 40, 9, generator=g), torch.rand(1, 41, 9, generator=g)
    x[0, 0] += 30.0
    y[0, 0] = x[0, 0] + 0.05 * torch.rand(9, generator=g)
    x, y = x.to(DEVICE), y.to(DEVICE)
    geom = otcore.PointCloud(x, y)
    assert triton_ops.squared_spread(geom) > 1e4
    h = torch.zeros(1, 41, device=DEVICE)
    exact = softmin64(x, y, h, 0.1, 1)
    got = geom.softmin(h, 0.1, 1, backend="triton")
    assert float((got.double() - exact).abs().max()) < 1e-5 * 0.1


def test_plan_operations_on_the_expansion(large):
    """The plan kernels share the cost tile: marginals, P v, the dense plan, <P, C> and
    the top entries (values, and the float64 plan read at the returned indices), against
    float64."""
    x, y = clouds(3, seed=5)
    geom = otcore.PointCloud(x, y)
    assert triton_ops.operand(geom, 1, "fp32", 0.05).mode == K.COST_EXPAND
    C = ((x.double()[:, :, None] - y.double()[:, None]) ** 2).sum(-1)
    G = torch.full((B, M), -0.05 * math.log(M), dtype=torch.float64, device=DEVICE)
    F = -0.05 * torch.logsumexp((G[:, None, :] - C) / 0.05, dim=2) - 0.05 * math.log(N)
    F[0, 3] = -INF
    P = torch.exp((F[:, :, None] + G[:, None, :] - C) / 0.05)
    F, G = F.float(), G.float()
    v = potential(M, seed=6)
    assert relerr(geom.marginals(F, G, 0.05, 1, backend="triton"), P.sum(2)) < 1e-5
    assert relerr(geom.marginals(F, G, 0.05, 0, backend="triton"), P.sum(1)) < 1e-5
    assert relerr(geom.apply_plan(F, G, 0.05, v, 1, backend="triton"), (P @ v.double()[..., None])[..., 0]) < 2e-5
    assert relerr(geom.plan(F, G, 0.05, backend="triton"), P) < 1e-5
    assert relerr(geom.plan_cost(F, G, 0.05, backend="triton"), (P * C).sum((1, 2))) < 1e-5
    vals, idx = geom.plan_topk(F, G, 0.05, 4, backend="triton")
    top = torch.topk(P, 4, dim=2).values
    assert relerr(vals, top) < 1e-5
    assert relerr(P.gather(2, idx), top) < 1e-5


@pytest.mark.parametrize("eps", [0.05, 0.2])
def test_sinkhorn_on_the_expansion_converges_to_the_float64_solution(large, monkeypatch, eps):
    """A whole solve on the expansion (the streamed passes: the one-program kernels, which
    small problems take, keep direct differences), balanced with weights: the potentials
    (up to the balanced gauge), value and cost of float64 to float32 accuracy, at
    tol = 1e-6."""
    monkeypatch.setattr(KS, "SMALL_MAX_ELEMENTS", 0)
    monkeypatch.setattr(KS, "TILES_MAX_WORK", 0)
    x, y = clouds(3, seed=7)
    g = torch.Generator().manual_seed(8)
    a = torch.rand(B, N, generator=g, dtype=torch.float64).to(DEVICE) + 0.1
    b = torch.rand(B, M, generator=g, dtype=torch.float64).to(DEVICE) + 0.1
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    geom = otcore.PointCloud(x, y)
    assert triton_ops.operand(geom, 1, "fp32", eps).mode == K.COST_EXPAND
    res = otcore.sinkhorn(geom, a.float(), b.float(), eps=eps, tol=1e-6, backend="triton", max_iter=3000)
    ref = otcore.sinkhorn(otcore.PointCloud(x.double(), y.double()), a, b, eps=eps, tol=1e-11,
                          backend="torch", max_iter=20000)
    assert bool(res.converged.all())
    assert relerr(res.value, ref.value) < 1e-6 and relerr(res.cost, ref.cost) < 1e-5
    df, dg = res.f.double() - ref.f, res.g.double() - ref.g
    shift = (df.mean(1, keepdim=True) - dg.mean(1, keepdim=True)) / 2  # (f + c, g - c) is the same plan
    assert relerr(res.f.double() - shift, ref.f) < 1e-5 and relerr(res.g.double() + shift, ref.g) < 1e-5


@pytest.mark.parametrize("d", [3, 8])
@pytest.mark.parametrize("self_transport", [False, True])
def test_float32_solves_at_the_guard_meet_a_tol_of_1_5e_6(large, monkeypatch, d, self_transport):
    """At eps just inside the guard (d + 2 times the rounding bound, halved for a cloud against
    itself), float32 Sinkhorn on the expansion still meets tol = 1.5e-6 (the lowest marginal
    error it reached at this boundary was 2.7e-7 to 1.2e-6; direct differences 1.3e-7 to
    7.2e-7). A guard 2.5x looser let self-transport stall at 2.2e-6 (d = 3) and 5.0e-6 (d = 8)."""
    monkeypatch.setattr(KS, "SMALL_MAX_ELEMENTS", 0)
    monkeypatch.setattr(KS, "TILES_MAX_WORK", 0)
    x, y = clouds(d, seed=1)
    geom = otcore.PointCloud(x, x) if self_transport else otcore.PointCloud(x, y)
    bound = (d + 2) * K.expansion_error(triton_ops.squared_spread(geom), False) / K.EXPAND_MAX_ERROR
    eps = 1.01 * bound * (2 if self_transport else 1)
    assert triton_ops.operand(geom, 1, "fp32", eps).mode == K.COST_EXPAND
    assert triton_ops.operand(geom, 1, "fp32", 0.98 * eps).mode == K.COST_DIRECT
    res = otcore.sinkhorn(geom, eps=eps, tol=1.5e-6, backend="triton", max_iter=400)
    # converged: the iterations' test passed, and the result's marginals (the plan kernels'
    # own rounding of the same cost) are within its slack of 2 tol
    assert bool(res.converged.all()) and float(res.marginal_error.max()) <= 3e-6
