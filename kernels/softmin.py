"""Fused online log-sum-exp ("softmin") over a cost computed on the fly or streamed.

One Sinkhorn half-step reduces the cost matrix along one axis:

    axis=1 (rows):    out_i = -eps * log sum_j exp((h_j - C_ij) / eps)
    axis=0 (columns): out_j = -eps * log sum_i exp((h_i - C_ij) / eps)

Both are the same reduction seen from one side: an *own* index (the output's,
``i`` for axis=1) and an *other* index (the reduced one). For point clouds the
cost is symmetric in its arguments, so the column pass is the row pass with the
two clouds' pointers swapped; for a dense ``C`` it is the same tiles read with
the two strides swapped. Nothing is transposed or copied in memory.

Base 2: with ``s = log2(e) / eps`` the kernel streams ``z_ij = s*h_j - s*C_ij``
and keeps a running maximum ``m`` and a running sum ``l = sum_j 2^(z_ij - m)``
(rescaled whenever the maximum grows), by default one pair per tile entry
(row, column lane) merged once at the end, so the loop needs no communication
between threads (see :func:`lse_lanes`). Then ``out = -(m + log2 l) / s``.
Given an estimate of the result (``hint``, the previous Sinkhorn iteration's), a
large pass sums ``2^(z - m)`` with that fixed shift instead, and a second launch
redoes the rows whose sum fell out of range (see :func:`lse_shift`).
No n x m buffer exists.

How the cost tile is obtained (``COST``, a compile-time flag):

- ``COST_DENSE``: read ``C`` (streamed, bandwidth-bound).
- ``COST_DIRECT``: ``sum_k (x_ik - y_jk)^2`` with one FMA per coordinate (static
  loop over d). Float32-faithful whatever the offset of the clouds.
- ``COST_DOT``: ``|x_i|^2 + |y_j|^2 - 2 x_i.y_j`` with the cross term on the tensor
  cores (``tl.dot``): ``"tf32x3"`` (float32-faithful: error ~ 2^-22 |x||y|) as three
  tf32 dots of heads and tails split once on the host (:func:`dot_features`), or one
  dot at ``"tf32"`` (fast: error ~ 2^-11 |x||y|) or ``"ieee"`` (float64).
- ``COST_EXPAND``: the same expansion with the cross term by FMAs (small d, squared
  Euclidean; float32 rounding ~ 2^-22 |x||y|), folded into the exponent
  (:func:`exponent_tile`): half the FP32 work per entry of direct differences at d = 3.
  The expansions cancel ``|x|^2 + |y|^2`` against ``2 x.y``, so the caller centres
  both clouds on their joint mean first (the cost is translation invariant) and takes
  them only where that rounding is small against ``eps`` (:func:`point_cost_mode`).

``EUCLID`` takes the square root of the squared distance. The tiles and the cost
helpers below are shared with :mod:`otcore.kernels.plan`.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._intmath import cdiv, next_pow2

COST_DENSE = 0
COST_DIRECT = 1
COST_DOT = 2
COST_EXPAND = 3

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)
_LOG2E = tl.constexpr(LOG2E)  # a global read inside a kernel must be a constexpr

#: Largest d for which float32 mode computes distances coordinate by coordinate.
#: Each coordinate costs a subtract and an FMA per cost entry on the FP32 pipe
#: (128 lanes/SM/clock on an H100) against one exp2 on the 16-lane MUFU, so up to
#: d ~ 8 the FMAs stay within ~2x of the exp floor; beyond, the tensor-core 3xTF32
#: cross term is cheaper.
DIRECT_MAX_D = 8

#: Smallest pass (``n * m`` entries per problem) that float32 mode computes by the FMA
#: expansion (``COST_EXPAND``, under its guard) rather than by direct differences: its
#: guard costs a host sync per geometry, and smaller passes are bound by launch latency,
#: not by the FP32 pipe. 2048 x 2048 points.
EXPAND_MIN_ENTRIES = 2**22

#: Largest d whose coordinate loop is unrolled in :func:`cost_tile` (direct differences).
#: Beyond, a plain loop: unrolled, the compiler hoists all 2d coordinate loads ahead of
#: the arithmetic, and at d = 64 the one-tile kernel of :mod:`otcore.kernels.sinkhorn_steps`
#: spilled 4 KB per thread (sm_90 cubin, cuobjdump --dump-resource-usage).
UNROLL_MAX_D = tl.constexpr(16)  # read inside kernels: a constexpr global

#: Widest slice of the dot path's coordinates held at once (``DP`` columns of head and
#: tail). Up to it the own rows' features are loaded once per program and stay in
#: registers; beyond (d > 64), both sides are read in slices of this width for every tile:
#: the whole own head and tail of a 64-row tile at d = 128 spilled 144-1,152 bytes per
#: thread at every tile shape tried (sm_90 cubins, Triton 3.9).
DOT_K_MAX = tl.constexpr(64)


# ---------------------------------------------------------------------------
# Shared tile helpers
# ---------------------------------------------------------------------------
@triton.jit
def program_rows(pid, tiles_own, n_own, own_ptr, oth_ptr, c_ptr, s_ob, s_tb, s_cb, BLOCK_I: tl.constexpr):
    """The grid contract of the streamed kernels: program ``pid`` (of ``B * tiles_own`` on
    axis 0) handles problem ``b = pid // tiles_own`` (int64, so batch offsets cannot
    overflow) and its own rows ``(pid % tiles_own) * BLOCK_I + [0, BLOCK_I)``.

    Returns ``(b, offs_i, mask_i, own_ptr, oth_ptr, c_ptr)`` with the three cost pointers
    moved to problem ``b`` (problem strides ``s_ob``, ``s_tb``, ``s_cb``).
    """
    b = (pid // tiles_own).to(tl.int64)
    offs_i = (pid % tiles_own) * BLOCK_I + tl.arange(0, BLOCK_I)
    return b, offs_i, offs_i < n_own, own_ptr + b * s_ob, oth_ptr + b * s_tb, c_ptr + b * s_cb


@triton.jit
def own_block(own_ptr, offs_i, mask_i, s_or, s_ok, DP: tl.constexpr, COST: tl.constexpr):
    """The own rows' :func:`dot_features`: tf32 head and tail ``(BLOCK_I, DP)`` each and
    squared norms ``(BLOCK_I,)``.

    Only ``COST_DOT`` needs them (loaded once per program, reused for every tile of
    the other side); the other modes get zeros that are never read, and so do the head
    and tail past ``DOT_K_MAX`` coordinates (:func:`cost_tile` reads slices of them).
    ``own_ptr`` points at this problem's first own point's features; point ``i``,
    column ``k`` is at ``own_ptr + i*s_or + k*s_ok``.
    """
    if COST == 2:
        sqn = tl.load(own_ptr + offs_i.to(tl.int64) * s_or + 2 * DP * s_ok, mask=mask_i, other=0.0)
        if DP <= DOT_K_MAX:
            hi, lo = feature_slices(own_ptr, offs_i, mask_i, s_or, s_ok, 0, DP, DP)
        else:
            hi = tl.zeros((offs_i.shape[0], 16), dtype=own_ptr.dtype.element_ty)
            lo = hi
    else:
        hi = tl.zeros((offs_i.shape[0], 16), dtype=own_ptr.dtype.element_ty)
        lo = hi
        sqn = tl.zeros((offs_i.shape[0],), dtype=own_ptr.dtype.element_ty)
    return hi, lo, sqn


@triton.jit
def feature_slices(ptr, offs, mask, s_r, s_k, k0, KB: tl.constexpr, DP: tl.constexpr):
    """Head and tail columns ``[k0, k0 + KB)`` of the :func:`dot_features` rows ``offs``,
    ``(len(offs), KB)`` each (masked rows read zeros)."""
    offs_k = k0 + tl.arange(0, KB)
    rows = ptr + offs[:, None].to(tl.int64) * s_r
    hi = tl.load(rows + offs_k[None, :] * s_k, mask=mask[:, None], other=0.0)
    lo = tl.load(rows + (DP + offs_k[None, :]) * s_k, mask=mask[:, None], other=0.0)
    return hi, lo


@triton.jit
def cross_slice(acc, a_hi, a_lo, oth_ptr, offs_j, mask_j, s_tr, s_tk, k0,
                KB: tl.constexpr, DP: tl.constexpr, IP: tl.constexpr):
    """``acc`` plus the cross term ``x.y`` over coordinates ``[k0, k0 + KB)``, with the own
    head and tail ``a_hi``/``a_lo`` ``(BLOCK_I, KB)`` and the other side's read transposed.
    "tf32x3": the three tf32 products of heads and tails, smallest first (``lo.lo'`` ~
    2^-22 is dropped); otherwise one dot of the heads (= the points) at precision ``IP``."""
    offs_k = k0 + tl.arange(0, KB)
    rows = oth_ptr + offs_j[None, :].to(tl.int64) * s_tr
    hi = tl.load(rows + offs_k[:, None] * s_tk, mask=mask_j[None, :], other=0.0)  # (KB, BLOCK_J)
    if IP == "tf32x3":
        lo = tl.load(rows + (DP + offs_k[:, None]) * s_tk, mask=mask_j[None, :], other=0.0)
        acc = tl.dot(a_hi, lo, acc, input_precision="tf32")
        acc = tl.dot(a_lo, hi, acc, input_precision="tf32")
        acc = tl.dot(a_hi, hi, acc, input_precision="tf32")
    else:
        acc = tl.dot(a_hi, hi, acc, input_precision=IP)
    return acc


@triton.jit
def coord_pair(own_ptr, oth_ptr, offs_i, offs_j, mask_i, mask_j, k, s_or, s_ok, s_tr, s_tk):
    """Column ``k`` of the own rows ``(BLOCK_I,)`` and of the other rows ``(BLOCK_J,)``
    (zeros where masked)."""
    xk = tl.load(own_ptr + offs_i.to(tl.int64) * s_or + k * s_ok, mask=mask_i, other=0.0)
    yk = tl.load(oth_ptr + offs_j.to(tl.int64) * s_tr + k * s_tk, mask=mask_j, other=0.0)
    return xk, yk


@triton.jit
def coord_sq_diff(own_ptr, oth_ptr, offs_i, offs_j, mask_i, mask_j, k, s_or, s_ok, s_tr, s_tk):
    """``(x_ik - y_jk)^2`` for one coordinate ``k``, a ``(BLOCK_I, BLOCK_J)`` tile."""
    xk, yk = coord_pair(own_ptr, oth_ptr, offs_i, offs_j, mask_i, mask_j, k, s_or, s_ok, s_tr, s_tk)
    diff = xk[:, None] - yk[None, :]
    return diff * diff


@triton.jit
def cost_tile(
    own_ptr, oth_ptr, c_ptr, own_hi, own_lo, own_sqn, offs_i, offs_j, mask_i, mask_j,
    s_or, s_ok, s_tr, s_tk, s_co, s_ct,
    D: tl.constexpr, DP: tl.constexpr, COST: tl.constexpr, EUCLID: tl.constexpr, IP: tl.constexpr,
):
    """The cost block ``C[own i, other j]`` as a ``(BLOCK_I, BLOCK_J)`` tensor, unscaled.

    Pointers are already offset to the current problem of the batch:

    - ``own_ptr``/``oth_ptr``: coordinates of the own / other points; own point ``i``,
      coordinate ``k`` at ``own_ptr + i*s_or + k*s_ok``, other point ``j`` at
      ``oth_ptr + j*s_tr + k*s_tk`` (``COST_DIRECT``); ``COST_DOT`` reads the two
      clouds' :func:`dot_features` through the same pointers and strides instead.
    - ``c_ptr``: dense cost; entry (own i, other j) at ``c_ptr + i*s_co + j*s_ct``
      (``COST_DENSE``; the column pass swaps the two strides).
    - ``own_hi``/``own_lo``/``own_sqn``: :func:`own_block`'s tiles and norms (``COST_DOT`` only).

    Masked-out entries are finite (loads fill zeros); callers mask them through
    the potentials, which they load as ``-inf``.
    """
    if COST == 0:
        ptrs = c_ptr + offs_i[:, None].to(tl.int64) * s_co + offs_j[None, :].to(tl.int64) * s_ct
        C = tl.load(ptrs, mask=mask_i[:, None] & mask_j[None, :], other=0.0)
    elif COST == 1:
        # direct differences: exact to rounding whatever the clouds' offset
        C = tl.zeros((offs_i.shape[0], offs_j.shape[0]), dtype=own_ptr.dtype.element_ty)
        if D <= UNROLL_MAX_D:
            for k in tl.static_range(D):
                C += coord_sq_diff(own_ptr, oth_ptr, offs_i, offs_j, mask_i, mask_j, k, s_or, s_ok, s_tr, s_tk)
        else:  # a loop, not D unrolled copies whose hoisted loads would spill (fp64, or one-tile problems)
            for k in range(D):
                C += coord_sq_diff(own_ptr, oth_ptr, offs_i, offs_j, mask_i, mask_j, k, s_or, s_ok, s_tr, s_tk)
    elif COST == 3:
        # |x|^2 + |y|^2 - 2 x.y by FMAs over the centred coordinates (expand_features)
        cross = tl.zeros((offs_i.shape[0], offs_j.shape[0]), dtype=own_ptr.dtype.element_ty)
        for k in tl.static_range(D):
            xk, yk = coord_pair(own_ptr, oth_ptr, offs_i, offs_j, mask_i, mask_j, k, s_or, s_ok, s_tr, s_tk)
            cross += xk[:, None] * yk[None, :]
        sqn_i, sqn_j = coord_pair(own_ptr, oth_ptr, offs_i, offs_j, mask_i, mask_j, D, s_or, s_ok, s_tr, s_tk)
        C = tl.maximum(sqn_i[:, None] + sqn_j[None, :] - 2.0 * cross, 0.0)  # rounding can dip below 0
    else:
        # |x|^2 + |y|^2 - 2 x.y with the cross term on the tensor cores (cross_slice)
        sqn_j = tl.load(oth_ptr + offs_j.to(tl.int64) * s_tr + 2 * DP * s_tk, mask=mask_j, other=0.0)
        if DP <= DOT_K_MAX:
            cross = cross_slice(None, own_hi, own_lo, oth_ptr, offs_j, mask_j, s_tr, s_tk, 0, DP, DP, IP)
        else:  # slices of both sides' features for every tile: registers stay bounded
            cross = tl.zeros((offs_i.shape[0], offs_j.shape[0]), dtype=own_ptr.dtype.element_ty)
            for k0 in tl.range(0, DP, DOT_K_MAX, num_stages=1):
                a_hi, a_lo = feature_slices(own_ptr, offs_i, mask_i, s_or, s_ok, k0, DOT_K_MAX, DP)
                cross = cross_slice(cross, a_hi, a_lo, oth_ptr, offs_j, mask_j, s_tr, s_tk, k0, DOT_K_MAX, DP, IP)
        # rounding can leave a tiny negative value where x ~ y; the distance is >= 0
        C = tl.maximum(own_sqn[:, None] + sqn_j[None, :] - 2.0 * cross, 0.0)
    if EUCLID:
        C = tl.sqrt(C)
    return C


@triton.jit
def exponent_tile(
    hs, v, scale, own_ptr, oth_ptr, c_ptr, own_hi, own_lo, own_sqn, offs_i, offs_j, mask_i, mask_j,
    s_or, s_ok, s_tr, s_tk, s_co, s_ct,
    D: tl.constexpr, DP: tl.constexpr, COST: tl.constexpr, EUCLID: tl.constexpr, IP: tl.constexpr,
    USE_V: tl.constexpr,
):
    """The base-2 exponent tile ``z_ij = s h_j - s C_ij``, plus ``v_i`` if ``USE_V``,
    (BLOCK_I, BLOCK_J); ``hs = s h`` (BLOCK_J,) is already scaled.

    ``COST_EXPAND`` (squared Euclidean) never forms ``C``: it sums
    ``(v_i - s|x_i|^2) + (s h_j - s|y_j|^2) + sum_k (2 s x_ik) y_jk``, an add and one FMA
    per coordinate per entry (d = 3: 4 FP32 operations, against 8 for direct differences
    and the scaling). It rounds at float32 of ``s |x|^2`` rather than of ``s |x - y|^2``
    (two clusters 100 apart at eps = 1e-3 gave potentials 0.58 off, against 6.3e-5 with
    direct differences), so the host takes it only under :func:`expansion_error`'s guard.
    """
    if COST == 3 and not EUCLID:
        sqn_i, sqn_j = coord_pair(own_ptr, oth_ptr, offs_i, offs_j, mask_i, mask_j, D, s_or, s_ok, s_tr, s_tk)
        row = -scale * sqn_i
        if USE_V:
            row += v
        z = row[:, None] + (hs - scale * sqn_j)[None, :]  # -inf columns (masked, zero weight) stay -inf
        for k in tl.static_range(D):
            xk, yk = coord_pair(own_ptr, oth_ptr, offs_i, offs_j, mask_i, mask_j, k, s_or, s_ok, s_tr, s_tk)
            z += (2.0 * scale * xk)[:, None] * yk[None, :]
        return z
    C = cost_tile(own_ptr, oth_ptr, c_ptr, own_hi, own_lo, own_sqn, offs_i, offs_j, mask_i, mask_j,
                  s_or, s_ok, s_tr, s_tk, s_co, s_ct, D, DP, COST, EUCLID, IP)
    if USE_V:
        return (hs[None, :] + v[:, None]) - C * scale
    else:
        return hs[None, :] - C * scale


# ---------------------------------------------------------------------------
# The softmin kernel
# ---------------------------------------------------------------------------
@triton.jit
def other_potential(h_ptr, bias_ptr, offs_j, mask_j, scale, BIAS: tl.constexpr):
    """``s h_j`` (``-inf`` past the slice), plus ``log2 b_j`` when ``BIAS`` (``bias_ptr``
    holds ``log b``): the base-2 exponent ``s (g_j + eps log b_j)`` of Sinkhorn's update,
    ``s = log2(e)/eps``, formed here (an FMA per column) instead of by launches of its own.
    Taking ``log b`` rather than ``eps log b`` spares the caller an operation per eps (one
    per eps-scaling stage)."""
    h = tl.load(h_ptr + offs_j, mask=mask_j, other=float("-inf")) * scale
    if BIAS:
        h += tl.load(bias_ptr + offs_j, mask=mask_j, other=0.0) * _LOG2E
    return h


@triton.jit
def lse_online(
    h_ptr, bias_ptr, scale, own_ptr, oth_ptr, c_ptr, own_hi, own_lo, own_sqn, offs_i, mask_i, j_lo, j_hi,
    s_or, s_ok, s_tr, s_tk, s_co, s_ct,
    D: tl.constexpr, DP: tl.constexpr, COST: tl.constexpr, EUCLID: tl.constexpr, IP: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, LANE: tl.constexpr, LOWEST: tl.constexpr, BIAS: tl.constexpr,
):
    """``(m, l)`` with ``m + log2 l = log2 sum_j 2^(z_ij)`` over other points ``[j_lo, j_hi)``,
    ``z_ij = s h_j - s C_ij``, by an online maximum (safe for any input)."""
    dtype = h_ptr.dtype.element_ty
    if LANE:
        # per-entry-lane running max and sum: no cross-thread reduction inside the loop
        m2 = tl.full((BLOCK_I, BLOCK_J), LOWEST, dtype=dtype)
        l2 = tl.zeros((BLOCK_I, BLOCK_J), dtype=dtype)
    else:
        m_i = tl.full((BLOCK_I,), float("-inf"), dtype=dtype)  # running row max of z (base 2)
        l_i = tl.zeros((BLOCK_I,), dtype=dtype)  # running row sum of 2^(z - m_i)
    for j0 in range(j_lo, j_hi, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < j_hi
        hs = other_potential(h_ptr, bias_ptr, offs_j, mask_j, scale, BIAS)
        z = exponent_tile(hs, None, scale, own_ptr, oth_ptr, c_ptr, own_hi, own_lo, own_sqn, offs_i, offs_j, mask_i, mask_j,
                          s_or, s_ok, s_tr, s_tk, s_co, s_ct, D, DP, COST, EUCLID, IP, False)
        if LANE:
            # one exp2 per entry: whichever of 2^(z - m), 2^(m - z) is <= 1 rescales the
            # other side; m starts at LOWEST (finite), so z = -inf gives e = 0, never NaN
            e = tl.exp2(-tl.abs(z - m2))
            l2 = tl.where(z > m2, l2 * e + 1.0, l2 + e)
            m2 = tl.maximum(m2, z)
        else:
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            # all-(-inf) so far (zero weights / masked): shift by 0 so no (-inf) - (-inf) = NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(z - m_safe[:, None]), axis=1)
            m_i = m_new
    if LANE:
        # combine the lanes once: sum_lanes l * 2^(m_lane - m_row)
        m_i = tl.max(m2, axis=1)
        l_i = tl.sum(l2 * tl.exp2(m2 - m_i[:, None]), axis=1)
    return m_i, l_i


@triton.jit
def lse_shifted(
    h_ptr, bias_ptr, scale, own_ptr, oth_ptr, c_ptr, own_hi, own_lo, own_sqn, offs_i, mask_i, j_lo, j_hi, v,
    s_or, s_ok, s_tr, s_tk, s_co, s_ct,
    D: tl.constexpr, DP: tl.constexpr, COST: tl.constexpr, EUCLID: tl.constexpr, IP: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BIAS: tl.constexpr,
):
    """``l = sum_j 2^(z_ij + v_i)`` for a given shift ``v = -m`` (BLOCK_I,): a plain sum, no
    running maximum. Accurate when the shift is within ~100 of ``log2 sum_j 2^z_ij``;
    the caller checks that from ``l`` itself.

    (A fallback inside the same program, a second loop or a second round of this one
    with each row's maximum as the shift, took the sm_90 cubin from 118 registers to
    240-255; so the launcher runs the fallback as a second launch, ``FIXUP``.)"""
    l2 = tl.zeros((BLOCK_I, BLOCK_J), dtype=h_ptr.dtype.element_ty)
    for j0 in range(j_lo, j_hi, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < j_hi
        hs = other_potential(h_ptr, bias_ptr, offs_j, mask_j, scale, BIAS)
        l2 += tl.exp2(exponent_tile(hs, v, scale, own_ptr, oth_ptr, c_ptr, own_hi, own_lo, own_sqn, offs_i, offs_j,
                                    mask_i, mask_j, s_or, s_ok, s_tr, s_tk, s_co, s_ct,
                                    D, DP, COST, EUCLID, IP, True))
    return tl.sum(l2, axis=1)


@triton.jit
def update_potential(s, prev_ptrs, mask, go, scal_ptr, omega_ptr, UPDATE: tl.constexpr):
    """Sinkhorn's update of a potential ``f`` (read at ``prev_ptrs``) from its new softmin
    ``s``, for a problem still iterating (``go``; otherwise ``f`` stays), with ``tau`` from
    ``scal_ptr[2]`` and ``omega`` from ``omega_ptr`` (the problem's):

    - ``UPDATE=1`` (alternating): ``f <- tau s``;
    - ``UPDATE=2`` (symmetric, self-transport): ``f <- (f + tau s) / 2``;
    - ``UPDATE=3`` (over-relaxed alternating): ``f <- (1 - omega) f + omega tau s``.

    (the same operations as :func:`otcore.reference.softmin_update`, in the same order; a GPU
    compiler may fuse ``prev + tau * s`` into one FMA.)"""
    prev = tl.load(prev_ptrs, mask=mask, other=0.0)
    tau = tl.load(scal_ptr + 2)
    if UPDATE == 2:
        new = 0.5 * (prev + tau * s)
    elif UPDATE == 3:
        omega = tl.load(omega_ptr)
        new = (1.0 - omega) * prev + omega * (tau * s)
    else:
        new = tau * s
    return tl.where(go, new, prev)


@triton.jit
def softmin_kernel(
    out_ptr, h_ptr, bias_ptr, hint_ptr, prev_ptr, active_ptr, omega_ptr, scal_ptr, own_ptr, oth_ptr, c_ptr,
    n_own, n_oth, tiles_own, split_len,
    s_outb, s_outs, s_hb, s_hib, s_pb,
    s_ob, s_or, s_ok, s_tb, s_tr, s_tk, s_cb, s_co, s_ct,
    D: tl.constexpr, DP: tl.constexpr, COST: tl.constexpr, EUCLID: tl.constexpr, IP: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, PARTIAL: tl.constexpr, LANE: tl.constexpr,
    LOWEST: tl.constexpr, SHIFT: tl.constexpr, FIXUP: tl.constexpr, BIAS: tl.constexpr, UPDATE: tl.constexpr,
):
    """Row softmin of one ``BLOCK_I`` slice of own points over one slice of the other side.

    Grid: ``(B * tiles_own, S)``; program ``(p, s)`` handles problem ``p // tiles_own``,
    own rows ``(p % tiles_own) * BLOCK_I + [0, BLOCK_I)``, other points
    ``[s * split_len, (s + 1) * split_len)``.

    Pointers and strides (elements):

    - ``out_ptr``: ``PARTIAL=False``: the result ``(B, n_own)``, problem stride ``s_outb``.
      ``PARTIAL=True``: base-2 partial log-sums ``(B, S, n_own)`` (strides
      ``s_outb``, ``s_outs``), combined by the launcher.
    - ``h_ptr``: the shifted potential on the other side, ``(B, n_oth)``, contiguous
      rows, problem stride ``s_hb``; ``-inf`` entries are zero-weight points.
    - ``bias_ptr`` (``BIAS`` only): ``log b``, same layout and stride: the pass reduces
      ``h + eps log b``, adding ``log2 b`` to the scaled ``h`` as it is read.
    - ``hint_ptr`` (``SHIFT`` only): an estimate of the result, ``(B, n_own)``, contiguous
      rows, problem stride ``s_hib`` (e.g. the previous iteration's).
    - ``prev_ptr``, ``active_ptr`` (``UPDATE`` only): the potential being updated,
      ``(B, n_own)``, contiguous rows, problem stride ``s_pb``, and the (B,) bool flags
      of the problems still iterating (see :func:`update_potential`); ``omega_ptr``
      (``UPDATE=3``): the (B,) relaxation factors.
    - ``scal_ptr``: ``[log2(e)/eps, eps*ln 2, tau]`` in the compute dtype (a tensor so
      float64 problems keep float64 scalars).
    - ``own_ptr``/``oth_ptr`` (+ problem strides ``s_ob``/``s_tb``, row strides
      ``s_or``/``s_tr``, coordinate strides ``s_ok``/``s_tk``): point coordinates.
    - ``c_ptr`` (+ ``s_cb``, own stride ``s_co``, other stride ``s_ct``): dense cost.

    ``LANE`` selects how the online log-sum-exp is kept (see :func:`lse_lanes`):
    per entry of the tile (one running max/sum per (row, column lane), merged
    once after the loop; ``LOWEST`` is the dtype's most negative finite value,
    their start) or per row (a max and a sum reduction across the tile's
    threads in every iteration).

    ``SHIFT`` (see :func:`lse_shift`): sum ``2^(z - m)`` with the fixed shift ``m = -s *
    hint`` (the result in base-2 units), no running maximum (:func:`lse_shifted`). A row
    whose sum is out of range (below ``2^-100`` per point of the slice, ``> 3e38`` or NaN:
    the hint was ~100/s or more off) is stored as NaN, for a second launch with ``FIXUP`` (and the online
    maximum) to recompute: its programs read their rows of ``out`` and redo the NaN ones
    only (none: no tile is read). So any hint gives the correct result.

    ``UPDATE`` (1, 2 or 3) stores Sinkhorn's new potential rather than the softmin
    (:func:`update_potential`; with ``PARTIAL`` the combine kernel applies it); an
    inactive problem's programs read no tile.
    """
    sid = tl.program_id(1)
    b, offs_i, mask_i, own_ptr, oth_ptr, c_ptr = program_rows(
        tl.program_id(0), tiles_own, n_own, own_ptr, oth_ptr, c_ptr, s_ob, s_tb, s_cb, BLOCK_I)
    h_ptr += b * s_hb
    bias_ptr += b * s_hb
    scale = tl.load(scal_ptr)
    inv_scale = tl.load(scal_ptr + 1)
    j_lo = sid * split_len
    j_hi = tl.minimum(j_lo + split_len, n_oth)
    go = True
    if UPDATE != 0:  # a converged problem keeps its potential: no tile is read
        go = tl.load(active_ptr + b) != 0
        j_hi = tl.where(go, j_hi, j_lo)
    out_ptrs = out_ptr + b * s_outb + sid.to(tl.int64) * s_outs + offs_i
    store = mask_i
    load_i = mask_i
    if FIXUP:  # redo the rows a SHIFT launch left as NaN; a program without any reads nothing more
        earlier = tl.load(out_ptrs, mask=mask_i, other=0.0)
        store = mask_i & (earlier != earlier)
        todo = tl.max(store.to(tl.int32), axis=0) > 0
        j_hi = tl.where(todo, j_hi, j_lo)
        load_i = offs_i < tl.where(todo, n_own, 0)  # (a vector mask: the interpreter rejects vector & scalar)
    own_hi, own_lo, own_sqn = own_block(own_ptr, offs_i, load_i, s_or, s_ok, DP, COST)
    if SHIFT:
        m_i = -tl.load(hint_ptr + b * s_hib + offs_i, mask=mask_i, other=0.0) * scale
        l_i = lse_shifted(h_ptr, bias_ptr, scale, own_ptr, oth_ptr, c_ptr, own_hi, own_lo, own_sqn, offs_i, mask_i,
                          j_lo, j_hi, -m_i, s_or, s_ok, s_tr, s_tk, s_co, s_ct, D, DP, COST, EUCLID, IP,
                          BLOCK_I, BLOCK_J, BIAS)
        # 7.9e-31 ~ 2^-100 per term of the slice: the GPU's exp2 flushes terms below 2^-126
        # to zero, at most 2^-26 of a sum above that floor (with 2^-100 in all, a slice of
        # 2^20 points could lose 1e-2 of it); NaN fails both tests
        floor = 7.9e-31 * tl.maximum(j_hi - j_lo, 1).to(l_i.dtype)
        in_range = (l_i >= floor) & (l_i <= 3.0e38)
        lse2 = tl.where(in_range, m_i + tl.log2(tl.where(in_range, l_i, 1.0)), float("nan"))
        if UPDATE != 0:  # an inactive problem's empty sum is no row to redo
            lse2 = tl.where(go, lse2, float("-inf"))
    else:
        m_i, l_i = lse_online(h_ptr, bias_ptr, scale, own_ptr, oth_ptr, c_ptr, own_hi, own_lo, own_sqn, offs_i, mask_i,
                              j_lo, j_hi, s_or, s_ok, s_tr, s_tk, s_co, s_ct, D, DP, COST, EUCLID, IP,
                              BLOCK_I, BLOCK_J, LANE, LOWEST, BIAS)
        # every weight zero: l_i = 0, lse2 = -inf and out = +inf (= -eps log 0), without evaluating log2(0);
        # a NaN sum (NaN or +inf in h) stays NaN (tested as l_i > 0 it read as "no weight": +inf, and a
        # split pass dropped that slice, returning the other slices' finite softmin)
        lse2 = tl.where(l_i == 0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0, 1.0, l_i)))
    if PARTIAL:
        tl.store(out_ptrs, lse2, mask=store)
    elif UPDATE != 0:
        new = update_potential(-lse2 * inv_scale, prev_ptr + b * s_pb + offs_i, store, go, scal_ptr, omega_ptr + b,
                               UPDATE)
        tl.store(out_ptrs, new, mask=store)
    else:
        tl.store(out_ptrs, -lse2 * inv_scale, mask=store)


@triton.jit
def softmin_combine_kernel(
    out_ptr, part_ptr, prev_ptr, active_ptr, omega_ptr, scal_ptr, n_own, n_split, tiles,
    s_outb, s_partb, s_parts, s_pb,
    BLOCK: tl.constexpr, UPDATE: tl.constexpr,
):
    """Combine a split pass's base-2 partial log-sums into the softmin (and, with
    ``UPDATE``, the updated potential): ``out_i = -(eps ln 2) log2 sum_s 2^(part_si)``.

    Grid: ``(B * tiles,)``; program ``p`` handles problem ``p // tiles``, own points
    ``(p % tiles) * BLOCK + [0, BLOCK)``. ``part_ptr``: ``(B, S, n_own)`` (strides
    ``s_partb``, ``s_parts``); ``out_ptr``: ``(B, n_own)``, contiguous rows. One launch
    in place of the ~7 of a torch ``logsumexp`` and its scalings.
    """
    pid = tl.program_id(0)
    b = (pid // tiles).to(tl.int64)  # (b * s_partb: a partial buffer of 2^31 entries or more)
    offs = (pid % tiles) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_own
    part_ptr += b * s_partb + offs
    m = tl.full((BLOCK,), float("-inf"), dtype=part_ptr.dtype.element_ty)
    for s in range(0, n_split):
        m = tl.maximum(m, tl.load(part_ptr + s * s_parts, mask=mask, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # every slice empty (zero weights): no (-inf) - (-inf)
    l = tl.zeros((BLOCK,), dtype=m.dtype)
    for s in range(0, n_split):
        l += tl.exp2(tl.load(part_ptr + s * s_parts, mask=mask, other=float("-inf")) - m_safe)
    # l = 0: -inf (out = +inf, as torch's logsumexp); a NaN partial stays NaN
    lse2 = tl.where(l == 0, float("-inf"), m_safe + tl.log2(tl.where(l == 0, 1.0, l)))
    out = -lse2 * tl.load(scal_ptr + 1)
    if UPDATE != 0:
        go = tl.load(active_ptr + b) != 0
        out = update_potential(out, prev_ptr + b * s_pb + offs, mask, go, scal_ptr, omega_ptr + b, UPDATE)
    tl.store(out_ptr + b * s_outb + offs, out, mask=mask)


# ---------------------------------------------------------------------------
# Host side: operands, heuristics, launcher
# ---------------------------------------------------------------------------
def dot_padding(d: int) -> int:
    """``DP``: the coordinates of the dot path padded to a power of 2, at least 16 (the
    smallest ``tl.dot`` operand)."""
    return max(16, next_pow2(d))


def dot_features(pts: torch.Tensor, input_precision: str) -> torch.Tensor:
    """One cloud as the dot path reads it, ``(B, n, d)`` -> ``(B, n, 2 DP + 16)``
    (:func:`dot_padding`): columns ``[0, DP)`` a head ``hi``, ``[DP, 2 DP)`` a tail
    ``lo``, column ``2 DP`` the squared norm ``|p|^2``; zeros elsewhere (the width keeps
    rows 16-element aligned).

    - ``"tf32x3"``: ``hi = tf32(p)`` (round to nearest, 10 mantissa bits) and
      ``lo = tf32(p - hi)``. ``hi.hi' + hi.lo' + lo.hi'`` -- three exact tf32 products --
      is ``p.p'`` to ~2^-22 relative, the error of ``tl.dot``'s own ``"tf32x3"``.
    - otherwise ``hi = p`` and ``lo = 0`` (one dot at the given precision).

    Why split here: ``tl.dot(..., input_precision="tf32x3")`` splits both operands in
    every program for every tile; on sm_90 the other side's tile then travels global ->
    shared -> registers (split) -> shared for the tensor cores. Split once per geometry
    (O(n d) work), the tiles go straight to shared memory: the d = 64 shifted pass's loop
    drops from 42.7 to 32.9 instructions per ``exp2`` (Triton 3.6: 40.6 to 25.2) by count
    (``bench/sass_counts.py``).
    """
    B, n, d = pts.shape
    dp = dot_padding(d)
    out = pts.new_zeros((B, n, 2 * dp + 16))
    if input_precision == "tf32x3":
        hi = _round_tf32(pts)
        out[..., :d] = hi
        out[..., dp:dp + d] = _round_tf32(pts - hi)
    else:
        out[..., :d] = pts
    out[..., 2 * dp] = pts.square().sum(-1)
    return out


def expand_features(pts: torch.Tensor) -> torch.Tensor:
    """One (centred) cloud as ``COST_EXPAND`` reads it, ``(B, n, d)`` -> ``(B, n, d + 1)``:
    the coordinates, then the squared norm ``|p|^2``."""
    return torch.cat([pts, pts.square().sum(-1, keepdim=True)], -1)


def _round_tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 rounded to tf32's 10 mantissa bits (to nearest, ties away from zero), by
    integer arithmetic on the bit pattern (the carry of the rounding bit moves into the
    exponent when the mantissa overflows, as it should)."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@dataclass(frozen=True)
class CostOperand:
    """Where the cost comes from, seen from one reduction's side.

    Point clouds: ``own`` ``(B, n_own, d)`` holds the points indexed by the output
    (x for a row pass), ``oth`` ``(B, n_oth, d)`` the reduced ones. Dense: ``C``
    ``(B, n, m)`` and ``transposed`` (True for a column pass: own index = column).
    ``COST_DOT`` and ``COST_EXPAND`` kernels read ``own_feat``/``oth_feat``, the two
    clouds' :func:`dot_features` / :func:`expand_features`, instead of the points.
    """

    own: Optional[torch.Tensor]
    oth: Optional[torch.Tensor]
    C: Optional[torch.Tensor]
    transposed: bool
    euclidean: bool
    mode: int
    input_precision: str
    own_feat: Optional[torch.Tensor] = None
    oth_feat: Optional[torch.Tensor] = None

    @property
    def batch(self) -> int:
        return (self.C if self.C is not None else self.own).shape[0]

    @property
    def n_own(self) -> int:
        if self.C is not None:
            return self.C.shape[2 if self.transposed else 1]
        return self.own.shape[1]

    @property
    def n_oth(self) -> int:
        if self.C is not None:
            return self.C.shape[1 if self.transposed else 2]
        return self.oth.shape[1]

    @property
    def d(self) -> int:
        return 1 if self.C is not None else self.own.shape[2]

    @property
    def ref(self) -> torch.Tensor:
        return self.C if self.C is not None else self.own

    def pointer_args(self) -> tuple:
        """``own, oth, c`` pointers and their 9 strides, in the kernels' argument order."""
        if self.C is not None:
            C = self.C
            s_co, s_ct = (C.stride(2), C.stride(1)) if self.transposed else (C.stride(1), C.stride(2))
            return (C, C, C, 0, 0, 0, 0, 0, 0, C.stride(0), s_co, s_ct)
        o, t = (self.own_feat, self.oth_feat) if self.mode in (COST_DOT, COST_EXPAND) else (self.own, self.oth)
        return (o, t, o, o.stride(0), o.stride(1), o.stride(2), t.stride(0), t.stride(1), t.stride(2), 0, 0, 0)

    def constexprs(self) -> dict:
        d = self.d
        dp = dot_padding(d) if self.mode == COST_DOT else next_pow2(d)
        return dict(D=d, DP=dp, COST=self.mode, EUCLID=self.euclidean, IP=self.input_precision)


#: ``precision="fp32"`` takes the 3xTF32 expansion (past :data:`DIRECT_MAX_D`) only while
#: its rounding, :func:`expansion_error`, is at most this fraction of ``eps``: then the
#: plan's entries ``exp((F + G - C)/eps)`` move by at most ~0.1%. Beyond, direct differences.
EXPANSION_MAX_ERROR = 1e-3

#: The FMA expansion (``COST_EXPAND``, d <= :data:`DIRECT_MAX_D`) replaces direct
#: differences, which are float32-faithful whatever the layout, only while ``d + 2`` (the
#: exponent's rounded terms) times its rounding bound :func:`expansion_error` is at most
#: this fraction of ``eps``: much tighter than the 3xTF32 guard, because the alternative
#: here is as accurate and costs only ~2d FP32 operations per entry. Set from the lowest
#: marginal error float32 solves reached (docs/kernels.md, "The FMA expansion for small
#: d"): at its boundary, at most 1.2e-6 (two clouds, d = 8) where direct differences reached
#: 1.3-7.2e-7. The target problems' unit cube (d = 3, bound 3.2e-7) keeps it down to eps = 0.04.
EXPAND_MAX_ERROR = 4e-5

#: ``precision="tf32"`` (the opt-in fast mode, any d) expands while its rounding bound is
#: at most this many ``eps``; beyond, the plan's entries could be off by more than a factor
#: ``e`` and carry no information, so it takes direct differences. This guards against
#: clouds far apart relative to their size, and far zero-weight padding (which the centring
#: counts): three pads at 1e8 once gave a value 2e7 times too large with ``converged`` True.
TF32_MAX_ERROR = 1.0


def expansion_error(sq_spread: float, euclidean: bool, tf32: bool = False) -> float:
    """Rounding of ``C`` computed as ``|x|^2 + |y|^2 - 2 x.y`` on centred clouds whose
    largest squared norms add up to ``sq_spread``: ~2^-22 of it (3xTF32 products and
    float32 sums; the interpreter's exact-float32 dot measured the same order), and its
    square root for the Euclidean cost (``sqrt`` of an error near ``C = 0``). It grows with
    the clouds' spread, not with the distances that carry the plan: clusters far apart
    (relative to their size) make it large where direct differences stay exact.
    ``tf32``: a plain tf32 dot, operands rounded to 2^-11: ``2 |x.y|`` errs up to
    ~2^-10 ``|x| |y|``, bounded by 2^-10 of ``sq_spread``."""
    err = (2.0**-10 if tf32 else 2.0**-22) * sq_spread
    return math.sqrt(err) if euclidean else err


def point_cost_mode(precision: str, d: int, dtype: torch.dtype, sq_spread: float = 0.0,
                    eps: float = math.inf, euclidean: bool = False, expand: bool = False,
                    self_transport: bool = False) -> tuple[int, str]:
    """How a point-cloud cost tile is computed: ``(COST_*, tl.dot input precision)``.

    - float64: direct differences (FMA), exact to float64 rounding.
    - ``"tf32"``: the expansion with a plain tf32 dot (fast, ~1e-3 relative error) while
      its rounding bound is at most ``TF32_MAX_ERROR * eps``, else direct differences.
    - ``"fp32"``: up to :data:`DIRECT_MAX_D` coordinates, direct differences, or with
      ``expand`` (a large pass, :data:`EXPAND_MIN_ENTRIES`) the FMA expansion of the squared
      Euclidean cost on centred coordinates while ``d + 2`` times its rounding
      (:func:`expansion_error` of ``sq_spread``) is at most ``EXPAND_MAX_ERROR * eps``
      (half that for a cloud against itself, ``self_transport``: its plan concentrates on
      pairs at distance ~0, which direct differences compute exactly); beyond ``DIRECT_MAX_D``, the
      expansion with a 3xTF32 dot if that rounding is at most ``EXPANSION_MAX_ERROR *
      eps``, else direct differences again (exact, ~2d FP32 operations per entry).
    """
    if dtype == torch.float64:
        return COST_DIRECT, "ieee"
    if precision == "tf32":
        if expansion_error(sq_spread, euclidean, tf32=True) > TF32_MAX_ERROR * eps:
            return COST_DIRECT, "tf32"
        return COST_DOT, "tf32"
    if d <= DIRECT_MAX_D:
        allowance = EXPAND_MAX_ERROR * eps / (2 if self_transport else 1)
        if expand and not euclidean and (d + 2) * expansion_error(sq_spread, False) <= allowance:
            return COST_EXPAND, "tf32x3"
        return COST_DIRECT, "tf32x3"
    if expansion_error(sq_spread, euclidean) > EXPANSION_MAX_ERROR * eps:
        return COST_DIRECT, "tf32x3"
    return COST_DOT, "tf32x3"


def point_operand(own, oth, euclidean: bool, precision: str, mode: Optional[int] = None,
                  sq_spread: float = 0.0, eps: float = math.inf,
                  features: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> CostOperand:
    """A point-cloud :class:`CostOperand`; ``mode`` overrides :func:`point_cost_mode`
    (to which ``sq_spread`` and ``eps`` go). ``COST_DOT`` and ``COST_EXPAND`` operands carry
    :func:`dot_features` / :func:`expand_features` of ``(own, oth)`` (centred clouds):
    ``features`` if given (a cache), else computed."""
    auto_mode, ip = point_cost_mode(precision, own.shape[2], own.dtype, sq_spread, eps, euclidean)
    if own.dtype == torch.float64:
        ip = "ieee"
    mode = auto_mode if mode is None else mode
    if mode == COST_EXPAND and euclidean:
        raise ValueError("COST_EXPAND computes the squared Euclidean cost only")
    if features is None and mode == COST_DOT:
        features = (dot_features(own, ip), dot_features(oth, ip))
    elif features is None and mode == COST_EXPAND:
        features = (expand_features(own), expand_features(oth))
    own_feat, oth_feat = features if mode in (COST_DOT, COST_EXPAND) else (None, None)
    return CostOperand(own, oth, None, False, euclidean, mode, ip, own_feat, oth_feat)


def dense_operand(C, transposed: bool) -> CostOperand:
    """A dense-cost :class:`CostOperand` (``transposed``: the column pass)."""
    return CostOperand(None, None, C, transposed, False, COST_DENSE, "ieee")


def block_sizes(n_own: int, n_oth: int, mode: int, d: int) -> tuple[int, int, int]:
    """``(BLOCK_I, BLOCK_J, num_warps)`` for a streamed pass.

    64 x 64 tiles: large enough that loading the other side's coordinates and
    potential (O(BLOCK_J) per tile) is amortised over BLOCK_I rows, and that one
    program streams a useful amount of work between its O(BLOCK_I) loads and
    stores. Warps: one per 512 tile entries (16 entries per thread). The sm_90
    cubins of the softmin kernel (cuobjdump --dump-resource-usage) then use
    116-204 registers (d = 3 direct: 127) and no stack; at 4 warps the same tile
    needs ~240 registers, and 128 x 128 tiles spill. Small problems shrink the tile to the problem (a power of 2,
    at least 16, the smallest tl.dot operand). ``mode`` and ``d`` are accepted so
    that a per-path choice can be added without touching the launchers; the softmin
    launcher's own per-path choice is :func:`pass_tiles`.
    """
    bi = min(64, max(16, next_pow2(n_own)))
    bj = min(64, max(16, next_pow2(n_oth)))
    warps = max(1, min(8, bi * bj // 512))
    return bi, bj, warps


def pass_tiles(n_own: int, n_oth: int, mode: int, d: int) -> tuple[int, int, int]:
    """``(BLOCK_I, BLOCK_J, num_warps)`` of a softmin pass: :func:`block_sizes`, except that
    the tensor-core cost (``COST_DOT``) takes 128 own rows per tile once there are 128.

    Measured on an H200 (bench/gpu_profile.py, one row pass, 32768 x 32768, d = 64):
    3xTF32 4.39 ms at 64 x 64 with 8 warps, 2.28 ms at 128 x 64 (8 warps; 2.27 with 4,
    whose online and FIXUP variants spill 176-192 bytes per thread at sm_90, Triton 3.9),
    2.57 ms at 64 x 64 with 4 warps; 64 x 128 and 128 x 128 need more shared memory than
    an SM has (233 and 262 KB). Plain tf32: 1.34 ms at 64 x 64, 1.28 ms at 128 x 64. The
    d = 3 direct cost was fastest at 64 x 64 (0.706 ms; 0.756 at 128 x 64), so only the dot
    path changes, and only up to d = 64 (one feature slice): at d = 200 the 128-row tile
    spilled (255 registers, tests/test_kernels_compile.py). The plan kernels keep
    :func:`block_sizes` (not measured at 128 rows).
    """
    bi, bj, warps = block_sizes(n_own, n_oth, mode, d)
    if mode == COST_DOT and n_own >= 128 and dot_padding(d) <= DOT_K_MAX.value:
        return 128, bj, 8
    return bi, bj, warps


def lse_lanes() -> bool:
    """Keep the online log-sum-exp per tile entry (True) rather than per row.

    Per row, every tile needs a max and a sum across the threads that share a row:
    in the sm_90 SASS of the d = 3 kernel (64 x 64 tile, 8 warps) that is 5
    butterfly shuffles per value, ~190 SHFL per thread and tile against 16 MUFU.EX2,
    so the shuffles, not the exp unit, would bound it. Per entry, each (row, lane)
    keeps its own max m and sum l and the update costs one exp2 and ~5 FP32 ops
    with no communication; lanes are merged once after the loop. Override with
    OTCORE_LSE_LANES=0 to time the per-row form.
    """
    return os.environ.get("OTCORE_LSE_LANES", "1") != "0"


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


#: A dense cost's pass is split (:func:`num_splits`) only when the reduced axis has at least
#: this many tiles of 64: at 8192 x 8192 (128 tiles) the unsplit pass was faster on an H200
#: (bench/gpu_profile.py: 0.214 vs 0.310 ms down the columns, 0.308 vs 0.346 ms along the
#: rows), and it saves the combine's ~7 small launches. Point clouds (exp-bound, not
#: memory-bound) keep the split.
DENSE_SPLIT_MIN_TILES = 256


def num_splits(programs: int, tiles_oth: int, device: torch.device, dense: bool = False) -> int:
    """How many slices the reduced axis is cut into (split-K, combined on the host side).

    A GPU needs several programs per SM to hide latency; with few own tiles (e.g.
    n = 8192: 128 tiles of 64 for 132 SMs) the other axis is split so that about
    4 programs per SM exist, each still streaming >= 8 tiles so the extra partial
    results (one per own row and slice) stay negligible. A dense cost (``dense``) is
    split only from :data:`DENSE_SPLIT_MIN_TILES` tiles on. On CPU (the interpreter)
    more programs only cost time: 1.
    """
    if device.type != "cuda" or (dense and tiles_oth < DENSE_SPLIT_MIN_TILES):
        return 1
    target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= target // 2:
        return 1
    return max(1, min(cdiv(target, programs), tiles_oth // 8))


#: CUDA caps a launch grid's second and third axes at 65535 programs: kernels with the
#: batch there run their torch twins for larger batches.
GRID_Y_MAX = 65535


class DeviceScalars:
    """Small constant tensors (``[log2(e)/eps, ...]``) cached on the device by key, made
    without a host sync.

    A plain copy to a CUDA device waits for the stream to drain; from pinned memory it is
    queued like a launch, on the stream current at the first call. Another stream that
    reads the cached tensor later must not run ahead of that copy, so every hit orders the
    current stream after it (a wait on a recorded event: nearly free once it has passed).
    Inside a CUDA graph's recording the wait is skipped: ``torch.cuda.graph`` synchronises
    the device before it records, and the solver's warm-up block fills the cache first (a
    miss there raises, and the solver then runs the block eagerly, with a warning).
    """

    def __init__(self, size: int = 64):
        self.size = size
        self.entries: dict = {}

    def get(self, key, values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (key, dtype, device)
        hit = self.entries.get(key)
        if device.type != "cuda":
            if hit is None:
                hit = self._put(key, (torch.tensor(values, dtype=dtype, device=device), None))
            return hit[0]
        stream = torch.cuda.current_stream(device)
        capturing = torch.cuda.is_current_stream_capturing()
        if hit is None:
            if capturing:  # a copy recorded into a graph would re-read a freed host buffer at replay
                raise RuntimeError("otcore: a kernel constant was first needed inside a CUDA graph recording "
                                   "(the warm-up block before it should have made it)")
            t = torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
            return self._put(key, (t, done))[0]
        if not capturing:
            stream.wait_event(hit[1])
        return hit[0]

    def _put(self, key, entry):
        if len(self.entries) >= self.size:
            self.entries.pop(next(iter(self.entries)))  # the oldest
        self.entries[key] = entry
        return entry


DEVICE_SCALARS = DeviceScalars()


def scalars(eps: float, dtype: torch.dtype, device: torch.device, tau: float = 1.0) -> torch.Tensor:
    """``[log2(e)/eps, eps*ln 2, tau]`` as a tensor of the compute dtype (cached per eps and tau)."""
    eps, tau = float(eps), float(tau)
    return DEVICE_SCALARS.get(("softmin", eps, tau), [LOG2E / eps, eps * LN2, tau], dtype, device)


#: Smallest ``B * n_own * n_oth`` (the whole launch) for which a ``hint`` is used (:func:`lse_shift`): the
#: shifted pass needs a second, mostly idle launch (the ``FIXUP`` one), and on an H200 a
#: launch_softmin call cost ~105 us of host time (bench/gpu_profile.py). Measured per eager Sinkhorn
#: iteration there (bench_sinkhorn_kernels.py, d = 3): 8192 x 8192 online 0.43 ms,
#: shifted 0.56 ms (host-bound: the extra launches cost more than the shift saves);
#: 32768 x 32768 online 1.40 ms, shifted 1.17 ms (kernel-bound). Hence 2^28 (16384^2).
SHIFT_MIN_ENTRIES = 1 << 28


def lse_shift() -> bool:
    """Use a caller's estimate of the result (``hint``) as a fixed log-sum-exp shift.

    The online maximum costs ~7 FP32 operations per entry besides the ``exp2`` (the
    lane update of :func:`lse_lanes`); with a fixed shift the sum is one addition, an
    FMA, the ``exp2`` and an addition. An H100 SM issues 128 instructions per clock and
    16 ``exp2``; the d = 3 loop's sm_90 SASS has 15.2 instructions per ``exp2`` online
    and 11.2 shifted (docs/kernels.md): ~1.9x against ~1.4x the exp floor by issue count.
    In Sinkhorn the previous iteration's result is such an estimate; rows whose
    sum falls out of range are redone online by a second launch (``FIXUP``). Used for
    passes of at least :data:`SHIFT_MIN_ENTRIES` entries. Override with
    OTCORE_LSE_SHIFT=0 to time the online form (the hint is then ignored).
    """
    return os.environ.get("OTCORE_LSE_SHIFT", "1") != "0"


#: Own points per program of :func:`softmin_combine_kernel`.
COMBINE_BLOCK = 256


def launch_softmin(op: CostOperand, h: torch.Tensor, eps: float, splits: Optional[int] = None,
                   hint: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                   prev: Optional[torch.Tensor] = None, active: Optional[torch.Tensor] = None,
                   tau: float = 1.0, average: bool = False, omega: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out_i = -eps log sum_j exp((h_j + eps bias_j - C_ij)/eps)`` over the operand's other side,
    or with ``prev`` Sinkhorn's update of the potential ``prev`` from it (below).

    Args:
        op: the cost, seen from the output's side (:func:`point_operand`/:func:`dense_operand`).
        h: ``(B, n_oth)`` potential on the reduced side (``-inf`` = zero weight).
        eps: regularization (> 0).
        splits: number of slices of the reduced axis (default :func:`num_splits`).
        hint: ``(B, n_own)`` estimate of the result, used as the log-sum-exp's shift
            (:func:`lse_shift`); any value gives the same result, a close one is faster.
            With ``prev`` it is ``prev / tau``, the softmin that gave ``prev`` (computed
            only for a pass that uses it).
        bias: ``(B, n_oth)`` ``log b`` (natural log; ``-inf`` for a zero weight), whose
            ``eps`` multiple the kernel adds to ``h`` as it reads it, or None.
        prev, active, tau, average, omega: ``prev`` ``(B, n_own)`` and ``active`` ``(B,)`` bool
            given, the result is ``where(active, tau s, prev)`` (``average``:
            ``where(active, (prev + tau s) / 2, prev)``; ``omega`` ``(B,)`` given, the
            over-relaxed ``where(active, (1 - omega) prev + omega tau s, prev)``) with ``s``
            the softmin above (:func:`update_potential`); inactive problems read no tile.

    Returns:
        ``(B, n_own)`` in the operand's dtype. A pass of one launch (two with the shift's
        ``FIXUP``, one more with ``S > 1`` slices: :func:`softmin_combine_kernel`).
    """
    ref = op.ref
    B, n_own, n_oth = op.batch, op.n_own, op.n_oth
    h = h.to(ref.dtype).contiguous()
    if hint is not None and tuple(hint.shape) != (B, n_own):
        raise ValueError(f"hint must have the result's shape ({B}, {n_own}), got {tuple(hint.shape)}")
    if bias is not None:
        if tuple(bias.shape) != tuple(h.shape):
            raise ValueError(f"bias must have h's shape {tuple(h.shape)}, got {tuple(bias.shape)}")
        bias = bias.to(ref.dtype).contiguous()
    update = 0 if prev is None else (2 if average else 3 if omega is not None else 1)
    if omega is not None and update != 3:
        raise ValueError("omega (over-relaxation) needs prev and excludes average")
    if update:
        if hint is not None:
            raise ValueError("hint and prev are exclusive: with prev the hint is prev / tau")
        if tuple(prev.shape) != (B, n_own):
            raise ValueError(f"prev must have the result's shape ({B}, {n_own}), got {tuple(prev.shape)}")
        if active is None or active.dtype != torch.bool or tuple(active.shape) != (B,) or active.device != ref.device:
            raise ValueError(f"active must be a ({B},) bool tensor on {ref.device} with prev")
        prev, active = prev.to(ref.dtype).contiguous(), active.contiguous()
    if update == 3:
        if tuple(omega.shape) != (B,) or omega.device != ref.device:
            raise ValueError(f"omega must be a ({B},) tensor on {ref.device}")
        omega = omega.to(ref.dtype).contiguous()
    shift = (hint is not None or update) and lse_shift() and B * n_own * n_oth >= SHIFT_MIN_ENTRIES
    if shift and update:
        hint = prev if tau == 1.0 else prev / tau
    hint = hint.to(ref.dtype).contiguous() if shift else h
    bi, bj, warps = pass_tiles(n_own, n_oth, op.mode, op.d)
    tiles_own = cdiv(n_own, bi)
    tiles_oth = cdiv(n_oth, bj)
    if splits is None:
        S = num_splits(B * tiles_own, tiles_oth, ref.device, dense=op.mode == COST_DENSE)
    else:
        S = max(1, min(splits, tiles_oth, GRID_Y_MAX))  # (the splits sit on grid axis 1)
    split_len = cdiv(tiles_oth, S) * bj
    S = cdiv(n_oth, split_len)
    partial = S > 1
    out = torch.empty((B, S, n_own) if partial else (B, n_own), dtype=ref.dtype, device=ref.device)
    s_outs = out.stride(1) if partial else 0
    scal = scalars(eps, ref.dtype, ref.device, tau)
    # unused pointers point at h (never read: their constexpr is off)
    bias_, prev_, active_ = (bias if bias is not None else h), (prev if update else h), (active if update else h)
    omega_ = omega if update == 3 else h
    for shifted, fixup in ((True, False), (False, True)) if shift else ((False, False),):
        softmin_kernel[(B * tiles_own, S)](
            out, h, bias_, hint, prev_, active_, omega_, scal, *op.pointer_args()[:3],
            n_own, n_oth, tiles_own, split_len,
            out.stride(0), s_outs, h.stride(0), hint.stride(0), prev_.stride(0), *op.pointer_args()[3:],
            **op.constexprs(), BLOCK_I=bi, BLOCK_J=bj, PARTIAL=partial, LANE=lse_lanes(),
            LOWEST=float(torch.finfo(ref.dtype).min), SHIFT=shifted, FIXUP=fixup, BIAS=bias is not None,
            UPDATE=update, num_warps=warps,
        )
    if not partial:
        return out
    res = torch.empty((B, n_own), dtype=ref.dtype, device=ref.device)
    tiles = cdiv(n_own, COMBINE_BLOCK)
    softmin_combine_kernel[(B * tiles,)](
        res, out, prev_, active_, omega_, scal, n_own, S, tiles, res.stride(0), out.stride(0), out.stride(1),
        prev_.stride(0), BLOCK=COMBINE_BLOCK, UPDATE=update, num_warps=4,
    )
    return res
