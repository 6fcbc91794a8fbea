"""Pure-torch twins of the k-sparse OT kernels (fallback and test oracle).

Everything here works on *lines* of the cost matrix: the columns ``C[:, j]``
(``axis=0``, lines indexed by ``j``, positions along a line by ``i``) or the rows
``C[i, :]`` (``axis=1``, the transposed / row-sparse variant). For a line ``l``
with potential ``h`` on the positions (``alpha`` over rows for columns, ``beta``
over columns for rows) the scores are ``x_r = h_r - C_rl`` and the line of the plan is

    T_rl = [x_r + beta_l]_+ / gamma   on the k largest x_r of the line, 0 elsewhere.

Two ways to fix the line multiplier ``beta_l``:

- *semi-dual* (``mass`` given): ``beta_l`` makes the line sum exact,
  ``sum_r T_rl = mass_l``. This is the k-sparse simplex projection:
  ``T_:l / mass_l = P_k(x / (gamma mass_l))`` with
  ``P_k(z) = argmin_{p in simplex, |p|_0 <= k} |p - z|^2`` (keep the top k entries,
  project them onto the simplex), and ``-beta_l`` is the projection's threshold
  ``theta = max_r (sum of the r largest x - gamma mass_l) / r`` (r <= k).
- *dual* (``beta`` given): the positive parts of the top k, as in the dual objective.

Per line it also returns ``reg_l = (gamma/2) |T_:l|^2``, so that both objectives read
``<alpha, a> + <beta, b> - sum_l reg_l`` (with the semi-dual's beta).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import reference


class KSparse(NamedTuple):
    """Output of one k-sparse pass over the lines (``L`` lines of length ``N``, ``O`` = the other size).

    beta: (B, L) line multipliers (solved in semi-dual mode, echoed in dual mode).
    reg: (B, L) ``(gamma/2) sum_r T_rl^2``.
    vals: (B, L, k) plan entries ``T_rl`` on the line's support (zeros allowed).
    idx: (B, L, k) int64 positions ``r`` along the line, ascending.
    cost: (B, L, k) ``C_rl`` at those positions.
    line_sum: (B, L) ``sum_r T_rl``.
    cross_sum: (B, N) plan summed over the lines (``T 1`` for columns).
    """

    beta: torch.Tensor
    reg: torch.Tensor
    vals: torch.Tensor
    idx: torch.Tensor
    cost: torch.Tensor
    line_sum: torch.Tensor
    cross_sum: torch.Tensor


def simplex_threshold(u_sorted: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Threshold ``theta`` with ``sum_r [u_r - theta]_+ = budget`` over the given entries.

    ``u_sorted`` (..., k) is sorted in decreasing order, ``budget`` (...) >= 0.
    ``theta = max_r (u_1 + ... + u_r - budget) / r`` (Duchi et al.'s rule: every
    prefix gives a lower bound, the support's prefix attains it). Computed relative
    to the largest entry so that the sums stay well conditioned.
    """
    return threshold_below_top(u_sorted, budget) + u_sorted[..., 0]


def threshold_below_top(u_sorted: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """``theta - u_1`` of :func:`simplex_threshold`, computed without ``u_1``'s magnitude:
    ``[u_r - theta]_+ = [(u_r - u_1) - (theta - u_1)]_+`` keeps the small differences that
    ``u_r - theta`` would cancel when the entries are large against the budget."""
    csum = prefix_sum(u_sorted - u_sorted[..., :1])
    r = torch.arange(1, u_sorted.shape[-1] + 1, dtype=u_sorted.dtype, device=u_sorted.device)
    return ((csum - budget[..., None]) / r).amax(-1)


def prefix_sum(t: torch.Tensor) -> torch.Tensor:
    """``torch.cumsum(t, -1)``, also under ``torch.use_deterministic_algorithms(True)``, where
    torch refuses a floating-point ``cumsum`` on CUDA (its scan's order of additions
    varies): in that mode a log-step scan (Hillis & Steele; ``ceil(log2 k)`` shifted adds in
    a fixed order) runs instead, on every device so that the CPU tests cover it."""
    if not torch.are_deterministic_algorithms_enabled():
        return torch.cumsum(t, dim=-1)
    return log_step_scan(t)


def log_step_scan(t: torch.Tensor) -> torch.Tensor:
    """Inclusive prefix sums along the last dimension by doubling shifts:
    after the step of shift ``h``, entry ``r`` holds the sum of entries ``r-2h+1 .. r``."""
    shift = 1
    while shift < t.shape[-1]:
        t = torch.cat([t[..., :shift], t[..., shift:] + t[..., :-shift]], dim=-1)
        shift *= 2
    return t


def ksparse_simplex(z: torch.Tensor, k: int) -> torch.Tensor:
    """k-sparse projection onto the probability simplex along the last dimension.

    ``P_k(z) = argmin_{p >= 0, sum p = 1, |p|_0 <= k} |p - z|^2``: keep the k largest
    entries of ``z`` and project them onto the simplex (Kyrillidis et al., 2013).
    Returns a tensor of ``z``'s shape. E.g. ``z = [0.5, 0.4, 0.3, -1]``, ``k = 2``
    gives ``[0.55, 0.45, 0, 0]``.
    """
    k = min(k, z.shape[-1])
    u, idx = torch.topk(z, k, dim=-1)
    theta = simplex_threshold(u, torch.ones(z.shape[:-1], dtype=z.dtype, device=z.device))
    p = torch.clamp(u - theta[..., None], min=0)
    return torch.zeros_like(z).scatter(-1, idx, p)


def _line_scores(geom, h: torch.Tensor, axis: int):
    """Yield ``(sl, x, C)`` with lines on dim 1: ``x = h_r - C_rl`` and ``C`` as (B, lines, N).

    Both are the reference's reused work tiles (:func:`otcore.reference._tiles`), valid
    until the next block: the pass allocates its tiles once, not per block."""
    for sl, Cl, Z in reference._tiles(geom, axis, h.dtype, keep_cost=True):
        yield sl, torch.sub(h[:, None, :], Cl, out=Z), Cl


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
    """One pass of the k-sparse plan over every column (``axis=0``) or row (``axis=1``).

    Args:
        geom: the geometry (``C`` is ``(B, n, m)``).
        h: potential on the positions, ``(B, n)`` for ``axis=0``, ``(B, m)`` for ``axis=1``.
        gamma: quadratic regularization (> 0).
        k: support size per line, ``1 <= k <= N`` (``N`` = line length).
        axis: 0 = columns are k-sparse, 1 = rows are k-sparse.
        mass: (B, L) line sums (semi-dual mode), or None.
        beta: (B, L) line multipliers (dual mode), or None. Exactly one of the two.
        precision: accepted for interface parity; the torch path is exact in its dtype.

    Returns:
        :class:`KSparse` (see the module docstring for the math).
    """
    if (mass is None) == (beta is None):
        raise ValueError("exactly one of mass (semi-dual) and beta (dual) must be given")
    # Outputs and the tile-sized temporaries allocated once per pass, written block by block:
    # per-block allocations fragmented glibc's heap (a 20,000 x 20,000 pass grew by 2.2 GiB,
    # past the dense cost, in 1 to 4 of 5 fresh runs; a review), as reference._tiles' tiles once did
    B, L = geom.batch, geom.m if axis == 0 else geom.n
    scratch = _Scratch()
    beta_o = reg = vals = idx = cost = None
    for sl, x, Cl in _line_scores(geom, h, axis):
        if vals is None:  # (the cost in its own dtype: a wider h than the geometry promotes x, not C; a review)
            dt, dev = x.dtype, x.device
            beta_o, reg = torch.empty(B, L, dtype=dt, device=dev), torch.empty(B, L, dtype=dt, device=dev)
            vals, cost = torch.empty(B, L, k, dtype=dt, device=dev), torch.empty(B, L, k, dtype=Cl.dtype, device=dev)
            idx = torch.empty(B, L, k, dtype=torch.int64, device=dev)
        if k == x.shape[2]:  # every position kept (k = line length): no selection, one sort for the threshold
            u = torch.sort(x, dim=2, descending=True, out=scratch.tile(x, "sorted", "order")).values
            ix = torch.arange(k, device=x.device).expand(x.shape)
            xs = x
            cost[:, sl] = Cl
        else:
            u, ix = torch.topk(x, k, dim=2, out=scratch.lines(x, k, "u", "ix"))  # sorted, largest first
            ix = top_positions(x, u, ix, scratch)  # canonical layout: positions ascending within each line
            xs = torch.gather(x, 2, ix)
            torch.gather(Cl, 2, ix, out=cost[:, sl])
        if mass is not None:  # relative to the line's top score (large scores, small gamma * mass)
            rel = threshold_below_top(u, gamma * mass[:, sl])
            bl = -(rel + u[..., 0])
            excess = torch.clamp((xs - u[..., :1]) - rel[..., None], min=0)
        else:
            bl = beta[:, sl].to(torch.promote_types(beta.dtype, x.dtype))  # (fp16/bf16: echoed in x's dtype)
            excess = torch.clamp(xs + bl[..., None], min=0)
        T = torch.div(excess, gamma, out=vals[:, sl])
        beta_o[:, sl] = bl
        # (gamma/2) T^2 as excess * T / 2: T^2 alone under- or overflows float32 at masses ~1e-23 or ~1e19
        reg[:, sl] = 0.5 * (excess * T).sum(2)
        idx[:, sl] = ix
    return KSparse(beta_o, reg, vals, idx, cost, vals.sum(2), cross_sum(vals, idx, h.shape[1]))


class _Scratch:
    """Work buffers of one pass, allocated at its first (largest) block; a smaller block
    takes a contiguous view of the front of each."""

    def __init__(self):
        self.bufs: dict = {}

    def _get(self, name: str, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        size, buf = math.prod(shape), self.bufs.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < size:
            buf = self.bufs[name] = torch.empty(size, dtype=dtype, device=device)
        return buf[:size].view(shape)

    def like(self, x: torch.Tensor, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A tile of ``x``'s shape, in ``dtype`` (``x``'s by default)."""
        return self._get(name, tuple(x.shape), dtype or x.dtype, x.device)

    def tile(self, x: torch.Tensor, values: str, order: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, int64 positions)`` of ``x``'s shape, for ``torch.sort(..., out=)``."""
        return self.like(x, values), self.like(x, order, torch.int64)

    def lines(self, x: torch.Tensor, k: int, values: str, order: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, int64 positions)`` of ``k`` per line of ``x``, for ``torch.topk(..., out=)``."""
        shape = (*x.shape[:-1], k)
        return self._get(values, shape, x.dtype, x.device), self._get(order, shape, torch.int64, x.device)


def top_positions(x: torch.Tensor, u: torch.Tensor, ix: torch.Tensor, scratch: Optional[_Scratch] = None) -> torch.Tensor:
    """Positions of the ``k`` largest entries of each line of ``x`` (..., N), ascending, from
    ``torch.topk``'s values ``u`` and positions ``ix`` (..., k): every entry above the k-th
    largest value, then of the entries equal to it the first in position order, as the
    kernel takes them. ``torch.topk``'s choice among ties is unspecified, and tied scores are
    common (duplicated points, padding tokens, a gate at 0). On a CPU the tie-break runs
    only where a tie straddles the k-th place (a check without cost there); on a GPU always
    (a check would be a host sync)."""
    k, N = u.shape[-1], x.shape[-1]
    scratch = scratch or _Scratch()
    kth = u[..., -1:]
    tied = torch.eq(x, kth, out=scratch.like(x, "tied", torch.bool))
    if not x.is_cuda and not bool((tied.sum(-1) > (u == kth).sum(-1)).any()):
        return ix.sort(dim=-1).values  # no tie left out: topk's set is the only one
    # a NaN score ranks above every number, as in torch.topk and the kernel (which reads it
    # as +inf): "not <= kth" holds for it, where "> kth" had dropped it and taken a padding
    # position instead (seen on an H200, where this path always runs). A NaN k-th value (k
    # NaNs or more) compares as +inf, so the first k NaN positions are taken, as there.
    kth = torch.where(kth.isnan(), float("inf"), kth)
    above = torch.le(x, kth, out=scratch.like(x, "above", torch.bool)).logical_not_()
    need = k - above.sum(-1, keepdim=True)
    rank = torch.cumsum(tied, -1, dtype=torch.int32, out=scratch.like(x, "rank", torch.int32))
    within = torch.le(rank, need, out=scratch.like(x, "within", torch.bool))
    take = above.logical_or_(within.logical_and_(tied))  # exactly k per line (in above's buffer)
    # the k taken positions have the k largest keys N - position, all distinct: largest key first
    # is smallest position first
    key = torch.mul(take, N - torch.arange(N, device=x.device, dtype=torch.int32), out=rank)
    return torch.topk(key, k, dim=-1).indices


def cross_sum(vals: torch.Tensor, idx: torch.Tensor, size: int) -> torch.Tensor:
    """Plan summed over the lines: ``out[b, r] = sum_{l, s: idx[b,l,s] = r} vals[b, l, s]``, (B, size)."""
    B = vals.shape[0]
    out = torch.zeros(B, size, dtype=vals.dtype, device=vals.device)
    return out.scatter_add_(1, idx.reshape(B, -1), vals.reshape(B, -1))


def sparse_cost_grad(geom, W: torch.Tensor, idx: torch.Tensor, axis: int) -> tuple[torch.Tensor, ...]:
    """Gradient of ``sum_{l,s} W_ls C(pos=idx_ls, line=l)`` with respect to the geometry's inputs.

    ``W`` and ``idx`` are (B, L, k) in the layout of :class:`KSparse`. Returns, like
    ``geom.inputs()``: ``(dC,)`` (a dense (B, n, m) tensor, nonzero on the support) for
    a cost matrix; ``(gx, gy)`` (B, n, d), (B, m, d) for point clouds, with
    ``dC_ij/dx_i = 2 (x_i - y_j)`` (squared Euclidean) or ``(x_i - y_j)/|x_i - y_j|``
    (Euclidean, 0 where the points coincide) and ``dC_ij/dy_j = -dC_ij/dx_i``.
    A gather/scatter over the B*L*k support entries (no n x m work for point clouds).
    """
    B, L, k = W.shape
    if geom.is_dense:
        G = torch.zeros(B, geom.n, geom.m, dtype=W.dtype, device=W.device)
        if axis == 0:
            return (G.scatter_add_(1, idx.transpose(1, 2), W.transpose(1, 2)),)
        return (G.scatter_add_(2, idx, W),)
    pos_pts, line_pts = (geom.x, geom.y) if axis == 0 else (geom.y, geom.x)
    d = pos_pts.shape[-1]
    P = torch.gather(pos_pts, 1, idx.reshape(B, L * k, 1).expand(B, L * k, d)).reshape(B, L, k, d)
    diff = P - line_pts[:, :, None, :]  # (position point) - (line point)
    if geom.cost == "sqeuclidean":
        dpos = 2 * diff
    else:
        nrm = diff.norm(dim=-1, keepdim=True)
        dpos = torch.where(nrm > 0, diff / torch.where(nrm > 0, nrm, torch.ones_like(nrm)), torch.zeros_like(diff))
    dpos = dpos * W[..., None]
    g_line = -dpos.sum(2)
    g_pos = torch.zeros_like(pos_pts).scatter_add_(1, idx.reshape(B, L * k, 1).expand(B, L * k, d), dpos.reshape(B, L * k, d))
    return (g_pos, g_line) if axis == 0 else (g_line, g_pos)
