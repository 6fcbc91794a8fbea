"""Fused k-sparse plan pass: top-k selection + simplex projection per line of the cost.

A *line* is a column ``C[:, j]`` (``axis=0``) or a row ``C[i, :]`` (``axis=1``, the
transposed / row-sparse variant: only the strides change). For each line ``l`` with
scores ``x_r = h_r - C_rl`` over its positions ``r`` the kernel computes

    T_rl = [x_r + beta_l]_+ / gamma     on the k largest x_r, 0 elsewhere,

where ``beta_l`` is given (dual) or solved so that ``sum_r T_rl = mass_l`` (semi-dual:
the k-sparse simplex projection, ``-beta_l = max_{r<=k} (x_(1) + ... + x_(r) - gamma mass_l) / r``),
plus ``reg_l = (gamma/2) sum_r T_rl^2`` and the line sum. The torch twin is
:func:`otcore.reference_ksparse.ksparse_columns`; the cross sums (``T 1`` over lines)
are a ``scatter_add`` of the output, done by the launcher.

One program owns ``BLOCK_L`` lines and streams their positions in chunks of ``BLOCK_N``
(costs computed on the fly from the points, or read from ``C``), in two passes:

1. Top-k values. A register buffer holds each line's k largest scores so far, sorted
   ascending in its last k slots (``-inf`` before). A chunk is merged only if one of
   its scores beats a line's current k-th largest: sort the chunk descending,
   ``max(buffer_ascending, chunk_descending)`` holds the ``BLOCK_N`` largest of the union
   (a bitonic half-cleaner), sort it ascending and keep the last k slots. Then the
   threshold, ``beta``, ``reg`` and the line sum come from the top k sorted largest
   first (prefix sums of the largest entries, relative to the largest, as in the twin).
2. Positions. The scores are recomputed bit for bit; a position is taken if its score
   beats the k-th largest, or equals it while ties are still needed (first in position
   order). Its slot is a running count plus an exclusive cumsum, so each line's output
   lists positions ascending, as the twin does.

Only reshapes, ``tl.cumsum``, min/max/sum reductions and masked loads/stores are used
(Triton >= 3.0); the sort is a bitonic network written with them (:func:`_bitonic_sort`).
``k`` up to :data:`K_MAX` runs here; larger ``k`` (e.g. expert capacities in the
thousands) falls back to the torch twin, whose ``torch.topk`` handles it well, and so do
batches above :data:`BATCH_MAX`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from otcore.reference_ksparse import KSparse, cross_sum
from otcore.reference_ksparse import ksparse_columns as _torch_ksparse_columns

from ._intmath import cdiv, next_pow2
from .softmin import GRID_Y_MAX

#: Largest ``k`` handled by the kernel (the chunk must hold k sorted entries in registers).
#: Each sort width is its own compile, and the network grows as log² of it: for sm_90
#: (Triton 3.6, measured on a CPU) width 32 took 4 s, 128 10 s, 512 20 s and 1024 27 s.
#: Past 256, ``torch.topk`` (the twin) is the better trade.
K_MAX = 256

#: Largest batch run here (the batch is grid axis 1); larger ones run the twin.
BATCH_MAX = GRID_Y_MAX


_COST_CODES = {"matrix": 0, "sqeuclidean": 1, "euclidean": 2}


@triton.jit
def _compare_swap(x, BLOCK_L: tl.constexpr, W: tl.constexpr, STAGE: tl.constexpr, STRIDE: tl.constexpr,
                  DESCENDING: tl.constexpr):
    """One bitonic step on each row of ``x`` (BLOCK_L, W): elements ``STRIDE`` apart are
    ordered ascending, or descending inside runs whose bit ``STAGE`` is set."""
    G: tl.constexpr = W // (2 * STRIDE)
    h = tl.reshape(x, (BLOCK_L, G, 2, STRIDE))
    lo = tl.min(h, axis=2, keep_dims=True)
    hi = tl.max(h, axis=2, keep_dims=True)
    first = tl.arange(0, 2)[None, None, :, None] == 0
    up = ((tl.arange(0, G)[None, :, None, None] * (2 * STRIDE)) & (1 << STAGE)) == 0
    if DESCENDING:
        up = ~up
    return tl.reshape(tl.where(first == up, lo, hi), (BLOCK_L, W))


@triton.jit
def _bitonic_sort(x, BLOCK_L: tl.constexpr, LOG_N: tl.constexpr, DESCENDING: tl.constexpr):
    """Sort each row of ``x`` (BLOCK_L, 2**LOG_N) with a bitonic network.

    Stage ``s`` merges bitonic runs of length ``2**s``; step ``t`` compares elements
    ``2**(s-1-t)`` apart. Viewing the row as (groups, 2, stride), a compare-and-swap is a
    min and a max over the middle axis, written back ascending or descending per group
    (runs whose bit ``s`` is set go the other way, so the next stage sees bitonic runs).
    Only reshapes, min/max reductions and selects: the same code is fast in the
    interpreter, unlike a sort built on custom-combine reductions.
    """
    for s in tl.static_range(1, LOG_N + 1):
        for t in tl.static_range(s):
            x = _compare_swap(x, BLOCK_L, 1 << LOG_N, s, 1 << (s - 1 - t), DESCENDING)
    return x


@triton.jit
def _line_scores(
    h_ptr, c_ptr, p_ptr, q_ptr, pid_b, pos, lines, pos_ok, line_ok, D,
    s_hb, s_hn, s_cb, s_cpos, s_cline, s_pb, s_pn, s_pd, s_qb, s_ql, s_qd,
    COST: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Tile of scores ``x = h_pos - C(pos, line)``, costs and where the score is NaN,
    (BLOCK_L, BLOCK_N); x = -inf outside, +inf where NaN.

    COST 0: read ``C`` (strides per position / per line); 1: ``|p - q|^2``; 2: ``|p - q|``,
    with ``p`` the position points, ``q`` the line points, summed coordinate by
    coordinate from direct differences (no ``|p|^2 + |q|^2 - 2pq`` cancellation).
    """
    h = tl.load(h_ptr + pid_b * s_hb + pos * s_hn, mask=pos_ok, other=0.0)
    ok = line_ok[:, None] & pos_ok[None, :]
    if COST == 0:  # int64 offsets: a position's row of C can start past 2^31 elements
        c = tl.load(c_ptr + pid_b * s_cb + lines[:, None].to(tl.int64) * s_cline + pos[None, :].to(tl.int64) * s_cpos,
                    mask=ok, other=0.0)
    else:
        c = tl.zeros((BLOCK_L, BLOCK_N), dtype=h.dtype)
        for dd in range(D):
            pv = tl.load(p_ptr + pid_b * s_pb + pos.to(tl.int64) * s_pn + dd * s_pd, mask=pos_ok, other=0.0)
            qv = tl.load(q_ptr + pid_b * s_qb + lines.to(tl.int64) * s_ql + dd * s_qd, mask=line_ok, other=0.0)
            diff = pv[None, :] - qv[:, None]
            c += diff * diff
        if COST == 2:
            c = tl.sqrt(c)
    x = h[None, :] - c
    # a NaN score (a NaN written into C after its check) ranks first as +inf, where torch.topk
    # ranks it in the twin; compared as NaN, it had broken the sorting network's order
    # (padding positions past N taken: an out-of-range index)
    nan = ok & (x != x)
    x = tl.where(ok, tl.where(nan, float("inf"), x), float("-inf"))
    return x, c, nan


@triton.jit
def _ksparse_kernel(
    h_ptr, c_ptr, p_ptr, q_ptr, mass_ptr, beta_in_ptr,
    beta_ptr, reg_ptr, lsum_ptr, vals_ptr, idx_ptr, cost_ptr,
    N, L, D, K, gamma_ptr,
    s_hb, s_hn, s_cb, s_cpos, s_cline, s_pb, s_pn, s_pd, s_qb, s_ql, s_qd,
    COST: tl.constexpr, SEMI: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, LOG_N: tl.constexpr,
):
    """Grid ``(cdiv(L, BLOCK_L), B)``.

    h_ptr: (B, N) potential on the positions, strides ``s_hb``, ``s_hn``.
    c_ptr: dense cost, ``C(pos, line)`` at ``b*s_cb + pos*s_cpos + line*s_cline`` (COST 0).
    p_ptr / q_ptr: position / line points (B, N, D) / (B, L, D) with their strides (COST 1, 2).
    mass_ptr: (B, L) contiguous line sums (SEMI); beta_in_ptr: (B, L) contiguous multipliers (dual).
    gamma_ptr: 1-element tensor holding gamma in the compute dtype.
    beta_ptr, reg_ptr, lsum_ptr: (B, L) contiguous outputs.
    vals_ptr, idx_ptr, cost_ptr: (B, L, K) contiguous outputs (plan entries, int64 positions, costs).
    """
    pid_l = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)  # batch offsets (and the outputs' B * L * K) may pass 2^31
    gamma = tl.load(gamma_ptr)  # a 1-element tensor, so fp64 problems keep a float64 gamma
    lines = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    line_ok = lines < L
    slot = tl.arange(0, BLOCK_N)
    keep = slot[None, :] >= BLOCK_N - K  # the last K slots of the ascending buffer
    ninf = float("-inf")

    # ---- pass 1: the K largest scores of each line, sorted ascending in the last K slots
    x0, c0, nan0 = _line_scores(h_ptr, c_ptr, p_ptr, q_ptr, pid_b, slot, lines, slot < N, line_ok, D,
                                s_hb, s_hn, s_cb, s_cpos, s_cline, s_pb, s_pn, s_pd, s_qb, s_ql, s_qd,
                                COST, BLOCK_L, BLOCK_N)
    buf = tl.where(keep, _bitonic_sort(x0, BLOCK_L, LOG_N, False), ninf)
    kth = tl.max(tl.where(slot[None, :] == BLOCK_N - K, buf, ninf), axis=1)
    nan_seen = nan0  # where a chunk held a NaN score (OR-ed per slot: one reduction after the loop)
    for n0 in range(BLOCK_N, N, BLOCK_N):
        pos = n0 + slot
        x, c, nan = _line_scores(h_ptr, c_ptr, p_ptr, q_ptr, pid_b, pos, lines, pos < N, line_ok, D,
                                 s_hb, s_hn, s_cb, s_cpos, s_cline, s_pb, s_pn, s_pd, s_qb, s_ql, s_qd,
                                 COST, BLOCK_L, BLOCK_N)
        nan_seen = nan_seen | nan
        beats = tl.max(tl.max((x > kth[:, None]).to(tl.int32), axis=1), axis=0)
        if beats > 0:  # merge only when some score enters a line's top K
            merged = _bitonic_sort(tl.maximum(buf, _bitonic_sort(x, BLOCK_L, LOG_N, True)), BLOCK_L, LOG_N, False)
            buf = tl.where(keep, merged, ninf)
            kth = tl.max(tl.where(slot[None, :] == BLOCK_N - K, buf, ninf), axis=1)

    # ---- line multiplier, regularizer and line sum from the top K, largest first
    nan_line = tl.max(nan_seen.to(tl.int32), axis=1)  # lines that hold a NaN score
    top = _bitonic_sort(buf, BLOCK_L, LOG_N, True)
    first = slot[None, :] < K
    if SEMI:
        mass = tl.load(mass_ptr + pid_b * L + lines, mask=line_ok, other=0.0)
        vmax = tl.max(top, axis=1)
        vmax = tl.where(line_ok, vmax, 0.0)  # padding lines are all -inf: keep them NaN-free
        up = tl.where(first, top - vmax[:, None], 0.0)  # relative to the max: small, exact sums
        r = (slot + 1).to(up.dtype)
        cand = tl.where(first, (tl.cumsum(up, axis=1) - gamma * mass[:, None]) / r[None, :], ninf)
        # the threshold below the top score: entries are [(x - vmax) - thr]_+ / gamma, which keeps
        # the small differences that x + beta would cancel when the scores are large
        shift = vmax
        thr = tl.where(line_ok, tl.max(cand, axis=1), 0.0)  # padding lines: -inf
        beta = tl.where(line_ok, -(thr + vmax), 0.0)
        # a line with a NaN score, or with no finite one (its costs all +inf: a point past
        # float32's range of squares), has no multiplier: NaN, as the twin's (tl.max skips the
        # NaN candidates: it had been +inf, with zero entries)
        beta = tl.where((nan_line > 0) | (vmax == float("-inf")), float("nan"), beta)
    else:
        beta = tl.load(beta_in_ptr + pid_b * L + lines, mask=line_ok, other=0.0)
        shift = tl.zeros_like(beta)
        thr = -beta
    # a line that held a NaN score (ranked first as +inf, see _line_scores) gets NaN sums and
    # NaN entries, as in the twin (tl.maximum(NaN, 0) would have returned 0): in the dual the
    # NaN one; all of a line whose multiplier is NaN (the semi-dual's above, a +inf score's
    # there, a NaN given in the dual); a +inf score in the dual gives +inf, as there
    bad = beta != beta
    excess = tl.where(first, tl.maximum((top - shift[:, None]) - thr[:, None], 0.0), 0.0)  # gamma T
    excess = tl.where(first & (bad | (nan_line > 0))[:, None], float("nan"), excess)  # (only summed)
    T = excess / gamma
    out = pid_b * L + lines.to(tl.int64)  # (B, L, K) outputs may pass 2^31 entries
    tl.store(beta_ptr + out, beta, mask=line_ok)
    # (gamma/2) T^2 as excess * T / 2: T^2 alone under- or overflows float32 at masses ~1e-23 or ~1e19
    tl.store(reg_ptr + out, 0.5 * tl.sum(excess * T, axis=1), mask=line_ok)
    tl.store(lsum_ptr + out, tl.sum(T, axis=1), mask=line_ok)

    # ---- pass 2: positions of the top K (ties at the K-th value: first ones in order)
    n_gt = tl.sum((keep & (buf > kth[:, None])).to(tl.int32), axis=1)
    need_eq = K - n_gt
    taken = tl.zeros((BLOCK_L,), dtype=tl.int32)
    eq_seen = tl.zeros((BLOCK_L,), dtype=tl.int32)
    for n0 in range(0, N, BLOCK_N):
        pos = n0 + slot
        x, c, nan = _line_scores(h_ptr, c_ptr, p_ptr, q_ptr, pid_b, pos, lines, pos < N, line_ok, D,
                                 s_hb, s_hn, s_cb, s_cpos, s_cline, s_pb, s_pn, s_pd, s_qb, s_ql, s_qd,
                                 COST, BLOCK_L, BLOCK_N)
        eq = ((x == kth[:, None]) & line_ok[:, None]).to(tl.int32)
        eq_rank = eq_seen[:, None] + tl.cumsum(eq, axis=1) - eq
        take = (((x > kth[:, None]) & line_ok[:, None]) | ((eq > 0) & (eq_rank < need_eq[:, None]))).to(tl.int32)
        dst = out[:, None] * K + taken[:, None] + tl.cumsum(take, axis=1) - take
        sel = take > 0
        val = tl.maximum((x - shift[:, None]) - thr[:, None], 0.0) / gamma
        tl.store(vals_ptr + dst, tl.where(bad[:, None] | nan, float("nan"), val), mask=sel)
        tl.store(idx_ptr + dst, (pos[None, :] + 0 * dst).to(tl.int64), mask=sel)
        tl.store(cost_ptr + dst, c, mask=sel)
        taken += tl.sum(take, axis=1)
        eq_seen += tl.sum(eq, axis=1)


def block_sizes(k: int, device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK_L, BLOCK_N, num_warps)``: lines per program and the chunk of ``BLOCK_N``
    scores read at a time, which holds the k kept entries (``BLOCK_N >= k``, a power of two
    for the sorting network).

    On CUDA: one line per program, chunks at least 64 wide, one warp per 64 chunk entries.
    Measured on an H200 (bench/gpu_profile.py, one pass over a 2048 x 2048 dense cost,
    k = 4): 64 lines x 32 per program with 8 warps (32 programs for 2048 lines, a quarter
    of the SMs) took 1.95 ms; one line x 64 with one warp (2048 programs) 0.163 ms, one
    line x 32 0.196 ms, one x 128 with two warps 0.272 ms; 4 lines x 32 with 4 warps
    0.275 ms. All gave the same supports and values.

    Elsewhere (the interpreter, whose cost is per program): about 2048 scores per program,
    up to 64 lines x 32, 8 warps; one line per program made the CPU tests 15-40x slower.
    ``tests/test_kernels_ksparse.py`` runs both layouts."""
    if device.type == "cuda":
        block_n = max(64, next_pow2(k))
        return 1, block_n, max(1, block_n // 64)
    block_n = max(32, next_pow2(k))
    return max(1, min(64, 2048 // block_n)), block_n, 8


def ksparse_columns(
    geom,
    h: torch.Tensor,
    gamma: float,
    k: int,
    axis: int,
    mass: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
    precision: str = "fp32",
) -> KSparse:
    """Triton implementation of :func:`otcore.reference_ksparse.ksparse_columns` (same contract).

    ``k > K_MAX`` and batches above ``BATCH_MAX`` run the torch twin. ``precision`` is
    accepted for interface parity: costs are computed from direct differences in the
    input dtype (fp32 or fp64).
    """
    if (mass is None) == (beta is None):
        raise ValueError("exactly one of mass (semi-dual) and beta (dual) must be given")
    if k > K_MAX or geom.batch > BATCH_MAX:
        return _torch_ksparse_columns(geom, h, gamma, k, axis, mass=mass, beta=beta, precision=precision)
    B, n, m = geom.batch, geom.n, geom.m
    N, L = (n, m) if axis == 0 else (m, n)
    # the geometry's compute dtype, as the torch twin reads narrower inputs (bf16 h had run
    # the whole pass in bf16: line sums 8.5e-22 for masses of 1/9, a review)
    dt, dev = geom.dtype, h.device
    h = h.to(dt).contiguous()
    line_in = (mass if mass is not None else beta).to(dt).contiguous()
    beta_o = torch.empty(B, L, dtype=dt, device=dev)
    reg = torch.empty_like(beta_o)
    lsum = torch.empty_like(beta_o)
    vals = torch.zeros(B, L, k, dtype=dt, device=dev)
    idx = torch.zeros(B, L, k, dtype=torch.int64, device=dev)
    cost = torch.zeros(B, L, k, dtype=dt, device=dev)
    code = _COST_CODES[geom.cost]
    if code == 0:
        C = geom.C
        s_cpos, s_cline = (C.stride(1), C.stride(2)) if axis == 0 else (C.stride(2), C.stride(1))
        c_args = (C, C, C, C.stride(0), s_cpos, s_cline, 0, 0, 0, 0, 0, 0, 1)
    else:
        P, Q = (geom.x, geom.y) if axis == 0 else (geom.y, geom.x)
        c_args = (P, P, Q, 0, 0, 0, *P.stride(), *Q.stride(), P.shape[2])
    c_ptr, p_ptr, q_ptr, s_cb, s_cpos, s_cline, s_pb, s_pn, s_pd, s_qb, s_ql, s_qd, D = c_args
    block_l, block_n, warps = block_sizes(k, dev)
    grid = (cdiv(L, block_l), B)
    _ksparse_kernel[grid](
        h, c_ptr, p_ptr, q_ptr, line_in, line_in,
        beta_o, reg, lsum, vals, idx, cost,
        N, L, D, k, torch.full((1,), float(gamma), dtype=dt, device=dev),
        h.stride(0), h.stride(1), s_cb, s_cpos, s_cline, s_pb, s_pn, s_pd, s_qb, s_ql, s_qd,
        COST=code, SEMI=mass is not None, BLOCK_L=block_l, BLOCK_N=block_n, LOG_N=block_n.bit_length() - 1,
        num_warps=warps,
    )
    return KSparse(beta_o, reg, vals, idx, cost, lsum, cross_sum(vals, idx, N))
