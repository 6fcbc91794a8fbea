"""Gradients of entropic OT values by the envelope theorem (no unrolling).

At the optimum ``(f*, g*)`` of the dual

    D(a, b, C) = <a, phi_a(f)> + <b, phi_b(g)> - eps * sum_ij a_i b_j (exp((f_i + g_j - C_ij)/eps) - 1),

with ``phi(f) = f`` for a balanced marginal and ``phi(f) = -rho (exp(-f/rho) - 1)``
for a KL-relaxed one, the derivative of the optimal value equals the partial
derivative of ``D`` with the potentials held fixed:

- ``dD/dC_ij = P_ij``, hence ``dD/dx_i = sum_j P_ij dC_ij/dx_i`` (and for ``y``);
- ``dD/da_i = phi_a(f_i) - eps * (exp((f_i - s_i)/eps) - sum(b))`` where ``s`` is the
  row softmin of ``g + eps log b`` (so ``exp((f - s)/eps) = (P1)_i / a_i``);
- ``dD/db_j`` likewise with the column softmin.

These are exact at the optimum and first-order accurate in the residual
otherwise. For balanced problems ``a`` and ``b`` live on a simplex, so their
gradient is meaningful up to an additive constant. The transport cost
``<P, C>`` is given the same derivative with respect to ``C`` (resp. ``x``, ``y``)
with ``P`` held fixed, and none with respect to ``a`` and ``b``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .reference import damping, scaled


@dataclass
class EnvelopeSpec:
    """What the backward pass needs (potentials and weights batched and detached)."""

    geom: object
    A: torch.Tensor
    Bw: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    #: the shifted potentials ``f + eps log a``, ``g + eps log b`` the plan is read from
    F: torch.Tensor
    G: torch.Tensor
    eps: float
    rho_a: Optional[float]
    rho_b: Optional[float]
    backend: str
    precision: str
    a_in: Optional[torch.Tensor] = None
    b_in: Optional[torch.Tensor] = None
    #: run the softmin behind ``exp((f - s)/eps)`` in float64 (see :func:`resolved_softmin`)
    wide: bool = False


def resolved_softmin(geom, g: torch.Tensor, w: torch.Tensor, eps: float, axis: int, kw: dict,
                     wide: bool) -> torch.Tensor:
    """The softmin ``s`` of ``eps (exp((f - s)/eps) - 1)`` in the dual value and the
    weights' gradient: of ``h = g + eps log w`` (the other side's potential and weights),
    formed and reduced in float64 when ``wide`` (in float32, ``eps log w ~ eps`` would
    round ``g`` to ``eps * 2^-24`` again).

    A float32 pass resolves ``s`` only to about ``eps * 2^-24`` (its log-sum-exp rounds
    relative to 1), and that product carries the error in full: it exceeds the value's
    own rounding once eps is above a quarter of the cost's diameter, and at
    eps = 5000 x the diameter it is 2e-2 of the value. The potentials themselves are
    only that accurate too, but the dual value is stationary in them, so one float64
    pass at the float32 potentials gives the value to float32 accuracy. A point cloud's
    costs are formed from its coordinates in float64 (on either backend: the torch pass on
    the cloud itself read its cached float32 costs, a review); a cost matrix is widened
    tile by tile by the torch pass, which reads it once without a float64 copy.
    """
    if not wide:
        return geom.softmin(g + eps * torch.log(w), eps, axis, **kw)
    h = g.double() + eps * torch.log(w.double())
    if geom.is_dense:
        return geom.softmin(h, eps, axis, backend="torch")
    wide_geom = type(geom)(geom.x.double(), geom.y.double(), geom.cost)
    return wide_geom.softmin(h, eps, axis, backend=kw["backend"])


def phi(f: torch.Tensor, rho: Optional[float]) -> torch.Tensor:
    """Conjugate of the marginal penalty: ``f`` (balanced) or ``-rho (exp(-f/rho) - 1)`` (KL)."""
    return f if rho is None else -rho * torch.expm1(-f / rho)


def _weight_grad(geom, f, g_other, w_other, own_rho, eps, axis, kw, wide):
    """``dD/da`` (axis=1) or ``dD/db`` (axis=0): ``phi(f) - eps (exp((f - s)/eps) - m)``,
    ``s`` the softmin of the other side's potential and weights ``w_other``, ``m`` their
    mass (summed in float64); computed in float64 when ``wide``."""
    dt = f.dtype
    other_mass = w_other.double().sum(-1, keepdim=True)
    s = resolved_softmin(geom, g_other, w_other, eps, axis, kw, wide)
    f = f.to(s.dtype)
    # expm1 + (1 - mass): near the optimum each part is small, so a large eps does not
    # multiply the rounding of exp(...) ~ 1 (see otcore.solvers._entropic.mass_gap)
    return (phi(f, own_rho) - eps * (torch.expm1((f - s) / eps) + (1.0 - other_mass).to(f.dtype))).to(dt)


def _refined_potentials(spec: EnvelopeSpec, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One Sinkhorn iteration in float64 from the solve's float32 potentials, relaxed side
    first (``f <- tau_a softmin(g + eps log b)``, ``tau = rho / (rho + eps)``), for the
    weights' gradients of an unbalanced problem at large eps (``spec.wide``).

    The float32 potentials are off by about ``eps 2^-24`` (see :func:`resolved_softmin`).
    ``dD/da`` is stationary in ``f`` but not in ``g``: an error ``delta`` in ``g`` moves
    ``dD/da_i`` by ``-(P delta)_i / a_i``, about the mean of ``delta``, uniformly. In a
    balanced problem that is the gradient's free additive constant; with one side relaxed
    it is an error (7% of a directional derivative at eps = 1e4 on the unit square).
    The relaxed side's update scales the other's error by ``tau`` (5e-5 at rho = 0.5,
    eps = 1e4), and at eps above the diameter one step mixes away the rest, so one pass
    per side in float64 resolves both potentials."""
    geom, eps = spec.geom, spec.eps
    tau_a, tau_b = damping(spec.rho_a, eps), damping(spec.rho_b, eps)
    if spec.rho_a is not None:
        f = scaled(resolved_softmin(geom, spec.g, spec.Bw, eps, 1, kw, True), tau_a)
        g = scaled(resolved_softmin(geom, f, spec.A, eps, 0, kw, True), tau_b)
    else:
        g = scaled(resolved_softmin(geom, spec.f, spec.A, eps, 0, kw, True), tau_b)
        f = scaled(resolved_softmin(geom, g, spec.Bw, eps, 1, kw, True), tau_a)
    return f, g


class _EnvelopeValue(torch.autograd.Function):
    """``(value, cost)`` as functions of (geometry inputs, a, b); see the module docstring."""

    @staticmethod
    def forward(ctx, spec: EnvelopeSpec, value, cost, *inputs):
        ctx.spec = spec
        # saved only for autograd's version check: backward re-reads the geometry's inputs,
        # so after an in-place change it would mix new points with the old potentials; and
        # the potentials, which the result hands out as res.f, res.g (views): an in-place
        # change of those (centring them, say) made the weights' gradients silently wrong
        ctx.save_for_backward(*inputs, spec.f, spec.g)
        return value.clone(), cost.clone()

    @staticmethod
    def backward(ctx, gv, gc):
        # read once (non-reentrant activation checkpointing allows one unpack); raises if an
        # input or a potential was modified in place since the solve
        saved = ctx.saved_tensors
        with torch.no_grad(), torch.autocast(ctx.spec.geom.device.type, enabled=False):  # the solve's precision
            grads = _envelope_backward(ctx, gv, gc)
        return first_order_only(grads, (*saved[:-2], gv, gc))


class _NoSecondDerivative(torch.autograd.Function):
    """``g`` as a function of ``anchors`` whose derivative raises: marks a first-order
    gradient as such."""

    @staticmethod
    def forward(ctx, g, *anchors):
        return g.clone()

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("otcore: second derivatives of OT values are not supported (their gradients come "
                           "from the envelope theorem at the solution, a first-order rule)")


def first_order_only(grads: tuple, anchors: tuple) -> tuple:
    """The gradients a ``backward`` returns; under ``create_graph=True`` each one becomes
    a function of ``anchors`` (the function's inputs and incoming gradients) whose
    derivative raises. So differentiating it again, by ``.backward()``,
    ``torch.autograd.grad(..., inputs=x)`` or a Hessian, fails loudly instead of
    treating the gradient as a constant (zero second derivative)."""
    anchors = tuple(t for t in anchors if isinstance(t, torch.Tensor) and t.requires_grad)
    if not (torch.is_grad_enabled() and anchors):
        return grads
    return tuple(g if g is None else _NoSecondDerivative.apply(g, *anchors) for g in grads)


def _envelope_backward(ctx, gv, gc):
    """The gradients of :class:`_EnvelopeValue` (see the module docstring)."""
    s = ctx.spec
    geom, eps = s.geom, s.eps
    F, G = s.F, s.G
    kw = dict(backend=s.backend, precision=s.precision)
    gv = gv.reshape(-1).to(F.dtype)
    gc = gc.reshape(-1).to(F.dtype)
    need = ctx.needs_input_grad[3:]
    geom_in = geom.inputs()
    grads = []
    if any(need[: len(geom_in)]):
        w = gv + gc
        for inp, part, want in zip(geom_in, geom.plan_cost_grad(F, G, eps, **kw), need):
            part = part * w.reshape(-1, *([1] * (part.dim() - 1)))
            grads.append(part.reshape(inp.shape).to(inp.dtype) if want else None)
    else:
        grads += [None] * len(geom_in)
    k = len(geom_in)
    f, g = s.f, s.g
    if s.wide and (s.rho_a, s.rho_b) != (None, None) and any(need[k:]):
        f, g = _refined_potentials(s, kw)
    for w_in, f, g_other, w_other, rho, axis in ((s.a_in, f, g, s.Bw, s.rho_a, 1),
                                                  (s.b_in, g, f, s.A, s.rho_b, 0)):
        if w_in is None:
            continue
        if need[k]:
            # the value's gradient only (the cost's is 0): a zero weight's -inf (a relaxed side's
            # potential below -88 rho, conventions.md) times gv = 0 made the cost's gradient NaN, and
            # a batch's problems outside the objective NaN too (a review)
            d = _weight_grad(geom, f, g_other, w_other, rho, eps, axis, kw, s.wide)
            d = torch.where(gv[:, None] == 0, 0.0, d * gv[:, None])
            grads.append(d.reshape(w_in.shape).to(w_in.dtype))
        else:
            grads.append(None)
        k += 1
    return (None, None, None, *grads)


def envelope_value(spec: EnvelopeSpec, value: torch.Tensor, cost: torch.Tensor):
    """Attach envelope-theorem gradients to the computed ``(value, cost)`` (each ``(B,)``).

    The returned pair depends on the geometry's input tensors and on
    ``spec.a_in`` / ``spec.b_in`` when given, so ``backward`` reaches them.
    """
    inputs = (*spec.geom.inputs(), *(w for w in (spec.a_in, spec.b_in) if w is not None))
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
        return value, cost
    return _EnvelopeValue.apply(spec, value, cost, *inputs)
