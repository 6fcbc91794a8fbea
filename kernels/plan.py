"""Streamed operations on the entropic plan ``P_ij = exp((F_i + G_j - C_ij)/eps)``.

Same tiling and cost tiles as :mod:`otcore.kernels.softmin` (own rows x other
columns, the column side obtained by swapping the clouds or C's strides); the
plan is formed tile by tile as ``2^(s F_i + s G_j - s C_ij)`` with
``s = log2(e)/eps`` and never stored, except by :func:`launch_plan_dense`.

- :func:`launch_plan_reduce`: ``sum_j W_ij V_jk`` and/or ``sum_j W_ij`` for the
  weights ``W = P`` (apply_plan, marginals), ``W = P * C`` (``<P, C>``) or
  ``W = P / C``, in one pass; or ``sum_j W_ij (own_ik - oth_jk)`` with the
  differences formed entry by entry (the point costs' gradient, ``diff=True``); or
  ``sum_j W_ij C_ij`` beside ``sum_j W_ij`` (``with_cost=True``: a result's column
  marginals and its transport cost in one pass instead of two).
- :func:`launch_plan_topk`: the ``k`` largest ``P_ij`` of each own row with their
  column indices, by a running top-k merged tile by tile.
- :func:`launch_plan_dense`: ``P`` itself (small problems).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._intmath import cdiv, next_pow2
from .softmin import (COST_DIRECT, COST_DOT, GRID_Y_MAX, CostOperand, block_sizes, cost_tile, own_block, program_rows,
                      scalars)

WEIGHT_P = 0  # W = P
WEIGHT_PC = 1  # W = P * C
WEIGHT_P_OVER_C = 2  # W = P / C, 0 where C = 0

#: Largest k for the in-kernel running top-k (k selection rounds per tile).
TOPK_MAX = 32


@triton.jit
def _log2_plan_tile(f_ptr, g_ptr, scale, C, offs_i, offs_j, mask_i, mask_j):
    """``log2 P`` on a tile: ``s F_i + (s G_j - s C_ij)``; masked rows/columns are ``-inf``."""
    fs = tl.load(f_ptr + offs_i, mask=mask_i, other=float("-inf")) * scale
    gs = tl.load(g_ptr + offs_j, mask=mask_j, other=float("-inf")) * scale
    return fs[:, None] + (gs[None, :] - C * scale)


@triton.jit
def plan_reduce_kernel(
    out_v_ptr, out_s_ptr, f_ptr, g_ptr, v_ptr, scal_ptr, own_ptr, oth_ptr, c_ptr,
    n_own, n_oth, n_val, tiles_own, q0,
    s_ovb, s_ovr, s_osb, s_fb, s_gb, s_vb, s_vr, s_vk,
    s_ob, s_or, s_ok, s_tb, s_tr, s_tk, s_cb, s_co, s_ct,
    D: tl.constexpr, DP: tl.constexpr, COST: tl.constexpr, EUCLID: tl.constexpr, IP: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_V: tl.constexpr, V_MATRIX: tl.constexpr, WITH_SUM: tl.constexpr, WEIGHT: tl.constexpr,
    VIP: tl.constexpr, DIFF: tl.constexpr, V_COST: tl.constexpr,
):
    """``out_v[i, k] = sum_j W_ij V[j, k]`` and ``out_s[i] = sum_j W_ij`` for own rows i.

    Grid: ``(B * tiles_own, Q)``; program ``(p, q - q0)`` handles problem
    ``p // tiles_own``, own rows ``(p % tiles_own)*BLOCK_I + [0, BLOCK_I)`` and value
    columns ``q*BLOCK_K + [0, BLOCK_K)``, streaming every other point (the launcher covers
    ``cdiv(n_val, BLOCK_K)`` value tiles in launches of at most ``GRID_Y_MAX``, from ``q0``).

    Pointers and strides (elements):

    - ``out_v_ptr``: ``(B, n_own, n_val)`` (strides ``s_ovb``, ``s_ovr``, 1), or
      ``(B, n_own)`` when ``V_MATRIX`` is False (vector ``V``).
    - ``out_s_ptr``: ``(B, n_own)`` row sums of W (problem stride ``s_osb``);
      written by the ``q = 0`` programs when ``WITH_SUM``.
    - ``f_ptr`` / ``g_ptr``: biased potentials of the own / other side, ``(B, n_own)``
      and ``(B, n_oth)``, contiguous rows (problem strides ``s_fb``, ``s_gb``).
    - ``v_ptr``: ``V`` ``(B, n_oth, n_val)`` (strides ``s_vb``, ``s_vr``, ``s_vk``),
      or ``(B, n_oth)`` when not ``V_MATRIX``; unused unless ``HAS_V``.
    - ``scal_ptr``: ``[log2(e)/eps, eps*ln 2]``.
    - ``own_ptr``, ``oth_ptr``, ``c_ptr`` and their strides: see
      :func:`otcore.kernels.softmin.cost_tile`.

    ``WEIGHT``: 0 ``W = P``, 1 ``W = P*C``, 2 ``W = P/C`` (0 where ``C = 0``).
    ``VIP``: tl.dot input precision of ``W @ V`` (``"tf32x3"`` keeps float32 accuracy).
    ``DIFF`` (with ``V_MATRIX``, ``COST_DIRECT``): ``V`` is not read; the values are the
    coordinate differences, ``out_v[i, k] = sum_j W_ij (own_ik - oth_jk)``, each difference
    formed per entry (BLOCK_I x BLOCK_J x BLOCK_K products per tile): where the plan sits on
    near-coincident pairs, ``x_i (W1)_i - (W y)_i`` would cancel two terms much larger than
    the result (for ``W = P / C``, ~``1/C`` times larger).
    ``V_COST`` (vector form): ``V`` is not read; the values are the cost's own entries,
    ``out_v[i] = sum_j W_ij C_ij``.
    """
    q = q0 + tl.program_id(1)
    b, offs_i, mask_i, own_ptr, oth_ptr, c_ptr = program_rows(
        tl.program_id(0), tiles_own, n_own, own_ptr, oth_ptr, c_ptr, s_ob, s_tb, s_cb, BLOCK_I)
    offs_k = q * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < n_val
    f_ptr += b * s_fb
    g_ptr += b * s_gb
    v_ptr += b * s_vb
    scale = tl.load(scal_ptr)
    own_hi, own_lo, own_sqn = own_block(own_ptr, offs_i, mask_i, s_or, s_ok, DP, COST)
    if DIFF:  # the own coordinates of this program's value columns, (BLOCK_I, BLOCK_K)
        own_k = tl.load(own_ptr + offs_i[:, None].to(tl.int64) * s_or + offs_k[None, :] * s_ok,
                        mask=mask_i[:, None] & mask_k[None, :], other=0.0)

    dtype = f_ptr.dtype.element_ty
    # sums are kept per tile entry and reduced across the tile's threads once, after the loop
    acc_s = tl.zeros((BLOCK_I, BLOCK_J), dtype=dtype)
    if V_MATRIX:
        acc_v = tl.zeros((BLOCK_I, BLOCK_K), dtype=dtype)
    else:
        acc_v = tl.zeros((BLOCK_I, BLOCK_J), dtype=dtype)
    for j0 in range(0, n_oth, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < n_oth
        C = cost_tile(own_ptr, oth_ptr, c_ptr, own_hi, own_lo, own_sqn, offs_i, offs_j, mask_i, mask_j,
                      s_or, s_ok, s_tr, s_tk, s_co, s_ct, D, DP, COST, EUCLID, IP)
        W = tl.exp2(_log2_plan_tile(f_ptr, g_ptr, scale, C, offs_i, offs_j, mask_i, mask_j))
        if WEIGHT == 1:
            W = W * C
        elif WEIGHT == 2:
            W = tl.where(C > 0, W / tl.where(C > 0, C, 1.0), 0.0)
        if WITH_SUM:
            acc_s += W
        if HAS_V:
            if DIFF:
                oth_k = tl.load(oth_ptr + offs_j[:, None].to(tl.int64) * s_tr + offs_k[None, :] * s_tk,
                                mask=mask_j[:, None] & mask_k[None, :], other=0.0)
                acc_v += tl.sum(W[:, :, None] * (own_k[:, None, :] - oth_k[None, :, :]), axis=1)
            elif V_MATRIX:
                V = tl.load(v_ptr + offs_j[:, None].to(tl.int64) * s_vr + offs_k[None, :] * s_vk,
                            mask=mask_j[:, None] & mask_k[None, :], other=0.0)
                acc_v += tl.dot(W, V, input_precision=VIP).to(dtype)
            elif V_COST:  # (masked entries: W = 0 and C finite, cost_tile's zeros)
                acc_v += W * C
            else:
                v = tl.load(v_ptr + offs_j.to(tl.int64) * s_vr, mask=mask_j, other=0.0)
                acc_v += W * v[None, :]
    if HAS_V:
        if V_MATRIX:
            ptrs = out_v_ptr + b * s_ovb + offs_i[:, None].to(tl.int64) * s_ovr + offs_k[None, :]
            tl.store(ptrs, acc_v, mask=mask_i[:, None] & mask_k[None, :])
        else:
            tl.store(out_v_ptr + b * s_ovb + offs_i.to(tl.int64) * s_ovr, tl.sum(acc_v, axis=1), mask=mask_i)
    if WITH_SUM:
        tl.store(out_s_ptr + b * s_osb + offs_i, tl.sum(acc_s, axis=1), mask=mask_i & ((offs_i * 0 + q) == 0))


@triton.jit
def plan_topk_kernel(
    val_ptr, idx_ptr, f_ptr, g_ptr, scal_ptr, own_ptr, oth_ptr, c_ptr,
    n_own, n_oth, tiles_own, s_fb, s_gb,
    s_ob, s_or, s_ok, s_tb, s_tr, s_tk, s_cb, s_co, s_ct,
    D: tl.constexpr, DP: tl.constexpr, COST: tl.constexpr, EUCLID: tl.constexpr, IP: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, LOWEST: tl.constexpr,
):
    """The ``K`` largest plan entries of each own row (unsorted), with their columns.

    Grid ``(B * tiles_own,)``. ``val_ptr``/``idx_ptr``: ``(B, n_own, K)`` contiguous
    outputs (values ``P_ij``, int64 column indices). ``f_ptr``/``g_ptr``/``scal_ptr``
    and the cost pointers: as in :func:`plan_reduce_kernel`.

    The key of entry ``(i, j)`` is ``log2 P_ij - s F_i = s G_j - s C_ij`` (the row
    constant does not change the order). Each row keeps ``K`` slots (padded to
    ``KP``; the padding holds ``+inf`` so it is never replaced). Per tile, each round
    takes every row's largest remaining key and, if it beats the row's smallest slot,
    overwrites that slot. The rounds needed are the most keys of one row that beat its
    smallest slot at the tile's start, at most ``K`` (a row's keys come in decreasing
    order and the slots' minimum only rises, so this is exact): none once the slots hold
    keys the tile does not beat. A fixed ``K`` rounds cost every tile ``K`` argmax
    reductions (``K = 8`` took 50x a plan-vector product on an H200); on a 4096 x 4096
    cloud (d = 3, 64 x 64 tiles, near-optimal potentials) the tiles need 2.6 rounds on
    average at ``K = 8`` and 6.1 at ``K = 32``, at 16384 x 16384 1.5 and 2.9
    (``bench/topk_rounds.py``). At sm_90 (Triton 3.9) this count compiles without a spill
    in float32, where a ``while`` loop testing after each round spilled 16-24 bytes; in
    float64 at 64 x 64 tiles it still spills 8-64 bytes (the fixed ``K`` rounds: 8-488).

    A zero-weight column (key ``-inf``) is ranked as ``LOWEST`` (the dtype's most
    negative finite value) so it can still fill a slot with a valid index (value 0)
    when a row has fewer than ``K`` positive entries; columns past ``n_oth`` stay
    ``-inf`` and never enter.
    """
    b, offs_i, mask_i, own_ptr, oth_ptr, c_ptr = program_rows(
        tl.program_id(0), tiles_own, n_own, own_ptr, oth_ptr, c_ptr, s_ob, s_tb, s_cb, BLOCK_I)
    f_ptr += b * s_fb
    g_ptr += b * s_gb
    scale = tl.load(scal_ptr)
    own_hi, own_lo, own_sqn = own_block(own_ptr, offs_i, mask_i, s_or, s_ok, DP, COST)

    slot = tl.arange(0, KP)
    dtype = f_ptr.dtype.element_ty
    top = tl.where(slot[None, :] < K, float("-inf"), float("inf")) + tl.zeros((BLOCK_I, KP), dtype=dtype)
    top_idx = tl.zeros((BLOCK_I, KP), dtype=tl.int32)
    col = tl.arange(0, BLOCK_J)
    for j0 in range(0, n_oth, BLOCK_J):
        offs_j = j0 + col
        mask_j = offs_j < n_oth
        C = cost_tile(own_ptr, oth_ptr, c_ptr, own_hi, own_lo, own_sqn, offs_i, offs_j, mask_i, mask_j,
                      s_or, s_ok, s_tr, s_tk, s_co, s_ct, D, DP, COST, EUCLID, IP)
        gs = tl.load(g_ptr + offs_j, mask=mask_j, other=float("-inf")) * scale
        key = tl.where(mask_j[None, :], tl.maximum(gs[None, :] - C * scale, LOWEST), float("-inf"))
        # rounds: the most keys of one row beating its smallest slot, at most K (see above)
        worst = tl.min(top, axis=1)
        rounds = tl.minimum(tl.max(tl.sum((key > worst[:, None]).to(tl.int32), axis=1), axis=0), K)
        for _ in range(rounds):
            best = tl.max(key, axis=1)
            best_j = tl.argmax(key, axis=1)
            worst = tl.min(top, axis=1)
            worst_slot = tl.argmin(top, axis=1)
            hit = (best > worst)[:, None] & (slot[None, :] == worst_slot[:, None])
            top = tl.where(hit, best[:, None], top)
            top_idx = tl.where(hit, (j0 + best_j)[:, None], top_idx)
            key = tl.where(col[None, :] == best_j[:, None], float("-inf"), key)
    fs = tl.load(f_ptr + offs_i, mask=mask_i, other=float("-inf")) * scale
    smask = mask_i[:, None] & (slot[None, :] < K)
    # unstored entries get 2^-inf: the +inf padding never meets F = -inf, nor a large F overflows
    vals = tl.exp2(fs[:, None] + tl.where(smask, top, float("-inf")))
    out = b * n_own * K + offs_i[:, None].to(tl.int64) * K + slot[None, :]
    tl.store(val_ptr + out, vals, mask=smask)
    tl.store(idx_ptr + out, top_idx.to(tl.int64), mask=smask)


@triton.jit
def plan_dense_kernel(
    out_ptr, f_ptr, g_ptr, scal_ptr, own_ptr, oth_ptr, c_ptr,
    n_own, n_oth, tiles_own, j0, s_pb, s_pr, s_fb, s_gb,
    s_ob, s_or, s_ok, s_tb, s_tr, s_tk, s_cb, s_co, s_ct,
    D: tl.constexpr, DP: tl.constexpr, COST: tl.constexpr, EUCLID: tl.constexpr, IP: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Write ``P`` tile ``(own rows of program p, other columns of program q)``.

    Grid ``(B * tiles_own, J)``: program ``(p, q)`` writes column tile ``j0 + q`` (the
    launcher covers ``cdiv(n_oth, BLOCK_J)`` tiles in launches of at most ``GRID_Y_MAX``,
    the CUDA limit of grid axis 1: one launch for m up to 4 million at 64 columns per
    tile); ``out_ptr``: ``(B, n_own, n_oth)`` with strides ``s_pb``, ``s_pr``, 1. Other
    pointers: as in :func:`plan_reduce_kernel`.
    """
    b, offs_i, mask_i, own_ptr, oth_ptr, c_ptr = program_rows(
        tl.program_id(0), tiles_own, n_own, own_ptr, oth_ptr, c_ptr, s_ob, s_tb, s_cb, BLOCK_I)
    offs_j = (j0 + tl.program_id(1)) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < n_oth
    f_ptr += b * s_fb
    g_ptr += b * s_gb
    scale = tl.load(scal_ptr)
    own_hi, own_lo, own_sqn = own_block(own_ptr, offs_i, mask_i, s_or, s_ok, DP, COST)
    C = cost_tile(own_ptr, oth_ptr, c_ptr, own_hi, own_lo, own_sqn, offs_i, offs_j, mask_i, mask_j,
                  s_or, s_ok, s_tr, s_tk, s_co, s_ct, D, DP, COST, EUCLID, IP)
    P = tl.exp2(_log2_plan_tile(f_ptr, g_ptr, scale, C, offs_i, offs_j, mask_i, mask_j))
    ptrs = out_ptr + b * s_pb + offs_i[:, None].to(tl.int64) * s_pr + offs_j[None, :]
    tl.store(ptrs, P, mask=mask_i[:, None] & mask_j[None, :])


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
def value_block(n_val: int) -> int:
    """Value columns per program for ``W @ V``: the accumulator is BLOCK_I x BLOCK_K
    registers, so at most 64 columns (one program per 64 more, each recomputing its
    tile of P, which costs exps but keeps registers bounded); at least 16, the
    smallest tl.dot operand."""
    return min(64, max(16, next_pow2(n_val)))


#: Coordinates per program of the ``diff`` reduction (its tile is BLOCK_I x BLOCK_J x this).
DIFF_BLOCK_K = 4


def reduce_block_sizes(op: CostOperand, has_v: bool, matrix: bool, bk: int,
                       diff: bool = False, with_cost: bool = False) -> tuple[int, int, int]:
    """``(BLOCK_I, BLOCK_J, num_warps)`` for :func:`plan_reduce_kernel` (``bk``: BLOCK_K).

    ``diff`` (``bk`` <= 4): 32 x 32 tiles (16 x 32 in float64) and 8 warps; the sm_90
    cubins for d = 1..8, both costs, then use at most 229 registers (float64: 242) and no
    stack with Triton 3.9 (4 warps spilled at d = 8, 64 x 32 tiles at d = 3).

    Otherwise the softmin tiles (:func:`~otcore.kernels.softmin.block_sizes`), except for values
    (``W V``) next to the d >= 32 own tiles of the dot path (head and tail, ``BLOCK_I x DP``
    each). There 64 x 64 tiles spill (sm_90 cubins at d = 64, Triton 3.9: 120 bytes per
    thread for a vector, 200-576 for 16-64 value columns). Without spills with Triton 3.6
    and 3.9, at d = 32 and 64: 64 x 32 tiles, 4 warps for a vector and 8 for a matrix, and
    32 x 32 for 64 value columns (64 x 32 spilled 32 bytes there with Triton 3.6).

    ``with_cost`` (two tile accumulators, the sums and the cost's) in float64: half the
    rows; 64 x 64 spilled 88 bytes per thread at d = 3 (sm_90, Triton 3.9; 160 registers
    and no spill at 32 x 64).
    """
    bi, bj, warps = block_sizes(op.n_own, op.n_oth, op.mode, op.d)
    if diff:
        return min(bi, 16 if op.ref.dtype == torch.float64 else 32), min(bj, 32), 8
    if with_cost and op.ref.dtype == torch.float64:
        bi = min(bi, 32)
    if has_v and op.mode == COST_DOT and op.d >= 32:
        bj = min(bj, 32)
        if matrix and bk >= 64:
            bi = min(bi, 32)
        warps = 8 if matrix else max(1, min(8, bi * bj // 512))
    return bi, bj, warps


def _value_precision(op: CostOperand) -> str:
    """``W @ V`` on the tensor cores: 3xTF32 keeps float32 accuracy, tf32 in fast mode."""
    if op.ref.dtype == torch.float64:
        return "ieee"
    return "tf32" if op.input_precision == "tf32" else "tf32x3"


def launch_plan_reduce(
    op: CostOperand,
    F_own: torch.Tensor,
    G_oth: torch.Tensor,
    eps: float,
    V: Optional[torch.Tensor] = None,
    with_sum: bool = False,
    weight: int = WEIGHT_P,
    diff: bool = False,
    with_cost: bool = False,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(W V, W 1)`` over the operand's other side, in one streamed pass.

    Args:
        op: the cost seen from the output's side.
        F_own: ``(B, n_own)`` biased potential of the own side; G_oth ``(B, n_oth)``.
        eps: regularization.
        V: None, ``(B, n_oth)`` or ``(B, n_oth, k)`` values on the other side.
        with_sum: also return the row sums ``sum_j W_ij`` ``(B, n_own)``.
        weight: ``WEIGHT_P`` / ``WEIGHT_PC`` / ``WEIGHT_P_OVER_C``.
        diff: instead of ``V``, ``WV[i] = sum_j W_ij (own_i - oth_j)`` ``(B, n_own, d)``,
            each difference formed per entry; needs a ``COST_DIRECT`` point operand and ``V=None``.
        with_cost: instead of ``V``, ``WV[i] = sum_j W_ij C_ij`` ``(B, n_own)``; needs ``V=None``.

    Returns:
        ``(WV or None, W1 or None)``; ``WV`` is ``(B, n_own)`` or ``(B, n_own, k)``.
    """
    ref = op.ref
    dt, dev = ref.dtype, ref.device
    B, n_own, n_oth = op.batch, op.n_own, op.n_oth
    F_own = F_own.to(dt).contiguous()
    G_oth = G_oth.to(dt).contiguous()
    if diff and (V is not None or op.mode != COST_DIRECT or with_cost):
        raise ValueError("diff=True needs V=None, with_cost=False and a COST_DIRECT point operand")
    if with_cost and V is not None:
        raise ValueError("with_cost=True needs V=None (the values are the cost)")
    has_v = V is not None or diff or with_cost
    matrix = diff or (V is not None and V.dim() == 3)
    n_val = op.d if diff else V.shape[2] if matrix else 1
    bk = min(DIFF_BLOCK_K, next_pow2(n_val)) if diff else value_block(n_val) if matrix else 16
    bi, bj, warps = reduce_block_sizes(op, has_v, matrix, bk, diff, with_cost)
    tiles_own = cdiv(n_own, bi)
    if has_v:
        # (diff, with_cost: V is not read; any tensor for the pointer)
        V = op.oth if diff else F_own if with_cost else V.to(dt)
        out_v = torch.empty((B, n_own, n_val) if matrix else (B, n_own), dtype=dt, device=dev)
        vs = (V.stride(0), V.stride(1), V.stride(2) if matrix else 0)
        ovs = (out_v.stride(0), out_v.stride(1))
    else:
        V, out_v, vs, ovs = F_own, None, (0, 0, 0), (0, 0)
    out_s = torch.empty((B, n_own), dtype=dt, device=dev) if with_sum else None
    args = op.pointer_args()
    tiles_val = cdiv(n_val, bk) if matrix else 1
    for q0 in range(0, tiles_val, GRID_Y_MAX):  # (grid axis 1 holds at most GRID_Y_MAX programs)
        plan_reduce_kernel[(B * tiles_own, min(GRID_Y_MAX, tiles_val - q0))](
            out_v if has_v else F_own, out_s if with_sum else F_own, F_own, G_oth, V,
            scalars(eps, dt, dev), *args[:3],
            n_own, n_oth, n_val, tiles_own, q0,
            *ovs, n_own, F_own.stride(0), G_oth.stride(0), *vs, *args[3:],
            **op.constexprs(), BLOCK_I=bi, BLOCK_J=bj, BLOCK_K=bk,
            HAS_V=has_v, V_MATRIX=matrix, WITH_SUM=with_sum, WEIGHT=weight, VIP=_value_precision(op),
            DIFF=diff, V_COST=with_cost, num_warps=warps,
        )
    return out_v, out_s


def launch_plan_topk(op: CostOperand, F_own, G_oth, eps: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest ``P_ij`` per own row, sorted decreasingly: values and
    int64 column indices, each ``(B, n_own, k)``. Needs ``1 <= k <= min(n_oth, TOPK_MAX)``."""
    if not 1 <= k <= op.n_oth:
        raise ValueError(f"k must be in [1, {op.n_oth}] (the number of columns), got {k}")
    if k > TOPK_MAX:
        raise ValueError(f"k must be <= {TOPK_MAX} for the Triton top-k (k selection rounds per tile), got {k}")
    ref = op.ref
    dt, dev = ref.dtype, ref.device
    B, n_own, n_oth = op.batch, op.n_own, op.n_oth
    F_own = F_own.to(dt).contiguous()
    G_oth = G_oth.to(dt).contiguous()
    bi, bj, warps = block_sizes(n_own, n_oth, op.mode, op.d)
    tiles_own = cdiv(n_own, bi)
    vals = torch.empty((B, n_own, k), dtype=dt, device=dev)
    idx = torch.empty((B, n_own, k), dtype=torch.int64, device=dev)
    args = op.pointer_args()
    plan_topk_kernel[(B * tiles_own,)](
        vals, idx, F_own, G_oth, scalars(eps, dt, dev), *args[:3],
        n_own, n_oth, tiles_own, F_own.stride(0), G_oth.stride(0), *args[3:],
        **op.constexprs(), BLOCK_I=bi, BLOCK_J=bj, K=k, KP=next_pow2(k),
        LOWEST=float(torch.finfo(dt).min), num_warps=warps,
    )
    vals, order = torch.sort(vals, dim=-1, descending=True)
    return vals, torch.gather(idx, -1, order)


def launch_plan_dense(op: CostOperand, F_own, G_oth, eps: float) -> torch.Tensor:
    """The dense plan ``(B, n_own, n_oth)`` (an n x m buffer: small problems only)."""
    ref = op.ref
    dt, dev = ref.dtype, ref.device
    B, n_own, n_oth = op.batch, op.n_own, op.n_oth
    F_own = F_own.to(dt).contiguous()
    G_oth = G_oth.to(dt).contiguous()
    bi, bj, warps = block_sizes(n_own, n_oth, op.mode, op.d)
    tiles_own = cdiv(n_own, bi)
    P = torch.empty((B, n_own, n_oth), dtype=dt, device=dev)
    args = op.pointer_args()
    tiles_oth = cdiv(n_oth, bj)
    for j0 in range(0, tiles_oth, GRID_Y_MAX):  # (grid axis 1 holds at most GRID_Y_MAX programs)
        plan_dense_kernel[(B * tiles_own, min(GRID_Y_MAX, tiles_oth - j0))](
            P, F_own, G_oth, scalars(eps, dt, dev), *args[:3],
            n_own, n_oth, tiles_own, j0, P.stride(0), P.stride(1), F_own.stride(0), G_oth.stride(0), *args[3:],
            **op.constexprs(), BLOCK_I=bi, BLOCK_J=bj, num_warps=warps,
        )
    return P
