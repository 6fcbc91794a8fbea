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
problem, without another host synchronisation:

- from the third test on, the residual's decay per iteration ``rho`` between two tests
  gives ``lam = rho`` while ``w = 1``, and, once relaxed, ``lam = (rho + w - 1)^2 /
  (rho w^2)`` (Young's relation between the two rates, exact below ``w_opt`` and a fixed
  point at and above it), so ``w`` only grows towards ``w_opt``, capped at :data:`CAP`;
- a residual that grew since the last test puts that problem back to ``w = 1``.

The last iteration before each test is plain (``reference.sinkhorn_steps``), so the
column marginals hold when the test reads the row residual, as without relaxation.
"""

from __future__ import annotations

import numbers
from typing import Optional, Union

import torch

#: Largest relaxation factor the adaptation sets (the theory's bound is 2).
CAP = 1.95


def check_overrelax(value: Union[bool, float], tol: Optional[float]) -> Union[bool, float]:
    """``False`` (plain Sinkhorn), ``True`` (adaptive; needs a ``tol``: it reads the
    residuals of the tests) or a fixed factor in (0, 2)."""
    if isinstance(value, bool):
        if value and tol is None:
            raise ValueError("overrelax=True adapts the factor to the residuals of the convergence tests, which "
                             "tol=None skips: give a tol, or a fixed factor such as overrelax=1.5")
        return value
    if isinstance(value, numbers.Real):
        w = float(value)
        if not 0.0 < w < 2.0:
            raise ValueError(f"overrelax as a factor must be in (0, 2) (the iteration diverges outside), got {w}")
        return w
    raise TypeError(f"overrelax must be a bool or a factor in (0, 2), got {type(value).__name__}")


class Overrelaxation:
    """The per-problem factors ``omega`` (B,) of one solve, one device buffer updated in
    place (a recorded CUDA graph reads it at its address), and their adaptation."""

    def __init__(self, setting: Union[bool, float], batch: int, device: torch.device, dtype: torch.dtype):
        self.adaptive = setting is True
        start = 1.0 if isinstance(setting, bool) else setting
        self.omega = torch.full((batch,), start, dtype=dtype, device=device)
        self.last: Optional[torch.Tensor] = None  # the previous test's residuals
        self.last_it = 0
        self.tests = 0

    def after_test(self, resid: torch.Tensor, it: int) -> None:
        """Adapt ``omega`` to the residuals ``resid`` (B,) read after ``it`` iterations."""
        if not self.adaptive:
            return
        self.tests += 1
        if self.last is not None and self.tests >= 3:
            prev, w = self.last, self.omega
            valid = torch.isfinite(resid) & torch.isfinite(prev) & (prev > 0) & (resid > 0)
            rho = torch.where(valid, resid / torch.where(valid, prev, 1.0), 1.0) ** (1.0 / max(it - self.last_it, 1))
            decayed = valid & (rho < 1)
            lam = torch.where(w == 1, rho, (rho + w - 1) ** 2 / (rho * w * w))
            best = 2.0 / (1.0 + torch.sqrt(torch.clamp(1.0 - lam, min=0.0)))
            grown = torch.clamp(torch.maximum(w, best), max=CAP)
            self.omega.copy_(torch.where(decayed, grown, torch.where(valid, torch.ones_like(w), w)))
        self.last, self.last_it = resid, it
