"""Triton kernel: a whole Jacobi-preconditioned conjugate gradient solve in one launch,
for the Newton systems of Sinkhorn-Newton-Sparse.

The system of every Newton step is, per problem (``S`` the ELL plan rows of
:mod:`otcore.kernels.sparse`, ``d_a = r (1 + lam)``, ``d_b = c (1 + lam)``)::

    [[diag(d_a), S  ], [S^T, diag(d_b)]] (x_a, x_b) = (r_a, r_b)

CG issued from the host costs ~17 launches per iteration (two ELL products, the dot
products, the vector updates) and a host read every 8 iterations, for a few
microseconds of GPU work each at the sizes SNS wins at (n = 500 ran 121 CG
iterations per Newton step). Here one program per problem runs the whole loop:

    q = K p;  alpha = rz / <p, q>;  x += alpha p;  r -= alpha q;  z = r / diag;
    rz' = <r, z>;  stop once rz' <= rtol^2 rz_0 (or <p, q> <= 0, or max_iter);
    p = z + (rz' / rz) p

with ``r``, ``p`` and ``q`` in a global scratch buffer. Both products are gathers, so
no atomics and a deterministic result: ``S p_b`` reads the ELL rows, ``S^T p_a`` a copy
of the entries sorted by column (CSR by column: ``vals_t``, int32 ``rows_t``, the
offsets ``off`` (B, m + 1)), built with a few torch ops per solve. A barrier separates
each sweep over the vectors from the next, since a gather reads entries that other
threads of the program wrote.

One program per problem runs on one SM: it wins while the host-issued loop's launch
time exceeds a sweep's memory time on a single SM, which holds for small ELL matrices;
larger ones run the host loop on the ELL product kernels (:data:`FUSED_MAX_ENTRIES`).

The torch twin is :func:`otcore.reference_sparse.ell_pcg` (the same iteration,
:func:`otcore._cg.pcg`). Only long-standing ``tl.*`` APIs are used (Triton >= 3.0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from otcore import reference_sparse as _twin

from ._intmath import next_pow2
from .sparse import ell_matvec

#: Largest ELL size ``n * s`` per problem solved by the one-launch kernel; larger ones run
#: the host-issued loop. An estimate, not a measurement: a CG step's sweeps read ~44 bytes
#: per ELL entry (11.5 MB at 2^18 entries) on one SM, against the ~0.3 ms of host time
#: that a host-issued CG step took on the H200 host (~17 launches); to be timed on a GPU
#: (``bench/bench_newton.py --host-cg``).
FUSED_MAX_ENTRIES = 1 << 18


@triton.jit
def _init_side(RHS, INV, X, W, size, BLOCK: tl.constexpr):
    """``x = 0``, ``r = rhs``, ``p = z = inv r`` over one side; returns ``<r, z>``.
    ``W`` holds ``r``, ``p``, ``q`` at offsets 0, ``size``, ``2 size``."""
    acc = tl.zeros((BLOCK,), dtype=X.dtype.element_ty)
    for i0 in range(0, size, BLOCK):
        o = i0 + tl.arange(0, BLOCK)
        mk = o < size
        r = tl.load(RHS + o, mask=mk, other=0.0)
        z = tl.load(INV + o, mask=mk, other=0.0) * r
        tl.store(X + o, tl.zeros((BLOCK,), dtype=X.dtype.element_ty), mask=mk)
        tl.store(W + o, r, mask=mk)
        tl.store(W + size + o, z, mask=mk)
        acc += r * z
    return tl.sum(acc, axis=0)


@triton.jit
def _rows_product(V, I, D, Wa, Wb, n, m, S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    """``q_a = d_a p_a + S p_b`` (stored in ``Wa``); returns ``<p_a, q_a>``."""
    slots = tl.arange(0, S_PAD)
    acc = tl.zeros((BLOCK_R,), dtype=Wa.dtype.element_ty)
    for i0 in range(0, n, BLOCK_R):
        rows = i0 + tl.arange(0, BLOCK_R)
        rm = rows < n
        mk = rm[:, None] & (slots < S)[None, :]
        v = tl.load(V + rows[:, None] * S + slots[None, :], mask=mk, other=0.0)
        j = tl.load(I + rows[:, None] * S + slots[None, :], mask=mk, other=0)
        pb = tl.load(Wb + m + j, mask=mk & (j >= 0) & (j < m), other=0.0)  # (an index off the matrix reads nothing)
        pa = tl.load(Wa + n + rows, mask=rm, other=0.0)
        q = tl.load(D + rows, mask=rm, other=0.0) * pa + tl.sum(v * pb, axis=1)
        tl.store(Wa + 2 * n + rows, q, mask=rm)
        acc += pa * q
    return tl.sum(acc, axis=0)


@triton.jit
def _cols_product(VT, RT, OFF, D, Wa, Wb, n, m, BLOCK: tl.constexpr):
    """``q_b = d_b p_b + S^T p_a`` (stored in ``Wb``) from the entries sorted by column:
    column ``j``'s are ``off[j] <= e < off[j + 1]``; returns ``<p_b, q_b>``."""
    acc = tl.zeros((BLOCK,), dtype=Wb.dtype.element_ty)
    for j0 in range(0, m, BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        cm = cols < m
        start = tl.load(OFF + cols, mask=cm, other=0)
        count = tl.load(OFF + cols + 1, mask=cm, other=0) - start
        s = tl.zeros((BLOCK,), dtype=Wb.dtype.element_ty)
        for t in range(0, tl.max(count, axis=0).to(tl.int32)):  # the longest column of the block
            mk = t < count
            v = tl.load(VT + start + t, mask=mk, other=0.0)
            i = tl.load(RT + start + t, mask=mk, other=0)
            s += v * tl.load(Wa + n + i, mask=mk, other=0.0)
        pb = tl.load(Wb + m + cols, mask=cm, other=0.0)
        q = tl.load(D + cols, mask=cm, other=0.0) * pb + s
        tl.store(Wb + 2 * m + cols, q, mask=cm)
        acc += pb * q
    return tl.sum(acc, axis=0)


@triton.jit
def _step_side(INV, X, W, size, alpha, BLOCK: tl.constexpr):
    """``x += alpha p``, ``r -= alpha q`` over one side; returns ``<r, inv r>``."""
    acc = tl.zeros((BLOCK,), dtype=X.dtype.element_ty)
    for i0 in range(0, size, BLOCK):
        o = i0 + tl.arange(0, BLOCK)
        mk = o < size
        p = tl.load(W + size + o, mask=mk, other=0.0)
        r = tl.load(W + o, mask=mk, other=0.0) - alpha * tl.load(W + 2 * size + o, mask=mk, other=0.0)
        tl.store(X + o, tl.load(X + o, mask=mk, other=0.0) + alpha * p, mask=mk)
        tl.store(W + o, r, mask=mk)
        acc += r * (tl.load(INV + o, mask=mk, other=0.0) * r)
    return tl.sum(acc, axis=0)


@triton.jit
def _direction_side(INV, W, size, beta, BLOCK: tl.constexpr):
    """``p = inv r + beta p`` over one side."""
    for i0 in range(0, size, BLOCK):
        o = i0 + tl.arange(0, BLOCK)
        mk = o < size
        z = tl.load(INV + o, mask=mk, other=0.0) * tl.load(W + o, mask=mk, other=0.0)
        tl.store(W + size + o, z + beta * tl.load(W + size + o, mask=mk, other=0.0), mask=mk)


@triton.jit
def _ell_pcg_kernel(
    V_ptr, I_ptr, VT_ptr, rows_t_ptr, off_ptr,
    DA_ptr, DB_ptr, RA_ptr, RB_ptr, IA_ptr, IB_ptr, RTOL2_ptr, active_ptr,
    XA_ptr, XB_ptr, WA_ptr, WB_ptr, its_ptr,
    n, m, max_iter,
    S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr,
):
    """The whole PCG solve of problem ``program_id(0)``; grid ``(B,)``.

    Every tensor is contiguous: V, I (B, n, S) the ELL rows; VT, RT (B, n S) the entries
    sorted by column (values, int32 rows) and OFF (B, m + 1) int64 offsets; DA, RA, IA,
    XA (B, n) and DB, RB, IB, XB (B, m) the diagonal, right-hand side, preconditioner and
    solution of each side; WA (B, 3, n), WB (B, 3, m) scratch (r, p, q); RTOL2 (B,) the
    squared tolerances in the solution's dtype; active (B,) bool; its (B,) int64 the
    iterations run. An index outside ``[0, m)`` reads nothing (``plan_sparse_rows`` gives none).
    """
    b = tl.program_id(0).to(tl.int64)
    V, I = V_ptr + b * n * S, I_ptr + b * n * S
    VT, RT, OFF = VT_ptr + b * n * S, rows_t_ptr + b * n * S, off_ptr + b * (m + 1)
    DA, RA, IA, XA, WA = DA_ptr + b * n, RA_ptr + b * n, IA_ptr + b * n, XA_ptr + b * n, WA_ptr + b * 3 * n
    DB, RB, IB, XB, WB = DB_ptr + b * m, RB_ptr + b * m, IB_ptr + b * m, XB_ptr + b * m, WB_ptr + b * 3 * m

    rz = _init_side(RA, IA, XA, WA, n, BLOCK) + _init_side(RB, IB, XB, WB, m, BLOCK)
    stop = rz * tl.load(RTOL2_ptr + b)
    go = (rz > 0) & (tl.load(active_ptr + b) != 0)
    k = 0
    tl.debug_barrier()  # p is read by gathers below
    while go:
        pq = _rows_product(V, I, DA, WA, WB, n, m, S, S_PAD, BLOCK_R) + _cols_product(VT, RT, OFF, DB, WA, WB, n, m,
                                                                                      BLOCK)
        tl.debug_barrier()
        ok = pq > 0  # else (rounding at the null space, or not finite) stop at this iterate
        rz_new = rz
        if ok:
            alpha = rz / pq
            rz_new = _step_side(IA, XA, WA, n, alpha, BLOCK) + _step_side(IB, XB, WB, m, alpha, BLOCK)
        tl.debug_barrier()
        k += 1
        go = ok & (rz_new > stop) & (k < max_iter)
        beta = rz_new / rz  # rz > 0: the loop runs only while rz > stop >= 0
        _direction_side(IA, WA, n, beta, BLOCK)
        _direction_side(IB, WB, m, beta, BLOCK)
        tl.debug_barrier()
        rz = rz_new
    tl.store(its_ptr + b, k)


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


def ell_pcg(geom, vals, idx, diag, rhs, inv_diag, rtol, max_iter: int, active):
    """Triton version of :func:`otcore.reference_sparse.ell_pcg`: one launch for the
    whole solve when :func:`fused`, else the host-issued loop on the Triton ELL products."""
    B, n, s = vals.shape
    m = geom.m
    if not fused(n, s):
        return _twin.ell_pcg(geom, vals, idx, diag, rhs, inv_diag, rtol, max_iter, active, matvec=ell_matvec)
    dtype, dev = vals.dtype, vals.device
    vals, idx = vals.contiguous(), idx.contiguous()
    vt, rt, off = _by_column(vals, idx, m)
    da, db, ra, rb, ia, ib = (t.contiguous() for t in (*diag, *rhs, *inv_diag))  # vals' dtype (checked)
    # rtol^2 rounded as the twin's `rz * rtol**2` rounds it
    rtol2 = (torch.full((B,), rtol**2, dtype=dtype, device=dev) if not isinstance(rtol, torch.Tensor)
             else (rtol**2).to(dtype).expand(B).contiguous())
    xa, xb = torch.empty(B, n, dtype=dtype, device=dev), torch.empty(B, m, dtype=dtype, device=dev)
    wa, wb = torch.empty(B, 3, n, dtype=dtype, device=dev), torch.empty(B, 3, m, dtype=dtype, device=dev)
    its = torch.empty(B, dtype=torch.int64, device=dev)
    _ell_pcg_kernel[(B,)](
        vals, idx, vt, rt, off, da, db, ra, rb, ia, ib, rtol2, active.contiguous(), xa, xb, wa, wb, its,
        n, m, max_iter, S=s, **block_sizes(s), num_warps=NUM_WARPS,
    )
    return (xa, xb), its
