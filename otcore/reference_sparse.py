"""Pure-torch twins of the sparse-plan (ELL) kernels of :mod:`otcore.kernels.sparse`.

Sinkhorn-Newton-Sparse replaces the plan ``P_ij = exp((F_i + G_j - C_ij)/eps)``
inside its Hessian by a sparse matrix ``S`` holding the ``s`` largest entries of
every row, in ELL format: ``vals`` (B, n, s) and int64 column indices ``idx``
(B, n, s); a zero value marks an unused slot.

- :func:`plan_sparse_rows`: the extraction (the torch version is the blockwise
  ``torch.topk`` of :func:`otcore.reference.plan_topk`).
- :func:`ell_matvec`: ``S v`` and ``S^T u`` by gather / ``scatter_add``.
- :func:`ell_pcg`: Newton's linear system ``[[diag(d_a), S], [S^T, diag(d_b)]] x = r``
  by Jacobi-preconditioned conjugate gradient on those products.
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


def ell_pcg(geom, vals, idx, diag, rhs, inv_diag, rtol, max_iter: int, active, matvec=ell_matvec):
    """Solve, for every problem of the batch, the symmetric positive semi-definite system

        [[diag(d_a), S], [S^T, diag(d_b)]] (x_a, x_b) = (r_a, r_b)

    (``S`` the ELL matrix ``vals``/``idx`` (B, n, s), n x m) by Jacobi-preconditioned
    conjugate gradient (:func:`otcore._cg.pcg`): a problem stops once ``r^T z <= rtol^2
    r_0^T z_0`` (``z = inv_diag * r``), at ``max_iter`` iterations, or at a direction with
    ``p^T K p <= 0``. Sinkhorn-Newton-Sparse's Newton step.

    Args:
        diag, rhs, inv_diag: pairs ``(a-part (B, n), b-part (B, m))``; ``inv_diag`` is the
            preconditioner (``1 / diag``, and 0 for entries left out of the system).
        rtol: float or (B,) tensor. active: (B,) bool; inactive problems get ``x = 0``.
        matvec: the ELL product used (:func:`ell_matvec`, or the Triton one).

    Returns:
        ``((x_a, x_b), its)``, ``its`` (B,) long: the iterations each problem ran.
    """
    n = vals.shape[1]
    da, db = diag

    def apply(p):
        pa, pb = p[:, :n], p[:, n:]
        return torch.cat((da * pa + matvec(geom, vals, idx, pb, 1), db * pb + matvec(geom, vals, idx, pa, 0)), 1)

    x, its = pcg(apply, torch.cat(rhs, 1), rtol, max_iter, inv_diag=torch.cat(inv_diag, 1), active=active)
    return (x[:, :n], x[:, n:]), its


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
