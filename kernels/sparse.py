"""Triton kernels for the sparse (ELL) part of the plan used by Sinkhorn-Newton-Sparse.

ELL format: a fixed number ``s`` of entries per row, stored as ``vals`` (B, n, s)
and int64 column indices ``idx`` (B, n, s). Missing entries are zeros (any index).

- :func:`plan_sparse_rows`: the ``s`` largest entries of every row of
  ``P_ij = exp((F_i + G_j - C_ij) / eps)``, streamed over column tiles with the
  cost computed on the fly for point clouds (a direct difference loop over ``d``,
  no ``|x|^2 + |y|^2 - 2xy`` expansion, so float32 distances stay accurate) or
  read from the dense ``C``. No ``n x m`` buffer.
- :func:`ell_matvec`: ``S v`` (``axis=1``, a gather per row) and ``S^T u``
  (``axis=0``, an atomic scatter-add into the columns; the torch twin's deterministic
  ``scatter_add_`` instead when ``torch.use_deterministic_algorithms(True)`` is on).

Torch twins (and the dispatch) live in :mod:`otcore.reference_sparse`. Only
long-standing ``tl.*`` APIs are used (Triton >= 3.0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from otcore import reference_sparse as _twin

from ._intmath import cdiv, next_pow2
from .softmin import GRID_Y_MAX, LOG2E

#: Largest batch run here (the batch is grid axis 1); larger ones run the twins.
BATCH_MAX = GRID_Y_MAX

# cost codes of the extraction kernel (a constexpr: one compiled variant each)
_DENSE, _SQEUCLID, _EUCLID = 0, 1, 2


@triton.jit
def _topk_rows_kernel(
    F_ptr, G_ptr, X_ptr, Y_ptr, C_ptr, V_ptr, I_ptr, E_ptr,
    n, m, d,
    sF_b, sG_b,
    sX_b, sX_n, sX_d, sY_b, sY_m, sY_d,
    sC_b, sC_n, sC_m,
    sV_b, sV_n, sI_b, sI_n,
    COST: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Top-``S`` entries of each row of P for a block of ``BLOCK_M`` rows of problem ``b``.

    Grid: ``(cdiv(n, BLOCK_M), B)``. Pointers: F (B,n) and G (B,m) biased
    potentials (row stride ``sF_b`` / ``sG_b``, unit column stride); X (B,n,d) and
    Y (B,m,d) points (unused when ``COST == 0``); C (B,n,m) dense cost (unused
    otherwise); outputs V (B,n,S) values and I (B,n,S) int64 column indices.
    E holds ``log2(e)/eps`` as a 1-element tensor in the potentials' dtype (a Python
    float argument would be passed as float32, too coarse for float64 runs).

    The ranking score of entry (i, j) is ``G_j - C_ij`` (``F_i`` is constant along a
    row). A register buffer of ``S_PAD`` slots (the pad slots hold +inf so they are
    never the minimum) keeps the best ``S`` scores seen so far; for each column
    tile, the tile's row maxima replace the buffer's row minima while any row still
    improves, one entry per row per round. Once the buffer holds large scores most
    tiles are rejected after a single max/min comparison.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # batch offsets may pass 2^31 elements
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    slots = tl.arange(0, S_PAD)
    lanes = tl.arange(0, BLOCK_N)
    neg_inf = float("-inf")
    f = tl.load(F_ptr + b * sF_b + rows, mask=rmask, other=0.0)
    pad = (slots >= S)[None, :] & (rows >= 0)[:, None]
    # (BLOCK_M, S_PAD) best scores so far, in the potentials' dtype
    buf = tl.zeros((BLOCK_M, S_PAD), dtype=f.dtype) + tl.where(pad, float("inf"), neg_inf)
    bidx = tl.zeros((BLOCK_M, S_PAD), dtype=tl.int64)
    for n0 in range(0, m, BLOCK_N):
        cols = n0 + lanes
        cmask = cols < m
        g = tl.load(G_ptr + b * sG_b + cols, mask=cmask, other=0.0)
        if COST == 0:
            cost = tl.load(
                C_ptr + b * sC_b + rows[:, None].to(tl.int64) * sC_n + cols[None, :].to(tl.int64) * sC_m,
                mask=rmask[:, None] & cmask[None, :], other=0.0,
            )
        else:
            # squared distance by a loop over coordinates: exact differences, FMA sums
            cost = tl.zeros((BLOCK_M, BLOCK_N), dtype=f.dtype)
            for k in range(0, d):
                xk = tl.load(X_ptr + b * sX_b + rows.to(tl.int64) * sX_n + k * sX_d, mask=rmask, other=0.0)
                yk = tl.load(Y_ptr + b * sY_b + cols.to(tl.int64) * sY_m + k * sY_d, mask=cmask, other=0.0)
                diff = xk[:, None] - yk[None, :]
                cost += diff * diff
            if COST == 2:
                cost = tl.sqrt(cost)
        score = g[None, :] - cost
        score = tl.where(rmask[:, None] & cmask[None, :], score, neg_inf)
        tmax = tl.max(score, axis=1)
        bmin = tl.min(buf, axis=1)
        more = tl.max((tmax > bmin).to(tl.int32), axis=0)
        while more > 0:
            targ = tl.argmax(score, axis=1)
            barg = tl.argmin(buf, axis=1)
            hit = (slots[None, :] == barg[:, None]) & (tmax > bmin)[:, None]
            buf = tl.where(hit, tmax[:, None], buf)
            bidx = tl.where(hit, (n0 + targ).to(tl.int64)[:, None], bidx)
            score = tl.where(lanes[None, :] == targ[:, None], neg_inf, score)
            tmax = tl.max(score, axis=1)
            bmin = tl.min(buf, axis=1)
            more = tl.max((tmax > bmin).to(tl.int32), axis=0)
    # P_ij = exp((F_i + G_j - C_ij) / eps); unfilled slots (-inf) give 0
    k2 = tl.load(E_ptr)  # log2(e) / eps: exp2 of the scaled exponent (tl.exp would scale again, less accurately)
    buf = tl.where(pad, neg_inf, buf)  # pad slots (+inf) would meet F = -inf rows as inf - inf
    vals = tl.exp2((f[:, None] + buf) * k2)
    omask = rmask[:, None] & (slots < S)[None, :]
    # the program's first row as a 64-bit base, the rows within it as small int32 offsets
    # (64-bit offsets per entry cost this kernel registers: a 40-byte spill at S = 128)
    row0 = (pid * BLOCK_M).to(tl.int64)
    local = tl.arange(0, BLOCK_M)[:, None]
    tl.store(V_ptr + b * sV_b + row0 * sV_n + local * sV_n + slots[None, :], vals, mask=omask)
    tl.store(I_ptr + b * sI_b + row0 * sI_n + local * sI_n + slots[None, :], bidx, mask=omask)


@triton.jit
def _ell_rows_kernel(
    V_ptr, I_ptr, X_ptr, O_ptr, n,
    sV_b, sV_n, sI_b, sI_n, sX_b, sO_b,
    S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``O_i = sum_k V_ik X_{I_ik}`` for a block of rows; grid ``(cdiv(n, BLOCK_M), B)``.

    V, I (B,n,S) the ELL matrix; X (B,m) the vector (unit stride); O (B,n).
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # batch offsets may pass 2^31 elements
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.arange(0, S_PAD)
    mask = (rows < n)[:, None] & (slots < S)[None, :]
    v = tl.load(V_ptr + b * sV_b + rows[:, None].to(tl.int64) * sV_n + slots[None, :], mask=mask, other=0.0)
    j = tl.load(I_ptr + b * sI_b + rows[:, None].to(tl.int64) * sI_n + slots[None, :], mask=mask, other=0)
    x = tl.load(X_ptr + b * sX_b + j, mask=mask, other=0.0)
    tl.store(O_ptr + b * sO_b + rows, tl.sum(v * x, axis=1), mask=rows < n)


@triton.jit
def _ell_cols_kernel(
    V_ptr, I_ptr, U_ptr, O_ptr, n,
    sV_b, sV_n, sI_b, sI_n, sU_b, sO_b,
    S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``O_j += sum_{i,k: I_ik = j} V_ik U_i`` for a block of rows (atomic scatter-add).

    V, I (B,n,S); U (B,n); O (B,m), zero on entry. Grid ``(cdiv(n, BLOCK_M), B)``.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # batch offsets may pass 2^31 elements
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.arange(0, S_PAD)
    rmask = rows < n
    mask = rmask[:, None] & (slots < S)[None, :]
    v = tl.load(V_ptr + b * sV_b + rows[:, None].to(tl.int64) * sV_n + slots[None, :], mask=mask, other=0.0)
    j = tl.load(I_ptr + b * sI_b + rows[:, None].to(tl.int64) * sI_n + slots[None, :], mask=mask, other=0)
    u = tl.load(U_ptr + b * sU_b + rows, mask=rmask, other=0.0)
    # empty slots (value 0, index 0) stay out: they would all hit column 0's address
    tl.atomic_add(O_ptr + b * sO_b + j, v * u[:, None], mask=mask & (v != 0))


def topk_blocks(s_pad: int, wide: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the extraction: the buffer is BLOCK_M x s_pad
    registers, the tile BLOCK_M x BLOCK_N; wide buffers get fewer rows so both stay ~4K
    elements (~2K in float64, ``wide``), over 8 warps. Compiled for sm_90, 4 warps and
    32 rows spilled (fp32: 136-608 bytes of stack per thread, fp64 up to 2 KB); these
    sizes use 0-56 bytes with Triton 3.6 and 3.9 (tests/test_kernels_compile.py)."""
    block_m = max(1, min(32, 4096 // max(s_pad, 128)) // (2 if wide else 1))
    block_m = 1 << (block_m.bit_length() - 1)
    return block_m, 128, 8


def plan_sparse_rows(geom, F, G, eps: float, s: int, precision: str = "fp32"):
    """Triton version of :func:`otcore.reference_sparse.plan_sparse_rows`.

    Returns ``vals`` (B,n,s) and int64 ``idx`` (B,n,s), each row sorted by
    decreasing value. ``precision`` is accepted for the common signature; the
    distances are always computed in full precision here.
    """
    B, n, m = geom.batch, geom.n, geom.m
    if B > BATCH_MAX:
        return _twin.plan_sparse_rows(geom, F, G, eps, s, precision)
    F = F.to(geom.dtype).contiguous()  # the compute dtype, as the twin reads fp16/bf16 potentials
    G = G.to(geom.dtype).contiguous()
    vals = torch.empty(B, n, s, dtype=F.dtype, device=F.device)
    idx = torch.empty(B, n, s, dtype=torch.int64, device=F.device)
    s_pad = next_pow2(s)
    block_m, block_n, warps = topk_blocks(s_pad, F.dtype == torch.float64)
    if geom.is_dense:
        C = geom.C
        X = Y = C  # unused pointers
        code, d = _DENSE, 0
        sx = sy = (0, 0, 0)
        sc = C.stride()
    else:
        X, Y, C = geom.x, geom.y, geom.x
        code = _SQEUCLID if geom.cost == "sqeuclidean" else _EUCLID
        d = geom.d
        sx, sy, sc = X.stride(), Y.stride(), (0, 0, 0)
    grid = (cdiv(n, block_m), B)
    _topk_rows_kernel[grid](
        F, G, X, Y, C, vals, idx, torch.full((1,), LOG2E / eps, dtype=F.dtype, device=F.device),
        n, m, d,
        F.stride(0), G.stride(0),
        *sx, *sy, *sc,
        vals.stride(0), vals.stride(1), idx.stride(0), idx.stride(1),
        COST=code, S=s, S_PAD=s_pad, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    vals, order = torch.sort(vals, dim=2, descending=True)
    return vals, torch.gather(idx, 2, order)


def ell_matvec(geom, vals, idx, v, axis: int):
    """Triton version of :func:`otcore.reference_sparse.ell_matvec`:
    ``axis=1``: ``S v`` (B,n) for v (B,m); ``axis=0``: ``S^T u`` (B,m) for u (B,n)."""
    B, n, s = vals.shape
    if B > BATCH_MAX or (axis == 0 and torch.are_deterministic_algorithms_enabled()):
        # S^T u adds by float atomics, in an order that varies from run to run; under
        # torch.use_deterministic_algorithms the twin's scatter_add_ (deterministic there) runs
        return _twin.ell_matvec(geom, vals, idx, v, axis)
    vals = vals.contiguous()
    idx = idx.contiguous()
    v = v.contiguous().to(vals.dtype)
    s_pad = next_pow2(s)
    block_m = max(1, min(64, 2048 // s_pad))
    grid = (cdiv(n, block_m), B)
    if axis == 1:
        out = torch.empty(B, n, dtype=vals.dtype, device=vals.device)
        _ell_rows_kernel[grid](
            vals, idx, v, out, n,
            vals.stride(0), vals.stride(1), idx.stride(0), idx.stride(1), v.stride(0), out.stride(0),
            S=s, S_PAD=s_pad, BLOCK_M=block_m,
        )
    else:
        out = torch.zeros(B, geom.m, dtype=vals.dtype, device=vals.device)
        _ell_cols_kernel[grid](
            vals, idx, v, out, n,
            vals.stride(0), vals.stride(1), idx.stride(0), idx.stride(1), v.stride(0), out.stride(0),
            S=s, S_PAD=s_pad, BLOCK_M=block_m,
        )
    return out
