"""Log-domain Sinkhorn: balanced and unbalanced, epsilon scaling, warm starts, batches.

One iteration is two streamed passes of the geometry's ``softmin``:

    f <- tau_a * softmin_j(g + eps log b)     tau = rho / (rho + eps), 1 if balanced
    g <- tau_b * softmin_i(f + eps log a)

With a ``tol`` the updates between two tests are over-relaxed by default
(``overrelax="auto"``, :mod:`otcore.solvers._overrelax`); the last one before a test is plain.

After the ``g`` update the column conditions hold exactly, so the stopping
residual is the row residual, and that comes out of the next row pass for free:
with ``s`` the new row softmin, ``(P1)_i = a_i exp((f_i - s_i)/eps)``. It is read
every ``check_every`` iterations (one host synchronisation per check, none in between).

Self-transport ``OT(a, x; a, x)`` (the debiasing terms of the Sinkhorn divergence:
same cloud, same weights, same penalty on both sides) has ``f = g`` at the optimum.
Alternating updates converge slowly there once eps is below the points' spacing
(the iterates oscillate between the two sides), so it runs the symmetric averaged
update of Feydy et al. (AISTATS 2019) instead, one pass per iteration:

    f <- (f + tau * softmin(f + eps log a)) / 2

whose fixed point is the same and whose convergence does not degrade that way.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .. import _validate
from .._progress import Progress
from ..result import OTResult
from ..reference import damping as _tau, scaled
from ._entropic import (Problem, balanced_gauge, check_init, entropic_result, make_problem, residual_floor,
                        settle_zero_weights, tol_against_mass, weighted_mean, far_start, residual_at, unresolved,
                        best_offset)
from ._graph import graphed
from . import _host
from ._overrelax import Overrelaxation, Progressing, check_overrelax, for_problem as relaxation

Schedule = Union[None, str, float, Sequence[float]]

#: Tests without the residual falling 1% below its best after which a problem within 4x of
#: its rounding estimate (``residual_floor``) stops, unconverged: the dtype's floor, where
#: the iterations only move the rounding (float32 at eps 10, masses ~30: 1000 iterations at
#: the residual of the 100th, for each of a loss's three solves). Only once that stall is
#: also :data:`STALL_SHARE` of the tests so far: near the float32 floor a slow linear
#: convergence (2% per 100 iterations, under the readings' noise) had been stopped as a
#: stall in 24 of 60 cases that went on to converge, the estimate being 10x high (a review).
STALL_STOP = 10
#: see :data:`STALL_STOP`: the stall at least half as long as the stretch before it.
STALL_SHARE = 1 / 3


def check_schedule(schedule: Schedule, eps: float, name: str = "eps_schedule", target: str = "eps",
                   word: str = "geometric"):
    """Validate ``eps_schedule`` (no geometry needed): the decay factor (a float in
    (0, 1)) for ``"geometric"`` or a number, else the list of stages (``[]`` for None).
    ``name``, ``target`` and ``word`` name the argument, the value it leads to and its
    keyword in errors (sparse OT's ``gamma_schedule`` checks its factors and sequences here)."""
    if schedule is None:
        return []
    schedule = _validate.numpy_scalar(schedule)
    if isinstance(schedule, np.ndarray) and schedule.ndim == 1:  # a sequence, as a list
        schedule = list(schedule)
    if isinstance(schedule, torch.Tensor) and schedule.ndim == 1:  # a sequence, as a 1-d array (one
        schedule = list(schedule.unbind())  # element too: a factor there had refused [5.0] and read
        # [0.5] as a factor where np.array([0.5]) is one stage, a review; an empty one: no stages)
    if isinstance(schedule, torch.Tensor) and schedule.ndim > 1:
        raise TypeError(f"{name} must be None, {word!r}, a number (a 0-d tensor) or a 1-d sequence, got a "
                        f"tensor of shape {tuple(schedule.shape)}")
    if isinstance(schedule, str):
        if schedule != word:
            raise ValueError(f"{name} must be None, {word!r}, a decay factor in (0, 1) or a decreasing "
                             f"sequence of values > {target}, got {schedule!r}")
        return 0.5
    if isinstance(schedule, (numbers.Real, torch.Tensor)) and not _validate._is_bool(schedule):
        q = _validate.positive(name, schedule)  # a Python, NumPy or 0-d tensor number
        if not 0 < q < 1:
            raise ValueError(f"{name} as a decay factor must be in (0, 1), got {q}")
        return q
    if isinstance(schedule, (list, tuple)):
        vals = [_validate.positive(f"{name}[{i}]", v) for i, v in enumerate(schedule)]
        if any(v <= eps for v in vals) or any(u <= v for u, v in zip(vals, vals[1:])):
            raise ValueError(f"{name} as a sequence must be decreasing and > {target}")
        return vals
    raise TypeError(f"{name} must be None, {word!r}, a float or a sequence, got {type(schedule).__name__}")


def eps_stages(schedule: Schedule, top: Callable[[], float], eps: float,
               max_iter: Optional[int] = None) -> list[float]:
    """The eps values run (one iteration each) before the target ``eps``.

    ``None``: none. ``"geometric"``: from the cost's diameter ``top()`` down to ``eps`` by
    factors of 1/2 (the first value is the diameter). A float ``q`` in (0, 1): the same
    with factor ``q``. A decreasing sequence of values > eps: those. ``max_iter``, if given,
    counts the stages: ``ValueError`` where they would leave no iteration at ``eps``
    (checked before the list is built: a factor of 0.9999999 made 50 million stages for a
    50-iteration solve, in 79 s, a review).
    """
    q = check_schedule(schedule, eps)
    if not isinstance(q, float):
        _check_stage_count(len(q), eps, max_iter)
        return q  # None: no stages; a sequence: those
    diam = top()  # asked only here, where a schedule needs it: a pass over the geometry
    if not math.isfinite(diam):  # a cost range past the dtype (finite points 4e19 apart in float32):
        return []  # no stage to scale from; the solve at eps reports what it reaches (a review: OverflowError)
    # in logarithms: diam / eps and q**i may leave the float range (eps 1e-200 and q 1e-170 had
    # raised ZeroDivisionError from eps / q**i)
    span, step = math.log(max(diam, eps)) - math.log(eps), -math.log(q)
    k = max(0, math.ceil(span / step))
    _check_stage_count(k, eps, max_iter)
    # the first stage is capped at the diameter: with a small q, eps / q**k can be far
    # above the cost's range, where the update rounds to a huge common offset of f and g
    def stage(i: int) -> float:  # eps / q**i (exact for q = 1/2), in logarithms where q**i underflows
        return diam if i * step >= span else min(eps / q**i if q**i > 0 else math.exp(math.log(eps) + i * step), diam)

    return [stage(i) for i in range(k, 0, -1)]


def _check_stage_count(k: int, eps: float, max_iter: Optional[int]) -> None:
    if max_iter is not None and k >= max_iter:  # the result would be read at an eps never iterated at
        raise ValueError(f"max_iter={max_iter} counts the eps-scaling stages, and eps_schedule gives {k} stages "
                         f"before eps={eps:g}, leaving no iteration at eps: give max_iter > {k} or a shorter "
                         f"schedule")


# torch.compile: the solve (data-dependent loop, host checks) is one opaque call, as in
# SinkhornLoss; its gradients are autograd.Functions. (Traced, 200 x 150 points compiled for
# 100-300 s, later calls ran 2-3 s for eager's 0.06-0.9 s, and inference tensors failed a guard.)
@torch.compiler.disable
def sinkhorn(
    geom,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    *,
    eps: float,
    tol: Optional[float] = 1e-5,
    max_iter: int = 1000,
    rho=None,
    eps_schedule: Schedule = None,
    init: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    backend: str = "auto",
    precision: str = "fp32",
    check_every: int = 10,
    cuda_graph: bool = False,
    overrelax: Union[bool, float, str] = "auto",
    verbose: Optional[bool] = None,
) -> OTResult:
    """Entropic optimal transport by log-domain Sinkhorn iterations.

    Solves ``min_P <P, C> + eps KL(P | a x b)`` over couplings of ``a`` and ``b``
    (balanced), or with the marginal constraints replaced by penalties
    ``rho KL(P1 | a) + rho KL(P^T 1 | b)`` (unbalanced). The optimal plan is
    ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``.

    Args:
        geom: :class:`~otcore.PointCloud` or :class:`~otcore.CostMatrix`, ``B`` problems if batched.
        a: ``(n,)`` / ``(B, n)`` non-negative weights, uniform if None. b: likewise ``(m,)``.
        eps: entropic regularization, in units of the cost (> 0).
        tol: stop when the residual ``|P1 - a|_1 + |P^T 1 - b|_1`` (KL-relaxed
            marginals: distance to their optimal targets ``a exp(-f/rho)``) is <= tol.
            ``None``: run exactly ``max_iter`` iterations with no convergence test (no
            host synchronisation in the loop; e.g. SwAV's 3 iterations); ``converged``
            then only says that the result (potentials, value, ``marginal_error``, cost) is
            finite, and no warning is given for the marginals, whose error
            ``marginal_error`` still reports.
        max_iter: iteration cap (eps-scaling stages count). Hitting it gives
            ``converged=False`` and a :class:`~otcore.result.ConvergenceWarning` (with a
            ``tol``). It must exceed the number of stages (``ValueError``). A problem also
            stops, unconverged, when its residual has not fallen 1% for :data:`STALL_STOP`
            tests (and a third of its tests) within 4x its rounding estimate (a ``tol`` the
            dtype cannot reach).
        rho: None (balanced), a number (KL penalty on both marginals), or
            ``(rho_a, rho_b)`` with None for an exact side.
        eps_schedule: eps scaling (see :func:`eps_stages`): None, ``"geometric"``,
            a decay factor, or explicit values; one iteration per stage. A batch runs one
            list of stages, from its largest cost diameter. With a ``tol``, a problem
            unconverged after stages that stops before ``max_iter`` runs once more from
            zero without them (:func:`retry_without_stages`; ``info["eps_schedule_retry"]``).
        init: warm start ``(f, g)``, e.g. ``(res.f, res.g)`` of a nearby problem.
        backend: ``"auto"`` (Triton on CUDA, torch otherwise), ``"torch"``, ``"triton"``.
        precision: ``"fp32"`` (float32-faithful) or ``"tf32"`` (faster kernels; ~1e-2 relative
            error expected, see docs/kernels.md).
        check_every: iterations between convergence checks (each one host sync).
        cuda_graph: on CUDA tensors, record the ``check_every - 1`` iterations between
            two checks into a CUDA graph once per solve and replay it (one launch per
            block instead of ~10 per iteration: for small, launch-bound problems). Same arithmetic as
            without; no effect on CPU tensors.
        overrelax: over-relaxed alternating updates ``f <- (1 - w) f + w tau softmin``
            (:mod:`otcore.solvers._overrelax`): ``True`` adapts ``w`` per problem to the
            measured convergence rate (needs a ``tol``), a number in (0, 2) fixes it,
            ``False`` runs plain Sinkhorn; needs ``check_every >= 3``. ``"auto"`` (default):
            adaptive with a ``tol`` and ``check_every >= 3``, else plain (``tol=None`` runs
            plain iterations). Same fixed point; at small eps 2-8x fewer iterations were
            measured, and never more away from the dtype's rounding floor
            (docs/conventions.md). Ignored by self-transport.
        verbose: progress line on stderr; None = on a terminal after ~1 s.

    Self-transport (``PointCloud(x, x)`` with the same tensor twice, ``a is b`` and
    the same ``rho`` on both sides) runs the symmetric update
    ``f <- (f + tau softmin(f + eps log a)) / 2`` instead, one pass per iteration,
    which converges in tens of iterations where alternating updates stall; then
    ``f = g`` and ``info["symmetric"]`` is True.

    Returns:
        :class:`~otcore.OTResult`; in a batch each problem stops on its own
        (its potentials freeze once it converges) and ``n_iter``/``converged`` are per problem.
    """
    tol = _validate.positive("tol", tol, allow_none=True)
    pb = make_problem(geom, a, b, eps, rho, backend, precision, tol)
    max_iter = _validate.positive_int("max_iter", max_iter)
    check_every = _validate.positive_int("check_every", check_every)
    _validate.flag("cuda_graph", cuda_graph)
    overrelax = check_overrelax(overrelax, tol, check_every)
    move = best_translation(pb) if translates(pb) else None  # after each block of iterations and at the end
    # a warm start moved first along (f + c, g - c), the same plan: balanced, to the gauge
    # <a, f>/m(a) = <b, g>/m(b) (a large offset would cost digits); unbalanced, by the best
    # translation (float32 from a rho = 1000 solve's f ~ -346 at rho = 0.5: exp(-f/rho)
    # overflowed the first test, which stopped the solve after 1 iteration, a review)
    balanced = pb.rho_a is None and pb.rho_b is None and not pb.symmetric
    f, g = check_init(init, geom, shift=(lambda f, g: balanced_gauge(f, g, pb.A, pb.Bw)) if balanced else move)
    if init is None:
        stages = eps_stages(eps_schedule, pb.top_diameter, pb.eps, max_iter)
        for stage in stages:  # the diameter's or the given values: each must fit the dtype as eps does
            _validate.magnitude_fits("eps_schedule", stage, geom.dtype, "rescale the cost")
    else:  # a warm start skips the eps stages (as in sinkhorn_newton): a stage at the diameter's
        check_schedule(eps_schedule, pb.eps)  # eps would throw a nearby problem's potentials away
        stages = []
    tol_against_mass(tol, pb.min_mass)
    progress = Progress(verbose, "sinkhorn", measure="marginal error" if pb.rho_a is None and pb.rho_b is None
                        else "residual")  # unbalanced: the distance to the optimality conditions
    with torch.autocast(geom.device.type, enabled=False):  # computed in fp32/fp64 whatever autocast says
        relax = relaxation(overrelax, pb)
        f, g, n_iter, passed, stalled = _iterate(pb, f, g, stages, tol, max_iter, check_every, progress, cuda_graph,
                                        cold=init is None, relax=relax, move=move)
        retried, retried_h = torch.zeros_like(passed), np.zeros(geom.batch, bool)
        # (not self-transport: f = g leaves a group no free offset, and the loss's two such
        # solves keep their host reads)
        if stages and tol is not None and not pb.symmetric:
            again_relax = []

            def again(f0, g0, failed, left: int):  # at eps, no stages: (f, g, n_iter, passed, stalled)
                again_relax.append(relaxation(overrelax, pb))
                return _iterate(pb, f0, g0, [], tol, left, check_every, progress, cuda_graph,
                                active=failed, cold=True, relax=again_relax[0], move=move)
            (f, g, n_iter, passed, stalled), retried, retried_h, kept = retry_without_stages(
                pb, (f, g, n_iter, passed, stalled), again, tol, max_iter)
            if relax is not None and kept is not None:  # the factors of the run kept
                relax.omega = torch.where(kept, again_relax[0].omega, relax.omega)
                relax.w = np.where(_host.to_host(kept)[0] > 0, again_relax[0].w, relax.w)
        if move is not None:
            f, g = move(f, g)
        f, g = settle_zero_weights(pb, f, g, (_tau(pb.rho_a, pb.eps), _tau(pb.rho_b, pb.eps)), tied=pb.symmetric)
        info = {"eps_stages": stages, "symmetric": pb.symmetric, "time_s": progress.elapsed,
                "eps_schedule_retry": retried if geom.batched else bool(retried_h[0])}
        if relax is not None:  # the factors in use at the end, per problem
            info["overrelax"] = relax.omega if geom.batched else float(relax.w[0])
        return entropic_result(pb, f, g, n_iter, passed, tol, "sinkhorn", info, stalled)


def retry_without_stages(pb: Problem, first: tuple, again: Callable, tol: float,
                         max_iter: Optional[int] = None):
    """The problems of a cold solve with eps stages that failed (not converged, or passed by a
    test that cannot see the plan's rounding: :func:`unresolved`), solved once more from zero
    at the target eps without stages. ``first = (f, g, n_iter, passed, stalled)`` of the
    solve; ``again(f0, g0, failed, left)`` the same tuple from ``(f0, g0)``, the potentials
    with the problems ``failed`` set to zero, run on those for at most ``left`` iterations.
    With ``max_iter`` (Sinkhorn's cap, stages included) only those that failed before it
    are run again, within the iterations left; without (``left`` None),
    every failed one, on budgets of its own (SNS's, whose caps are per phase). Returns the
    tuple kept per problem (the second where it converged or ends nearer the optimality
    conditions; iterations of both counted), the (B,) mask of the problems solved again (on
    the device, and its host copy), and that of those whose second run is kept (None where
    none ran again: no host read is spent on it).

    Why: the stages' large eps couple every point, and one iteration each leaves a group of
    points that decouples from the rest on the way down (a far pair or cluster of balanced
    mass: no representable plan entry across) at an offset ``(f + c, g - c)`` of its own,
    of the order of the cost to the rest, which no later iteration moves (the exact optimum
    ties it through plan entries below the dtype's range; iterations run to convergence at
    each stage froze it too, at eps ~ that cost, measured). It is an optimum in exact
    arithmetic, but its potentials round: in float32 a pair 10 units away (offset 114)
    stalled at a marginal error of 7e-5, 1e4 units away (offset 1e8) the plan was lost and
    SinkhornLoss came out negative; a forbidden cost of 1e30 (float64) left ``f ~ -1e28``
    (reviews). A cold start sets each group's offset locally (``g`` from 0) and converged
    on all of them in 60-220 iterations; on coupled problems the stages are the faster
    start, hence this order. A solve that reaches ``max_iter`` is not run again: the cap
    holds (a capped solve equals ``tol=None``'s iterations)."""
    f, g, n_iter, passed, stalled = first
    failed = ~passed | unresolved(pb, f, g, tol)
    if max_iter is not None:
        failed &= n_iter < max_iter
    used = _host.to_host(torch.where(failed, n_iter, -1))[0]  # one host read, after the loop's last
    if (used < 0).all():
        return first, failed, used >= 0, None
    # (a batch: the iterations left to the latest to fail)
    f0, g0 = (torch.where(failed[:, None], 0.0, t) for t in (f, g))
    second = again(f0, g0, failed, None if max_iter is None else max_iter - int(used.max()))
    take = failed & second[3] & ~unresolved(pb, second[0], second[1], tol)
    if bool((failed & ~take).any()):  # neither converged: the smaller residual
        take |= failed & (residual_at(pb, second[0], second[1]) < residual_at(pb, f, g))
    f, g = (torch.where(take[:, None], new, old) for old, new in zip((f, g), second[:2]))
    passed, stalled = (torch.where(take, new, old) for old, new in ((passed, second[3]), (stalled, second[4])))
    return (f, g, n_iter + second[2], passed, stalled), failed, used >= 0, take


def translates(pb: Problem) -> bool:
    """Whether the solve moves its potentials by :func:`best_translation`: unbalanced, not
    self-transport (whose ``f = g`` has its best translation at 0)."""
    return not (pb.symmetric or (pb.rho_a is None and pb.rho_b is None))


def best_translation(pb: Problem):
    """``move(f, g, active=None)``: unbalanced potentials moved by the best ``c`` along
    ``(f + c, g - c)``, the direction that leaves the plan as it is, in closed form (as
    translation-invariant Sinkhorn does, Sejourne et al. 2022), for the problems
    ``active``. Along it the dual ``-rho_a <a, e^(-f/rho_a) - 1> - rho_b <b, e^(-g/rho_b) - 1>``
    (an exact side: ``<a, f>``) has curvature ~ mass / rho, so the iterations converge along
    it slowly and the residual sees a drift ``c`` only as ``mass c / rho``: at rho = 1e5 a
    solve stopped at tol 1e-5 after 30 iterations with ``f`` 0.059 off the optimum (eps
    0.05) and the value's derivative in the weights' scale 80% off, ``converged=True``, and
    with unequal masses rho = 1000 did not converge in 20,000 iterations (reviews). The
    maximum is where ``<a, e^(-(f+c)/rho_a)> = <b, e^(-(g-c)/rho_b)>`` (an exact side: its
    mass), i.e. ``c = (L_a - L_b) / (1/rho_a + 1/rho_b)``, ``L = log <w, e^(-f/rho)>``,
    taken in float64 (float32's log of a sum near the mass would lose ``c`` to rho 2^-24).
    A problem whose move would round ``f + g`` by more than ``eps/16`` is left where it is
    (:func:`~otcore.solvers._entropic.best_offset`; the optimum of masses that differ by a
    rounding step at rho = 1e39 is ~1e23 away).
    No host sync (an exact side's log mass is put on the device here, once), so a CUDA
    graph of the iterations can hold it."""
    device = pb.A.device
    exact = [torch.as_tensor(np.log(mass), dtype=torch.float64, device=device) if rho is None else None
             for rho, mass in ((pb.rho_a, pb.mass_a), (pb.rho_b, pb.mass_b))]

    @torch.no_grad()
    def move(f, g, active=None):
        c, keep = best_offset(pb, f, g, exact)
        c = torch.where(keep if active is None else keep & active[:, None], c, 0.0)
        return f + c, g - c

    return move


def _cold_gauge(pb: Problem, f, g, active):
    """Balanced potentials after an eps stage moved to ``<b, g> = 0``, the gauge of a cold
    start (``g`` from ``f = softmin(C)``: a cost offset stays in ``f``, where it rounds
    least, sinkhorn_newton's warm-up notes). The stages' updates drift along the free
    direction ``(f + c, g - c)`` by about each stage's eps: from a first stage at 1e8 (a
    pair discouraged by a cost of 1e8, float32) they left ``f, g`` at -/+1.7e4, whose
    rounding (2e-3 = 0.2 eps at eps 0.01) stalled the solve at a marginal error of 0.22
    where none converged in 70 iterations; from 1e30 (float64) at -/+1.2e28 (reviews).
    Moved once after the stages, the 1e30 case still kept 1e12: the drift of the large
    stages had rounded away the small ones' digits, hence after each large one too."""
    c = torch.where(active, weighted_mean(g, pb.Bw), 0.0)[:, None]
    return f + c, g - c


@torch.no_grad()
def _iterate(pb: Problem, f, g, stages, tol, max_iter, check_every, progress, cuda_graph: bool = False,
             active=None, cold: bool = False, relax: Optional[Overrelaxation] = None, move=None):
    """Run the iterations; returns ``(f, g, n_iter, passed, stalled)`` (per-problem counts and
    flags; ``stalled``: stopped by :data:`STALL_STOP`, None with ``tol=None``).
    ``active`` (B,) bool, if given, restricts the iterations to those problems (the
    others keep their potentials and count no iterations). ``cold``: ``f, g`` are the zeros
    of no warm start (the symmetric iteration then starts one pass further, below).
    ``move``: :func:`best_translation`'s, applied after each block of iterations at the
    target eps (unbalanced problems; None: none).

    The eps-scaling stages run one iteration each, unchecked (the potentials are far
    from the target's). At the target eps the residual is read after the first
    iteration and then every ``check_every``: each such block of iterations is one
    ``sinkhorn_steps`` call whose last row pass gives the residual (the next iteration's
    row pass: the test costs no pass) and one host sync; on the Triton backend a small
    problem runs the whole block, test included, in one launch. The steady-state block
    is replayed from a CUDA graph when ``cuda_graph`` (see :mod:`otcore.solvers._graph`).
    """
    geom, kw, eps = pb.geom, pb.kw(), pb.eps
    B = geom.batch
    active = torch.ones(B, dtype=torch.bool, device=geom.device) if active is None else active.clone()
    passed = torch.zeros_like(active)
    n_iter = torch.zeros(B, dtype=torch.long, device=geom.device)
    if pb.symmetric and cold:
        # from f = 0 the averaged update gives f = s / 2, half the c-transform, and at large eps
        # the residual (~|f - s| / eps) passes tol right there: f stayed 0.23 off (eps = 1e4,
        # value 1e-6 off). Start at the c-transform of 0 instead (GeomLoss's start): one pass,
        # not counted as an iteration
        e0 = stages[0] if stages else eps
        s0 = scaled(geom.softmin(e0 * pb.loga, e0, 1, **kw), _tau(pb.rho_a, e0))
        f = g = torch.where(active[:, None], s0, f)
    elif pb.symmetric:  # a warm start may hold two different potentials
        avg = 0.5 * (f + g)
        f, g = torch.where(active[:, None], avg, f), torch.where(active[:, None], avg, g)

    def steps(f, g, e, k: int, active, check=None, omega=None):
        # the one update rule (reference.sinkhorn_steps), fused into one launch for small
        # problems on the Triton backend
        tau = (_tau(pb.rho_a, e), _tau(pb.rho_b, e))
        return geom.sinkhorn_steps(f, g, pb.loga, pb.logb, e, tau, k, active, pb.symmetric, check, omega=omega, **kw)

    omega = None if relax is None else relax.omega  # at the target eps only

    it = 0
    gauged = pb.rho_a is None and pb.rho_b is None and not pb.symmetric
    # the drift of a stage is about its eps: re-gauged after those large enough to cost the target's
    # digits (eps / (1024 u); none in a loss's usual schedule, from a diameter of a few units) and
    # after the last (the drift left, up to twice that bound, would stay in the result's rounding)
    large, last = pb.eps / (1024 * torch.finfo(f.dtype).eps), min(len(stages), max_iter) - 1
    for i, e in enumerate(stages[:max_iter]):
        f, g = steps(f, g, e, 1, active)
        if gauged and (e > large or i == last):
            f, g = _cold_gauge(pb, f, g, active)
        it += 1
        progress.update(it, None, e, f"eps stage {i + 1}/{len(stages)}")
    if it:  # one iteration per stage, for every problem (active does not change during them)
        n_iter += active * it

    def until_test(done: int) -> int:
        """Iterations at the target eps before the next test, ``done`` having run: after
        iteration 1, then after multiples of check_every."""
        return (1 if done <= 1 else check_every * -(-done // check_every)) - done

    if tol is None:  # a fixed number of iterations, no test (progress lines between blocks)
        # blocks as the tested loop's (each test's row pass is the next iteration's: k + 1
        # iterations), so that the translations fall at the same iterations, bit for bit
        def unchecked_block(f, g, active, k: int):
            f, g = steps(f, g, eps, k, active, omega=omega)
            return (f, g) if move is None else move(f, g, active)

        run = graphed(unchecked_block, geom.device, check_every) if cuda_graph else unchecked_block
        left = max_iter - it
        while it < max_iter:
            k = until_test(it - len(stages)) + 1
            if k > max_iter - it:  # cut at the cap: untranslated, as the tested loop's last steps
                f, g = steps(f, g, eps, max_iter - it, active, omega=omega)
                break
            f, g = run(f, g, active, k)
            it += k
            if progress.due():
                progress.update(it, None, eps)
        progress.close()
        return f, g, n_iter + active * left, passed, None  # (left > 0: max_iter exceeds the stages)

    def checked_block(f, g, active, k: int):
        """``k`` iterations, the test, and one more iteration where it fails: (f, g, resid)."""
        f, g, resid = steps(f, g, eps, k, active, check=(tol, pb.rho_a), omega=omega)
        return (f, g, resid) if move is None else (*move(f, g, active & (resid > tol)), resid)

    run_block = graphed(checked_block, geom.device, check_every - 1) if cuda_graph else checked_block
    progressing, stalled = Progressing(B), torch.zeros_like(active)
    relaxed, going_prev = pb.rho_a is not None or pb.rho_b is not None, None
    while it < max_iter:
        k = until_test(it - len(stages))
        if it + k >= max_iter:  # the cap comes first: run up to it, untested
            f, g = steps(f, g, eps, max_iter - it, active, omega=omega)
            n_iter += active * (max_iter - it)
            break
        f, g, resid = run_block(f, g, active, k)
        n_iter += active * k
        ok = resid <= tol
        passed |= active & ok
        before = active
        active = active & ~ok & _validate.finite_rows(resid)  # a non-finite residual: failed
        n_iter += active  # the iteration whose row pass gave the test, completed by those still running
        # the block's one host synchronisation: the flags, and the residuals with them
        r_h, going_h = _host.to_host(resid, active)
        if relaxed and not np.isfinite(r_h).all():
            # save a relaxed problem's far start: its inf (or inf - inf) contracts away (float32
            # potentials 100 off had stopped after 1 iteration). Read only here: the check costs
            # the common case nothing (the previous test's flags tell who was running)
            was_h = going_prev if going_prev is not None else _host.to_host(before)[0]
            lost = (was_h > 0) & ~np.isfinite(r_h)
            if lost.any():
                revive = far_start(pb, f, g) & _host.to_device(lost, active.device)
                active |= revive
                n_iter += revive & (resid > tol)  # (inf completed the test's iteration, NaN did not)
                going_h = _host.to_host(active)[0]
        stale = progressing.update(np.where(going_h > 0, r_h, np.nan))
        if relax is not None:
            relax.after_test(r_h, it + k, stale)
        stop = (going_h > 0) & (stale >= STALL_STOP) & (stale >= STALL_SHARE * progressing.tests)
        if stop.any():  # no progress for STALL_STOP tests: stop there if it is the dtype's rounding
            floor = _host.to_host(residual_floor(pb, f, g))[0]
            stop &= r_h <= 4 * floor
            if stop.any():
                stop_d = _host.to_device(stop, active.device)
                active &= ~stop_d
                stalled |= stop_d
                going_h = np.where(stop, 0.0, going_h)
        it += k + 1
        going_prev = going_h
        if not going_h.any():
            break
        if progress.due():  # from the residuals the test already read: those after it - 1 iterations
            progress.update(it - 1, float(r_h[going_h > 0].max()), eps)
    progress.close()
    return f, g, n_iter, passed, stalled
