"""Several Sinkhorn iterations of a small or mid-sized problem in one launch.

Two kernels, one program per problem each: :func:`sinkhorn_steps_kernel` holds a cost that
fits one tile in registers (below); :func:`sinkhorn_tiles_kernel` streams a larger one in
tiles with the potentials in memory, up to :data:`TILES_MAX_WORK` (larger problems fill
the GPU with the streamed passes of :mod:`otcore.kernels.softmin`).

For a problem whose whole cost fits in one tile (``n x m`` padded to powers of two,
at most :data:`SMALL_MAX_ELEMENTS` entries) one program computes the cost once and
then runs ``k`` iterations without leaving the kernel:

    f <- tau_a * softmin_j(g + eps log b)      (row pass, a reduction along axis 1)
    g <- tau_b * softmin_i(f + eps log a)      (column pass, along axis 0)

or, for self-transport (``SYMMETRIC``: same cloud, weights and penalty on both sides),
the averaged update ``f <- (f + tau_a softmin(f + eps log a)) / 2``, ``g = f``; with
``CHECK``, then the solver's convergence test (the residual from the next row pass)
and, where it fails, that iteration. Grid: one program per problem of the batch.

Why: for a batch of tiny problems (B = 16,384 of 4 x 4 or 64 x 64) or a few small
ones, each streamed pass is a launch with a few microseconds of work, and the
potentials make a round trip through memory between passes; ``~10`` launches per
iteration then cost more than the exponentials. Here ``k`` iterations and the test
are one launch, the cost is computed once per launch instead of once per pass, and
nothing but the final potentials and the residual is written.

Same base-2 arithmetic as :mod:`otcore.kernels.softmin` (``z = s h - s C`` with
``s = log2(e)/eps``, ``softmin = -(max z + log2 sum 2^(z - max z)) / s``), with the
cost from the same :func:`~otcore.kernels.softmin.cost_tile`. Point clouds always use
direct coordinate differences: the cost is computed once per launch, so the
tensor-core expansion would save nothing, and direct differences are float32-faithful
for any ``d``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._intmath import next_pow2
from .softmin import COST_DENSE, COST_DIRECT, DEVICE_SCALARS, CostOperand, cost_tile, lse_online

#: Largest padded tile ``next_pow2(n) * next_pow2(m)`` run by this kernel: 64 x 64. The
#: tile, its scaled copy and one exponent block stay in registers (16 entries per thread
#: each at the launcher's warp count); a larger problem goes through the streamed passes.
SMALL_MAX_ELEMENTS = 4096

LOG2E = 1.0 / math.log(2.0)
_LOG2E = tl.constexpr(LOG2E)  # a global read inside a kernel must be a constexpr


def fits(n: int, m: int) -> bool:
    """Whether an ``n x m`` problem's padded cost tile fits one program (see :data:`SMALL_MAX_ELEMENTS`)."""
    return _pad(n) * _pad(m) <= SMALL_MAX_ELEMENTS


def _pad(k: int) -> int:
    return max(2, next_pow2(k))


@triton.jit
def lse2(z, AXIS: tl.constexpr):
    """``log2 sum 2^z`` along ``AXIS`` of a 2-D block; ``-inf`` for an all-``-inf`` line
    (shifted by 0 there, so no ``(-inf) - (-inf)``)."""
    mx = tl.max(z, axis=AXIS)
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    total = tl.sum(tl.exp2(z - tl.expand_dims(safe, AXIS)), axis=AXIS)
    return tl.where(total == 0, float("-inf"), safe + tl.log2(tl.where(total == 0, 1.0, total)))  # NaN stays NaN


@triton.jit
def _scalars_of(scal_ptr):
    """The launch's scalars (:func:`_scalars`): ``log2(e)/eps``, ``eps ln 2``, ``tau_a``,
    ``tau_b``, ``tol``, ``log2(e)/rho_a``."""
    return (tl.load(scal_ptr), tl.load(scal_ptr + 1), tl.load(scal_ptr + 2), tl.load(scal_ptr + 3),
            tl.load(scal_ptr + 4), tl.load(scal_ptr + 5))


@triton.jit
def sinkhorn_steps_kernel(
    f_ptr, g_ptr, resid_ptr, loga_ptr, logb_ptr, active_ptr, omega_ptr, scal_ptr, own_ptr, oth_ptr, c_ptr,
    n, m, n_steps,
    s_fb, s_gb, s_ab, s_bb,
    s_ob, s_or, s_ok, s_tb, s_tr, s_tk, s_cb, s_co, s_ct,
    D: tl.constexpr, COST: tl.constexpr, EUCLID: tl.constexpr, SYMMETRIC: tl.constexpr,
    CHECK: tl.constexpr, RELAX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``n_steps`` iterations of problem ``program_id(0)``, updating ``f``/``g`` in place;
    with ``CHECK`` then the convergence test and, where it fails, one more iteration.

    - ``f_ptr`` (B, n), ``g_ptr`` (B, m): potentials, read at the start and written at
      the end (problem strides ``s_fb``/``s_gb``, unit stride along the points).
    - ``resid_ptr`` (B,): ``CHECK`` only, the residual
      ``sides * sum_i a_i |exp((f_i - s_i)/eps) - t_i|`` of the state after ``n_steps``
      (``s``: the next row pass; ``t = 1`` or ``exp(-f/rho_a)``; see
      ``otcore.reference.sinkhorn_steps``). Where it is not above ``tol`` (or is NaN) the
      problem stops there, else it completes that iteration.
    - ``loga_ptr``/``logb_ptr``: ``log a``, ``log b`` (strides ``s_ab``/``s_bb``); ``-inf``
      marks a zero-weight point, whose column (row) of the plan is zero.
    - ``active_ptr`` (B,) bool: problems with False run no iteration and are not written.
    - ``omega_ptr`` (B,) (``RELAX`` only): the relaxation factors ``w`` of the first
      ``n_steps - 1`` iterations, ``f <- (1 - w) f + w tau_a softmin`` (likewise ``g``); the
      last one and the test's are plain (as ``otcore.reference.sinkhorn_steps``).
    - ``scal_ptr``: ``[log2(e)/eps, eps ln 2, tau_a, tau_b, tol, log2(e)/rho_a (0: balanced)]``
      in the compute dtype.
    - ``own_ptr``/``oth_ptr``/``c_ptr`` and their strides: the cost as the row pass
      sees it, as in :func:`~otcore.kernels.softmin.cost_tile` (x, y; or C, row stride
      ``s_co``, column stride ``s_ct``).
    """
    b = tl.program_id(0).to(tl.int64)
    offs_i = tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_M)
    mask_i = offs_i < n
    mask_j = offs_j < m
    active = tl.load(active_ptr + b) != 0
    scale, inv_scale, tau_a, tau_b, tol, rho2 = _scalars_of(scal_ptr)

    C = cost_tile(own_ptr + b * s_ob, oth_ptr + b * s_tb, c_ptr + b * s_cb, 0.0, 0.0, 0.0,
                  offs_i, offs_j, mask_i, mask_j, s_or, s_ok, s_tr, s_tk, s_co, s_ct,
                  D, 1, COST, EUCLID, "ieee")
    Cs = C * scale  # padded entries are finite; the -inf weights below mask them out
    # log2 of the weights: the bias eps log a, scaled by s, is log2(a)
    la2 = tl.load(loga_ptr + b * s_ab + offs_i, mask=mask_i, other=float("-inf")) * _LOG2E
    lb2 = tl.load(logb_ptr + b * s_bb + offs_j, mask=mask_j, other=float("-inf")) * _LOG2E
    f = tl.load(f_ptr + b * s_fb + offs_i, mask=mask_i, other=0.0)
    g = tl.load(g_ptr + b * s_gb + offs_j, mask=mask_j, other=0.0)
    resid = tl.sum(tl.zeros_like(f), axis=0) + float("nan")  # a scalar of the compute dtype
    go = active
    omega = tl.load(omega_ptr + b) if RELAX else 1.0

    # an inactive problem runs zero iterations; CHECK adds the test's iteration
    for it in range(0, tl.where(active, n_steps + CHECK, 0)):
        if SYMMETRIC:  # x is y: the row and column index the same points; g holds f = g
            hf = tl.where(lb2 > float("-inf"), g * scale + lb2, float("-inf"))
            s = -lse2(hf[None, :] - Cs, 1) * inv_scale
            cur = g
        else:
            hg = tl.where(lb2 > float("-inf"), g * scale + lb2, float("-inf"))
            s = -lse2(hg[None, :] - Cs, 1) * inv_scale
            cur = f
        if CHECK:
            if it == n_steps:  # the test, from this iteration's row pass: go on only above tol
                # (P1)_i / a_i = 2^(s (f_i - s_i)); target 2^(-f_i log2(e) / rho_a), 1 if balanced
                gap = tl.exp2(la2) * tl.abs(tl.exp2((cur - s) * scale) - tl.exp2(-cur * rho2))
                resid = tl.sum(tl.where(la2 > float("-inf"), gap, 0.0), axis=0) * (2.0 if SYMMETRIC else 1.0)
                go = resid > tol
        if SYMMETRIC:
            g = tl.where(go, 0.5 * (g + tau_a * s), g)
        else:
            new_f = tau_a * s
            if RELAX:  # over-relaxed but for the last iteration (and the test's)
                new_f = tl.where(it < n_steps - 1, (1.0 - omega) * f + omega * new_f, new_f)
            f = tl.where(go, new_f, f)
            hf = tl.where(la2 > float("-inf"), f * scale + la2, float("-inf"))
            new_g = tau_b * (-lse2(hf[:, None] - Cs, 0) * inv_scale)
            if RELAX:
                new_g = tl.where(it < n_steps - 1, (1.0 - omega) * g + omega * new_g, new_g)
            g = tl.where(go, new_g, g)
    if SYMMETRIC:
        f = g
    # an inactive problem stores nothing: its rows and columns count as none
    tl.store(f_ptr + b * s_fb + offs_i, f, mask=offs_i < tl.where(active, n, 0))
    tl.store(g_ptr + b * s_gb + offs_j, g, mask=offs_j < tl.where(active, m, 0))
    if CHECK:
        tl.store(resid_ptr + b, resid, mask=active)


#: Largest ``n * m * w`` run by :func:`sinkhorn_tiles_kernel` (one program streaming the
#: cost in tiles), ``w = max(d, 4)`` for point clouds (the cost is recomputed per tile and
#: pass) and 4 for a dense cost. An estimate, not a measurement: its tile loops are ~16-18
#: sm_90 instructions per entry and pass (SASS, d = 3 and dense), and one SM issues
#: ~2.5e11 thread instructions per second, so MoE's 4096 x 64 takes ~40 us per iteration,
#: against ~0.2 ms of host time per iteration that the streamed passes took on the H200
#: host; larger problems (whose passes fill the GPU) go through the streamed passes. To be
#: timed on a GPU (``bench/bench_latency.py``).
TILES_MAX_WORK = 1 << 20


def tile_blocks(n: int, m: int) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_M, num_warps)`` of :func:`sinkhorn_tiles_kernel`: tiles of 2048
    entries over 8 warps, 32 x 64 when both sides are long, and longer along the long side
    of a skinny problem (16 x 16384: 16 x 128) so that a pass is not thousands of nearly
    empty tiles. Compiled for sm_90 (Triton 3.6 and 3.9) with the per-lane log-sum-exp's
    two accumulators, 64 x 64 tiles spilled 8-104 bytes (float64 the most); at these sizes
    ptxas keeps at most a few words on the stack (tests/test_kernels_compile.py), float64
    included."""
    size = 2048
    bn, bm = min(32, _pad(n)), min(64, _pad(m))
    if bn < 32:  # few rows: longer column tiles
        bm = min(_pad(m), size // bn)
    elif bm < 64:  # few columns: longer row tiles
        bn = min(_pad(n), size // bm)
    return bn, bm, 8


def tiles_fit(n: int, m: int, d: int, dense: bool) -> bool:
    """Whether an ``n x m`` problem too large for one tile runs in one program streaming its
    cost in tiles (see :data:`TILES_MAX_WORK`)."""
    return n * m * (4 if dense else max(d, 4)) <= TILES_MAX_WORK


@triton.jit
def _softmin_of(m, l, inv_scale):
    """``-(m + log2 l) / s`` from :func:`~otcore.kernels.softmin.lse_online`'s pair: the
    softmin, ``+inf`` for a line with no positive weight (``l = 0``), NaN for a NaN sum."""
    return -tl.where(l == 0, float("-inf"), m + tl.log2(tl.where(l == 0, 1.0, l))) * inv_scale


@triton.jit
def sinkhorn_tiles_kernel(
    f_ptr, g_ptr, s_ptr, resid_ptr, loga_ptr, logb_ptr, active_ptr, omega_ptr, scal_ptr,
    own_ptr, oth_ptr, c_ptr,
    n, m, n_steps,
    s_fb, s_gb, s_sb, s_ab, s_bb,
    s_ob, s_or, s_ok, s_tb, s_tr, s_tk, s_cb, s_co, s_ct,
    D: tl.constexpr, COST: tl.constexpr, EUCLID: tl.constexpr, SYMMETRIC: tl.constexpr,
    CHECK: tl.constexpr, RELAX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    LOWEST: tl.constexpr,
):
    """:func:`sinkhorn_steps_kernel`'s iterations for a problem larger than one tile: one
    program per problem streams the cost in ``BLOCK_N x BLOCK_M`` tiles (recomputed, or read
    from ``C``, in every pass) and keeps the potentials in memory between passes:
    ``f_ptr``/``g_ptr`` are updated in place, ``s_ptr`` (B, n) is scratch for a row pass's
    softmins (stride ``s_sb``), ``loga_ptr``/``logb_ptr`` hold ``log a``, ``log b`` (strides
    ``s_ab``/``s_bb``: the passes' biases, added as ``log2`` of the weights to the scaled
    potential, and the test's weights). Each pass ends with a barrier, since the next one
    reads what other threads of the program wrote.

    The passes are the streamed kernel's per-lane online log-sum-exp
    (:func:`~otcore.kernels.softmin.lse_online` with ``LANE``, one ``exp2`` per entry and no
    cross-thread reduction inside the tile loop; ``LOWEST`` the dtype's most negative finite
    value); the column pass is the row pass of the transposed problem (the two clouds, or
    ``C``'s two strides, swapped). Per iteration: the row pass writes ``s`` and, with
    ``CHECK``, in the test's iteration, sums the residual (all of it is needed before ``f``
    may change); then ``f`` (``g``, symmetric) is updated from ``s``; then the column pass
    updates ``g``, unless the test stopped the problem. The other arguments and the
    results are those of :func:`sinkhorn_steps_kernel`; ``SYMMETRIC`` iterates on ``g``,
    which must equal ``f`` on entry (as the solver passes them).
    """
    b = tl.program_id(0).to(tl.int64)
    active = tl.load(active_ptr + b) != 0
    scale, inv_scale, tau_a, tau_b, tol, rho2 = _scalars_of(scal_ptr)
    own, oth, cc = own_ptr + b * s_ob, oth_ptr + b * s_tb, c_ptr + b * s_cb
    F, G, S, LA = f_ptr + b * s_fb, g_ptr + b * s_gb, s_ptr + b * s_sb, loga_ptr + b * s_ab
    LB = logb_ptr + b * s_bb
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_M)
    zero_n = tl.zeros((BLOCK_N,), dtype=f_ptr.dtype.element_ty)
    resid = tl.sum(zero_n, axis=0) + float("nan")  # a scalar of the compute dtype
    go = active
    omega = tl.load(omega_ptr + b) if RELAX else 1.0

    for it in range(0, tl.where(active, n_steps + CHECK, 0)):
        # row pass: s_i = softmin_j(g_j + eps log b_j - C_ij) (symmetric: g holds f, b = a)
        test = CHECK and it == n_steps
        acc = tl.sum(zero_n, axis=0)
        for i0 in range(0, n, BLOCK_N):
            oi = i0 + rows
            mi = oi < n
            mx, tot = lse_online(G, LB, scale, own, oth, cc, 0.0, 0.0, 0.0, oi, mi, 0, m,
                                 s_or, s_ok, s_tr, s_tk, s_co, s_ct, D, 1, COST, EUCLID, "ieee",
                                 BLOCK_N, BLOCK_M, True, LOWEST, True)
            s = _softmin_of(mx, tot, inv_scale)
            tl.store(S + oi, s, mask=mi)
            if test:  # the residual of the state before this pass: (P1)_i / a_i = 2^(scale (f_i - s_i))
                cur = tl.load((G if SYMMETRIC else F) + oi, mask=mi, other=0.0)
                la2 = tl.load(LA + oi, mask=mi, other=float("-inf")) * _LOG2E
                gap = tl.exp2(la2) * tl.abs(tl.exp2((cur - s) * scale) - tl.exp2(-cur * rho2))
                acc += tl.sum(tl.where(la2 > float("-inf"), gap, 0.0), axis=0)
        if test:  # go on only above tol
            resid = acc * (2.0 if SYMMETRIC else 1.0)
            go = resid > tol
        tl.debug_barrier()
        # the row update from s: f (symmetric: the averaged g)
        for i0 in range(0, n, BLOCK_N):
            oi = i0 + rows
            mi = oi < n
            s = tl.load(S + oi, mask=mi, other=0.0)
            if SYMMETRIC:
                old = tl.load(G + oi, mask=mi, other=0.0)
                tl.store(G + oi, tl.where(go, 0.5 * (old + tau_a * s), old), mask=mi)
            else:
                old = tl.load(F + oi, mask=mi, other=0.0)
                new = tau_a * s
                if RELAX:  # over-relaxed but for the last iteration (and the test's)
                    new = tl.where(it < n_steps - 1, (1.0 - omega) * old + omega * new, new)
                tl.store(F + oi, tl.where(go, new, old), mask=mi)
        tl.debug_barrier()
        if not SYMMETRIC:
            if go:  # column pass: g_j = tau_b softmin_i(f_i + eps log a_i - C_ij), the transposed row pass
                for j0 in range(0, m, BLOCK_M):
                    oj = j0 + cols
                    mj = oj < m
                    mx, tot = lse_online(F, LA, scale, oth, own, cc, 0.0, 0.0, 0.0, oj, mj, 0, n,
                                         s_tr, s_tk, s_or, s_ok, s_ct, s_co, D, 1, COST, EUCLID, "ieee",
                                         BLOCK_M, BLOCK_N, True, LOWEST, True)
                    new = tau_b * _softmin_of(mx, tot, inv_scale)
                    if RELAX:
                        old = tl.load(G + oj, mask=mj, other=0.0)
                        new = tl.where(it < n_steps - 1, (1.0 - omega) * old + omega * new, new)
                    tl.store(G + oj, new, mask=mj)
            tl.debug_barrier()
    if SYMMETRIC:  # f = g (an inactive problem stores nothing)
        for i0 in range(0, tl.where(active, n, 0), BLOCK_N):
            oi = i0 + rows
            tl.store(F + oi, tl.load(G + oi, mask=oi < n, other=0.0), mask=oi < n)
    if CHECK:
        tl.store(resid_ptr + b, resid, mask=active)


def _scalars(eps: float, tau_a: float, tau_b: float, tol: float, rho2: float, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """``[log2(e)/eps, eps ln 2, tau_a, tau_b, tol, log2(e)/rho_a]`` on the device, cached
    (:class:`otcore.kernels.softmin.DeviceScalars`): made once outside a CUDA graph's
    recording (the solver's warm-up block), never copied from the host inside it."""
    key = ("steps", eps, tau_a, tau_b, tol, rho2)
    return DEVICE_SCALARS.get(key, [LOG2E / eps, eps * math.log(2.0), tau_a, tau_b, tol, rho2], dtype, device)


def launch_sinkhorn_steps(
    op: CostOperand, f: torch.Tensor, g: torch.Tensor, loga: torch.Tensor, logb: torch.Tensor,
    eps: float, tau: tuple[float, float], k: int, active: torch.Tensor, symmetric: bool = False,
    check=None, omega: Optional[torch.Tensor] = None,
):
    """``k`` Sinkhorn iterations of every active problem, one launch (one program per
    problem); returns new ``(f, g)``,
    or ``(f, g, resid)`` with ``check = (tol, rho_a)``.

    Args:
        op: the cost seen from the rows (``point_operand(x, y, ..., mode=COST_DIRECT)`` or
            ``dense_operand(C, transposed=False)``); :func:`fits` (one tile, the cost in
            registers: :func:`sinkhorn_steps_kernel`) or :func:`tiles_fit` (one program
            streaming tiles: :func:`sinkhorn_tiles_kernel`) must hold.
        f, g: ``(B, n)``, ``(B, m)`` potentials (unbiased). loga, logb: ``log a``, ``log b``.
        eps: regularization. tau: ``(tau_a, tau_b)``, ``rho / (rho + eps)`` or 1 per side.
        k: iterations (>= 0). active: ``(B,)`` bool; inactive problems keep their potentials.
        symmetric: self-transport (``x is y``, ``a is b``, equal tau): the averaged update,
            on ``g``, which must equal ``f`` (as the solver passes them).
        check: ``(tol, rho_a)`` (``rho_a`` None: balanced rows): then the convergence test
            and one more iteration where the residual is above ``tol``, as in
            ``otcore.reference.sinkhorn_steps``; ``resid`` (B,) is NaN where not active.
        omega: ``(B,)`` relaxation factors of the first ``k - 1`` iterations (not with
            ``symmetric``), or None.

    The inputs are not modified (the outputs are new tensors, so a CUDA graph can record
    the call on static inputs).
    """
    ref = op.ref
    if op.mode not in (COST_DENSE, COST_DIRECT) or op.transposed:
        raise ValueError("launch_sinkhorn_steps needs the row operand with a direct or dense cost")
    B, n, m = op.batch, op.n_own, op.n_oth
    one_tile = fits(n, m)
    if not (one_tile or tiles_fit(n, m, op.d, op.mode == COST_DENSE)):
        raise ValueError(f"a {n} x {m} problem does not fit one program (SMALL_MAX_ELEMENTS = {SMALL_MAX_ELEMENTS}, "
                         f"TILES_MAX_WORK = {TILES_MAX_WORK})")
    if f.shape != (B, n) or g.shape != (B, m):
        raise ValueError(f"f and g must be ({B}, {n}) and ({B}, {m}) for this operand, got "
                         f"{tuple(f.shape)} and {tuple(g.shape)}")
    if omega is not None and (symmetric or tuple(omega.shape) != (B,)):
        raise ValueError(f"omega must be a ({B},) tensor, for the alternating updates only")
    if symmetric and n != m:
        raise ValueError(f"symmetric=True needs a square problem, got {n} x {m}")
    dt = ref.dtype
    f_out = f.to(dt).contiguous().clone()
    g_out = g.to(dt).contiguous().clone()
    resid = torch.full((B,), float("nan"), dtype=dt, device=ref.device)
    loga = loga.to(dt).contiguous()
    logb = logb.to(dt).contiguous()
    tau_a, tau_b = tau
    tol, rho_a = check if check is not None else (0.0, None)
    scal = _scalars(float(eps), float(tau_a), float(tau_b), float(tol), 0.0 if rho_a is None else LOG2E / rho_a,
                    dt, ref.device)
    omega_ = resid if omega is None else omega.to(dt).contiguous()  # (unread without RELAX)
    flags = dict(D=op.d, COST=op.mode, EUCLID=op.euclidean, SYMMETRIC=bool(symmetric), CHECK=check is not None,
                 RELAX=omega is not None)
    active = active.to(torch.bool).contiguous()
    if one_tile:
        bn, bm = _pad(n), _pad(m)
        sinkhorn_steps_kernel[(B,)](
            f_out, g_out, resid, loga, logb, active, omega_, scal, *op.pointer_args()[:3],
            n, m, int(k),
            f_out.stride(0), g_out.stride(0), loga.stride(0), logb.stride(0), *op.pointer_args()[3:],
            **flags, BLOCK_N=bn, BLOCK_M=bm, num_warps=max(1, min(8, bn * bm // 512)),
        )
    else:
        bn, bm, warps = tile_blocks(n, m)
        scratch = torch.empty(B, n, dtype=dt, device=ref.device)  # a row pass's softmins
        sinkhorn_tiles_kernel[(B,)](
            f_out, g_out, scratch, resid, loga, logb, active, omega_, scal, *op.pointer_args()[:3],
            n, m, int(k),
            f_out.stride(0), g_out.stride(0), scratch.stride(0), loga.stride(0), logb.stride(0),
            *op.pointer_args()[3:],
            **flags, BLOCK_N=bn, BLOCK_M=bm, LOWEST=float(torch.finfo(dt).min), num_warps=warps,
        )
    return (f_out, g_out) if check is None else (f_out, g_out, resid)
