"""Triton kernel: a whole preconditioned conjugate gradient solve in one launch, for the
Newton systems of Sinkhorn-Newton-Sparse.

The system of every Newton step is, per problem (``S`` the ELL plan rows of
:mod:`otcore.kernels.sparse`, ``d_a = r (1 + lam)``, ``d_b = c (1 + lam)``)::

    [[diag(d_a), S  ], [S^T, diag(d_b)]] (x_a, x_b) = (r_a, r_b)

solved, as the twin solves it, through its Schur complement (``x_b`` eliminated)::

    K x_a = r_a - S (r_b / d_b),   K = diag(d_a) - S diag(1/d_b) S^T,   x_b = (r_b - S^T x_a) / d_b

by CG preconditioned with ``K``'s diagonal (1.8-18x fewer iterations than Jacobi-PCG on the
whole system, at the same cost per iteration: :func:`otcore.reference_sparse.ell_pcg`).
CG issued from the host costs ~17 launches per iteration (two ELL products, the dot
products, the vector updates) and a host read every 8 iterations, for a few
microseconds of GPU work each at the sizes SNS wins at (n = 500 ran 121 CG
iterations per Newton step on the whole system). Here one program per problem runs the
whole loop:

    u = S^T p / d_b;  q = d_a p - S u;  alpha = rz / <p, q>;  x += alpha p;  r -= alpha q;
    rz' = <r, pre r>;  stop once rz' <= rtol^2 rz_0 (or <p, q> <= 0, or max_iter);
    p = pre r + (rz' / rz) p

with ``r``, ``p``, ``q``, ``pre`` and ``u`` in a global scratch buffer. Both products are
gathers, so no atomics and a deterministic result: ``S u`` reads the ELL rows, ``S^T p``
a copy of the entries sorted by column (CSR by column: ``vals_t``, int32 ``rows_t``, the
offsets ``off`` (B, m + 1)), built with a few torch ops per solve. A barrier separates
each sweep over the vectors from the next, since a gather reads entries that other
threads of the program wrote.

One program per problem runs on one SM: it wins while the host-issued loop's launch
time exceeds a sweep's memory time on a single SM, which holds for small ELL matrices;
larger ones run the same iteration as whole-GPU sweeps issued from the host
(:mod:`otcore.kernels.sparse_cg_steps`, which calls this module's tile helpers;
:data:`FUSED_MAX_ENTRIES`).

The torch twin is :func:`otcore.reference_sparse.ell_pcg` (the same iteration, on
:func:`otcore._cg.pcg`). Only long-standing ``tl.*`` APIs are used (Triton >= 3.0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._intmath import next_pow2

#: Largest ELL size ``n * s`` per problem solved by the one-launch kernel; larger ones run
#: the host-issued sweeps. An estimate, not a measurement: a CG step's sweeps read ~44 bytes
#: per ELL entry (11.5 MB at 2^18 entries) on one SM, against the ~0.3 ms of host time
#: that a host-issued CG step took on the H200 host (~17 launches of the loop on the ELL
#: products that the sweeps, four launches per step, replaced); to be timed on a GPU
#: (``bench/bench_newton.py --host-cg``).
FUSED_MAX_ENTRIES = 1 << 18


@triton.jit
def _ell_rows(V, I, i0, n, m, S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    """ELL rows ``i0 .. i0 + BLOCK_R``: ``(rows, rows in range, values, column indices,
    entries to read)`` (BLOCK_R, S_PAD); an index off the matrix reads nothing."""
    slots = tl.arange(0, S_PAD)
    rows = i0 + tl.arange(0, BLOCK_R)
    rm = rows < n
    mk = rm[:, None] & (slots < S)[None, :]
    v = tl.load(V + rows[:, None] * S + slots[None, :], mask=mk, other=0.0)
    j = tl.load(I + rows[:, None] * S + slots[None, :], mask=mk, other=0)
    on = mk & (j >= 0) & (j < m)
    return rows, rm, tl.where(on, v, 0.0), j, on  # (an off-matrix entry's value, even inf, plays no part)


@triton.jit
def _schur_init_rows(V, I, DA, RA, IA, INV_B, XA, WA, WB, n, m, i0, S: tl.constexpr, S_PAD: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    """Rows ``i0 .. i0 + BLOCK_R`` of the solve's start: the preconditioner ``pre = 1 / (d_a -
    sum_k v^2 ib_j)`` (the Schur complement's diagonal, floored at 64 rounding units of
    ``|d_a|`` as :func:`otcore.reference_sparse.floor_factor`; 0 where ``ia`` leaves the row out
    or its inverse is not finite), the reduced right-hand side as the residual ``r = r_a - S u``
    (``u = ib r_b`` in ``WB``), ``p = pre r``, ``x_a = 0``. ``WA`` holds ``r, p, q, pre`` at
    offsets 0, n, 2n, 3n. Returns the rows' ``r pre r`` (BLOCK_R,)."""
    if WA.dtype.element_ty == tl.float64:
        FLOOR: tl.constexpr = 1.4210854715202004e-14  # 64 * 2^-52
        LEAST: tl.constexpr = 5.562684646268003e-309  # 1 / the largest float64: 1 / k finite above it
    else:
        FLOOR: tl.constexpr = 7.62939453125e-06  # 64 * 2^-23
        LEAST: tl.constexpr = 2.938735877055719e-39  # 1 / the largest float32
    rows, rm, v, j, on = _ell_rows(V, I, i0, n, m, S, S_PAD, BLOCK_R)
    da = tl.load(DA + rows, mask=rm, other=0.0)
    k = da - tl.sum(v * v * tl.load(INV_B + j, mask=on, other=0.0), axis=1)
    k = tl.where(k < FLOOR * tl.abs(da), FLOOR * tl.abs(da), k)  # (NaN stays NaN, as in the twin)
    ok = (tl.load(IA + rows, mask=rm, other=0.0) != 0) & (k >= LEAST)  # (a subnormal k: left out, as the twin)
    pre = tl.where(ok, 1 / tl.where(ok, k, 1.0), 0.0)
    r = tl.load(RA + rows, mask=rm, other=0.0) - tl.sum(v * tl.load(WB + j, mask=on, other=0.0), axis=1)
    tl.store(XA + rows, tl.zeros((BLOCK_R,), dtype=WA.dtype.element_ty), mask=rm)
    tl.store(WA + rows, r, mask=rm)
    tl.store(WA + n + rows, pre * r, mask=rm)
    tl.store(WA + 3 * n + rows, pre, mask=rm)
    return r * (pre * r)


@triton.jit
def _schur_init(V, I, DA, RA, IA, INV_B, XA, WA, WB, n, m, S: tl.constexpr, S_PAD: tl.constexpr,
                BLOCK_R: tl.constexpr):
    """:func:`_schur_init_rows` over every row; returns ``<r, pre r>``."""
    acc = tl.zeros((BLOCK_R,), dtype=WA.dtype.element_ty)
    for i0 in range(0, n, BLOCK_R):
        acc += _schur_init_rows(V, I, DA, RA, IA, INV_B, XA, WA, WB, n, m, i0, S, S_PAD, BLOCK_R)
    return tl.sum(acc, axis=0)


@triton.jit
def _cols_scaled(VT, RT, OFF, INV_B, SRC, RB, OUT, m, keep, BLOCK: tl.constexpr, FINAL: tl.constexpr):
    """Over the columns, from the entries sorted by column (column ``j``'s at
    ``off[j] <= e < off[j + 1]``), with ``t = S^T src`` and ``ib = 1 / d_b`` (0: left out; in ``INV_B``):
    ``out = ib t`` (the loop's ``u``), or with ``FINAL`` ``out = ib (r_b - t)`` (``x_b`` from
    ``x_a``), 0 where left out or ``keep`` is 0 (an inactive problem), whatever ``r_b`` holds."""
    for j0 in range(0, m, BLOCK):
        _cols_scaled_tile(VT, RT, OFF, INV_B, SRC, RB, OUT, m, keep, j0, BLOCK, FINAL)


@triton.jit
def _cols_scaled_tile(VT, RT, OFF, INV_B, SRC, RB, OUT, m, keep, j0, BLOCK: tl.constexpr, FINAL: tl.constexpr):
    """:func:`_cols_scaled` for columns ``j0 .. j0 + BLOCK``."""
    cols = j0 + tl.arange(0, BLOCK)
    cm = cols < m
    start = tl.load(OFF + cols, mask=cm, other=0)
    count = tl.load(OFF + cols + 1, mask=cm, other=0) - start
    t = tl.zeros((BLOCK,), dtype=OUT.dtype.element_ty)
    for e in range(0, tl.max(count, axis=0).to(tl.int32)):  # the longest column of the block
        mk = e < count
        v = tl.load(VT + start + e, mask=mk, other=0.0)
        t += v * tl.load(SRC + tl.load(RT + start + e, mask=mk, other=0), mask=mk, other=0.0)
    ib = tl.load(INV_B + cols, mask=cm, other=0.0)
    if FINAL:
        out = tl.where((keep != 0) & (ib != 0), ib * (tl.load(RB + cols, mask=cm, other=0.0) - t), 0.0)
    else:
        out = ib * t
    tl.store(OUT + cols, out, mask=cm)


@triton.jit
def _rows_product(V, I, DA, WA, U, n, m, S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    """``q = d_a p - S u`` (the Schur complement times ``p``; stored in ``WA``); returns ``<p, q>``."""
    acc = tl.zeros((BLOCK_R,), dtype=WA.dtype.element_ty)
    for i0 in range(0, n, BLOCK_R):
        acc += _rows_product_tile(V, I, DA, WA, U, n, m, i0, S, S_PAD, BLOCK_R)
    return tl.sum(acc, axis=0)


@triton.jit
def _rows_product_tile(V, I, DA, WA, U, n, m, i0, S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    """:func:`_rows_product` for rows ``i0 .. i0 + BLOCK_R``; returns their ``p q`` (BLOCK_R,)."""
    rows, rm, v, j, on = _ell_rows(V, I, i0, n, m, S, S_PAD, BLOCK_R)
    u = tl.load(U + j, mask=on, other=0.0)
    pa = tl.load(WA + n + rows, mask=rm, other=0.0)
    q = tl.load(DA + rows, mask=rm, other=0.0) * pa - tl.sum(v * u, axis=1)
    tl.store(WA + 2 * n + rows, q, mask=rm)
    return pa * q


@triton.jit
def _scale(IB, DB, RB, U, INV_B, m, BLOCK: tl.constexpr):
    """Over the columns: ``1 / d_b`` where ``ib`` keeps the entry, else 0 (as the twin; once
    per solve, into ``INV_B``), and ``u = r_b / d_b`` (0 where left out, whatever ``r_b``
    holds there)."""
    for j0 in range(0, m, BLOCK):
        _scale_tile(IB, DB, RB, U, INV_B, m, j0, BLOCK)


@triton.jit
def _scale_tile(IB, DB, RB, U, INV_B, m, j0, BLOCK: tl.constexpr):
    """:func:`_scale` for columns ``j0 .. j0 + BLOCK``."""
    o = j0 + tl.arange(0, BLOCK)
    mk = o < m
    keep = tl.load(IB + o, mask=mk, other=0.0) != 0
    ib = tl.where(keep, 1 / tl.where(keep, tl.load(DB + o, mask=mk, other=1.0), 1.0), 0.0)
    tl.store(INV_B + o, ib, mask=mk)
    tl.store(U + o, tl.where(keep, ib * tl.load(RB + o, mask=mk, other=0.0), 0.0), mask=mk)


@triton.jit
def _step(X, WA, n, alpha, BLOCK: tl.constexpr):
    """``x += alpha p``, ``r -= alpha q``; returns ``<r, pre r>``."""
    acc = tl.zeros((BLOCK,), dtype=X.dtype.element_ty)
    for i0 in range(0, n, BLOCK):
        acc += _step_tile(X, WA, n, alpha, i0, BLOCK)
    return tl.sum(acc, axis=0)


@triton.jit
def _step_tile(X, WA, n, alpha, i0, BLOCK: tl.constexpr):
    """:func:`_step` for entries ``i0 .. i0 + BLOCK``; returns their ``r pre r`` (BLOCK,)."""
    o = i0 + tl.arange(0, BLOCK)
    mk = o < n
    p = tl.load(WA + n + o, mask=mk, other=0.0)
    r = tl.load(WA + o, mask=mk, other=0.0) - alpha * tl.load(WA + 2 * n + o, mask=mk, other=0.0)
    tl.store(X + o, tl.load(X + o, mask=mk, other=0.0) + alpha * p, mask=mk)
    tl.store(WA + o, r, mask=mk)
    return r * (tl.load(WA + 3 * n + o, mask=mk, other=0.0) * r)


@triton.jit
def _direction(WA, n, beta, BLOCK: tl.constexpr):
    """``p = pre r + beta p``."""
    for i0 in range(0, n, BLOCK):
        _direction_tile(WA, n, beta, i0, BLOCK)


@triton.jit
def _direction_tile(WA, n, beta, i0, BLOCK: tl.constexpr):
    """:func:`_direction` for entries ``i0 .. i0 + BLOCK``."""
    o = i0 + tl.arange(0, BLOCK)
    mk = o < n
    z = tl.load(WA + 3 * n + o, mask=mk, other=0.0) * tl.load(WA + o, mask=mk, other=0.0)
    tl.store(WA + n + o, z + beta * tl.load(WA + n + o, mask=mk, other=0.0), mask=mk)


@triton.jit
def _ell_pcg_kernel(
    V_ptr, I_ptr, VT_ptr, rows_t_ptr, off_ptr,
    DA_ptr, DB_ptr, RA_ptr, RB_ptr, IA_ptr, IB_ptr, RTOL2_ptr, active_ptr,
    XA_ptr, XB_ptr, WA_ptr, WB_ptr, its_ptr,
    n, m, max_iter,
    S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr,
):
    """The whole solve of problem ``program_id(0)`` (the twin's Schur-complement PCG); grid ``(B,)``.

    Every tensor is contiguous: V, I (B, n, S) the ELL rows; VT, RT (B, n S) the entries
    sorted by column (values, int32 rows) and OFF (B, m + 1) int64 offsets; DA, RA, IA,
    XA (B, n) the ``a`` side's diagonal, right-hand side, inverse (0: left out) and
    solution; DB, RB, IB, XB (B, m) the ``b`` side's; WA (B, 4, n) scratch (r, p, q, pre),
    WB (B, 2, m) scratch (u, and ``1 / d_b`` where kept); RTOL2 (B,) the squared
    tolerances in the solution's dtype; active (B,) bool; its (B,) int64 the
    iterations run. An index outside ``[0, m)`` reads nothing (``plan_sparse_rows`` gives
    none). A barrier separates each sweep from the next: the gathers read entries other
    threads of the program wrote.
    """
    b = tl.program_id(0).to(tl.int64)
    V, I = V_ptr + b * n * S, I_ptr + b * n * S
    VT, RT, OFF = VT_ptr + b * n * S, rows_t_ptr + b * n * S, off_ptr + b * (m + 1)
    DA, RA, IA, XA, WA = DA_ptr + b * n, RA_ptr + b * n, IA_ptr + b * n, XA_ptr + b * n, WA_ptr + b * 4 * n
    DB, RB, IB, XB = DB_ptr + b * m, RB_ptr + b * m, IB_ptr + b * m, XB_ptr + b * m
    U, INV_B = WB_ptr + b * 2 * m, WB_ptr + b * 2 * m + m
    act = tl.load(active_ptr + b) != 0

    _scale(IB, DB, RB, U, INV_B, m, BLOCK)
    tl.debug_barrier()
    rz = _schur_init(V, I, DA, RA, IA, INV_B, XA, WA, U, n, m, S, S_PAD, BLOCK_R)
    stop = rz * tl.load(RTOL2_ptr + b)
    go = (rz > 0) & act
    k = 0
    tl.debug_barrier()  # p is read by gathers below
    while go:
        _cols_scaled(VT, RT, OFF, INV_B, WA + n, RB, U, m, 1, BLOCK, False)  # u = S^T p / d_b
        tl.debug_barrier()
        pq = _rows_product(V, I, DA, WA, U, n, m, S, S_PAD, BLOCK_R)
        tl.debug_barrier()
        ok = pq > 0  # else (rounding at the null space, or not finite) stop at this iterate
        rz_new = rz
        if ok:
            alpha = rz / pq
            rz_new = _step(XA, WA, n, alpha, BLOCK)
        tl.debug_barrier()
        k += 1
        go = ok & (rz_new > stop) & (k < max_iter)
        beta = rz_new / rz  # rz > 0: the loop runs only while rz > stop >= 0
        _direction(WA, n, beta, BLOCK)
        tl.debug_barrier()
        rz = rz_new
    tl.store(its_ptr + b, k)
    _cols_scaled(VT, RT, OFF, INV_B, XA, RB, XB, m, act.to(tl.int32), BLOCK, True)


def _by_column(vals, idx, m: int):
    """The ELL entries sorted by column: values (B, n s), int32 rows (B, n s) and int64
    offsets (B, m + 1) (column ``j``'s entries at ``off[j] <= e < off[j + 1]``). Empty
    slots (value 0) sort last, past ``off[m]``."""
    B, n, s = vals.shape
    flat = vals.reshape(B, n * s)
    key = torch.where(flat != 0, idx.reshape(B, n * s), m)
    key, order = torch.sort(key, dim=1, stable=True)
    cols = torch.arange(m + 1, device=vals.device, dtype=key.dtype).expand(B, m + 1).contiguous()
    off = torch.searchsorted(key, cols)
    return flat.gather(1, order), (order // s).to(torch.int32), off


#: Warps of the one program per problem: the whole SM's parallelism for one problem's gathers.
NUM_WARPS = 8


def block_sizes(s: int) -> dict:
    """The kernel's ``S_PAD``, ``BLOCK_R`` (ELL rows per tile, ~2048 entries) and ``BLOCK``
    (vector entries per sweep step) for ``s`` entries per row."""
    s_pad = next_pow2(s)
    return dict(S_PAD=s_pad, BLOCK_R=max(1, min(128, 2048 // s_pad)), BLOCK=512)


def fused(n: int, s: int) -> bool:
    """Whether a solve with ``n x s`` ELL rows per problem runs in one launch (one program
    per problem: any batch size)."""
    return n * s <= FUSED_MAX_ENTRIES


def operands(vals, idx, diag, rhs, inv_diag, rtol, m: int):
    """What both Triton paths read: the contiguous ELL rows ``(vals, idx)``, their by-column
    copy ``(vt, rt, off)``, the six vectors ``(d_a, d_b, r_a, r_b, i_a, i_b)`` (vals' dtype,
    checked by the caller), ``rtol^2`` (B,) rounded as the twin's ``rz * rtol**2`` rounds it,
    and the solution and scratch buffers ``(x_a, x_b, WA (B, 4, n), WB (B, 2, m))``."""
    B, n, _ = vals.shape
    dtype, dev = vals.dtype, vals.device
    vals, idx = vals.contiguous(), idx.contiguous()
    vectors = tuple(t.contiguous() for t in (*diag, *rhs, *inv_diag))
    rtol2 = (torch.full((B,), rtol**2, dtype=dtype, device=dev) if not isinstance(rtol, torch.Tensor)
             else (rtol**2).to(dev, dtype).expand(B).contiguous())
    buffers = (torch.empty(B, n, dtype=dtype, device=dev), torch.empty(B, m, dtype=dtype, device=dev),
               torch.empty(B, 4, n, dtype=dtype, device=dev), torch.empty(B, 2, m, dtype=dtype, device=dev))
    return (vals, idx), _by_column(vals, idx, m), vectors, rtol2, buffers


def ell_pcg(geom, vals, idx, diag, rhs, inv_diag, rtol, max_iter: int, active):
    """Triton version of :func:`otcore.reference_sparse.ell_pcg`: one launch for the
    whole solve when :func:`fused`, else host-issued whole-GPU sweeps
    (:func:`otcore.kernels.sparse_cg_steps.ell_pcg_steps`)."""
    B, n, s = vals.shape
    m = geom.m
    if not fused(n, s):
        from .sparse_cg_steps import ell_pcg_steps  # (it builds on this module's tile helpers)

        return ell_pcg_steps(geom, vals, idx, diag, rhs, inv_diag, rtol, max_iter, active)
    (vals, idx), (vt, rt, off), vectors, rtol2, (xa, xb, wa, wb) = operands(vals, idx, diag, rhs, inv_diag, rtol, m)
    its = torch.empty(B, dtype=torch.int64, device=vals.device)
    _ell_pcg_kernel[(B,)](
        vals, idx, vt, rt, off, *vectors, rtol2, active.contiguous(), xa, xb, wa, wb, its,
        n, m, max_iter, S=s, **block_sizes(s), num_warps=NUM_WARPS,
    )
    return (xa, xb), its
