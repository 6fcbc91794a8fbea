"""Geometry primitives on the Triton kernels (same names and signatures as :mod:`otcore.reference`).

:mod:`otcore._dispatch` calls these for ``backend="triton"``. Each turns a
geometry and a pass direction into a :class:`~otcore.kernels.softmin.CostOperand`
(the cost seen from the output's side) and launches one kernel per pass for the
whole batch. On CPU tensors the kernels run under the Triton interpreter
(``TRITON_INTERPRET=1``).

The tensor-core path (``|x|^2 + |y|^2 - 2 x.y``) runs on centred clouds: both clouds
of a problem shifted by their joint mean, which leaves ``|x_i - y_j|`` unchanged but
keeps the expansion from cancelling large numbers. Direct differences read the points
as given (contiguous copies where they are not): a shift can only round them, and a
far zero-weight padding point would move the joint mean far from the points that
carry mass. Both copies are made once per geometry and cached (weakly, they die with
the geometry).

Under ``torch.compile`` every launch goes through a ``torch.library`` custom op
(``otcore::softmin``, ``otcore::plan_reduce``, ``otcore::plan_topk``,
``otcore::plan_dense``) with a shape-only fake implementation, so a compiled
graph holds the kernels as opaque calls; eager calls launch directly.

Potentials are *biased*: ``F = f + eps log a``, ``G = g + eps log b`` and
``P_ij = exp((F_i + G_j - C_ij)/eps)``.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from . import _validate, reference
from .kernels import plan as _plan
from .kernels import sinkhorn_steps as _steps
from .kernels import softmin as _softmin


_CENTRED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cached(geom, key, make):
    """``make()`` once per geometry and input versions (recomputed after an in-place
    change of the inputs; inside a compiled graph always, as part of the graph)."""
    if torch.compiler.is_compiling():
        return make()
    geom.x  # noqa: B018 -- reloads the geometry (new versions) after an in-place change
    hit = _CENTRED.get(geom)
    if hit is None or hit[0] != geom.loaded_versions:
        hit = _CENTRED[geom] = (geom.loaded_versions, {})
    if key not in hit[1]:
        hit[1][key] = make()
    return hit[1][key]


def centred_points(geom) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x - mu, y - mu)`` with ``mu`` the joint mean of both clouds of each problem, (B,1,d)."""
    def make():
        x, y = geom.x, geom.y
        mu = (x.sum(1, keepdim=True) + y.sum(1, keepdim=True)) / (geom.n + geom.m)
        return (x - mu).contiguous(), (y - mu).contiguous()
    return _cached(geom, "centred", make)


def direct_points(geom) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` as given, contiguous (B,n,d), (B,m,d): the direct-difference paths' operands."""
    return _cached(geom, "direct", lambda: (geom.x.contiguous(), geom.y.contiguous()))


def squared_spread(geom) -> float:
    """``max_b (max_i |x_i - mu|^2 + max_j |y_j - mu|^2)`` of the centred clouds, which bounds
    the expansion's rounding (:func:`otcore.kernels.softmin.expansion_error`). One host
    sync per geometry (cached with the centred points); 0 while compiling (the graph
    cannot read it), which keeps the d-based choice there."""
    if torch.compiler.is_compiling():
        return 0.0
    def make():
        xc, yc = centred_points(geom)
        return float((xc.square().sum(2).amax(1) + yc.square().sum(2).amax(1)).max())
    return _cached(geom, "spread", make)


def centred_features(geom, mode: int, input_precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The centred clouds' features for an expansion ``mode``, ``(x, y)``:
    :func:`~otcore.kernels.softmin.dot_features` (``COST_DOT``, the tensor-core path) or
    :func:`~otcore.kernels.softmin.expand_features` (``COST_EXPAND``, FMAs); computed once
    per geometry, mode and precision (cached with the centred points), in the graph while
    compiling."""
    def make():
        xc, yc = centred_points(geom)
        if mode == _softmin.COST_EXPAND:
            return _softmin.expand_features(xc), _softmin.expand_features(yc)
        return _softmin.dot_features(xc, input_precision), _softmin.dot_features(yc, input_precision)
    return _cached(geom, ("features", mode, input_precision), make)


# ---------------------------------------------------------------------------
# torch.library custom ops: under torch.compile the kernels are opaque ops with
# shape functions (Dynamo cannot trace a Triton launch on the interpreter, and
# needs no more than shapes on the GPU). Eager calls skip the op dispatch.
# ---------------------------------------------------------------------------
def _fields(op: _softmin.CostOperand) -> tuple:
    """The operand as custom-op arguments (the dot features as one list of two)."""
    return (op.own, op.oth, op.C, op.transposed, op.euclidean, op.mode, op.input_precision,
            [op.own_feat, op.oth_feat])


def _operand_of(own, oth, C, transposed, euclidean, mode, ip, feats) -> _softmin.CostOperand:
    return _softmin.CostOperand(own, oth, C, transposed, euclidean, mode, ip, *feats)


def _fake_shape(own, C, transposed) -> tuple:
    """(B, n_own) of an operand from its tensors."""
    if C is not None:
        return (C.shape[0], C.shape[2] if transposed else C.shape[1])
    return (own.shape[0], own.shape[1])


@torch.library.custom_op("otcore::softmin", mutates_args=())
def _softmin_op(
    own: Optional[torch.Tensor], oth: Optional[torch.Tensor], C: Optional[torch.Tensor],
    transposed: bool, euclidean: bool, mode: int, ip: str, feats: list[Optional[torch.Tensor]],
    h: torch.Tensor, eps: float, hint: Optional[torch.Tensor],
) -> torch.Tensor:
    op = _operand_of(own, oth, C, transposed, euclidean, mode, ip, feats)
    return _softmin.launch_softmin(op, h, eps, hint=hint)


@_softmin_op.register_fake
def _(own, oth, C, transposed, euclidean, mode, ip, feats, h, eps, hint):
    ref = C if C is not None else own
    return ref.new_empty(_fake_shape(own, C, transposed))


@torch.library.custom_op("otcore::plan_reduce", mutates_args=())
def _plan_reduce_op(
    own: Optional[torch.Tensor], oth: Optional[torch.Tensor], C: Optional[torch.Tensor],
    transposed: bool, euclidean: bool, mode: int, ip: str, feats: list[Optional[torch.Tensor]],
    F: torch.Tensor, G: torch.Tensor, eps: float,
    V: Optional[torch.Tensor], with_sum: bool, weight: int, diff: bool, with_cost: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    op = _operand_of(own, oth, C, transposed, euclidean, mode, ip, feats)
    WV, W1 = _plan.launch_plan_reduce(op, F, G, eps, V=V, with_sum=with_sum, weight=weight, diff=diff,
                                      with_cost=with_cost)
    empty = op.ref.new_empty(0)  # a custom op returns tensors: empty stands for "not asked"
    return (WV if WV is not None else empty), (W1 if W1 is not None else empty)


@_plan_reduce_op.register_fake
def _(own, oth, C, transposed, euclidean, mode, ip, feats, F, G, eps, V, with_sum, weight, diff, with_cost):
    ref = C if C is not None else own
    shape = _fake_shape(own, C, transposed)
    if diff:
        WV = ref.new_empty(shape + (own.shape[2],))
    elif with_cost:
        WV = ref.new_empty(shape)
    else:
        WV = ref.new_empty(0) if V is None else ref.new_empty(shape + tuple(V.shape[2:]))
    return WV, (ref.new_empty(shape) if with_sum else ref.new_empty(0))


@torch.library.custom_op("otcore::plan_topk", mutates_args=())
def _plan_topk_op(
    own: Optional[torch.Tensor], oth: Optional[torch.Tensor], C: Optional[torch.Tensor],
    transposed: bool, euclidean: bool, mode: int, ip: str, feats: list[Optional[torch.Tensor]],
    F: torch.Tensor, G: torch.Tensor, eps: float, k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _plan.launch_plan_topk(_operand_of(own, oth, C, transposed, euclidean, mode, ip, feats), F, G, eps, k)


@_plan_topk_op.register_fake
def _(own, oth, C, transposed, euclidean, mode, ip, feats, F, G, eps, k):
    ref = C if C is not None else own
    shape = _fake_shape(own, C, transposed) + (k,)
    return ref.new_empty(shape), ref.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("otcore::plan_dense", mutates_args=())
def _plan_dense_op(
    own: Optional[torch.Tensor], oth: Optional[torch.Tensor], C: Optional[torch.Tensor],
    transposed: bool, euclidean: bool, mode: int, ip: str, feats: list[Optional[torch.Tensor]],
    F: torch.Tensor, G: torch.Tensor, eps: float,
) -> torch.Tensor:
    return _plan.launch_plan_dense(_operand_of(own, oth, C, transposed, euclidean, mode, ip, feats), F, G, eps)


@_plan_dense_op.register_fake
def _(own, oth, C, transposed, euclidean, mode, ip, feats, F, G, eps):
    ref = C if C is not None else own
    n_oth = (C.shape[1] if transposed else C.shape[2]) if C is not None else oth.shape[1]
    return ref.new_empty(_fake_shape(own, C, transposed) + (n_oth,))


def _launch_softmin(op, h, eps, hint=None):
    if torch.compiler.is_compiling():
        return _softmin_op(*_fields(op), h, eps, hint)
    return _softmin.launch_softmin(op, h, eps, hint=hint)


def _launch_reduce(op, F, G, eps, V=None, with_sum=False, weight=_plan.WEIGHT_P, diff=False, with_cost=False):
    if torch.compiler.is_compiling():
        WV, W1 = _plan_reduce_op(*_fields(op), F, G, eps, V, with_sum, weight, diff, with_cost)
        return (WV if V is not None or diff or with_cost else None), (W1 if with_sum else None)
    return _plan.launch_plan_reduce(op, F, G, eps, V=V, with_sum=with_sum, weight=weight, diff=diff,
                                    with_cost=with_cost)


def _check(precision: str, axis=None) -> None:
    _validate.choice("precision", precision, _validate.PRECISIONS)
    if axis is not None and axis not in (0, 1):
        raise ValueError(f"axis must be 0 (columns) or 1 (rows), got {axis!r}")


def operand(geom, axis: int, precision: str, eps: float) -> _softmin.CostOperand:
    """The cost seen from the output side of an ``axis`` pass: rows (x) for ``axis=1``,
    columns (y, or C read transposed) for ``axis=0``. In ``"fp32"`` past
    ``DIRECT_MAX_D``, and for a large squared-Euclidean pass below it
    (``EXPAND_MIN_ENTRIES``), an expansion is used only where its rounding is small against
    ``eps`` (:func:`otcore.kernels.softmin.point_cost_mode`); not inside a compiled graph,
    which cannot read that rounding's bound. The expansions read the centred clouds,
    direct differences the points as given (:func:`direct_points`)."""
    if geom.is_dense:
        return _softmin.dense_operand(geom.C, transposed=axis == 0)
    euclidean = geom.cost == "euclidean"
    dtype = geom.x.dtype
    expand = (dtype != torch.float64 and precision == "fp32" and geom.d <= _softmin.DIRECT_MAX_D and not euclidean
              and geom.n * geom.m >= _softmin.EXPAND_MIN_ENTRIES and not torch.compiler.is_compiling())
    spread = 0.0
    if dtype != torch.float64 and (precision == "tf32" or geom.d > _softmin.DIRECT_MAX_D or expand):
        spread = squared_spread(geom)  # the expansions' guard (fp32 past DIRECT_MAX_D or large; tf32 always)
    mode, ip = _softmin.point_cost_mode(precision, geom.d, dtype, spread, float(eps), euclidean, expand,
                                        self_transport=geom.symmetric)
    if mode in (_softmin.COST_DOT, _softmin.COST_EXPAND):
        (xs, ys), feats = centred_points(geom), centred_features(geom, mode, ip)
    else:
        (xs, ys), feats = direct_points(geom), None
    if axis == 0:
        xs, ys = ys, xs
        feats = feats[::-1] if feats is not None else None
    return _softmin.point_operand(xs, ys, euclidean, precision, mode=mode, features=feats)


def softmin(geom, h: torch.Tensor, eps: float, axis: int, precision: str = "fp32",
            hint: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``axis=1``: ``out_i = -eps log sum_j exp((h_j - C_ij)/eps)``, h (B,m) -> (B,n);
    ``axis=0``: ``out_j = -eps log sum_i exp((h_i - C_ij)/eps)``, h (B,n) -> (B,m).
    ``-inf`` entries of ``h`` are zero-weight points; all of them give ``+inf``.
    ``hint``: an estimate of the output (the previous iteration's), the kernel's
    log-sum-exp shift (:func:`otcore.kernels.softmin.lse_shift`); it does not change the result."""
    _check(precision, axis)
    return _launch_softmin(operand(geom, axis, precision, eps), h, float(eps), hint)


def softmin_update(geom, h: torch.Tensor, bias: torch.Tensor, eps: float, axis: int, prev: torch.Tensor,
                   active: torch.Tensor, tau: float, average: bool = False, precision: str = "fp32",
                   omega: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sinkhorn's half-step ``where(active, tau s, prev)`` (``average``: ``where(active,
    (prev + tau s) / 2, prev)``; ``omega``: ``where(active, (1 - omega) prev + omega tau s,
    prev)``) with ``s = softmin(h + eps bias)``, ``bias = log b``: one softmin launch that adds
    ``eps bias`` as it reads ``h`` and writes the update (see :func:`otcore.reference.softmin_update`).
    Traced calls (``torch.compile``) run the softmin op and the update in torch."""
    _check(precision, axis)
    if torch.compiler.is_compiling():
        return reference.softmin_update(geom, h, bias, eps, axis, prev, active, tau, average, precision,
                                        softmin=softmin, omega=omega)
    return _softmin.launch_softmin(operand(geom, axis, precision, eps), h, float(eps), bias=bias, prev=prev,
                                   active=active, tau=tau, average=average, omega=omega)


def sinkhorn_steps(geom, f, g, loga, logb, eps: float, tau: tuple[float, float], k: int, active: torch.Tensor,
                   symmetric: bool = False, check=None, precision: str = "fp32", omega=None):
    """``k`` Sinkhorn iterations, and the convergence test if ``check = (tol, rho_a)``
    (see :func:`otcore.reference.sinkhorn_steps`).

    A problem whose cost fits one tile (:func:`otcore.kernels.sinkhorn_steps.fits`) runs
    it all in one launch of :mod:`otcore.kernels.sinkhorn_steps`, with the cost held in
    registers; so does one up to ``TILES_MAX_WORK`` (:func:`~otcore.kernels.sinkhorn_steps.tiles_fit`:
    one program per problem streaming its cost in tiles); larger ones and traced calls
    (``torch.compile``) run the streamed passes one by one (:func:`softmin_update`).
    """
    _check(precision)
    one_launch = _steps.fits(geom.n, geom.m) or _steps.tiles_fit(geom.n, geom.m, 0 if geom.is_dense else geom.d,
                                                                  geom.is_dense)
    if one_launch and not torch.compiler.is_compiling():
        if geom.is_dense:
            op = _softmin.dense_operand(geom.C, transposed=False)
        else:
            op = _softmin.point_operand(*direct_points(geom), geom.cost == "euclidean", precision,
                                        mode=_softmin.COST_DIRECT)
        return _steps.launch_sinkhorn_steps(op, f, g, loga, logb, float(eps), tau, k, active, symmetric, check, omega)
    return reference.sinkhorn_steps(geom, f, g, loga, logb, eps, tau, k, active, symmetric, check,
                                    precision, softmin=softmin, update=softmin_update, omega=omega)


def apply_plan(geom, F, G, eps: float, v: torch.Tensor, axis: int, precision: str = "fp32") -> torch.Tensor:
    """``axis=1``: ``(P v)_i = sum_j P_ij v_j``, v (B,m) or (B,m,k) -> (B,n[,k]);
    ``axis=0``: ``(P^T u)_j = sum_i P_ij u_i``, u (B,n) or (B,n,k) -> (B,m[,k])."""
    _check(precision, axis)
    own, oth = reference.sides(F, G, axis)
    out, _ = _launch_reduce(operand(geom, axis, precision, eps), own, oth, float(eps), V=v)
    return out


def marginals(geom, F, G, eps: float, axis: int, precision: str = "fp32") -> torch.Tensor:
    """``axis=1``: row sums ``P 1`` (B,n); ``axis=0``: column sums ``P^T 1`` (B,m)."""
    _check(precision, axis)
    own, oth = reference.sides(F, G, axis)
    _, s = _launch_reduce(operand(geom, axis, precision, eps), own, oth, float(eps), with_sum=True)
    return s


def marginals_and_cost(geom, F, G, eps: float, axis: int, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`marginals` along ``axis`` and :func:`plan_cost`, in one pass: each output
    point's ``sum P`` and ``sum P C`` come from the same tile of ``P``."""
    _check(precision, axis)
    own, oth = reference.sides(F, G, axis)
    part, s = _launch_reduce(operand(geom, axis, precision, eps), own, oth, float(eps), with_sum=True, with_cost=True)
    return s, part.sum(-1)


def plan_dense(geom, F, G, eps: float, precision: str = "fp32") -> torch.Tensor:
    """The dense plan ``P`` (B,n,m). Small problems only: this *is* an n x m buffer."""
    _check(precision)
    op = operand(geom, 1, precision, eps)
    if torch.compiler.is_compiling():
        return _plan_dense_op(*_fields(op), F, G, float(eps))
    return _plan.launch_plan_dense(op, F, G, float(eps))


def plan_cost(geom, F, G, eps: float, precision: str = "fp32") -> torch.Tensor:
    """Transport cost ``<P, C> = sum_ij P_ij C_ij`` per problem, (B,)."""
    _check(precision)
    _, rows = _launch_reduce(operand(geom, 1, precision, eps), F, G, float(eps), with_sum=True, weight=_plan.WEIGHT_PC)
    return rows.sum(-1)


def plan_topk(geom, F, G, eps: float, k: int, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of each row of ``P``, sorted decreasingly:
    values (B,n,k) and column indices (B,n,k).

    ``k > TOPK_MAX`` (32) runs the blockwise torch top-k of :mod:`otcore.reference`
    instead: the kernel spends k selection rounds per tile, so beyond a few dozen
    a sort-based top-k of materialised row blocks is the faster algorithm.
    """
    _check(precision)
    k = _validate.top_k(k, geom.m)
    if k > _plan.TOPK_MAX:
        return reference.plan_topk(geom, F, G, eps, k)
    op = operand(geom, 1, precision, eps)
    if torch.compiler.is_compiling():
        return _plan_topk_op(*_fields(op), F, G, float(eps), k)
    return _plan.launch_plan_topk(op, F, G, float(eps), k)


def plan_cost_grad(geom, F, G, eps: float, precision: str = "fp32") -> tuple[torch.Tensor, ...]:
    """Derivative of ``<P, C>`` w.r.t. the cost's inputs, ``P`` held fixed.

    Dense cost: ``(P,)``. Point clouds: ``(gx, gy)``, (B,n,d) and (B,m,d), with
    ``gx_i = sum_j P_ij dC_ij/dx_i = sum_j W_ij (x_i - y_j)``: ``W = 2P`` for the squared
    Euclidean cost, ``W = P / C`` (0 where ``C = 0``) for the Euclidean one. One streamed
    pass per side:

    - up to ``reference.GRAD_DIFF_MAX_D`` coordinates, and for the Euclidean cost at every
      ``d`` (as in the twin: :func:`otcore.reference.grad_per_entry`), each difference is
      formed per entry from the raw coordinates, with the cost from direct differences
      (the kernel's ``diff`` mode, ``ceil(d / 4)`` programs per tile):
      written as ``x_i (W1)_i - (W y)_i`` the two terms cancel where the plan sits on
      near-coincident pairs, without bound as ``W ~ 1/C`` for the Euclidean cost;
    - past it, for the squared Euclidean cost (where a per-entry difference costs ``d``
      times more), that product form on the clouds centred at the mean of their points of
      positive weight (:func:`otcore.reference.live_mean`; centring keeps its terms from
      cancelling large numbers).
    """
    _check(precision)
    if geom.is_dense:
        return (plan_dense(geom, F, G, eps, precision),)
    euclid = geom.cost == "euclidean"
    weight, factor = (_plan.WEIGHT_P_OVER_C, 1.0) if euclid else (_plan.WEIGHT_P, 2.0)
    diff = reference.grad_per_entry(geom)
    if not diff:
        mu = reference.live_mean(geom, F, G)
        centred = (geom.x - mu, geom.y - mu)
    grads = []
    for axis in (1, 0):
        own, oth = reference.sides(F, G, axis)
        if diff:
            x, y = direct_points(geom)[:: 1 if axis == 1 else -1]
            op = _softmin.point_operand(x, y, euclid, precision, mode=_softmin.COST_DIRECT)
            grads.append(factor * _launch_reduce(op, own, oth, float(eps), weight=weight, diff=True)[0])
        else:
            xc, yc = centred[:: 1 if axis == 1 else -1]
            WV, W1 = _launch_reduce(operand(geom, axis, precision, eps), own, oth, float(eps), V=yc,
                                    with_sum=True, weight=weight)
            grads.append(factor * (xc * W1[..., None] - WV))
    return tuple(grads)


# Sparse (ELL) plan rows and products for Sinkhorn-Newton-Sparse (kernels/sparse.py) and
# the k-sparse plans of sparsity-constrained OT (kernels/ksparse.py).
from .kernels.ksparse import ksparse_columns  # noqa: E402,F401
from .kernels.sparse import ell_matvec, plan_sparse_rows  # noqa: E402,F401
from .kernels.sparse_cg import ell_pcg  # noqa: E402,F401
