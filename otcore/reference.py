"""Pure-torch implementation of every geometry primitive (fallback and test oracle).

All functions are batched: potentials are ``(B, n)`` / ``(B, m)``. Costs of at
most ``BLOCK_ELEMENTS`` entries in all are read whole from ``geom.cost_block()``
(which a :class:`~otcore.geometry.PointCloud` then caches); larger point clouds
are streamed: their cost is computed tile by tile, never as an ``n x m`` buffer.

Notation: ``F = f + eps*log(a)`` and ``G = g + eps*log(b)`` are the *biased*
potentials, so that the plan is ``P_ij = exp((F_i + G_j - C_ij) / eps)``.
Zero weights give ``-inf`` biases and therefore zero rows/columns of ``P``.

Allocation-lean: one call allocates its work tiles (two or three, of
``TILE_ELEMENTS`` entries on the CPU, see :func:`_tile_elements`) once and
reuses them for every block, with in-place ops (``out=``, ``sub_``, ``exp2_``,
...); per block only ``O(lines)`` vectors are allocated. Exponentials are taken in base 2
(``exp2`` is several times faster than ``exp`` on the CPU): a block holds
``k (F_i + G_j - C_ij)`` with ``k = log2(e) / eps``.

These functions work on detached tensors (the solvers' potentials, the
geometry's points); gradients come from :func:`plan_cost_grad` and
:mod:`otcore.autograd`, not from autograd through them.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch

from . import _validate

#: Largest cost materialised at once, per call (all problems of the batch together):
#: 4M entries, 16 MB in float32. A point cloud whose whole cost fits is computed once
#: and cached by the geometry (``geom.cost_block()``); a larger one is streamed in tiles.
#: Tests shrink it to force many blocks.
BLOCK_ELEMENTS = 1 << 22

#: Entries per work tile on the CPU (capped by ``BLOCK_ELEMENTS``): 1M entries, 4 MB in
#: float32, so that the ~10 elementwise passes over a tile run in the cache rather than
#: in main memory. Measured at n = m = 20,000, d = 3, float32, one thread: 0.9 s per
#: Sinkhorn iteration at 1M (about the same at 512K), +15% at 256K, +25% at 2M, x2 at
#: 4M. A call allocates its tiles once, so they cannot fragment the heap the way fresh
#: block-sized temporaries did (tests/test_memory.py).
TILE_ELEMENTS = 1 << 20

_LOG2E = 1.0 / math.log(2.0)


# ----------------------------------------------------------------------------- streaming
def _tile_elements(device: torch.device) -> int:
    """Entries per work tile. CPU: ``TILE_ELEMENTS``, small enough to stay in cache.
    Other devices: ``BLOCK_ELEMENTS``, since each of a tile's ~10 ops is a kernel launch
    and a GPU's memory bandwidth, not its cache, sets the pace."""
    return min(TILE_ELEMENTS, BLOCK_ELEMENTS) if device.type == "cpu" else BLOCK_ELEMENTS


def _is_streamed(geom) -> bool:
    """A point cloud whose cost is too large to hold (and for the geometry to cache)."""
    return not geom.is_dense and geom.batch * geom.n * geom.m > BLOCK_ELEMENTS


def _tiles(
    geom, axis: int, dtype: torch.dtype, keep_cost: bool = False
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Yield ``(sl, C, Z)`` covering the cost, with the *lines* on dim 1.

    ``axis=1``: lines are rows, ``C = C[:, sl, :]`` (B, r, m).
    ``axis=0``: lines are columns, ``C = C[:, :, sl]^T`` (B, c, n).
    So a reduction over the other index is always over dim 2.

    ``Z`` is a work tile of ``C``'s shape, reused from block to block, for the
    caller to overwrite (e.g. ``torch.sub(h, C, alpha=k, out=Z)``). A streamed
    ``C`` is itself a reused tile and may *be* ``Z`` (same memory) unless
    ``keep_cost``; a held cost (a cost matrix, or a point cloud small enough for
    the geometry to cache) is a view, never written to. Both are only valid until
    the next block. The tiles are in ``dtype`` (the potentials' type promoted with
    the geometry's).
    """
    B = geom.batch
    lines, other = (geom.n, geom.m) if axis == 1 else (geom.m, geom.n)
    step = min(lines, max(1, _tile_elements(geom.device) // max(1, B * other)))
    work = torch.empty(B, step, other, dtype=torch.promote_types(dtype, geom.dtype), device=geom.device)
    if not _is_streamed(geom):
        C = geom.cost_block()
        C = C if axis == 1 else C.transpose(1, 2)
        for s in range(0, lines, step):
            sl = slice(s, min(lines, s + step))
            yield sl, C[:, sl], work[:, : sl.stop - s]
        return
    P, Q = (geom.x, geom.y) if axis == 1 else (geom.y, geom.x)
    Qt = Q.transpose(1, 2).contiguous()[:, :, None, :]  # (B, d, 1, other): Qt[:, k] is coordinate k, unit stride
    diff = torch.empty_like(work)
    cost = torch.empty_like(work) if keep_cost else work
    for s in range(0, lines, step):
        sl = slice(s, min(lines, s + step))
        r = sl.stop - s
        _cost_into(P[:, sl], Qt, geom.cost, cost[:, :r], diff[:, :r])
        yield sl, cost[:, :r], work[:, :r]


def _cost_into(Pb: torch.Tensor, Qt: torch.Tensor, cost: str, out: torch.Tensor, diff: torch.Tensor) -> None:
    """``out[b, i, j] = C(Pb[b, i], Q[b, j])`` from explicit coordinate differences.

    Like ``geometry.PointCloud.cost_block`` (``cdist`` without the ``|p|^2 + |q|^2 - 2pq``
    expansion), the differences are taken first, so far-from-origin coordinates keep
    full relative accuracy; the squares are then summed in place, one coordinate at
    a time (``diff`` is scratch of ``out``'s shape).
    """
    for k in range(Pb.shape[-1]):
        torch.sub(Pb[:, :, k, None], Qt[:, k], out=diff)
        if k == 0:
            torch.mul(diff, diff, out=out)
        else:
            out.addcmul_(diff, diff)
    if cost == "euclidean":
        out.sqrt_()


def _log2_plan_(Z: torch.Tensor, C: torch.Tensor, Fk_lines: torch.Tensor, Gk_other: torch.Tensor, k: float):
    """``Z = k (F_i + G_j - C_ij)`` on a lines-first block, in place; returns ``Z``.

    ``Fk_lines`` (B, lines) and ``Gk_other`` (B, other) are the potentials of the
    block's lines and of the other side, already multiplied by ``k``.
    """
    torch.sub(Gk_other[:, None, :], C, alpha=k, out=Z)
    return Z.add_(Fk_lines[:, :, None])


def scaled_potentials(geom, F: torch.Tensor, G: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F k, G k)`` in the compute dtype (the geometry's, widened to the potentials' if
    theirs is wider), as :func:`softmin` reads ``h``: fp16 potentials scaled in fp16 put the
    plan operations 66% off where the kernels, reading them in float32, kept 1e-3 (a review)."""
    dt = torch.promote_types(torch.promote_types(F.dtype, G.dtype), geom.dtype)
    return F.to(dt) * k, G.to(dt) * k


def sides(F: torch.Tensor, G: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(potential of the lines, potential of the other side) for a pass along ``axis``."""
    return (F, G) if axis == 1 else (G, F)


# ----------------------------------------------------------------------------- primitives
def softmin(geom, h: torch.Tensor, eps: float, axis: int, precision: str = "fp32",
            hint: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Soft minimum of the cost, shifted by ``h``.

    ``axis=1``: ``out_i = -eps * log sum_j exp((h_j - C_ij) / eps)``, h (B,m) -> (B,n).
    ``axis=0``: ``out_j = -eps * log sum_i exp((h_i - C_ij) / eps)``, h (B,n) -> (B,m).
    With ``h = g + eps*log b`` the first is the Sinkhorn update of ``f``.
    Computed as ``-eps ln2 (M + log2 sum 2^(Z - M))`` with ``Z = k (h - C)``,
    ``k = log2(e)/eps`` and ``M`` the line maximum; a line whose ``h`` is all
    ``-inf`` gives ``+inf``. ``hint`` (an estimate of the output, which the Triton
    kernel uses as its shift) is accepted and not needed: ``M`` is exact here.
    """
    dt = torch.promote_types(h.dtype, geom.dtype)
    # h in the compute dtype first (as the kernel reads it): an fp16 h times k = log2(e)/eps
    # overflowed at |h| ~ 1e3, eps = 0.01, and lost 5e-4 at |h| ~ 1, where the kernel kept 2e-7
    h = h.to(dt)
    k = _LOG2E / eps
    hk = h * k
    lowest = torch.finfo(dt).min
    out = torch.empty(geom.batch, geom.n if axis == 1 else geom.m, dtype=dt, device=h.device)
    for sl, C, Z in _tiles(geom, axis, h.dtype):
        torch.sub(hk[:, None, :], C, alpha=k, out=Z)
        mx = Z.amax(2, keepdim=True).clamp_(min=lowest)  # an all -inf line: sum 0, log -inf
        s = Z.sub_(mx).exp2_().sum(2)
        out[:, sl] = s.log2_().add_(mx[..., 0])
    return out.mul_(-eps * math.log(2.0))


def softmin_update(geom, h: torch.Tensor, bias: torch.Tensor, eps: float, axis: int, prev: torch.Tensor,
                   active: torch.Tensor, tau: float, average: bool = False, precision: str = "fp32",
                   softmin=softmin, omega: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One Sinkhorn half-step of the potential ``prev`` on the ``axis`` side, (B,n) or (B,m):

        s = softmin(h + eps bias)                   (:func:`softmin`; ``bias`` = log b)
        prev <- tau s                               (alternating update)
        prev <- (prev + tau s) / 2                  (``average``: the symmetric update)
        prev <- (1 - omega) prev + omega tau s      (``omega`` (B,): over-relaxed)

    for the problems whose ``active`` (B,) entry is True; the others keep ``prev``.
    ``softmin`` is the pass used, given ``unscaled(prev, tau)`` (the softmin that gave
    ``prev``) as its hint; the Triton backend's op while ``torch.compile`` traces. The
    Triton backend otherwise runs it all in the softmin pass's launch
    (:func:`otcore.kernels.softmin.launch_softmin`).
    """
    s = softmin(geom, h + eps * bias, eps, axis, precision=precision, hint=unscaled(prev, tau))
    if average:
        new = 0.5 * (prev + scaled(s, tau))
    elif omega is not None:
        w = omega.to(prev.dtype)[:, None]
        new = (1.0 - w) * prev + w * scaled(s, tau)
    else:
        new = scaled(s, tau)
    return torch.where(active[:, None], new, prev)


def sinkhorn_steps(
    geom, f, g, loga, logb, eps: float, tau: tuple[float, float], k: int, active: torch.Tensor,
    symmetric: bool = False, check=None, precision: str = "fp32", softmin=softmin, update=softmin_update,
    omega: Optional[torch.Tensor] = None,
):
    """``k`` Sinkhorn iterations at one ``eps``: new potentials ``(f, g)``, (B,n) and (B,m).

    Each iteration is two :func:`softmin` passes,
    ``f <- tau_a softmin_j(g + eps log b)`` then ``g <- tau_b softmin_i(f + eps log a)``,
    with ``tau = (tau_a, tau_b)`` (``rho / (rho + eps)`` for a KL-relaxed side, 1 for an
    exact one); ``symmetric`` (self-transport: ``f = g`` at the optimum) runs the averaged
    ``f <- (f + tau_a softmin(f + eps log a)) / 2`` instead, ``g = f``, one pass each.
    Problems whose ``active`` (B,) entry is False keep their potentials.

    ``check = (tol, rho_a)`` adds the convergence test: the row pass of one more
    iteration, ``s``, gives each problem's marginal residual after the ``k``,

        r = sides * sum_i a_i |exp((f_i - s_i)/eps) - t_i|

    with ``(P1)_i / a_i = exp((f_i - s_i)/eps)``, ``t = 1`` (balanced) or ``exp(-f/rho_a)``
    (KL-relaxed), ``sides = 2`` in the symmetric iteration (both marginals agree) and 1
    otherwise (the column update makes the column residual zero). Problems with
    ``r > tol`` then complete that iteration (``k + 1`` in all), the others stop after
    ``k``. Returns ``(f, g, r)``, ``r`` (B,) (NaN where not active). The test costs no
    pass: the row pass is the next iteration's.

    ``omega`` (B,), alternating updates only: the first ``k - 1`` iterations are
    over-relaxed, ``f <- (1 - omega) f + omega tau_a softmin(...)`` (likewise ``g``); the
    ``k``-th is plain, so the column marginals hold exactly again when the test reads the
    row residual.

    Each pass gets the previous one's output as ``hint`` (:func:`unscaled`). ``softmin``
    and ``update`` (:func:`softmin_update`) are the passes used (both of one backend), this
    module's by default; the Triton backend hands in its kernels for problems too large for
    :mod:`otcore.kernels.sinkhorn_steps`. The passes other than the test's are
    ``update`` calls: one launch each there.
    """
    tau_a, tau_b = tau
    resid = None
    # the updates take log a, log b as their bias (the Triton pass adds eps times it as it reads
    # h, so a block costs no operation per eps: the eps-scaling stages are one-iteration blocks)
    kw = dict(precision=precision)
    if omega is not None and symmetric:
        raise ValueError("omega (over-relaxation) is for the alternating updates, not the symmetric one")
    for i in range(k + (check is not None)):
        relax = dict(omega=omega) if omega is not None and i < k - 1 else {}
        if i < k:
            if symmetric:
                f = update(geom, f, loga, eps, 1, f, active, tau_a, True, **kw)
                if i == k - 1:  # g = f (g is not read before), but an inactive problem keeps its own g
                    g = torch.where(active[:, None], f, g)
                continue
            f = update(geom, g, logb, eps, 1, f, active, tau_a, **kw, **relax)
        else:  # the convergence test, from this iteration's row pass
            h = (f + eps * loga) if symmetric else (g + eps * logb)
            s = softmin(geom, h, eps, 1, hint=unscaled(f, tau_a), **kw)
            tol, rho_a = check
            a = torch.exp(loga)
            target = 1.0 if rho_a is None else torch.exp(-f / rho_a)
            gap = torch.where(a > 0, a * (torch.exp((f - s) / eps) - target).abs(), 0.0)
            resid = torch.where(active, (2 if symmetric else 1) * gap.sum(-1), float("nan"))
            active = active & (resid > tol)  # NaN (a failed problem) stops too
            if symmetric:
                new = 0.5 * (f + scaled(s, tau_a))
                f, g = torch.where(active[:, None], new, f), torch.where(active[:, None], new, g)
                continue
            f = torch.where(active[:, None], scaled(s, tau_a), f)
        g = update(geom, f, loga, eps, 0, g, active, tau_b, **kw, **relax)
    return (f, g) if check is None else (f, g, resid)


def damping(rho: Optional[float], eps: float) -> float:
    """``tau = rho / (rho + eps)`` of a KL-relaxed marginal's update ``f <- tau softmin``; 1
    for a balanced one (``rho`` None)."""
    return 1.0 if rho is None else rho / (rho + eps)


def scaled(s: torch.Tensor, tau: float) -> torch.Tensor:
    """``tau * s``, without a launch when ``tau`` is 1 (a balanced side)."""
    return s if tau == 1.0 else tau * s


def unscaled(f: torch.Tensor, tau: float) -> torch.Tensor:
    """``f / tau``: the softmin that gave the potential ``f = tau * softmin`` last
    iteration, an estimate of the next one (the kernel's shift, see :func:`softmin`)."""
    return f if tau == 1.0 else f / tau


def apply_plan(geom, F, G, eps: float, v: torch.Tensor, axis: int, precision: str = "fp32") -> torch.Tensor:
    """``axis=1``: ``(P v)_i = sum_j P_ij v_j`` with v (B,m) or (B,m,k) -> (B,n[,k]).
    ``axis=0``: ``(P^T u)_j = sum_i P_ij u_i`` with u (B,n) or (B,n,k) -> (B,m[,k])."""
    vec = v.dim() == 2
    k = _LOG2E / eps
    Fl, Go = sides(*scaled_potentials(geom, F, G, k), axis)
    V = (v[..., None] if vec else v).to(Fl.dtype)  # (a float64 v on float32 potentials was a RuntimeError)
    out = torch.empty(geom.batch, Fl.shape[1], V.shape[2], dtype=V.dtype, device=V.device)
    for sl, C, Z in _tiles(geom, axis, Fl.dtype):
        out[:, sl] = _log2_plan_(Z, C, Fl[:, sl], Go, k).exp2_() @ V
    return out[..., 0] if vec else out


def marginals(geom, F, G, eps: float, axis: int, precision: str = "fp32") -> torch.Tensor:
    """``axis=1``: row sums ``P 1`` (B,n); ``axis=0``: column sums ``P^T 1`` (B,m)."""
    k = _LOG2E / eps
    Fl, Go = sides(*scaled_potentials(geom, F, G, k), axis)
    out = torch.empty_like(Fl)
    for sl, C, Z in _tiles(geom, axis, Fl.dtype):
        out[:, sl] = _log2_plan_(Z, C, Fl[:, sl], Go, k).exp2_().sum(2)
    return out


def marginals_and_cost(geom, F, G, eps: float, axis: int, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`marginals` along ``axis`` (B,n) or (B,m) and :func:`plan_cost` (B,), from the
    same blocks of ``P``."""
    k = _LOG2E / eps
    Fl, Go = sides(*scaled_potentials(geom, F, G, k), axis)
    out = torch.empty_like(Fl)
    total = torch.zeros(geom.batch, dtype=Fl.dtype, device=F.device)
    for sl, C, Z in _tiles(geom, axis, Fl.dtype, keep_cost=True):
        P = _log2_plan_(Z, C, Fl[:, sl], Go, k).exp2_()
        out[:, sl] = P.sum(2)
        total += P.mul_(C).sum((1, 2))
    return out, total


def plan_dense(geom, F, G, eps: float, precision: str = "fp32") -> torch.Tensor:
    """The dense plan ``P`` (B,n,m). Small problems only: this *is* an n x m buffer."""
    k = _LOG2E / eps
    C = geom.cost_block()
    Fk, Gk = scaled_potentials(geom, F, G, k)
    return _log2_plan_(torch.empty_like(C, dtype=Fk.dtype), C, Fk, Gk, k).exp2_()


def plan_cost(geom, F, G, eps: float, precision: str = "fp32") -> torch.Tensor:
    """Transport cost ``<P, C>`` per problem, (B,)."""
    k = _LOG2E / eps
    Fk, Gk = scaled_potentials(geom, F, G, k)
    total = torch.zeros(geom.batch, dtype=Fk.dtype, device=F.device)
    for sl, C, Z in _tiles(geom, 1, Fk.dtype, keep_cost=True):
        total += _log2_plan_(Z, C, Fk[:, sl], Gk, k).exp2_().mul_(C).sum((1, 2))
    return total


def plan_topk(geom, F, G, eps: float, k: int, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of each row of ``P``: values (B,n,k), column indices (B,n,k)."""
    k = _validate.top_k(k, geom.m)
    kk = _LOG2E / eps
    Fk, Gk = scaled_potentials(geom, F, G, kk)
    vals = torch.empty(geom.batch, geom.n, k, dtype=Fk.dtype, device=F.device)
    idx = torch.empty(geom.batch, geom.n, k, dtype=torch.int64, device=F.device)
    for sl, C, Z in _tiles(geom, 1, Fk.dtype):
        lp, ix = torch.topk(_log2_plan_(Z, C, Fk[:, sl], Gk, kk), k, dim=2)
        vals[:, sl] = lp.exp2_()
        idx[:, sl] = ix
    return vals, idx


#: Up to this many coordinates the squared-Euclidean gradient forms each difference per
#: entry (the Triton path, ``triton_ops.plan_cost_grad``, uses the same bound); past it, the
#: product form. The Euclidean gradient forms them per entry at every ``d``.
GRAD_DIFF_MAX_D = 8


def grad_per_entry(geom) -> bool:
    """Whether :func:`plan_cost_grad` (both paths) forms each difference per entry: up to
    ``GRAD_DIFF_MAX_D`` coordinates, and for the Euclidean cost at every ``d``. Its product
    form's two terms cancel to ``u |x| P_ij / C_ij`` on a pair with ``W = P / C``: unbounded
    as the pair closes (float32, d = 9, a pair 1e-7 apart: 30% of the largest gradient
    entry), where the squared cost's ``W = 2P`` keeps the error ``u |x| P_ij``."""
    return geom.d <= GRAD_DIFF_MAX_D or geom.cost == "euclidean"


def live_mean(geom, F, G) -> torch.Tensor:
    """Per problem, the joint mean of the points of positive weight (biased potential
    ``> -inf``), (B,1,d): the centre of :func:`plan_cost_grad`'s product form. Zero-weight
    points are left out because far padding would move the centre away from the points
    that carry the mass, and the shifted coordinates would lose their digits."""
    x, y = geom.x, geom.y
    wx, wy = (F > -math.inf).to(x.dtype)[..., None], (G > -math.inf).to(y.dtype)[..., None]
    count = wx.sum(1, keepdim=True) + wy.sum(1, keepdim=True)
    return ((x * wx).sum(1, keepdim=True) + (y * wy).sum(1, keepdim=True)) / count.clamp_min(1)


def plan_cost_grad(geom, F, G, eps: float, precision: str = "fp32") -> tuple[torch.Tensor, ...]:
    """Derivative of ``<P, C>`` with respect to the cost's inputs, ``P`` held fixed.

    Dense cost: ``(P,)``. Point clouds: ``(gx, gy)`` with
    ``gx_i = sum_j P_ij dC_ij/dx_i`` (B,n,d) and ``gy_j = sum_i P_ij dC_ij/dy_j`` (B,m,d).
    Both are ``gx_i = sum_j W_ij (x_i - y_j)``, ``W = 2P`` (squared Euclidean) or
    ``W = P / C`` (Euclidean, 0 where the points coincide):

    - up to ``GRAD_DIFF_MAX_D`` coordinates, and for the Euclidean cost at every ``d``
      (:func:`grad_per_entry`), each difference is formed per entry, one coordinate at a
      time, from the raw coordinates. Written as ``x_i (W1)_i - (W y)_i`` the two terms
      cancel where the plan sits on near-coincident pairs, without bound as ``W ~ 1/C``
      for the Euclidean cost;
    - past it, for the squared Euclidean cost, in that product form (one matrix product
      with ``[1, y]`` per block, ``d`` times cheaper than per-entry differences) on the
      clouds centred at the joint mean of their points of positive weight
      (:func:`live_mean`), which keeps the terms from cancelling large numbers far from
      the origin.
    """
    if geom.is_dense:
        return (plan_dense(geom, F, G, eps),)
    k = _LOG2E / eps
    euclid = geom.cost == "euclidean"
    per_entry = grad_per_entry(geom)
    mu = 0.0 if per_entry else live_mean(geom, F, G)
    grads = []
    for axis, (own, far) in ((1, (geom.x, geom.y)), (0, (geom.y, geom.x))):
        Fl, Go = sides(F * k, G * k, axis)
        dt = torch.promote_types(Fl.dtype, far.dtype)
        own, far = (own - mu).to(dt), (far - mu).to(dt)
        out = torch.empty(geom.batch, own.shape[1], geom.d, dtype=dt, device=own.device)
        V = None if per_entry else torch.cat([torch.ones_like(far[..., :1]), far], dim=2)  # (B, other, 1 + d)
        D = None  # per-entry differences: one more work tile, allocated at the first (largest) block
        for sl, C, Z in _tiles(geom, axis, Fl.dtype, keep_cost=euclid):
            W = _log2_plan_(Z, C, Fl[:, sl], Go, k).exp2_()
            if euclid:
                W.div_(C).nan_to_num_(nan=0.0, posinf=0.0)  # P / C, and 0 where C = 0 (0/0 or P/0)
            if per_entry:
                D = torch.empty_like(W) if D is None else D
                Dt = D[:, : W.shape[1]]
                for c in range(geom.d):  # sum_j W_ij (x_ic - y_jc)
                    torch.sub(own[:, sl, c, None], far[:, None, :, c], out=Dt)
                    out[:, sl, c] = Dt.mul_(W).sum(-1)
            else:
                WV = W @ V
                out[:, sl] = own[:, sl] * WV[..., :1] - WV[..., 1:]
        grads.append(out if euclid else 2 * out)
    return tuple(grads)
