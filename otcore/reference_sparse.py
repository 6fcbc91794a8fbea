"""Pure-torch twins of the sparse-plan (ELL) kernels of :mod:`otcore.kernels.sparse`.

Sinkhorn-Newton-Sparse replaces the plan ``P_ij = exp((F_i + G_j - C_ij)/eps)``
inside its Hessian by a sparse matrix ``S`` holding the ``s`` largest entries of
every row, in ELL format: ``vals`` (B, n, s) and int64 column indices ``idx``
(B, n, s); a zero value marks an unused slot.

- :func:`plan_sparse_rows`: the extraction (the torch version is the blockwise
  ``torch.topk`` of :func:`otcore.reference.plan_topk`).
- :func:`ell_matvec`: ``S v`` and ``S^T u`` by gather / ``scatter_add``.
- :func:`ell_pcg`: Newton's linear system ``[[diag(d_a), S], [S^T, diag(d_b)]] x = r``
  by conjugate gradient on its Schur complement, with those products.
- :func:`ell_to_csr`: the same matrix as a ``torch.sparse_csr_tensor`` (the
  independent reference the tests compare both implementations with; on CPU
  torch's CSR product is far slower than the gather, so the solver does not use it).

The geometry dispatches to these twins or to the Triton kernels (:mod:`otcore._dispatch`).
"""

from __future__ import annotations

import torch

from . import reference
from ._cg import pcg


def plan_sparse_rows(geom, F, G, eps: float, s: int, precision: str = "fp32"):
    """The ``s`` largest entries of each row of ``P`` in ELL form.

    Args:
        F: (B, n), G: (B, m) biased potentials (``F = f + eps log a``).
        s: entries kept per row, ``1 <= s <= m``.

    Returns:
        ``vals`` (B, n, s), ``P_{i, idx[i, k]}`` in decreasing order along ``k``,
        and ``idx`` (B, n, s) int64 column indices. Streamed over row blocks: no
        ``n x m`` buffer for point clouds.
    """
    return reference.plan_topk(geom, F, G, eps, s, precision=precision)


def ell_matvec(geom, vals: torch.Tensor, idx: torch.Tensor, v: torch.Tensor, axis: int) -> torch.Tensor:
    """Product with the ELL matrix ``S`` (B, n, m) given by ``vals``/``idx`` (B, n, s).

    ``axis=1``: ``(S v)_i = sum_k vals_ik v_{idx_ik}``, v (B, m) -> (B, n).
    ``axis=0``: ``(S^T u)_j = sum_{(i,k): idx_ik = j} vals_ik u_i``, u (B, n) -> (B, m).
    """
    B, n, s = vals.shape
    v = v.to(vals.dtype)
    if axis == 1:
        return (vals * torch.gather(v, 1, idx.reshape(B, n * s)).reshape(B, n, s)).sum(2)
    out = torch.zeros(B, geom.m, dtype=vals.dtype, device=vals.device)
    # empty slots (value 0) add nothing, even where u is not finite (as in the kernel)
    terms = torch.where(vals != 0, vals * v[:, :, None], 0.0)
    return out.scatter_add_(1, idx.reshape(B, n * s), terms.reshape(B, n * s))


def ell_pcg(geom, vals, idx, diag, rhs, inv_diag, rtol, max_iter: int, active):
    """Solve, for every problem of the batch, the symmetric positive semi-definite system

        [[diag(d_a), S], [S^T, diag(d_b)]] (x_a, x_b) = (r_a, r_b)

    (``S`` the ELL matrix ``vals``/``idx`` (B, n, s), n x m) through the Schur complement of
    its ``b`` block: ``x_b = (r_b - S^T x_a) / d_b`` eliminated,

        K x_a = r_a - S (r_b / d_b),    K = diag(d_a) - S diag(1/d_b) S^T,

    by conjugate gradient (:func:`otcore._cg.pcg`) preconditioned by ``K``'s diagonal
    ``d_a,i - sum_k S_ik^2 / d_b,idx_ik``. An iteration costs what one of the whole system
    costs (a product with ``S^T`` and one with ``S``), and on SNS's Newton systems they took
    1.8-18x fewer (float64, to the same residual: 191 -> 106 on a 2048-point cloud at
    eps 1e-3, 558 -> 31 on the 500-point random assignment, 820 -> 458 on 8 x 8 digits):
    with the diagonals scaled to 1 the whole system's eigenvalues are ``1 +- sigma``
    (``sigma`` the scaled ``S``'s singular values), paired around 1, where ``K``'s are
    ``1 - sigma^2``. A problem stops once ``rho^T z <= rtol^2 rho_0^T z_0`` (``rho`` the
    residual of ``K``'s system, which is the whole system's: its ``b`` part is 0; ``z`` the
    preconditioned residual), at ``max_iter`` iterations, or at a direction with
    ``p^T K p <= 0`` (rounding where ``K`` is singular, or not finite).

    Args:
        diag, rhs: pairs ``(a-part (B, n), b-part (B, m))``.
        inv_diag: the same pair: 0 for the entries left out of the system (zero weights:
            their solution is 0), else ``1 / diag`` (its values are not used: the
            preconditioner is the Schur complement's diagonal, the elimination divides by
            ``d_b``).
        rtol: float or (B,) tensor. active: (B,) bool; inactive problems get ``x = 0``.

    Returns:
        ``((x_a, x_b), its)``, ``its`` (B,) long: the iterations each problem ran.
    """
    B, n, s = vals.shape
    da = diag[0]
    ia = inv_diag[0]
    kept = inv_diag[1] != 0  # the b side's entries in the system (a left-out one's rhs, even NaN, plays no part)
    ib = torch.where(kept, 1 / torch.where(kept, diag[1], 1.0), 0.0)  # the system's own 1 / d_b
    sq = (vals * vals * torch.gather(ib, 1, idx.reshape(B, n * s)).reshape(B, n, s)).sum(2)
    pre = schur_preconditioner(da, sq, ia)

    def apply(p):
        return da * p - ell_matvec(geom, vals, idx, ib * ell_matvec(geom, vals, idx, p, 0), 1)

    reduced = rhs[0] - ell_matvec(geom, vals, idx, torch.where(kept, ib * rhs[1], 0.0), 1)
    xa, its = pcg(apply, reduced, rtol, max_iter, inv_diag=pre, active=active)
    xb = torch.where(kept, ib * (rhs[1] - ell_matvec(geom, vals, idx, xa, 0)), 0.0)
    if active is not None:
        xb = torch.where(active[:, None], xb, 0.0)
    return (xa, xb), its


def floor_factor(dtype: torch.dtype) -> float:
    """The Schur complement's diagonal is floored at this times ``|d_a|`` (64 rounding units)."""
    return 64 * torch.finfo(dtype).eps


def least_invertible(dtype: torch.dtype) -> float:
    """``1 / max``: the smallest positive number whose inverse the dtype holds (a subnormal's
    overflows to inf)."""
    return 1 / torch.finfo(dtype).max


def schur_preconditioner(da: torch.Tensor, sq: torch.Tensor, ia: torch.Tensor) -> torch.Tensor:
    """``1 / (d_a - sq)``, the Schur complement's Jacobi preconditioner (``sq`` (B, n) the
    rows' ``sum_k S_ik^2 / d_b``), 0 where ``ia`` leaves an entry out or it is not positive.
    The complement's diagonal is ``>= lam r_i`` for a damped Newton system (``d_a`` the row
    sums of ``S`` and more, times ``1 + lam``); it is floored at :func:`floor_factor`
    ``|d_a|``: as a difference of near-equal terms it can round to 0 or below. (A NaN stays
    NaN and gets 0, as in the kernel.) A ``k`` whose inverse the dtype cannot hold (a row of
    subnormal mass: a weight of 1e-310 in float64) gets 0 too, the row left out of the step:
    its inf had made ``<r, pre r>`` inf, and the whole problem's Newton step 0 (100 steps
    unconverged where exact zeros converged in 21, a review)."""
    k = da - sq
    floor = floor_factor(da.dtype) * da.abs()
    k = torch.where(k < floor, floor, k)
    ok = (ia != 0) & (k >= least_invertible(k.dtype))  # (k > 0 and 1 / k finite)
    return torch.where(ok, 1 / torch.where(ok, k, 1.0), 0.0)


def ell_to_csr(vals: torch.Tensor, idx: torch.Tensor, m: int, transpose: bool = False) -> torch.Tensor:
    """The batch of ELL matrices as one block-diagonal CSR matrix.

    Returns a sparse CSR tensor of size (B n, B m) (``S``), or (B m, B n)
    (``S^T``) with ``transpose=True``; repeated indices in a row are summed; so
    ``(csr @ v.reshape(-1, 1)).reshape(B, -1)`` is :func:`ell_matvec`.
    """
    B, n, s = vals.shape
    cols = (idx + m * torch.arange(B, device=idx.device)[:, None, None]).reshape(-1)
    rows = torch.arange(B * n, device=idx.device).repeat_interleave(s)
    ij, size = (torch.stack([cols, rows]), (B * m, B * n)) if transpose else (torch.stack([rows, cols]), (B * n, B * m))
    # COO first: CSR wants sorted, distinct columns per row, and ELL rows may repeat one
    coo = torch.sparse_coo_tensor(ij, vals.reshape(-1), size, check_invariants=True)
    return coo.coalesce().to_sparse_csr()
