"""Sinkhorn-Newton-Sparse (SNS): Tang et al., *Accelerating Sinkhorn Algorithm with
Sparse Newton Iterations* (ICLR 2024).

The balanced entropic OT dual (Lyapunov potential) is

    L(f, g) = <a, f> + <b, g> - eps * sum_ij P_ij,   P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps),

concave, with gradient ``(a - r, b - c)`` (``r = P1``, ``c = P^T 1``) and Hessian
``-(1/eps) M``, ``M = [[diag(r), P], [P^T, diag(c)]]``, singular along ``(1, -1)``
(shifting ``f`` up and ``g`` down leaves ``P`` unchanged).

1. Warm-up: Sinkhorn iterations (the same loop as :func:`otcore.sinkhorn`, over-relaxed
   by a fixed factor at the target eps) until a loose residual or an iteration cap; from a
   cold start, by default, after eps scaling (one iteration at each eps halving from the
   cost's diameter). The Newton steps' damped,
   globalising phase is the longest part of a solve at small eps, and a start closer to
   the solution shortens it.
2. Newton (the paper's stage 2): ``M`` is replaced by ``M_s``, whose off-diagonal
   block keeps only the ``s`` largest entries of each row of ``P`` (ELL format) while
   the diagonal stays exact: ``M_s`` is symmetric and diagonally dominant, hence
   positive semi-definite. ``(M_s + lam D) d = eps * grad`` (``D = diag(r, c)``) is
   solved by conjugate gradient on its Schur complement (the column side eliminated,
   preconditioned by the complement's diagonal: :meth:`Geometry.ell_pcg`), the
   right-hand side made orthogonal to ``(1, -1)`` (it is in exact arithmetic, as
   ``sum a = sum b``), to the relative residual ``sqrt(err)`` (inexact Newton).
   The Levenberg-Marquardt damping ``lam`` matters: top-``s`` rows can split the graph
   of kept entries into weakly coupled blocks, each with its own near-null direction
   ``(1_K, -1_K)`` along which an undamped step is huge. ``lam`` shrinks tenfold after
   full steps (down to 1e-10 in float64), grows after short or rejected ones; as
   ``lam -> inf`` the step tends to ``eps (a - r) / (r (1 + lam))``, a damped
   simultaneous Sinkhorn step.
   A backtracking line search accepts a step by Armijo's test on ``L`` while the
   predicted increase is above ``L``'s floating-point resolution, and by a decrease of
   the marginal error below it (near the solution differences of ``L`` are rounding
   noise, but the gradient is still measured accurately).
3. When no step is accepted, a few Sinkhorn iterations are run instead; so they are
   when the plan of the starting potentials overflows or carries over 3x the mass (a
   warm start from a larger eps).
4. Zero-weight rows and columns take no Newton step; at the end their potentials are
   set to the soft c-transforms, as Sinkhorn's updates set them.

Stops when ``|P1 - a|_1 + |P^T 1 - b|_1 <= tol``. Each Newton iteration costs one
extraction pass, the CG iterations on the sparse matrix (``O(n s)`` each), and two
streamed passes per line-search trial.
"""

from __future__ import annotations

import time
from typing import Optional, Union

import numpy as np
import torch

from .. import _validate
from .._progress import Progress
from ..reference_ksparse import cross_sum
from ..reference_sparse import least_invertible
from ..result import OTResult
from . import _host
from ._entropic import (Problem, balanced_gauge, check_init, entropic_result, finite_abs_max, live_potential,
                        make_problem, rounding_floor, settle_zero_weights, tol_against_mass, unresolved)
from ._overrelax import check_overrelax, for_problem as relaxation
from .sinkhorn import Schedule, _iterate, check_schedule, eps_stages, retry_without_stages

#: Newton steps without progress after which a problem near its floor stops. 20, not 5: in
#: float32 at eps = 1e-3 (tol 1e-6, close to the floor) 5 stopped problems that went on to
#: converge (72 problems: 32 converged alone with 5, 39 with 20; float64 runs never stall).
PATIENCE = 20

#: A problem without progress for ``PATIENCE`` Newton steps stops, unconverged, once its
#: marginal error is within this factor of its rounding estimate (``_entropic.marginal_floor``,
#: an upper estimate that errs high: float32 at eps = 1e-3 reaches ~1e-6 where it says 2e-5 to 6e-5).
NEAR_FLOOR = 100.0

#: The warm-up's over-relaxation factor at the target eps (``warmup_overrelax``). A fixed
#: factor: the adaptive one reads the residual every 10 iterations, as many as the warm-up
#: runs. 1.8 over 1.5: 161-168 Newton steps against 172-189 on the 15 problems of the
#: docstring's measurement (plain: 197-200); on 14 random ones (clustered, Gaussian,
#: shifted clouds, zero weights, batches, float32) 89 against 94 (plain, 20 iterations: 97).
WARMUP_OVERRELAX = 1.8

#: Largest ELL size ``B * n * s`` the automatic sparsity grows to (16M entries).
MAX_ELL_ENTRIES = 1 << 24

#: Largest factor by which one growth of the automatic sparsity multiplies ``s``
#: (:func:`grown_sparsity`): a bound on an extrapolation's overshoot.
GROWTH_MAX = 8


def grown_sparsity(s: int, dropped_half: np.ndarray, dropped: np.ndarray, drop_tol: float, s_max: int) -> int:
    """The automatic sparsity's next ``s`` after an extraction at ``s`` dropped the mass
    fractions ``dropped`` (host array, one per problem still above ``drop_tol``), and its
    first ``s // 2`` entries per row (they are sorted) ``dropped_half``.

    The dropped fraction of an entropic plan's rows falls faster than geometrically in
    ``s`` (a Gaussian kernel on points in ``d`` dimensions: ``q(s) ~ exp(-c s^(2/d))``), so
    doubling ``s`` until ``q(s) <= drop_tol`` took 7 extractions (8 to 512, each a pass
    over the plan) on a 4096-point cloud at eps = 1e-2. Instead ``q(s) = exp(-c s^alpha)``
    is fitted through the two fractions and solved for ``drop_tol``; the result is rounded
    up to ``s`` times a power of 2, at least ``2 s``, at most ``GROWTH_MAX s`` and
    ``s_max``; where the fit is undefined (``dropped_half`` not above ``dropped``, or
    either not in (0, 1)) ``s`` doubles. Where the fit errs low (the early, flat part of a
    smooth profile) it costs one more extraction; where it errs high (a run of tied entries,
    then a sharp drop) the caller keeps the shortest sufficient prefix of the entries."""
    with np.errstate(divide="ignore", invalid="ignore"):
        l_half, l_full = -np.log(dropped_half), -np.log(dropped)
        alpha = np.log2(l_full / l_half)
        factor = (-np.log(drop_tol) / l_full) ** (1 / alpha)
    fitted = (s >= 2) & (l_half > 0) & np.isfinite(l_full) & (alpha > 0) & np.isfinite(factor)
    doublings = np.where(fitted, np.ceil(np.log2(np.where(fitted, factor, 2.0))), 1.0)
    grow = 2 ** int(np.clip(doublings.max(initial=1.0), 1, np.log2(GROWTH_MAX)))
    return min(s_max, grow * s)


@torch.compiler.disable  # one opaque call under torch.compile, as otcore.sinkhorn (see there)
def sinkhorn_newton(
    geom,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    *,
    eps: float,
    tol: float = 1e-6,
    max_iter: int = 100,
    warmup_iter: int = 10,
    warmup_tol: float = 1e-2,
    warmup_overrelax: Union[bool, float] = WARMUP_OVERRELAX,
    eps_schedule: Schedule = "geometric",
    sparsity: Optional[int] = None,
    drop_tol: float = 1e-3,
    cg_tol: float = 1e-10,
    cg_max_iter: int = 2000,
    fallback_iter: int = 10,
    init: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    backend: str = "auto",
    precision: str = "fp32",
    verbose: Optional[bool] = None,
) -> OTResult:
    """Balanced entropic OT by Sinkhorn warm-up then sparse Newton steps (SNS).

    Same problem and solution as :func:`otcore.sinkhorn` (balanced): the plan
    ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)`` minimizing
    ``<P, C> + eps KL(P | a x b)`` over couplings of ``a`` and ``b``. At small
    ``eps`` Sinkhorn converges slowly (its rate degrades like ``1 - O(eps)``, over-relaxed like
    ``1 - O(sqrt(eps))``), while
    the Newton stage converges in tens of steps because the plan is then nearly
    sparse and a sparse Hessian captures it.

    Args:
        geom: :class:`~otcore.PointCloud` or :class:`~otcore.CostMatrix` (``B`` problems if batched).
        a: ``(n,)`` / ``(B, n)`` non-negative weights, uniform if None; b: likewise ``(m,)``.
            Equal total mass (balanced OT only).
        eps: entropic regularization, in units of the cost (> 0).
        tol: stop when ``|P1 - a|_1 + |P^T 1 - b|_1 <= tol``. 1e-6 needs float64 at
            small ``eps``: in float32 the plan's entries carry a relative error of about
            ``1e-7 * max|f + g - C| / eps``, which floors the reachable error.
        max_iter: cap on Newton iterations (the Sinkhorn iterations are capped separately).
            A problem also stops, unconverged, after 20 Newton iterations without progress
            (no resolvable increase of the dual, error not 10% below its best) while its
            error is within ``NEAR_FLOOR`` (100x) of its rounding estimate: the accuracy
            floor of the dtype.
        warmup_iter: cap on the warm-up's Sinkhorn iterations at the target ``eps`` (0 skips
            the warm-up, eps stages included).
        warmup_tol: the warm-up stops once the marginal error is below this.
        warmup_overrelax: the warm-up's iterations at the target ``eps`` over-relaxed by
            this fixed factor in (0, 2) (as :func:`otcore.sinkhorn`'s ``overrelax``), or
            ``False`` for plain iterations (the adaptive factor, ``True``, would stay at 1
            over so few: ``ValueError``). The default, 1.8, with 10 iterations started the
            Newton steps closer to the solution than 20 plain ones: over 15 clouds, random
            assignments and digit problems 168 Newton steps against 197 and 307 warm-up
            iterations against 457, each converged; in float32 near its accuracy floor a
            problem may fall either side of ``tol`` (docs/newton.md).
        eps_schedule: eps scaling at the start of a cold warm-up (no ``init``), one
            Sinkhorn iteration per stage, on top of ``warmup_iter`` (as in
            :func:`otcore.sinkhorn`: None, ``"geometric"``, a decay factor or explicit
            values). The default halves eps from the cost's diameter: the Newton steps
            then start closer to the solution (about a third fewer of them on the paper's
            digits problems). A warm start ``init`` skips the stages (they would wash it out).
            A problem unconverged after a run with stages is solved once more from zero
            without them (:func:`~otcore.solvers.sinkhorn.retry_without_stages`), warm-up and
            Newton steps on budgets of their own; ``info["eps_schedule_retry"]`` says which.
        sparsity: entries ``s`` kept per row of the plan in the Hessian (``1 <= s <= m``);
            None chooses it: start at 8 and grow (up to ``m``, and ``B n s`` at most
            ``MAX_ELL_ENTRIES``) while the dropped mass ``1 - sum(kept)/sum(P)`` exceeds
            ``drop_tol``, each time by 2 to 8x as a fit of the dropped mass's decay predicts
            (:func:`grown_sparsity`).
        drop_tol: target dropped-mass fraction for ``sparsity=None``, in (0, 1).
        cg_tol: floor of the conjugate-gradient tolerance, in (0, 0.1]. Each Newton step stops CG at the
            relative preconditioned residual ``clamp(sqrt(err), cg_tol, 0.1)`` (inexact
            Newton: cheap far from the solution, superlinear near it).
        cg_max_iter: cap on conjugate-gradient iterations per Newton step.
        fallback_iter: Sinkhorn iterations run when the line search finds no step, or
            when the plan of the starting potentials overflows or carries over 3x the
            mass (marginal error above ``2 (m(a) + m(b))``).
        init: warm start ``(f, g)``, e.g. the potentials of a nearby problem (with
            ``warmup_iter=0``: no Sinkhorn warm-up; otherwise the warm-up runs at the
            target eps only).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :func:`otcore.sinkhorn`).
        precision: ``"fp32"`` or ``"tf32"`` for the dense passes (see :func:`otcore.sinkhorn`).
        verbose: progress line on stderr; None = on a terminal after ~1 s.

    Returns:
        :class:`~otcore.OTResult` (``plan()``, ``apply``, ``topk``, differentiable
        ``value``/``cost`` as for Sinkhorn). ``n_iter`` counts all Sinkhorn and Newton
        iterations; ``info`` holds ``warmup_iter`` (eps stages included), ``eps_stages``,
        ``newton_iter``, ``fallback_iter``
        (per problem), ``cg_iter``, ``line_search_evals``, ``sparsity`` (final ``s``; 0 when
        the warm-up met ``tol`` and no Newton step ran) and
        ``time_warmup_s``, ``time_newton_s``, ``time_fallback_s``, ``time_s``.
    """
    tol = _validate.positive("tol", tol)
    pb = make_problem(geom, a, b, eps, None, backend, precision, tol, has_rho=False)
    max_iter = _validate.positive_int("max_iter", max_iter)
    warmup_iter = _validate.positive_int("warmup_iter", warmup_iter, minimum=0)
    warmup_tol = _validate.positive("warmup_tol", warmup_tol)
    warmup_overrelax = check_overrelax(warmup_overrelax, warmup_tol, name="warmup_overrelax")
    if warmup_overrelax is True:
        raise ValueError("warmup_overrelax must be a fixed factor in (0, 2) or False (off): the adaptive factor "
                         "(True, 'auto') starts after several residual tests, one every 10 iterations, and stays "
                         "at 1 over a warm-up this short")
    if sparsity is not None:
        sparsity = _validate.positive_int("sparsity", sparsity)
        if sparsity > geom.m:
            raise ValueError(f"sparsity must be in [1, m={geom.m}], got {sparsity}")
    drop_tol = _validate.positive("drop_tol", drop_tol)
    if drop_tol >= 1:  # a fraction of the plan's mass
        raise ValueError(f"drop_tol must be in (0, 1) (the dropped fraction of the plan's mass), got {drop_tol:g}")
    cg_tol = _validate.positive("cg_tol", cg_tol)
    if cg_tol > 0.1:  # the forcing term lies in [cg_tol, 0.1]
        raise ValueError(f"cg_tol must be in (0, 0.1] (the floor of CG's relative tolerance), got {cg_tol:g}")
    cg_max_iter = _validate.positive_int("cg_max_iter", cg_max_iter)
    fallback_iter = _validate.positive_int("fallback_iter", fallback_iter)
    check_schedule(eps_schedule, pb.eps)
    # the same plan in the gauge <a, f>/m(a) = <b, g>/m(b) (an offset costs digits)
    f, g = check_init(init, geom, shift=lambda f, g: balanced_gauge(f, g, pb.A, pb.Bw))
    tol_against_mass(tol, pb.min_mass)
    progress = Progress(verbose, "sinkhorn_newton")
    with torch.autocast(geom.device.type, enabled=False):
        state = _Solve(pb, f, g, progress, cold=init is None)
        state.warmup(warmup_iter, max(warmup_tol, tol), eps_schedule, warmup_overrelax)
        state.newton(tol, max_iter, sparsity, drop_tol, cg_tol, cg_max_iter, fallback_iter)
        retried, retried_h = torch.zeros_like(state.passed), np.zeros(geom.batch, bool)
        if state.stages:  # a cold start whose eps stages may have left a group of points offset
            def again(f0, g0, failed, _left):  # those problems from zero, no stages; state counts both runs
                other = _Solve(pb, f0, g0, progress, cold=True)
                other.passed = ~failed  # the others stay as they are
                other.warmup(warmup_iter, max(warmup_tol, tol), None, warmup_overrelax, active=failed)
                other.newton(tol, max_iter, sparsity, drop_tol, cg_tol, cg_max_iter, fallback_iter)
                state.add_counts(other)
                return other.f, other.g, other.n_iter(), other.passed, other.stalled
            (state.f, state.g, _, state.passed, state.stalled), retried, retried_h, _ = retry_without_stages(
                pb, (state.f, state.g, state.n_iter(), state.passed, state.stalled), again, tol)
        progress.close()
        out = (lambda t: t) if geom.batched else (lambda t: int(t[0]))
        info = {
            "warmup_iter": out(state.warmup_its),
            "eps_stages": state.stages,
            "newton_iter": out(state.newton_its),
            "fallback_iter": out(state.fallback_its),
            "cg_iter": int(state.cg_its),
            "line_search_evals": state.ls_evals,
            "sparsity": state.s,
            "time_warmup_s": state.times["warmup"],
            "time_newton_s": state.times["newton"],
            "time_fallback_s": state.times["fallback"],
            "time_s": progress.elapsed,
            "eps_schedule_retry": retried if geom.batched else bool(retried_h[0]),
        }
        return entropic_result(pb, state.f, state.g, state.n_iter(), state.passed, tol, "sinkhorn_newton", info,
                               state.stalled)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dot(u: tuple[torch.Tensor, torch.Tensor], v: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-problem inner product of (f-part, g-part) pairs, (B,)."""
    return (u[0] * v[0]).sum(-1) + (u[1] * v[1]).sum(-1)


def _dead_lines(pb: Problem, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(B,) bool: some point whose weight the dtype can invert receives a plan mass it cannot
    (``r_i < 1 / max``: underflowed to a subnormal or 0). The Newton system leaves such a
    point out (:meth:`_Solve._direction`), so no Newton step moves it."""
    least = least_invertible(r.dtype)
    return ((r < least) & (pb.A >= least)).any(-1) | ((c < least) & (pb.Bw >= least)).any(-1)


def _closing_updates(pb: Problem, f: torch.Tensor, g: torch.Tensor, r: torch.Tensor, tol: float):
    """Sinkhorn's row then column update of Newton's iterate: the new ``(f, g)``. One pass.

    The row update needs none: from ``r = P1`` of ``(f, g)``, ``(P1)_i = a_i exp((f_i -
    s_i) / eps)`` for the soft c-transform ``s``, so ``f_i - eps log(r_i / a_i) = s_i``. The
    column update is the pass ``g_j = -eps log sum_i a_i exp((f_i - C_ij)/eps)`` at the new
    ``f``. Newton's iterate leaves a point of tiny weight where the marginal test cannot see
    it (its error is ``a_i |exp((f_i - s_i)/eps) - 1|``, CG's tolerance is relative), and
    ``value``'s gradient in its weight reads that exponential: rows of weight 1e-12 had
    gradients 34 off at 9 eps from ``s_i``, and a column of weight 1e-40 (float64, eps 1e-3)
    sat 5.8 eps off, its marginal 320x its weight, with ``converged`` True (reviews). Each
    update leaves its side exact and moves the total L1 marginal error down or not at all
    in exact arithmetic (from exact rows, the column update leaves the rows an error of at
    most the columns' before it: ``sum_i |sum_j P_ij (b_j / c_j - 1)| <= |b - c|_1``); a
    point of tiny weight barely moves the other side's marginals, so both keep theirs.
    Points without weight or mass keep their potential (zero weights: :func:`settle_zero_weights`), and so
    do problems whose plan the dtype does not resolve (:func:`unresolved`: rounded at |f| ~
    1e6 in float32 the row update had raised their true marginal error from 0.66-0.81 to
    1.27-1.41, a review; they are not converged either way)."""
    keep = ~unresolved(pb, f, g, tol)[:, None]
    new = f - pb.eps * torch.log(r / pb.A)
    f = torch.where(keep & (pb.A > 0) & torch.isfinite(new), new, f)
    new = pb.geom.softmin(f + pb.eps * pb.loga, pb.eps, 0, **pb.kw())
    return f, torch.where(keep & (pb.Bw > 0) & torch.isfinite(new), new, g)


class _Solve:
    """Mutable state of one SNS run (batched potentials, per-problem counters)."""

    def __init__(self, pb: Problem, f: torch.Tensor, g: torch.Tensor, progress: Progress, cold: bool):
        self.pb, self.f, self.g, self.progress = pb, f, g, progress
        self.bias = (pb.eps * pb.loga, pb.eps * pb.logb)  # eps log a, eps log b: once per solve
        self.cold = cold  # f, g are the zeros of no warm start (see sinkhorn._iterate)
        self.stages: list[float] = []  # the warm-up's eps stages
        B, dev = pb.geom.batch, pb.geom.device
        self.passed = torch.zeros(B, dtype=torch.bool, device=dev)
        self.warmup_its = torch.zeros(B, dtype=torch.long, device=dev)
        self.newton_its = torch.zeros_like(self.warmup_its)
        self.fallback_its = torch.zeros_like(self.warmup_its)
        self.cg_its = 0
        self.ls_evals = 0
        self.s = 0
        self.stalled = torch.zeros(B, dtype=torch.bool, device=dev)  # stopped at the accuracy floor
        self.times = {"warmup": 0.0, "newton": 0.0, "fallback": 0.0}
        # Levenberg-Marquardt damping of the Newton system, per problem (see newton())
        tiny = 1e-10 if f.dtype == torch.float64 else 1e-6
        self.lam_min, self.lam_max = tiny, 1e2
        self.lam = np.full(B, 1e-4)  # on the host, with the rest of the per-problem arithmetic

    def n_iter(self) -> torch.Tensor:
        """(B,) iterations run: warm-up (eps stages included), Newton steps, fallback iterations."""
        return self.warmup_its + self.newton_its + self.fallback_its

    def add_counts(self, other: "_Solve") -> None:
        """Add ``other``'s iterations, CG iterations, line-search evaluations and stage times
        (a second run on some of these problems, :func:`retry_without_stages`)."""
        self.warmup_its = self.warmup_its + other.warmup_its
        self.newton_its = self.newton_its + other.newton_its
        self.fallback_its = self.fallback_its + other.fallback_its
        self.cg_its += other.cg_its
        self.ls_evals += other.ls_evals
        self.s = other.s or self.s
        for k in self.times:
            self.times[k] += other.times[k]

    # --- pieces -------------------------------------------------------------
    def _biased(self, f, g):
        return f + self.bias[0], g + self.bias[1]

    def _marginals(self, f, g):
        """``(r, c, err)``: ``P1`` (B,n), ``P^T 1`` (B,m), marginal error (B,). Two passes."""
        pb = self.pb
        F, G = self._biased(f, g)
        r = pb.geom.marginals(F, G, pb.eps, 1, **pb.kw())
        c = pb.geom.marginals(F, G, pb.eps, 0, **pb.kw())
        err = (r - pb.A).abs().sum(-1) + (c - pb.Bw).abs().sum(-1)
        return r, c, err

    def _sinkhorn(self, n_iter: int, tol: float, stage: str, active=None, cold: bool = False,
                  stages: tuple = (), overrelax: Union[bool, float] = False) -> torch.Tensor:
        """Run up to ``n_iter`` Sinkhorn iterations on the ``active`` problems (all if
        None), after one at each eps of ``stages``; each stops at ``tol``, the others keep
        their potentials. ``overrelax``: those at the target eps over-relaxed (a factor, or
        True: adaptive), as in :func:`otcore.sinkhorn` (never for self-transport)."""
        _sync(self.pb.geom.device)
        t0 = time.perf_counter()
        f, g, its, _, _ = _iterate(self.pb, self.f, self.g, list(stages), tol, len(stages) + n_iter, 10,
                                self.progress, active=active, cold=cold, relax=relaxation(overrelax, self.pb))
        if not self.cold:
            # Sinkhorn's updates move the free (f + c, g - c) direction, which Newton steps then
            # keep: a warm start offset by k/2 on both sides (solved on C + k) left |f|, |g| ~ 1
            # instead of 0.1, and float32 stalled near 1e-4. The same plan, in the gauge the
            # start was put in (balanced_gauge). Not for a cold start: Sinkhorn's own gauge
            # (g from f) keeps g small where the cost has a large offset (C ~ 1e6 in float32:
            # balanced, both potentials ~5e5 round alike and the marginals missed by 0.73)
            bf, bg = balanced_gauge(f, g, self.pb.A, self.pb.Bw)
            f, g = (bf, bg) if active is None else (torch.where(active[:, None], bf, f),
                                                    torch.where(active[:, None], bg, g))
        self.f, self.g = f, g
        _sync(self.pb.geom.device)
        self.times[stage] += time.perf_counter() - t0
        return its

    # --- stages -------------------------------------------------------------
    @torch.no_grad()
    def warmup(self, n_iter: int, tol: float, schedule: Schedule, overrelax: Union[bool, float],
               active: Optional[torch.Tensor] = None) -> None:
        if n_iter > 0:
            self.stages = eps_stages(schedule, self.pb.top_diameter, self.pb.eps) if self.cold else []
            self.warmup_its += self._sinkhorn(n_iter, tol, "warmup", active=active, cold=self.cold,
                                              stages=self.stages, overrelax=overrelax)

    @torch.no_grad()
    def newton(self, tol, max_iter, sparsity, drop_tol, cg_tol, cg_max_iter, fallback_iter, patience=PATIENCE) -> None:
        """Newton steps until every problem meets ``tol``, stalls at its dtype's floor, or
        ``max_iter``. The per-problem arithmetic of the line search, the damping and the
        stopping rules runs on the host, on numbers the line search's trials send back
        (one transfer each, the trial's synchronisation): on a GPU a (B,)-sized test costs
        a launch, more host time than the transfer. The vectors stay on the device, and
        the host's per-problem state (active, CG tolerances, damping) goes back in one copy
        per step, issued when the device's queue is empty."""
        pb, geom = self.pb, self.pb.geom
        _sync(geom.device)
        t0 = time.perf_counter()
        fallback_time = self.times["fallback"]
        r, c, err = self._marginals(self.f, self.g)
        self.ls_evals += 1
        err, pot, dead = self._read_state(err, _dead_lines(pb, r, c))
        mass = pb.mass_a + pb.mass_b
        # a start whose plan overflows or carries over 3x the mass (err > 2 (m(a) + m(b))), e.g.
        # a warm start from a larger eps: Sinkhorn steps scale the plan to the marginals in one
        # iteration, where damped Newton steps shed ~1 unit of log-mass each (a review: from the
        # optimum with f, g + 0.5 at eps 0.01, a plan e^100 too heavy, 100 steps left 1.3 of error;
        # in float32 the plan overflowed and took this path)
        far = ~np.isfinite(err) | (err > 2 * mass)
        if far.any():
            r, c, err, pot = self._fallback(fallback_iter, tol, far, r, c, err, pot)
        # a start where a point of weight receives no mass the dtype can invert (its row of the plan
        # underflowed): Newton leaves it out of its system, as a zero weight, and cannot move it;
        # one Sinkhorn iteration restores it (a review: a warm start after one point moved ran 10
        # Newton steps and 10 fallback iterations, against 3 steps cold)
        dead = ~far & (dead > 0)
        if dead.any():
            r, c, err, pot = self._fallback(1, tol, dead, r, c, err, pot)
        s = sparsity if sparsity is not None else min(geom.m, 8)
        s_max = geom.m if sparsity is not None else max(s, min(geom.m, MAX_ELL_ENTRIES // (geom.batch * geom.n)))
        B = geom.batch
        passed = _host.host_array(self.passed).copy()
        newton_its, best, stalled = np.zeros(B, np.int64), err.copy(), np.zeros(B, np.int64)
        for _ in range(max_iter):
            passed |= err <= tol
            with np.errstate(invalid="ignore"):
                active = ~passed & np.isfinite(err) & (stalled < patience)
            if not active.any():
                break
            # inexact Newton: relative CG residual ~ sqrt(error) (superlinear steps
            # near the solution, cheap ones far from it), within [cg_tol, 0.1]
            with np.errstate(invalid="ignore"):
                forcing = np.clip(np.sqrt(err), cg_tol, 0.1)
            packed = _host.to_device(np.stack([active, forcing, self.lam]), geom.device).to(self.f.dtype)
            active_d, forcing_d, lam_d = packed[0] > 0, packed[1], packed[2]
            vals, idx, s = self._sparse_plan(r, active, s, s_max, sparsity is None, drop_tol)
            if self.progress.due():
                self.progress.update(int(newton_its.max()), float(err[active].max()), pb.eps, "newton")
            df, dg = self._direction(r, c, vals, idx, active_d, forcing_d, lam_d, cg_max_iter)
            newton_its += active
            r, c, err, pot, accepted, alpha, armijo, exhausted = self._line_search(df, dg, r, c, err, pot, active)
            # damping: relax after full steps, tighten after short or failed ones
            lam = np.where(accepted & (alpha >= 0.5), self.lam / 10, self.lam)
            lam = np.where(accepted & (alpha < 0.25), self.lam * 10, lam)
            lam = np.where(active & ~accepted, self.lam * 100, lam)
            self.lam = np.clip(lam, self.lam_min, self.lam_max)
            stuck = active & ~accepted
            if exhausted and stuck.any():  # Newton did not help: Sinkhorn steps for those problems
                r, c, err, pot = self._fallback(fallback_iter, tol, stuck, r, c, err, pot)
            # progress: a resolvable increase of L, or the error down by 10% from its best.
            # Without it for `patience` iterations within NEAR_FLOOR of the error's rounding
            # estimate (marginal_floor's) we are at the dtype's accuracy floor. Above that the
            # iterations go on (to max_iter): there a slow stretch (a few % per step, or a rise
            # after a shrunken damping) is no floor, and a restart from those potentials converged.
            with np.errstate(invalid="ignore"):
                progress = armijo | (err < 0.9 * best)
                best = np.fmin(best, err)
                near_floor = err <= NEAR_FLOOR * rounding_floor(pot, pb.eps, mass, self.f.dtype)
            # a problem that stopped keeps its count (it stays stopped: a reset re-activated it
            # one step later, in a batch whose other problems were still running)
            stalled = np.where(active, np.where(~progress & near_floor, stalled + 1, 0), stalled)
        passed |= err <= tol
        dev = geom.device
        self.passed = _host.to_device(passed, dev)
        self.stalled = _host.to_device(~passed & (stalled >= patience), dev)
        self.newton_its = self.newton_its + _host.to_device(newton_its, dev)
        self.f, self.g = settle_zero_weights(pb, *_closing_updates(pb, self.f, self.g, r, tol))
        self.s = s if newton_its.any() else 0  # no Newton step: no sparse plan was extracted
        _sync(geom.device)
        self.times["newton"] += time.perf_counter() - t0 - (self.times["fallback"] - fallback_time)

    def _read_state(self, err, *more):
        """Host copies of the marginal error (B,) and of ``max |f|, |g|`` over the points
        with weight (:func:`~otcore.solvers._entropic.marginal_floor`'s potential), and of
        ``more`` (B,) rows: one transfer."""
        st = _host.to_host(err, live_potential(self.pb, self.f, self.g), *more)
        return st[0], st[1], *st[2:]

    def _fallback(self, n_iter, tol, which, r, c, err, pot):
        """Sinkhorn iterations for the problems in ``which`` (host mask); their new ``(r, c,
        err, pot)`` (``err``, ``pot`` on the host)."""
        mask = _host.to_device(which, self.pb.geom.device)
        self.fallback_its += self._sinkhorn(n_iter, tol, "fallback", active=mask)
        r2, c2, err2 = self._marginals(self.f, self.g)
        self.ls_evals += 1
        err2, pot2 = self._read_state(err2)
        return (torch.where(mask[:, None], r2, r), torch.where(mask[:, None], c2, c),
                np.where(which, err2, err), np.where(which, pot2, pot))

    def _sparse_plan(self, r, active, s, s_max, adaptive, drop_tol):
        """ELL top-``s`` rows of P; with ``adaptive`` grow ``s`` (:func:`grown_sparsity`)
        until the dropped mass fraction of every active problem (``active`` on the host) is
        at most ``drop_tol`` (one host read per test), then keep the shortest prefix of the
        sorted entries, ``s`` of the call times a power of 2, that meets it: a fit that
        overshot (rows with a run of tied entries then a sharp drop: 64 where 16 sufficed,
        a review) costs an extraction, not a wider matrix. Returns ``(vals, idx, s)``."""
        pb = self.pb
        F, G = self._biased(self.f, self.g)
        extract = lambda s: pb.geom.plan_sparse_rows(F, G, pb.eps, s, **pb.kw())  # noqa: E731
        vals, idx = extract(s)
        if not adaptive or s >= s_max:
            return vals, idx, s
        first, rows = s, r.sum(-1)
        while True:
            # the mass kept by every prefix of the sorted entries, and the rows': one transfer
            prof = _host.to_host(*vals.sum(1).cumsum(-1).T, rows)  # (s + 1, B)
            with np.errstate(divide="ignore", invalid="ignore"):
                dropped = (1 - prof[:-1] / prof[-1]).T  # (B, s): by the first 1, 2, ..., s entries
            above = active & (dropped[:, -1] > drop_tol)
            if s >= s_max or not above.any():
                break
            s = grown_sparsity(s, dropped[above, s // 2 - 1] if s >= 2 else np.ones(int(above.sum())),
                               dropped[above, -1], drop_tol, s_max)
            vals, idx = extract(s)
        k = first
        while k < s and not (~active | (dropped[:, k - 1] <= drop_tol)).all():
            k *= 2
        if k < s:
            s, vals, idx = k, vals[..., :k].contiguous(), idx[..., :k].contiguous()
        return vals, idx, s

    def _direction(self, r, c, vals, idx, active, rtol, lam, cg_max_iter):
        """Newton direction: solve ``(M_s + lam D) d = eps * grad`` by PCG on its Schur complement.

        ``M_s = [[diag(r), S], [S^T, diag(c)]]`` with ``S`` the ELL matrix,
        ``D = diag(r, c)``, ``lam`` (B,) the per-problem damping. Zero-weight
        rows/columns (``r_i = 0``) get ``d_i = 0``.
        """
        pb, geom = self.pb, self.pb.geom
        eps = pb.eps
        lam = lam[:, None]
        kw = dict(backend=pb.backend)
        ga, gb = pb.A - r, pb.Bw - c
        # make the right-hand side consistent with M's null direction (1, -1): sum rhs_a = sum rhs_b
        # (exact in exact arithmetic, the masses' rounding in floating point). The correction is
        # taken along D (1, -1) = (r, -c), so each point's share follows its mass and the
        # preconditioned step it causes is the null direction itself; a uniform shift t (~1e-18 of
        # rounding in float64), divided by a point's r_i ~ 1e-20, moved its potential by 1e10
        # a row or column whose plan mass is too small for its inverse (subnormal: a weight of
        # 1e-310 in float64) is left out of the system as a zero weight is (1 / r had been inf,
        # CG's <r, pre r> inf, and the whole problem's step 0: 100 steps unconverged, a review)
        least = least_invertible(r.dtype)
        live_a, live_b = r >= least, c >= least
        mass = (r.sum(-1) + c.sum(-1)).clamp(min=torch.finfo(r.dtype).tiny)
        t = (((ga * live_a).sum(-1) - (gb * live_b).sum(-1)) / mass)[:, None]
        # solved for d / eps (the system is linear), scaled after: CG's <r, pre r> grows as the
        # right-hand side squared, and eps * grad overflowed it from eps ~ 1e154 in float64 (a
        # problem scaled by 1e200 ran 96 Newton steps and 930 fallback iterations, a review)
        rhs = (torch.where(live_a, ga - t * r, 0.0), torch.where(live_b, gb + t * c, 0.0))
        # the diagonal at least the kept entries' sums (it is in exact arithmetic: S holds part of
        # P): r, c and S come from separate passes, and in float32 c fell below S's column sums by
        # up to 1e-5 relative, leaving 6 of 14 Newton systems of a 24 x 24 problem indefinite (CG
        # then ran to its cap, or returned a residual above the right-hand side's)
        dr = torch.maximum(r, vals.sum(2)) * (1 + lam)
        dc = torch.maximum(c, cross_sum(vals, idx, c.shape[1])) * (1 + lam)
        inv = (torch.where(live_a, 1 / dr, 0.0), torch.where(live_b, 1 / dc, 0.0))  # (live: dr >= r >= least)

        (da, db), its = geom.ell_pcg(vals, idx, (dr, dc), rhs, inv, rtol, cg_max_iter, active, check_idx=False, **kw)
        self.cg_its = self.cg_its + its.max()  # on the device: read once, at the end
        return eps * da, eps * db

    def _line_search(self, df, dg, r, c, err, pot, active, max_halvings: int = 12, c1: float = 1e-4):
        """Backtracking on ``alpha`` in {1, 1/2, ...}; moves ``self.f``, ``self.g``.

        Returns the new ``(r, c, err, pot)``, per problem whether a step was taken, its
        ``alpha`` and whether it was taken on a resolvable increase of ``L``, and whether
        the halvings ran out (otherwise every active problem took a step). ``err``, ``pot``
        (the live potentials' size), ``active`` and the per-problem outputs are host arrays.

        Accept when ``L(new) - L(old) >= c1 * alpha * <grad, d>`` if the predicted increase
        ``alpha <grad, d>`` is above the rounding noise of ``L``, else when the marginal
        error decreases. Each trial's numbers come back in one transfer; the tests run on
        the host, and a device mask goes back only where the problems of a batch part ways.
        """
        pb, dev = self.pb, self.pb.geom.device
        eps = pb.eps
        ulp = torch.finfo(r.dtype).eps
        F, G = self._biased(self.f, self.g)
        # step-independent terms, read with the first trial: <grad L, d> >= 0, <a, df> + <b, dg>,
        # P's mass, the potentials' scale, and the noise of L's difference at step alpha:
        # 16 ulp (alpha (|a.df| + |b.dg|) + eps (masses) (1 + scale))
        fixed = [_dot((pb.A - r, pb.Bw - c), (df, dg)), (pb.A * df).sum(-1) + (pb.Bw * dg).sum(-1), r.sum(-1),
                 (finite_abs_max(F) + finite_abs_max(G)) / eps, (pb.A * df).abs().sum(-1) + (pb.Bw * dg).abs().sum(-1)]
        B = err.shape[0]
        alpha = np.ones(B)
        searching = active.copy()
        accepted, by_armijo = np.zeros(B, bool), np.zeros(B, bool)
        for trial in range(max_halvings + 1):
            if trial == 0:
                f_new, g_new = self.f + df, self.g + dg
            else:
                step = _host.to_device(alpha, dev).to(df.dtype)[:, None]
                f_new, g_new = self.f + step * df, self.g + step * dg
            r_new, c_new, err_new = self._marginals(f_new, g_new)
            self.ls_evals += 1
            st = _host.to_host(err_new, r_new.sum(-1), live_potential(pb, f_new, g_new), *(fixed if trial == 0 else ()))
            if trial == 0:
                slope, lin, mass, scale, moved = st[3:]
            with np.errstate(invalid="ignore", over="ignore"):
                gain = alpha * lin - eps * (st[1] - mass)
                noise = 16 * ulp * (alpha * moved + eps * (mass + st[1]) * (1 + scale))
                resolvable = alpha * slope > noise
                ok = np.where(resolvable, gain >= c1 * alpha * slope, st[0] < err) & np.isfinite(st[0])
            take = searching & ok
            by_armijo |= take & resolvable
            if take.all():
                self.f, self.g, r, c = f_new, g_new, r_new, c_new
            elif take.any():
                mask = _host.to_device(take, dev)
                self.f, self.g = torch.where(mask[:, None], f_new, self.f), torch.where(mask[:, None], g_new, self.g)
                r, c = torch.where(mask[:, None], r_new, r), torch.where(mask[:, None], c_new, c)
            err, pot = np.where(take, st[0], err), np.where(take, st[2], pot)
            accepted |= take
            searching &= ~ok
            if not searching.any():
                return r, c, err, pot, accepted, alpha, by_armijo, False
            alpha = np.where(searching, alpha / 2, alpha)
        return r, c, err, pot, accepted, alpha, by_armijo, True
