"""Triton kernels: the Schur-complement CG of SNS's Newton systems issued from the host, each
sweep one launch over the whole GPU, for systems too large for one program per problem
(:data:`otcore.kernels.sparse_cg.FUSED_MAX_ENTRIES`).

The iteration is the twin's (:func:`otcore.reference_sparse.ell_pcg` on
:func:`otcore._cg.pcg`) and the one-launch kernel's (:mod:`otcore.kernels.sparse_cg`, whose
tile helpers these kernels call), per problem ``b`` and iteration ``k``::

    u = S^T p / d_b                                        (columns: _cg_cols_kernel)
    q = d_a p - S u,  partial <p, q>                       (row tiles: _cg_rows_kernel)
    alpha = rz / <p, q>;  x += alpha p;  r -= alpha q;  partial <r, pre r>   (_cg_step_kernel)
    run' = step & rz' > stop;  beta = rz' / rz;  p = pre r + beta p          (_cg_direction_kernel)

Four launches per iteration and no torch operation: the twin's loop on the Triton ELL
products took ~3 launches and ~50 torch operations per iteration (each a launch on a GPU,
``bench/newton_sync_count.py --host-cg``). A problem's dot products are reduced without
atomics: each program writes its partial sum, and every program that needs the total sums
the partials in the same order (deterministic); a problem's row and vector sweeps take at
most :data:`PROGRAMS_MAX` programs, each looping over its share of the tiles (the column
sweeps too, which keeps them within CUDA's 65535 programs on grid axis 1), so that these
re-summations stay small at any ``n`` (a review: one program per tile read ~4 partials per ELL
entry at n = 2^21). The per-problem scalars ``rz`` and ``run``
live on the device in two slots, read at the iteration's parity and written at the next's
by the direction kernel's program 0, so no program reads a slot being written. The host
reads ``run`` every 8 iterations (the twin's rule); a stopped problem's programs return at
once. Only long-standing ``tl.*`` APIs are used (Triton >= 3.0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse_cg import (_cols_scaled_tile, _direction_tile, _rows_product_tile, _scale_tile, _schur_init_rows,
                        _step_tile, block_sizes, operands)

#: Entries of a vector sweep's tile (the step and direction kernels).
BLOCK_V = 1024
#: Columns per program of the column kernels.
BLOCK_C = 512
#: Partial sums added per loop step when a program reduces a problem's partials.
BLOCK_SUM = 1024
#: Warps of every kernel here.
NUM_WARPS = 4
#: Most programs per problem of a sweep (each loops over its share of the tiles):
#: every program of the step and direction kernels re-sums up to this many partials.
PROGRAMS_MAX = 512


@triton.jit
def _total(P, count, BLOCK: tl.constexpr):
    """``sum(P[0 : count])`` in a fixed order (every program gets the same rounding)."""
    acc = tl.zeros((BLOCK,), dtype=P.dtype.element_ty)
    for t0 in range(0, count, BLOCK):
        o = t0 + tl.arange(0, BLOCK)
        acc += tl.load(P + o, mask=o < count, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _row0(t, BLOCK_R: tl.constexpr):
    """Row tile ``t``'s first row in 64 bits: its entries' offsets ``row * S + slot`` pass 2^31
    where one problem holds that many ELL entries (the one-launch kernel's systems are small)."""
    return tl.cast(t, tl.int64) * BLOCK_R


@triton.jit
def _cg_setup_cols_kernel(IB_ptr, DB_ptr, RB_ptr, WB_ptr, m, tiles, BLOCK: tl.constexpr):
    """Grid ``(B, programs)``: ``1 / d_b`` where kept (into ``WB[:, 1]``) and ``u = r_b / d_b``
    (``WB[:, 0]``) for the column tiles ``pid, pid + programs, ...``."""
    b, pid, progs = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.num_programs(1)
    U = WB_ptr + b * 2 * m
    for t in range(pid, tiles, progs):
        _scale_tile(IB_ptr + b * m, DB_ptr + b * m, RB_ptr + b * m, U, U + m, m, t * BLOCK, BLOCK)


@triton.jit
def _cg_setup_rows_kernel(V_ptr, I_ptr, DA_ptr, RA_ptr, IA_ptr, WB_ptr, XA_ptr, WA_ptr, P_ptr, n, m, tiles, s_p,
                          S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    """Grid ``(B, programs)``: the start of the solve (``pre``, ``r``, ``p``, ``x_a = 0``) for the
    row tiles ``pid, pid + programs, ...`` and their partial ``<r, pre r>`` in ``P[b, pid]``
    (problem stride ``s_p``)."""
    b, pid, progs = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.num_programs(1)
    U = WB_ptr + b * 2 * m
    acc = tl.zeros((BLOCK_R,), dtype=WA_ptr.dtype.element_ty)
    for t in range(pid, tiles, progs):
        acc += _schur_init_rows(V_ptr + b * n * S, I_ptr + b * n * S, DA_ptr + b * n, RA_ptr + b * n, IA_ptr + b * n,
                                U + m, XA_ptr + b * n, WA_ptr + b * 4 * n, U, n, m, _row0(t, BLOCK_R), S, S_PAD,
                                BLOCK_R)
    tl.store(P_ptr + b * s_p + pid, tl.sum(acc, axis=0))


@triton.jit
def _cg_start_kernel(P_ptr, RTOL2_ptr, active_ptr, RZ_ptr, STOP_ptr, RUN_ptr, its_ptr, parts, s_p,
                     BLOCK: tl.constexpr):
    """Grid ``(B,)``: ``rz = <r, pre r>`` from the setup's partials, ``stop = rtol^2 rz``, and
    whether the problem runs (``rz > 0`` and active), in slot 0."""
    b = tl.program_id(0).to(tl.int64)
    rz = _total(P_ptr + b * s_p, parts, BLOCK)
    tl.store(RZ_ptr + b * 2, rz)
    tl.store(STOP_ptr + b, rz * tl.load(RTOL2_ptr + b))
    tl.store(RUN_ptr + b * 2, ((rz > 0) & (tl.load(active_ptr + b) != 0)).to(tl.int32))
    tl.store(its_ptr + b, 0)


@triton.jit
def _cg_cols_kernel(VT_ptr, rows_t_ptr, off_ptr, WB_ptr, SRC_ptr, RB_ptr, OUT_ptr, FLAG_ptr, m, s_src, s_out, nnz,
                    tiles, BLOCK: tl.constexpr, FINAL: tl.constexpr):
    """Grid ``(B, programs)``: ``out = S^T src / d_b`` for the column tiles ``pid, pid + programs,
    ...``, where the flag
    (``run`` at this iteration's slot, or with ``FINAL`` ``active``) is set; ``FINAL``:
    ``x_b = (r_b - S^T x_a) / d_b`` (0 where left out or inactive). ``src``/``out`` at problem
    strides ``s_src``/``s_out``; the by-column copy holds ``nnz = n s`` entries per problem."""
    b, pid, progs = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.num_programs(1)
    flag = tl.load(FLAG_ptr + b * (1 if FINAL else 2))
    if FINAL or flag != 0:
        INV_B = WB_ptr + b * 2 * m + m
        for t in range(pid, tiles, progs):
            _cols_scaled_tile(VT_ptr + b * nnz, rows_t_ptr + b * nnz, off_ptr + b * (m + 1), INV_B,
                              SRC_ptr + b * s_src, RB_ptr + b * m, OUT_ptr + b * s_out, m, flag, t * BLOCK, BLOCK,
                              FINAL)


@triton.jit
def _cg_rows_kernel(V_ptr, I_ptr, DA_ptr, WA_ptr, WB_ptr, RUN_ptr, PQ_ptr, n, m, tiles,
                    S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    """Grid ``(B, programs)``: ``q = d_a p - S u`` for the row tiles ``pid, pid + programs, ...``,
    their partial ``<p, q>`` in ``PQ[b, pid]`` (``RUN_ptr`` points at this iteration's slot)."""
    b, pid, progs = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.num_programs(1)
    if tl.load(RUN_ptr + b * 2) != 0:
        acc = tl.zeros((BLOCK_R,), dtype=WA_ptr.dtype.element_ty)
        for t in range(pid, tiles, progs):
            acc += _rows_product_tile(V_ptr + b * n * S, I_ptr + b * n * S, DA_ptr + b * n, WA_ptr + b * 4 * n,
                                      WB_ptr + b * 2 * m, n, m, _row0(t, BLOCK_R), S, S_PAD, BLOCK_R)
        tl.store(PQ_ptr + b * progs + pid, tl.sum(acc, axis=0))


@triton.jit
def _cg_step_kernel(XA_ptr, WA_ptr, RZ_ptr, RUN_ptr, PQ_ptr, PR_ptr, n, parts_r, tiles, s_pr,
                    BLOCK: tl.constexpr, BLOCK_SUM: tl.constexpr):
    """Grid ``(B, programs)``: where the problem steps (running, ``<p, q> > 0`` from the rows'
    ``parts_r`` partials), ``alpha = rz / <p, q>``, ``x += alpha p``, ``r -= alpha q`` for the
    tiles ``pid, pid + programs, ...``, and their partial ``<r, pre r>`` in ``PR[b, pid]``
    (``RZ_ptr``, ``RUN_ptr`` at this iteration's slot)."""
    b, pid, progs = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.num_programs(1)
    if tl.load(RUN_ptr + b * 2) != 0:
        pq = _total(PQ_ptr + b * parts_r, parts_r, BLOCK_SUM)
        if pq > 0:  # else (rounding at the null space, or not finite) the problem stops at this iterate
            alpha = tl.load(RZ_ptr + b * 2) / pq
            acc = tl.zeros((BLOCK,), dtype=XA_ptr.dtype.element_ty)
            for t in range(pid, tiles, progs):
                acc += _step_tile(XA_ptr + b * n, WA_ptr + b * 4 * n, n, alpha, t * BLOCK, BLOCK)
            tl.store(PR_ptr + b * s_pr + pid, tl.sum(acc, axis=0))


@triton.jit
def _cg_direction_kernel(WA_ptr, RZ_ptr, RUN_ptr, STOP_ptr, PQ_ptr, PR_ptr, its_ptr, n, parts_r, tiles, s_pr,
                         parity, BLOCK: tl.constexpr, BLOCK_SUM: tl.constexpr):
    """Grid ``(B, programs)`` (the step kernel's): ``rz' = <r, pre r>`` from the step's
    partials; the problem runs on while it stepped and ``rz' > stop``; ``p = pre r + beta p``
    for the tiles ``pid, pid + programs, ...`` (``beta = rz' / rz``, 0 once stopped). Program
    0 writes ``rz'`` and ``run'`` into the next iteration's slot and counts the iteration."""
    b, t, progs = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.num_programs(1)
    cur, nxt = b * 2 + parity, b * 2 + 1 - parity
    run = tl.load(RUN_ptr + cur)
    rz = tl.load(RZ_ptr + cur)
    if run != 0:
        step = _total(PQ_ptr + b * parts_r, parts_r, BLOCK_SUM) > 0
        rz_new = rz
        if step:
            rz_new = _total(PR_ptr + b * s_pr, progs, BLOCK_SUM)
        go = step & (rz_new > tl.load(STOP_ptr + b))
        beta = tl.where(go, rz_new / rz, 0.0)  # rz > 0: a problem runs only while rz > stop >= 0
        for tt in range(t, tiles, progs):
            _direction_tile(WA_ptr + b * 4 * n, n, beta, tt * BLOCK, BLOCK)
        if t == 0:
            tl.store(RZ_ptr + nxt, rz_new)
            tl.store(RUN_ptr + nxt, go.to(tl.int32))
            tl.store(its_ptr + b, tl.load(its_ptr + b) + 1)
    elif t == 0:
        tl.store(RZ_ptr + nxt, rz)
        tl.store(RUN_ptr + nxt, 0)


def ell_pcg_steps(geom, vals, idx, diag, rhs, inv_diag, rtol, max_iter: int, active):
    """:func:`otcore.reference_sparse.ell_pcg` as host-issued Triton sweeps (module docstring):
    the same arguments and result, ``((x_a, x_b), its)``. Reads ``run`` from the device every
    8 iterations, from the 8th on (the twin's rule)."""
    B, n, s = vals.shape
    m = geom.m
    dtype, dev = vals.dtype, vals.device
    (vals, idx), (vt, rt, off), (da, db, ra, rb, ia, ib), rtol2, (xa, xb, wa, wb) = operands(
        vals, idx, diag, rhs, inv_diag, rtol, m)
    bs = block_sizes(s)
    rows = dict(S=s, S_PAD=bs["S_PAD"], BLOCK_R=bs["BLOCK_R"])
    tiles_r, tiles_v, tiles_c = triton.cdiv(n, bs["BLOCK_R"]), triton.cdiv(n, BLOCK_V), triton.cdiv(m, BLOCK_C)
    # every sweep at most PROGRAMS_MAX programs per problem (also under CUDA's 65535 on grid axis 1)
    progs_r, progs_v, progs_c = (min(tiles, PROGRAMS_MAX) for tiles in (tiles_r, tiles_v, tiles_c))
    pq = torch.empty(B, progs_r, dtype=dtype, device=dev)  # the rows' partial <p, q>
    pr = torch.empty(B, max(progs_r, progs_v), dtype=dtype, device=dev)  # partial <r, pre r>
    rz, stop = torch.empty(B, 2, dtype=dtype, device=dev), torch.empty(B, dtype=dtype, device=dev)
    run, its = torch.empty(B, 2, dtype=torch.int32, device=dev), torch.empty(B, dtype=torch.int64, device=dev)
    act = active.contiguous()
    sums = dict(BLOCK=BLOCK_V, BLOCK_SUM=BLOCK_SUM, num_warps=NUM_WARPS)

    _cg_setup_cols_kernel[(B, progs_c)](ib, db, rb, wb, m, tiles_c, BLOCK=BLOCK_C, num_warps=NUM_WARPS)
    _cg_setup_rows_kernel[(B, progs_r)](vals, idx, da, ra, ia, wb, xa, wa, pr, n, m, tiles_r, pr.stride(0), **rows,
                                        num_warps=NUM_WARPS)
    _cg_start_kernel[(B,)](pr, rtol2, act, rz, stop, run, its, progs_r, pr.stride(0), BLOCK=BLOCK_SUM,
                           num_warps=NUM_WARPS)
    p, u = wa[:, 1], wb[:, 0]  # views: the kernels offset them per problem by their strides
    for k in range(max_iter):
        q = k % 2
        if k and k % 8 == 0 and not bool(run[:, q].any()):  # one host read (none at k = 0: a call has work)
            break
        _cg_cols_kernel[(B, progs_c)](vt, rt, off, wb, p, rb, u, run[:, q], m, p.stride(0), u.stride(0), n * s,
                                      tiles_c, BLOCK=BLOCK_C, FINAL=False, num_warps=NUM_WARPS)
        _cg_rows_kernel[(B, progs_r)](vals, idx, da, wa, wb, run[:, q], pq, n, m, tiles_r, **rows,
                                      num_warps=NUM_WARPS)
        _cg_step_kernel[(B, progs_v)](xa, wa, rz[:, q], run[:, q], pq, pr, n, progs_r, tiles_v, pr.stride(0), **sums)
        _cg_direction_kernel[(B, progs_v)](wa, rz, run, stop, pq, pr, its, n, progs_r, tiles_v, pr.stride(0), q,
                                           **sums)
    _cg_cols_kernel[(B, progs_c)](vt, rt, off, wb, xa, rb, xb, act.to(torch.int32), m, n, m, n * s, tiles_c,
                                  BLOCK=BLOCK_C, FINAL=True, num_warps=NUM_WARPS)
    return (xa, xb), its
