"""Shared pieces of the entropic solvers (Sinkhorn, SNS): argument checks and results."""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .. import _dispatch, _validate
from ..autograd import EnvelopeSpec, envelope_value, phi, resolved_softmin
from ..geometry import Geometry
from ..reference import scaled
from ..result import ConvergenceWarning, OTResult, user_stacklevel


@dataclass
class Problem:
    """A validated entropic OT problem (batched tensors in the compute dtype)."""

    geom: Geometry
    A: torch.Tensor  # (B, n) weights
    Bw: torch.Tensor  # (B, m) weights
    loga: torch.Tensor
    logb: torch.Tensor
    a_in: Optional[torch.Tensor]
    b_in: Optional[torch.Tensor]
    eps: float
    rho_a: Optional[float]
    rho_b: Optional[float]
    backend: str
    precision: str
    #: the largest cost diameter of the batch, if known (see :meth:`top_diameter`)
    diameter: Optional[float]
    #: float32 (or narrower) with eps above a quarter of a problem's cost diameter: the value
    #: and the weights' gradient take their softmin in float64 (autograd.resolved_softmin)
    wide: bool = False
    #: self-transport (same cloud and weights on both sides): the optimal potentials
    #: agree, f = g, and the solver iterates on f alone (see sinkhorn._iterate).
    symmetric: bool = False
    #: whether some problem has zero weights in ``a`` / ``b`` (read with the weights' checks)
    zeros: tuple[bool, bool] = (True, True)
    #: each problem's total mass of ``a`` and of ``b`` (B,), host float64 (read with their checks)
    mass_a: np.ndarray = None
    mass_b: np.ndarray = None

    @property
    def min_mass(self) -> float:
        """The smallest total mass of the weights of any problem and side."""
        return float(min(self.mass_a.min(), self.mass_b.min()))

    def kw(self):
        return dict(backend=self.backend, precision=self.precision)

    def top_diameter(self) -> float:
        """The largest cost diameter of the batch (the start of eps scaling), computed
        once (one pass over the points or ``C`` and a host sync)."""
        if self.diameter is None:
            self.diameter = float(self.geom._diameters(*self.padded()).max())  # (checked weights)
        return self.diameter

    def value_weights(self, dtype: torch.dtype):
        """``(A, Bw)`` for the dual value in ``dtype`` (the row pass's): float64 where the
        solve is ``wide``, and there the weights as given (a float64 ``a`` had been read
        through its float32 copy) and the default uniform weights (``a``/``b`` None) as
        ``1/n`` in float64, not float32's rounding of it, whose 2e-8 relative error is the
        value's (~7e-9 of each term of a unit-square loss, 3e-4 of the debiased loss at
        large eps, a review)."""
        def wide(w, given):
            if w.dtype == dtype:
                return w
            if given is None:
                return torch.full_like(w, 1.0 / w.shape[-1], dtype=dtype)
            return given.detach().reshape(w.shape).to(dtype)
        return wide(self.A, self.a_in), wide(self.Bw, self.b_in)

    def padded(self):
        """``(A, Bw)``, each None where it has no zero weight, for :meth:`Geometry.diameters`:
        zero-weight padding stays out of the diameter, and unpadded sides skip the masking."""
        return padded(self.A, self.Bw, self.zeros)


def parse_rho(rho) -> tuple[Optional[float], Optional[float]]:
    """``rho``: None (balanced), a number (both marginals), or a pair ``(rho_a, rho_b)``
    whose entries may be None (that marginal stays an exact constraint)."""
    if isinstance(rho, (tuple, list)):
        if len(rho) != 2:
            raise ValueError(f"rho must be a number or a pair (rho_a, rho_b), got {rho!r}")
        return _rho("rho[0]", rho[0]), _rho("rho[1]", rho[1])
    r = _rho("rho", rho)
    return r, r


def _rho(name: str, value) -> Optional[float]:
    if isinstance(value, float) and value == math.inf:  # POT's reg_m spelling of an exact marginal
        raise ValueError(f"{name} must be a finite number > 0, got inf: an exact (balanced) marginal is "
                         f"rho=None (or None in the pair)")
    return _validate.positive(name, value, allow_none=True)


def make_problem(geom, a, b, eps, rho, backend, precision, tol: Optional[float], has_rho: bool = True) -> Problem:
    """Validate every argument before any work is done (``tol``: already validated, for
    the mass check; None: none; ``has_rho``: whether the caller takes ``rho``, for the
    mass check's advice)."""
    if not isinstance(geom, Geometry):
        raise TypeError(f"geom must be an otcore.PointCloud or otcore.CostMatrix, got {type(geom).__name__}")
    geom._reread_untracked()  # inference tensors: read as they are now
    eps = _validate.magnitude_fits("eps", _validate.positive("eps", eps), geom.dtype, "rescale the cost")
    _validate.choice("precision", precision, _validate.PRECISIONS)
    backend = _dispatch.resolve(backend, geom.device)
    (A, pos_a, mass_a), (Bw, pos_b, mass_b) = _validate.weights((("a", a, geom.n), ("b", b, geom.m)), geom.batch,
                                                                geom.batched, geom._ref)
    rho_a, rho_b = parse_rho(rho)
    for r in (rho_a, rho_b):
        if r is not None:
            _validate.magnitude_fits("rho", r, geom.dtype)
    if rho_a is None and rho_b is None and not (a is None and b is None):  # uniform weights: both sum to 1
        _validate.balanced_mass(mass_a, mass_b, tol, A.dtype, given=(a, b), has_rho=has_rho)
    symmetric = geom.symmetric and a is b and rho_a == rho_b
    zeros = (min(pos_a) < geom.n, min(pos_b) < geom.m)
    # per problem: one problem's large diameter must not hide another's large eps/diameter
    span = None
    if geom.dtype != torch.float64:
        d = geom._diameters(*padded(A, Bw, zeros))  # (checked weights)
        span = tuple(torch.stack([d.min(), d.max()]).tolist())  # one host sync
    wide = span is not None and eps > span[0] / 4
    return Problem(geom, A, Bw, torch.log(A), torch.log(Bw), a, b, eps, rho_a, rho_b, backend, precision,
                   None if span is None else span[1], wide, symmetric, zeros, np.array(mass_a), np.array(mass_b))


#: ``tol`` above this share of a measure's total mass draws a warning (:func:`tol_against_mass`).
TOL_MASS_SHARE = 0.1


def tol_against_mass(tol: Optional[float], mass: float) -> None:
    """Warn when ``tol``, an absolute L1 marginal error, is a large share of the smallest
    total mass: the test then passes before the solve has converged (a review: a loss on
    weights of mass 1e-6 at the default tol stopped after one iteration at eps and came out
    -3.2e-6 against 7.1e-8, no warning; at mass 1e-4, 5% off). Called by the solvers once
    every argument is checked (bad input raises without a warning first); for their caller's
    line (:func:`~otcore.result.user_stacklevel`)."""
    if tol is not None and tol > TOL_MASS_SHARE * mass:
        warnings.warn(
            f"tol={tol:g} is {tol / mass:.3g} of the smallest total mass of the weights ({mass:.3g}): the marginal "
            f"error it bounds is absolute (|P1 - a|_1 + |P^T 1 - b|_1), so the solve may stop before it converges. "
            f"Scale tol with the weights (e.g. tol={1e-5 * mass:.1g}) or normalise them",
            UserWarning, stacklevel=user_stacklevel())


def padded(A: torch.Tensor, Bw: torch.Tensor, zeros: tuple[bool, bool]):
    """``(A, Bw)`` with None for a side without zero weights (``zeros``: from the weights' check)."""
    return (A if zeros[0] else None), (Bw if zeros[1] else None)


def check_init(init, geom, names=("f", "g"), shift=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Warm start: a pair of potentials on the two sides (``names`` in messages), with
    the unbatched or batched shapes; returned batched, detached, in the geometry's dtype
    (zeros if ``init`` is None). ``shift``: ``(f, g) -> (f + c, g - c)``, the same plan, applied
    in float64 before the cast (:func:`balanced_gauge` for a balanced problem, the best
    translation for an unbalanced one: a float64 pair (f + c, g - c) cast to float32 first
    lost its digits to c: at c = 1e7 a start at the optimum took a cold start's 70
    iterations, a review)."""
    start = init_pair(init, geom, names)
    if start is None:
        return tuple(torch.zeros(geom.batch, k, dtype=geom.dtype, device=geom.device) for k in (geom.n, geom.m))
    f, g, tops = start
    if shift is not None:
        f, g = shift(f, g)
    return init_in_dtype(f, g, tops, geom, names)


def init_pair(init, geom, names) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``init`` checked for type, shape and device (see :func:`check_init`): ``(f, g)``
    batched, detached and in float64, for the shifts a solver applies before
    :func:`init_in_dtype`, and their largest ``|entry|`` as given (a device tensor, read
    there); None if ``init`` is None."""
    if init is None:
        return None
    if not isinstance(init, (tuple, list)) or len(init) != 2:
        raise TypeError(f"init must be a pair ({names[0]}, {names[1]}) of tensors")
    sides = ((f"init[0] ({names[0]})", init[0], geom.n), (f"init[1] ({names[1]})", init[1], geom.m))
    for name, t, k in sides:
        _validate.tensor(name, t, (2,) if geom.batched else (1,), finite=False)  # (read in init_in_dtype)
        want = (geom.batch, k) if geom.batched else (k,)
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
        if t.device != geom.device:
            raise ValueError(f"{name} is on {t.device} but the geometry is on {geom.device}")
    f, g = (t.detach().reshape(geom.batch, k).double() for _, t, k in sides)
    return f, g, torch.stack([torch.linalg.vector_norm(t, math.inf) for t in (f, g)])


def init_in_dtype(f, g, tops, geom, names) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair of :func:`init_pair` (shifted) in the geometry's dtype, checked in one host
    read: finite as given (``tops``), and held by that dtype after the shifts (a float64
    1e39 became inf in float32 and the solve NaN, its warning blaming eps, a review);
    ``ValueError`` naming the side."""
    out = [t.to(geom.dtype) for t in (f, g)]
    read = torch.cat([tops, torch.stack([torch.linalg.vector_norm(t, math.inf).double() for t in out])]).tolist()
    for i in range(2):
        if not math.isfinite(read[i]):
            raise ValueError(f"init[{i}] ({names[i]}) contains NaN or inf")
    for i in range(2):
        if not math.isfinite(read[2 + i]):
            raise ValueError(f"init[{i}] ({names[i]}) does not fit {_validate.dtype_name(geom.dtype)}: its largest "
                             f"|entry| is {float((f, g)[i].abs().max()):.3g} (after the shift along (f + c, g - c) "
                             f"that keeps the plan: the balanced gauge, or an unbalanced problem's best translation)")
    return out[0], out[1]


def balanced_gauge(f: torch.Tensor, g: torch.Tensor, a=None, b=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced potentials ``(f, g)`` (B, n), (B, m) are defined up to ``(f + c, g - c)``:
    the pair shifted to ``<a, f> / m(a) = <b, g> / m(b)`` per problem (means over the points
    with weight; uniform where ``a`` or ``b`` is None). A warm start carrying a large ``c``
    costs float32 its digits: shifted by 3 at eps = 0.01, a start at the optimum ran 1000
    iterations unconverged."""
    c = 0.5 * (weighted_mean(f, a) - weighted_mean(g, b))
    return f - c[..., None], g + c[..., None]


def weighted_mean(p: torch.Tensor, w: Optional[torch.Tensor]) -> torch.Tensor:
    """``<w, p> / m(w)`` over the last dimension, over the points with weight (a zero weight's
    entry, even non-finite, plays no part); the plain mean where ``w`` is None."""
    if w is None:
        return p.mean(-1)
    w = w.to(p.dtype).expand_as(p)
    return torch.where(w > 0, w * p, 0.0).sum(-1) / w.sum(-1)


def finite_abs_max(t: torch.Tensor) -> torch.Tensor:
    """``max |t|`` over the last dimension, ignoring non-finite entries (the ``-inf`` of
    zero weights), (B,)."""
    return torch.nan_to_num(t.abs(), 0.0, 0.0, 0.0).amax(-1)


def optimality_residual(pb: Problem, r: torch.Tensor, c: torch.Tensor, f, g) -> torch.Tensor:
    """L1 violation of the first-order conditions, (B,).

    Balanced: ``|P1 - a|_1 + |P^T 1 - b|_1``. A KL-relaxed marginal's target is
    ``a * exp(-f/rho)`` instead of ``a`` (the optimum of the relaxed problem).
    """
    ta = pb.A if pb.rho_a is None else weighted(pb.A, torch.exp(-f / pb.rho_a), pb.zeros[0])
    tb = pb.Bw if pb.rho_b is None else weighted(pb.Bw, torch.exp(-g / pb.rho_b), pb.zeros[1])
    return (r - ta).abs().sum(-1) + (c - tb).abs().sum(-1)


def best_offset(pb: Problem, f, g, log_masses=(None, None)):
    """``(c, keep)``, (B, 1) each: the offset of :func:`~otcore.solvers.sinkhorn.best_translation`,
    ``c = (L_a - L_b) / (1/rho_a + 1/rho_b)``, ``L = log <w, e^(-f/rho)>`` (an exact side:
    its log mass, ``log_masses`` if given as device tensors, else read here), in float64,
    and whether the move is taken: finite, and rounding ``f + g - C`` by ``u |c|`` at most
    ``eps/16`` (at rho = 1e39, float64, masses equal to a rounding step put the optimum at
    ``|c| ~ 1e23``, where ``f + c`` keeps no digit of ``f``: the plan was lost). (The bound
    had been ``2^-10 eps``, which refused a float32 optimum at ``c ~ 199``, rho 1000, eps
    0.01, masses 1 and 1.5: 1000 iterations at a residual of 0.49; moved, the solve stalls
    at float32's rounding, 4.8e-3, after 151.)"""
    stiff = (0.0 if pb.rho_a is None else 1 / pb.rho_a) + (0.0 if pb.rho_b is None else 1 / pb.rho_b)

    def log_sum(w, h, rho, mass, given):  # log <w, e^(-h/rho)> over the points of weight
        if rho is None:
            return given if given is not None else math.log(mass)
        return torch.logsumexp(torch.where(w > 0, torch.log(w.double()) - h.double() / rho, -math.inf), -1)

    la = log_sum(pb.A, f, pb.rho_a, pb.mass_a, log_masses[0])
    lb = log_sum(pb.Bw, g, pb.rho_b, pb.mass_b, log_masses[1])
    c = ((la - lb) / stiff).to(f.dtype)[:, None]
    return c, torch.isfinite(c) & (c.abs() * torch.finfo(f.dtype).eps <= pb.eps * 2.0**-4)


def residual_at(pb: Problem, f, g) -> torch.Tensor:
    """(B,) :func:`optimality_residual` of the potentials ``(f, g)``, NaN read as inf. Two passes."""
    F, G, kw = f + pb.eps * pb.loga, g + pb.eps * pb.logb, pb.kw()
    r, c = (pb.geom.marginals(F, G, pb.eps, axis, **kw) for axis in (1, 0))
    return torch.nan_to_num(optimality_residual(pb, r, c, f, g), nan=math.inf)


def far_start(pb: Problem, f, g) -> torch.Tensor:
    """(B,) bool: a KL-relaxed problem at finite potentials that ``eps`` resolves (each exponent
    ``(f_i + g_j - C_ij) / eps`` rounded by less than 1): if its residual is not finite there
    (``P1``, or the target ``a exp(-f / rho)``, past the dtype: a warm start far from the
    optimum, float32 potentials ~100 eps off), the damped updates (``tau = rho / (rho + eps)
    < 1`` on a relaxed side) still contract the offset, so the problem is not failed, as one
    whose plan overflows at an eps below what the dtype resolves is. All False if balanced."""
    if pb.rho_a is None and pb.rho_b is None:
        return torch.zeros(f.shape[0], dtype=torch.bool, device=f.device)
    pot = live_potential(pb, f, g)
    return _validate.finite_rows(f, g) & (2 * torch.finfo(f.dtype).eps * pot < pb.eps)


def weighted(w: torch.Tensor, t: torch.Tensor, zeros: bool) -> torch.Tensor:
    """``w * t`` per point, 0 where ``w`` is 0 (``zeros``: some weight is; else no mask, no
    operation): a zero-weight point carries no mass whatever its potential, which can be far
    below ``-88 rho`` for padding far from the other side (its soft c-transform), where a
    relaxed side's ``exp(-f / rho)`` overflows and ``0 * inf`` made the value NaN."""
    wt = w * t
    return torch.where(w > 0, wt, 0.0) if zeros else wt


def mass_gap(pb: Problem, A: torch.Tensor, Bw: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``sum P - (sum a)(sum b)`` per problem, (B,), from the row pass: ``sum_j P_ij =
    a_i exp(delta_i)``, so it is ``sum_i a_i expm1(delta_i) + (sum a)(1 - sum b)``
    (``A``, ``Bw``: :meth:`Problem.value_weights`, in ``delta``'s dtype).

    The dual value subtracts ``eps`` times it. Summed as ``sum P`` in float32, its
    rounding (~1e-7 of the mass) times a large eps swamped the value (eps = 1e4: 2e-2
    relative); in this form each term is small near the optimum and the masses are summed
    in float64. Uniform weights (``a``/``b`` None) have their float64 mass from the host
    (float32: exactly as the device sums it, ``n`` copies of the rounded ``1/n`` making
    every partial sum exact; float64: within a rounding step), and no zero weight to mask:
    four operations fewer each."""
    terms = weighted(A, torch.expm1(delta), pb.zeros[0]).sum(-1)
    ma, mb = (_uniform_mass(w) if given is None else w.double().sum(-1)
              for w, given in ((A, pb.a_in), (Bw, pb.b_in)))
    masses = ma * (1.0 - mb)
    return terms + (masses.to(terms.dtype) if isinstance(masses, torch.Tensor) else masses)


def _uniform_mass(w: torch.Tensor) -> float:
    """``w.double().sum(-1)`` of uniform weights ``w`` (B, n), each ``1/n`` rounded to
    ``w``'s dtype (float32 or float64), computed on the host."""
    n = w.shape[-1]
    return n * (float(np.float32(1.0 / n)) if w.dtype == torch.float32 else 1.0 / n)


@torch.no_grad()
def settle_zero_weights(pb: Problem, f, g, tau: tuple[float, float] = (1.0, 1.0), tied: bool = False):
    """``(f, g)`` with the potentials of zero-weight points set to the soft c-transforms of
    the other side, ``f_i = tau_a softmin_j(g_j + eps log b_j - C_ij)`` (likewise ``g_j``),
    the fixed point of Sinkhorn's update. The plan does not depend on them (their rows of P
    are 0), but ``value``'s gradient with respect to a zero weight is its potential; the
    iterations leave them one update behind (Sinkhorn: the row update before the last column
    update; Newton: the warm-up's). One pass per side that has zero weights (known from the
    weights' checks: no host sync). ``tied``: ``f`` and ``g`` are one potential (Sinkhorn's
    symmetric update), so is the result."""
    eps, kw = pb.eps, pb.kw()
    if pb.zeros[0]:
        f = torch.where(pb.A == 0, scaled(pb.geom.softmin(g + eps * pb.logb, eps, 1, **kw), tau[0]), f)
        if tied:
            return f, f
    if pb.zeros[1]:
        g = torch.where(pb.Bw == 0, scaled(pb.geom.softmin(f + eps * pb.loga, eps, 0, **kw), tau[1]), g)
    return f, g


#: A plan whose entries carry more rounding than this fraction of themselves
#: (:func:`marginal_floor` over the mass), and more than ``LOOSE * tol``, is not resolved
#: by the dtype: never ``converged``. (It was 1e-2: float32 Euclidean clouds at eps 7.85e-4
#: with an estimate of 1.5e-3 converged at tol 1.76e-6 while the exact plan of their
#: potentials missed its marginals by 2.9e-4, a review found.)
UNRESOLVED = 1e-3

#: The rounding estimate errs high (float32 clouds 60 apart at eps 0.2: estimate 2.6e-2,
#: marginals of the plan, summed in float64, 2.4e-3), so a ``tol`` within this factor of it
#: is still left to the marginal test.
LOOSE = 10.0


def unresolved(pb: "Problem", f, g, tol: float) -> torch.Tensor:
    """(B,) bool: the plan's entries round by more than ``UNRESOLVED`` of the mass and by
    more than ``LOOSE * tol`` (:func:`marginal_floor`): no marginal test certifies it."""
    floor = marginal_floor(pb, f, g)
    return (floor > UNRESOLVED * (pb.A.sum(-1) + pb.Bw.sum(-1))) & (floor > LOOSE * tol)


#: Rounding of the value at a large eps, in float64 units per unit of eps and mass
#: (:func:`value_unresolved`; a float32 solve's large-eps softmin runs in float64 too).
#: Measured on 200 x 150 clouds in the unit square, the value erred ~6 u64 eps relative in
#: float64; float32 erred ~100-700 u64 eps there, but on clouds 1e-5 wide at eps 1 only
#: ~1 u64 eps (8e-6 of a value of 3e-11), which a larger constant for float32 flagged: the
#: error depends on the spread too, and this one bound stays on the safe side of false alarms.
VALUE_NOISE = 4.0


def value_unresolved(pb: Problem, value, cost) -> torch.Tensor:
    """(B,) bool: the value's rounding, which grows with eps (the potentials carry ~u eps:
    the log-sum-exp of nearly equal terms), exceeds 1e-4 of ``|value| + |cost|``. Past it
    the value is not the solution's: at eps = 1e14 (float64) it read 0.290 for 0.320,
    float32 -4.32, with every marginal met."""
    noise = VALUE_NOISE * torch.finfo(torch.float64).eps * pb.eps * (pb.A.sum(-1) + pb.Bw.sum(-1))
    # a cost of exactly 0 (C = 0 where the plan is) has no spread to lose: its value is 0 to
    # ~u eps, which is no relative digit of anything
    return (noise.to(value.dtype) > 1e-4 * (value.abs() + cost.abs())) & (cost != 0)


def marginal_floor(pb: Problem, f, g) -> torch.Tensor:
    """Per problem (B,): an upper estimate of the marginal error's rounding floor. The entries
    ``exp((f + g - C)/eps)`` of the plan are exact to ``u |f + g - C| / eps`` each, about
    ``u (1 + 2 max(|f|, |g|) / eps)`` of the mass (``u``: the dtype's rounding unit). Errors of
    different entries partly cancel, so the reachable error is often well below it. Points
    of zero weight carry no mass: their potentials (large for far padding) do not count."""
    return rounding_floor(live_potential(pb, f, g), pb.eps, pb.A.sum(-1) + pb.Bw.sum(-1), f.dtype)


def rounding_floor(pot, eps: float, mass, dtype: torch.dtype):
    """:func:`marginal_floor` from the live potentials' size ``pot`` and the masses ``m(a) +
    m(b)``: ``u (1 + 2 pot / eps) mass``, on tensors or on host arrays."""
    return torch.finfo(dtype).eps * (1 + 2 * pot / eps) * mass


def residual_floor(pb: Problem, f, g) -> torch.Tensor:
    """Per problem (B,): :func:`marginal_floor` plus, for each KL-relaxed side, ``u eps / rho``
    of its mass: the residual compares ``P1`` with ``a exp(-f / rho)``, and the iterations
    leave ``f`` rounded by about ``u eps`` (the softmin's ``eps log`` terms), a relative
    error ``u eps / rho`` of the target (float32, masses 12 and 18, rho 0.5: the residual
    stalled at 2.4e-5 for eps 5 and 4.2e-5 for eps 100, where this term is 3.3e-5 and
    6.6e-4 and the plan's rounding alone 4.9e-6 and 3.4e-6). Not part of :func:`unresolved`:
    it bounds the test, not the plan."""
    floor = marginal_floor(pb, f, g)
    u = torch.finfo(f.dtype).eps
    for w, rho in ((pb.A, pb.rho_a), (pb.Bw, pb.rho_b)):
        if rho is not None:
            floor = floor + u * pb.eps / rho * w.sum(-1)
    # self-transport's residual is twice its row gap (both sides are the one potential)
    return 2 * floor if pb.symmetric else floor


def live_potential(pb: Problem, f, g) -> torch.Tensor:
    """(B,) ``max(|f_i|, |g_j|)`` over the points of positive weight."""
    return torch.maximum(finite_abs_max(torch.where(pb.A > 0, f, 0.0)), finite_abs_max(torch.where(pb.Bw > 0, g, 0.0)))


#: Unconverged problems of a batch diagnosed one by one in the warning (the rest counted).
DIAGNOSED = 4


def _diagnoses(pb: Problem, f, g, resid, passed, converged, finite, n_iter, tol, value, cost, stalled) -> str:
    """:func:`_why_not_converged` for the unconverged problems: of a batch, each of the
    first :data:`DIAGNOSED` on its own, problems with one diagnosis grouped (one message
    for all sent a problem that only hit ``max_iter`` the diagnosis of its neighbour, whose
    eps was below what float32 resolves)."""
    bad = (~converged).nonzero().flatten().tolist()
    if len(bad) == 1:
        return _why_not_converged(pb, f, g, resid, passed, converged, finite, n_iter, tol, value, cost, stalled)
    groups: dict[str, list[int]] = {}
    for i in bad[:DIAGNOSED]:
        alone = torch.ones_like(converged)
        alone[i] = False
        why = _why_not_converged(pb, f, g, resid, passed, alone, finite, n_iter, tol, value, cost, stalled)
        groups.setdefault(why, []).append(i)
    more = f"; {len(bad) - DIAGNOSED} more not diagnosed" if len(bad) > DIAGNOSED else ""
    return "; ".join(f"problem{'s' if len(ix) > 1 else ''} {', '.join(map(str, ix))}: {why}"
                     for why, ix in groups.items()) + more


def _why_not_converged(pb: Problem, f, g, resid, passed, converged, finite, n_iter, tol, value, cost,
                       stalled=None) -> str:
    """The warning's diagnosis for the problems that did not converge (``stalled``: (B,)
    bool, the problems a solver stopped for lack of progress near the floor, if it has such a rule).
    Every number read is over those problems (:func:`_diagnoses` asks it of one at a time)."""
    bad = ~converged
    eps, dt = pb.eps, _validate.dtype_name(f.dtype)
    if not bool(_validate.finite_rows(f, g)[bad].all()):
        reach = ("1e19 overflow float32; rescale the points or use float64" if f.dtype != torch.float64
                 else "1e154 overflow float64; rescale the points")  # (a float64 run was told to use float64)
        return f"non-finite potentials: eps too small for {dt}, or costs beyond its range (squared distances " \
               f"of coordinates near {reach})"
    if bool((finite & ~converged & value_unresolved(pb, value, cost)).any()):
        return (f"eps={eps:g} is above what {dt} resolves of the value: its potentials carry a rounding of about "
                f"u * eps, over 1e-4 of the value; the plan is near a (x) b there and the value near <a (x) b, C> "
                f"(res.cost); use a smaller eps{'' if f.dtype == torch.float64 else ' or float64'}")
    if not bool(finite[bad].all()):
        masses = float((pb.A.double().sum(-1) * pb.Bw.double().sum(-1))[bad].max())
        if eps * masses > 1e-3 * torch.finfo(f.dtype).max:  # the value's own term is out of range
            return (f"the value is not finite in {dt}: its term eps * m(a) * m(b) (here up to {eps * masses:.3g}) "
                    f"is beyond the dtype's range; normalise the weights (the plan scales with them) or use float64")
        if bool(far_start(pb, f, g)[bad].all()):
            return (f"the plan of the returned potentials, or a relaxed marginal's target a * exp(-f / rho), "
                    f"overflows {dt} at potentials eps={eps:g} resolves: a start (init) far from the optimum, whose "
                    f"offset each iteration shrinks by rho / (rho + eps); more iterations (max_iter), or a start "
                    f"nearer the optimum")
        return (f"the plan of the returned potentials overflows (non-finite value or marginals) at eps={eps:g}: "
                f"too few iterations at eps (eps_schedule's stages count toward max_iter), or eps below what {dt} "
                f"resolves of the cost")
    pot = float(live_potential(pb, f, g)[bad].max())
    floors, masses = marginal_floor(pb, f, g), pb.A.sum(-1) + pb.Bw.sum(-1)
    mass, floor = float(masses[bad].max()), float(residual_floor(pb, f, g)[bad].max())
    wider = "" if f.dtype == torch.float64 else "use float64, "
    rounding = (f"rounding at eps={eps:g} in {dt} (about {floor:.1e}, with |f|, |g| up to {pot:.3g}): "
                f"ask for a larger tol, or {wider}a larger eps, or rescale the cost")
    # marginals that look met (else the messages below say by how much they miss)
    fuzzy = ~converged & unresolved(pb, f, g, tol) & (resid <= 2 * tol)
    if bool(fuzzy.any()):
        share = float((floors / masses)[fuzzy].max())
        shift = "subtract C.min() (the plan does not change), " if pb.geom.is_dense else ""
        return (f"eps={eps:g} is below what {dt} resolves of f + g - C (|f|, |g| up to {pot:.3g}): each entry of "
                f"the plan is exact to only about {100 * share:.2g}% of itself, so no marginal test certifies it "
                f"(residual {float(resid[fuzzy].max()):.3e}); {shift}{wider}a larger eps, or rescale the cost")
    if bool((passed & ~converged).any()):
        miss = float(resid[passed & ~converged].max())
        if float(floors[bad].max()) < UNRESOLVED * mass:  # a plan that holds, at a tol below its rounding
            return (f"the iterations met tol={tol:g}, but the plan of the potentials misses its marginals by "
                    f"{miss:.3e}, which is their {rounding}")
        return (f"the iterations met tol={tol:g}, but the plan of the potentials misses its marginals by {miss:.3e}: "
                f"eps={eps:g} is below what {dt} resolves of f + g - C (|f|, |g| up to {pot:.3g}; {wider}a larger "
                f"eps, or rescale the cost)")
    if pb.rho_a is None and pb.rho_b is None:
        # |P1 - a|_1 + |P^T 1 - b|_1 >= |sum P - sum a| + |sum P - sum b| >= |m(a) - m(b)|
        gap = float(torch.where(~converged, (pb.A.double().sum(-1) - pb.Bw.double().sum(-1)).abs(), 0.0).max())
        left = float(resid[~converged].max())
        # the gap as the cause where the residual is near it (a residual 5x the gap of float32's
        # uniform weights had been blamed on weights the user never passed, a review)
        if gap > tol and left <= 2 * gap:
            fix = ("normalise a and b in the geometry's dtype (weights normalised in float32 keep a gap of their "
                   "rounding on a float64 geometry)" if pb.a_in is not None or pb.b_in is not None
                   else f"use float64 (the uniform weights' rounding in {dt})")
            return (f"the weights' total masses differ by {gap:.3e}, below which no balanced plan's marginal error "
                    f"(residual {left:.3e}) can fall, so tol={tol:g} is out of reach: {fix}, or ask for a larger tol")
    if (pb.rho_a is not None or pb.rho_b is not None) and not pb.symmetric:
        c, keep = best_offset(pb, f, g)
        far = ~converged & ~keep[:, 0] & torch.isfinite(c[:, 0])
        if bool(far.any()):  # the optimum lies along (f + c, g - c), beyond what the dtype moves to
            c_far = float(c[far].abs().max())
            return (f"residual {float(resid[far].max()):.3e} > tol={tol:g}: the optimum lies at an offset of about "
                    f"{c_far:.3g} along (f + c, g - c), the direction that keeps the plan (unequal masses and a large "
                    f"rho: c ~ rho log(m(a)/m(b)) / 2), and {dt} would round f + g there by about "
                    f"{c_far * torch.finfo(f.dtype).eps:.1e}, over eps/16; the iterations move along it by a factor "
                    f"1 - eps/rho each: use {'' if f.dtype == torch.float64 else 'float64, '}a smaller rho, "
                    f"or equal masses")
    if stalled is not None and bool((stalled & ~converged).any()):
        left = float(resid[stalled & ~converged].max())
        return (f"no progress in the last steps (Sinkhorn iterations or Newton steps) at residual {left:.3e} > "
                f"tol={tol:g}, near the marginals' {rounding}")
    left = float(resid[~converged].max())
    if not math.isfinite(left):  # P1 overflows (or is 0/0): no iteration can recover from it
        return (f"the plan of the potentials has non-finite marginals (residual {left}): eps={eps:g} is far below "
                f"what {dt} resolves of f + g - C (|f|, |g| up to {pot:.3g}); use a larger eps, "
                f"eps_schedule='geometric', {wider}or rescale the cost")
    why = f"residual {left:.3e} > tol={tol:g} after {int(n_iter[bad].max())} iterations"
    # an estimate of the rounding's order (errors partly cancel; the iterations may still get
    # there, or stall a few times above it: float32 unbalanced solves stalled at 1.4x)
    if tol < floor and left <= 4 * floor:
        why += (f" (more iterations may reach it, but tol may also be below the residual's rounding at eps={eps:g} "
                f"in {dt}, of the order of {floor:.1e})")
    return why


#: The geometry whose solve's result only its value will be read of (set by
#: :func:`value_only_results`, as ``SinkhornLoss`` does), to combine it with others: see
#: :func:`entropic_result`.
_VALUE_ONLY = contextvars.ContextVar("otcore_value_only", default=None)


@contextlib.contextmanager
def value_only_results(geom):
    """Within this context, the result of a solve on ``geom`` (this object, not any other
    solve that code run meanwhile starts, e.g. from a warning hook) holds its value in the
    dtype it was computed in (float64 where a float32 solve's softmin is: eps above a quarter
    of the cost's diameter), for the caller to round once after combining values, and with
    ``tol=None`` it skips the column marginals and the transport cost (:func:`entropic_result`)."""
    token = _VALUE_ONLY.set(geom)
    try:
        yield
    finally:
        _VALUE_ONLY.reset(token)


def entropic_result(pb: Problem, f, g, n_iter, passed, tol, name: str, info: dict, stalled=None) -> OTResult:
    """Build the :class:`OTResult` at potentials ``(f, g)``: exact marginals, cost, value
    (through its dual), convergence (``tol`` None: finiteness only), and envelope
    gradients. Two streamed passes: the row pass, then the column marginals with the cost.
    ``stalled`` (B,) bool: problems stopped for lack of progress (for the warning's text).
    Within :func:`value_only_results` of this geometry and with ``tol=None`` (a caller that reads only the
    value and its gradients, as ``SinkhornLoss``): one streamed pass instead of two, the
    column marginals and the transport cost being skipped; ``marginal_error``, the residual
    and ``cost`` are then NaN. (A tolerance is tested on the marginals: then all passes run.)
    Within that context (any ``tol``) the value also keeps its computed dtype: float32
    rounding of each term had cost the debiased loss, a difference of three terms ~1e4 times
    its size at large eps, 1.6e-3 of itself (a review: eps 100, 200 vs 150 points)."""
    geom, eps, kw = pb.geom, pb.eps, pb.kw()
    # (the context is read only where it matters: a value computed wider than the solve, or
    # tol=None; torch.compile cannot trace ContextVar.get, a graph break every solve)
    for_loss = (tol is None or pb.wide) and _VALUE_ONLY.get() is geom
    value_only = tol is None and for_loss
    with torch.no_grad():
        F, G = f + eps * pb.loga, g + eps * pb.logb
        # row marginals from the row pass s: (P1)_i = a_i exp(delta_i), delta = (f - s)/eps
        # (s in float64 when wide: resolved_softmin; else the pass of G = g + eps log b itself)
        A, Bw = pb.value_weights(torch.float64 if pb.wide else f.dtype)
        s = resolved_softmin(geom, g, Bw, eps, 1, kw, True) if pb.wide else geom.softmin(G, eps, 1, **kw)
        delta = (f.to(s.dtype) - s) / eps
        if value_only:
            marg_err = resid = cost = torch.full((geom.batch,), math.nan, dtype=f.dtype, device=f.device)
        else:
            r = weighted(pb.A, torch.exp(delta), pb.zeros[0]).to(f.dtype)
            c, cost = geom.marginals_and_cost(F, G, eps, 0, **kw)  # one pass for both
            marg_err = (r - pb.A).abs().sum(-1) + (c - pb.Bw).abs().sum(-1)
            # balanced: the residual is the marginal error
            resid = marg_err if pb.rho_a is None and pb.rho_b is None else optimality_residual(pb, r, c, f, g)
        wf, wg = f.to(delta.dtype), g.to(delta.dtype)
        value = (weighted(A, phi(wf, pb.rho_a), pb.zeros[0]).sum(-1)
                 + weighted(Bw, phi(wg, pb.rho_b), pb.zeros[1]).sum(-1) - eps * mass_gap(pb, A, Bw, delta))
        value = value if for_loss else value.to(f.dtype)
        # what the result holds, all finite (a plan of mass 1.8e19 at eps 1e-10 in float32 had
        # marginal_error inf with converged True under tol=None, a review)
        # (resid is marg_err itself where balanced: checked once)
        finite = _validate.finite_rows(f, g, value, *(() if value_only else
                                                      (marg_err, cost) + (() if resid is marg_err else (resid,))))
        # The in-loop test ("passed") and these marginals round differently: a problem that
        # passed may sit a rounding step above tol here. Beyond that slack the marginals of
        # the plan the result hands out decide: with eps below what the dtype resolves of
        # F + G - C the loop's test can read 0 while P misses its marginals by O(1).
        if tol is None:  # a fixed number of iterations (sinkhorn(tol=None)): no tolerance to meet
            converged = finite
        else:
            slack = 2 * tol + 64 * torch.finfo(f.dtype).eps * (pb.A.sum(-1) + pb.Bw.sum(-1))
            # Every marginal above is computed with the iterations' own rounding, so it cannot see
            # an eps below what the dtype resolves of f + g - C: with float32 costs near 1e6 at
            # eps = 0.05 it read 1.4e-7 while plan() missed a by 0.58
            converged = ((resid <= tol) | (passed & (resid <= slack))) & finite & ~unresolved(pb, f, g, tol) \
                & ~value_unresolved(pb, value, cost)
    spec = EnvelopeSpec(geom, pb.A, pb.Bw, f, g, F, G, eps, pb.rho_a, pb.rho_b, pb.backend, pb.precision,
                        pb.a_in, pb.b_in, pb.wide)
    value, cost = envelope_value(spec, value, cost)
    if geom.batched:
        all_ok = bool(converged.all())
        n_out, err_out, ok_out, res_out = n_iter, marg_err, converged, resid
    else:  # the Python numbers an unbatched result holds, in one transfer (one sync on a GPU)
        nums = torch.stack([t[0].double() for t in (n_iter, marg_err, converged, resid)]).tolist()
        n_out, err_out, ok_out, res_out = int(nums[0]), nums[1], nums[2] == 1.0, nums[3]
        all_ok = ok_out
    info = dict(info, residual=res_out)
    if not all_ok:
        bad = int((~converged).sum())
        why = _diagnoses(pb, f, g, resid, passed, converged, finite, n_iter, tol, value, cost, stalled)
        warnings.warn(f"{name} did not converge for {bad} of {geom.batch} problem(s): {why}", ConvergenceWarning, stacklevel=user_stacklevel())
    out = (lambda t: t) if geom.batched else (lambda t: t[0])
    return OTResult(
        f=out(f),
        g=out(g),
        cost=out(cost),
        value=out(value),
        n_iter=n_out,
        marginal_error=err_out,
        converged=ok_out,
        info=info,
        _geom=geom,
        _F=F,
        _G=G,
        _eps=eps,
        _backend=pb.backend,
        _precision=pb.precision,
        _versions=geom.input_versions(),
    )
