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


@dataclass
class EnvelopeSpec:
    """What the backward pass needs (potentials and weights batched and detached)."""

    geom: object
    A: torch.Tensor
    Bw: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    eps: float
    rho_a: Optional[float]
    rho_b: Optional[float]
    backend: str
    precision: str
    a_in: Optional[torch.Tensor] = None
    b_in: Optional[torch.Tensor] = None


def phi(f: torch.Tensor, rho: Optional[float]) -> torch.Tensor:
    """Conjugate of the marginal penalty: ``f`` (balanced) or ``-rho (exp(-f/rho) - 1)`` (KL)."""
    return f if rho is None else -rho * torch.expm1(-f / rho)


def _weight_grad(geom, f, pot_other, own_rho, other_mass, eps, axis, kw):
    """``dD/da`` (axis=1) or ``dD/db`` (axis=0): ``phi(f) - eps (exp((f - s)/eps) - other_mass)``,
    ``other_mass`` (B, 1) in float64."""
    s = geom.softmin(pot_other, eps, axis, **kw)
    # expm1 + (1 - mass): near the optimum each part is small, so a large eps does not
    # multiply the rounding of exp(...) ~ 1 (see otcore.solvers._entropic.mass_gap)
    return phi(f, own_rho) - eps * (torch.expm1((f - s) / eps) + (1.0 - other_mass).to(f.dtype))


class _EnvelopeValue(torch.autograd.Function):
    """``(value, cost)`` as functions of (geometry inputs, a, b); see the module docstring."""

    @staticmethod
    def forward(ctx, spec: EnvelopeSpec, value, cost, *inputs):
        ctx.spec = spec
        # saved only for autograd's version check: backward re-reads the geometry's inputs,
        # so after an in-place change it would mix new points with the old potentials
        ctx.save_for_backward(*inputs)
        return value.clone(), cost.clone()

    @staticmethod
    def backward(ctx, gv, gc):
        _ = ctx.saved_tensors  # raises if an input was modified in place since the solve
        s = ctx.spec
        geom, eps = s.geom, s.eps
        F = s.f + eps * torch.log(s.A)
        G = s.g + eps * torch.log(s.Bw)
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
        for w_in, f, other, rho, mass, axis in (
            (s.a_in, s.f, G, s.rho_a, s.Bw.double().sum(-1, keepdim=True), 1),  # masses summed in float64
            (s.b_in, s.g, F, s.rho_b, s.A.double().sum(-1, keepdim=True), 0),
        ):
            if w_in is None:
                continue
            if need[k]:
                d = _weight_grad(geom, f, other, rho, mass, eps, axis, kw) * gv[:, None]
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
