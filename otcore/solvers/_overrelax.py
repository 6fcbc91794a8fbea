"""Over-relaxed Sinkhorn iterations with a relaxation factor adapted to the convergence rate.

The over-relaxed update (Thibault et al. 2017; Lehmann, von Renesse, Sambale and
Uschmajew, *A note on overrelaxation in the Sinkhorn algorithm*, Optim. Lett. 2022) is

    f <- (1 - w) f + w tau_a softmin_j(g + eps log b),   likewise g,

with the fixed point of plain Sinkhorn (``w = 1``). Near that fixed point the iteration
is a block Gauss-Seidel method on the linearised dual, so Young's theory of successive
over-relaxation applies: if plain Sinkhorn contracts the error by ``lam`` per iteration,

    w_opt = 2 / (1 + sqrt(1 - lam))          contracts it by w_opt - 1,

e.g. ``lam = 0.99`` (hundreds of iterations per decade) gives ``w = 1.82`` (a decade in
~12 iterations). Any ``w`` in (0, 2) converges locally; none is guaranteed to far from
the solution.

``overrelax=True`` estimates ``lam`` from the residuals the solver reads anyway, per
problem, without another host synchronisation. With ``rho`` the residual's decay per
iteration between two tests:

- relaxation starts (``w = w_opt(lam = rho)``) only once the plain iteration is in its
  linear regime: the residual is below a tenth of the first test's (not on an early
  plateau, where ``rho ~ 1`` says nothing of the asymptotic rate), and two successive
  plain decays agree (``1 - rho`` within a factor 1.5);
- once relaxed, ``lam = (rho + w - 1)^2 / (rho w^2)`` (Young's relation between the two
  rates; exact below ``w_opt``, a fixed point at and above it) lets ``w`` grow towards
  ``w_opt``, capped at :data:`CAP`, as long as the relaxed decay beats the plain one
  measured before (``rho < lam_plain``);
- a relaxed block that does not (or a residual that grew) puts the problem back to plain
  iterations for one block, which measures the plain rate afresh: if plain decays no
  slower than that relaxed block did, it was a failure, and after :data:`MAX_FAILURES`
  the problem stays plain; if plain is slower (the problem entered a slower phase),
  relaxation restarts at once from the new rate. So the relaxation costs a few blocks
  over plain Sinkhorn where it does not pay.

The last iteration before each test is plain (``reference.sinkhorn_steps``), so the
column marginals hold when the test reads the row residual, as without relaxation; hence
the blocks need ``check_every >= 3`` (``check_every - 2`` of every ``check_every``
iterations are relaxed).
"""

from __future__ import annotations

import numbers
from typing import Optional, Union

import numpy as np
import torch

from .. import _validate

#: Largest relaxation factor the adaptation sets (the theory's bound is 2).
CAP = 1.95
#: Returns to plain iterations after which a problem stays plain.
MAX_FAILURES = 2
#: Tests without the residual falling by 1% after which a problem that was relaxed stays plain.
STALL = 3


def check_overrelax(value: Union[bool, float, str], tol: Optional[float], check_every: int = 10,
                    name: str = "overrelax") -> Union[bool, float]:
    """``"auto"`` (the default: adaptive where there are tests to adapt to, i.e. with a
    ``tol`` and ``check_every >= 3``, else plain), ``False`` (plain Sinkhorn), ``True``
    (adaptive; needs a ``tol``: it reads the residuals of the tests) or a fixed factor in
    (0, 2); relaxation needs ``check_every >= 3`` (the iteration before each test is plain).
    Returns ``False``, ``True`` or the factor. ``name``: the argument's, for the errors."""
    value = _validate.numpy_scalar(value)
    if isinstance(value, np.bool_):
        value = bool(value)
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"{name} must be 'auto', a bool or a factor in (0, 2), got {value!r}")
        return tol is not None and check_every >= 3
    if isinstance(value, bool):
        if value and tol is None:
            raise ValueError(f"{name}=True adapts the factor to the residuals of the convergence tests, which "
                             f"tol=None skips: give a tol, or a fixed factor such as {name}=1.5")
        w = value
    elif isinstance(value, (numbers.Real, torch.Tensor)) and not _validate._is_bool(value):
        # a one-element tensor as for every other number (positive() checks its size and grad)
        w = float(value) if isinstance(value, numbers.Real) else _validate.positive(name, value)
        if not 0.0 < w < 2.0:
            raise ValueError(f"{name} as a factor must be in (0, 2) (the iteration diverges outside), got {w}")
    else:
        raise TypeError(f"{name} must be 'auto', a bool or a factor in (0, 2), got {type(value).__name__}")
    if w is not False and check_every < 3:
        raise ValueError(f"{name} needs check_every >= 3: the iteration before each test runs plain, so with "
                         f"check_every={check_every} none would be relaxed")
    return w


def for_problem(setting: Union[bool, float], pb) -> Optional["Overrelaxation"]:
    """The factors of a solve of ``pb`` (an entropic ``Problem``) with the checked
    ``setting``: None for plain iterations (``False``, or self-transport: its symmetric
    update is an average already)."""
    if setting is False or pb.symmetric:
        return None
    return Overrelaxation(setting, pb.geom.batch, pb.geom.device, pb.geom.dtype)


class Overrelaxation:
    """The per-problem factors ``omega`` (B,) of one solve, one device buffer updated in
    place (a recorded CUDA graph reads it at its address), and their adaptation.

    The adaptation runs on the host, in float64, from the residuals the solver reads
    there anyway to decide whether to go on (one transfer per test): as ~90 (B,)-sized
    device operations it cost the host ~0.9 ms per test on a GPU (~10 us each), more than
    a block of iterations of a small problem; here it costs one copy of ``omega`` back."""

    def __init__(self, setting: Union[bool, float], batch: int, device: torch.device, dtype: torch.dtype):
        self.adaptive = setting is True
        start = 1.0 if isinstance(setting, bool) else float(setting)
        self.omega = torch.full((batch,), start, dtype=dtype, device=device)
        self.w = np.full(batch, start)  # omega's host copy
        self.last: Optional[np.ndarray] = None  # the previous test's residuals
        self.last_it = 0
        nan = np.full(batch, np.nan)
        self.first = nan  # the first test's residuals
        self.rate = nan.copy()  # the last plain decay per iteration (NaN: none since the last switch)
        self.plain_rate = nan.copy()  # the plain decay relaxation started from
        self.reverted = nan.copy()  # the relaxed decay that sent a problem back to plain
        self.failures = np.zeros(batch, dtype=np.int64)

    def after_test(self, resid, it: int, stale=None) -> None:
        """Adapt ``omega`` to the residuals ``resid`` (B,) (host values: an array or a CPU
        tensor) read after ``it`` iterations; ``stale`` (B,): tests since each residual last
        fell by 1% (:class:`Progressing`; None: all falling)."""
        if not self.adaptive:
            return
        resid = np.asarray(resid, dtype=np.float64).reshape(-1)
        if self.last is None:
            self.first, self.last, self.last_it = resid, resid, it
            return
        prev, w = self.last, self.w
        with np.errstate(all="ignore"):  # NaN/inf/0 residuals are masked by valid
            valid = np.isfinite(resid) & np.isfinite(prev) & (prev > 0) & (resid > 0)
            rho = np.where(valid, resid / np.where(valid, prev, 1.0), 1.0) ** (1.0 / max(it - self.last_it, 1))
            plain = w == 1
            gap, before = 1.0 - rho, 1.0 - self.rate
            # the plain block after a return from relaxation: a failure only if plain decays
            # as fast as the relaxed block did (else the plain rate had slowed: restart at once)
            probe = plain & valid & np.isfinite(self.reverted)
            failed = probe & (rho <= self.reverted)
            self.failures = self.failures + failed
            # plain: start past an early plateau once two decays agree, or after a probe that did not fail
            steady = (before > 0) & (gap <= 1.5 * before) & (before <= 1.5 * gap) & (resid <= 0.1 * self.first)
            start = plain & valid & (gap > 0) & (self.failures < MAX_FAILURES) & (steady | (probe & ~failed))
            w_start = np.minimum(2.0 / (1.0 + np.sqrt(np.maximum(gap, 0.0))), CAP)
            # relaxed: grow while it beats the plain decay it started from, else back to plain
            helps = valid & (rho < self.plain_rate)
            lam = (rho + w - 1) ** 2 / (rho * w * w)
            w_grown = np.minimum(np.maximum(w, 2.0 / (1.0 + np.sqrt(np.maximum(1.0 - lam, 0.0)))), CAP)
        back = ~plain & valid & ~helps
        # at the dtype's rounding floor the residual only fluctuates: a probe's random small
        # decay restarted the relaxation at the cap, which kept the residual from ever reading
        # below tol there (float64, tol 1e-12: 100,000 iterations where plain passed after
        # 15,200). A problem relaxed before whose residual has not fallen by 1% in STALL tests
        # stays plain (before relaxation starts, a plateau is the early one: it waits)
        stuck = np.isfinite(self.plain_rate) & (False if stale is None else stale >= STALL)
        self.failures = np.where(stuck, MAX_FAILURES, self.failures)
        start &= ~stuck
        new = np.where(start, w_start, np.where(~plain & helps & ~stuck, w_grown, np.where(back | stuck, 1.0, w)))
        self.plain_rate = np.where(start, rho, self.plain_rate)
        self.reverted = np.where(back, rho, np.where(plain & valid, np.nan, self.reverted))
        # the plain decay of this block (NaN after a switch either way: the next block starts a fresh pair)
        self.rate = np.where(plain & valid & ~start, rho, np.nan)
        if not np.array_equal(new, w):  # a copy to the device only when a factor changed
            self.omega.copy_(torch.from_numpy(new))
        self.w = new
        self.last, self.last_it = resid, it


class Progressing:
    """Per problem, the tests since its residual last fell by 1% below the best read so far
    (``stale``, host (B,)), and the tests in all (``tests``); a NaN residual (a problem that
    stopped) counts no test."""

    def __init__(self, batch: int):
        self.best = np.full(batch, np.inf)
        self.stale = np.zeros(batch, dtype=np.int64)
        self.tests = np.zeros(batch, dtype=np.int64)

    def update(self, resid: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            fell = resid < 0.99 * self.best
        self.best = np.where(fell, resid, self.best)
        self.stale = np.where(fell, 0, self.stale + np.isfinite(resid))
        self.tests += np.isfinite(resid)
        return self.stale
