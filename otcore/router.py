"""Mixture-of-experts routing by sparsity-constrained optimal transport.

Tokens (rows) are transported to experts (columns) with the token-expert cost
``C = -scores``. Every token carries mass 1 and every expert receives ``n_tokens /
n_experts``, so loads are balanced by construction; the plan entry ``T_te`` is the
share of token ``t`` handled by expert ``e`` and serves as the combine weight.

- ``mode="capacity"`` (expert choice): at most ``capacity = ceil(n_tokens *
  capacity_factor / n_experts)`` tokens per expert, i.e. k-sparse *columns*. The
  semi-dual makes every expert's load exactly ``n_tokens / n_experts``; the tokens'
  masses are matched at the optimum up to the relaxation's gap (a token may be dropped
  or split when capacities bind).
- ``mode="tokens"`` (token choice): at most ``k`` experts per token, k-sparse *rows*;
  every token's weights sum to exactly 1 and the experts' loads are balanced at the
  optimum up to the same gap.

The plan is differentiable with respect to the scores (see
:func:`otcore.sparse_ot`'s ``plan_grad``), so the scoring network trains through it.
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from . import _validate
from ._dispatch import BACKENDS
from .geometry import CostMatrix
from .result import ConvergenceWarning, SparseOTResult, all_converged, reemit, user_stacklevel
from .solvers._entropic import TOL_MASS_SHARE
from .solvers.sparse import sparse_ot

MODES = ("capacity", "tokens")
#: the capacity solve's seed (:meth:`SparseOTRouter._seed`) is solved to this fraction of ``tol``.
#: Its tolerance bounds the expert loads; the token masses read off its duals erred more: with
#: L-BFGS at 1x the plans were 1.3-2.3x further from a float64 solve to 1e-10 (L1 per token) than
#: the unseeded capacity solve's, at 0.1 7.6-27x closer (four float32 cases, 4096 x 8 to
#: 2048 x 64); by Newton steps at 0.1, 4.8-228x closer, for a step more of E unknowns
SEED_TOL = 0.1


class RouterOutput(NamedTuple):
    """What a MoE layer needs (unbatched shapes; batched scores add a leading ``B``).

    ``mode="capacity"``: one row per expert, ``capacity`` slots each:
        combine_weights ``(E, capacity)``: plan entries ``T[token, expert]``, differentiable.
        dispatch_index ``(E, capacity)`` int64: the token in each slot.
        dispatch_mask ``(E, capacity)`` bool: the slot carries mass (``weight > 0``).
    ``mode="tokens"``: one row per token, ``k`` slots each, with expert indices.
    expert_load ``(E,)``: token mass routed to each expert (``n_tokens / E`` when balanced).
    result: the :class:`~otcore.SparseOTResult` (duals, convergence, ``to_dense()``).
    """

    combine_weights: torch.Tensor
    dispatch_index: torch.Tensor
    dispatch_mask: torch.Tensor
    expert_load: torch.Tensor
    result: SparseOTResult

    def combine_dense(self) -> torch.Tensor:
        """Dense ``(n_tokens, E)`` combine matrix (differentiable); small problems and tests."""
        return self.result.to_dense()


class SparseOTRouter(nn.Module):
    """Token-to-expert router solving a top-k sparse OT problem per forward pass.

    Args:
        n_experts: number of experts ``E``.
        mode: ``"capacity"`` (each expert takes at most ``capacity`` tokens) or
            ``"tokens"`` (each token goes to at most ``k`` experts).
        capacity_factor: ``>= 1``; ``capacity = ceil(n_tokens * capacity_factor / E)``
            (``mode="capacity"``).
        k: experts per token (``mode="tokens"``); a call needs ``n_tokens * k >= E`` (every
            expert takes its ``n_tokens / E`` share), else ``ValueError``.
        gamma: quadratic regularization in score units: about the score margin over
            which a token's weight goes from 0 to 1. Smaller is harder (closer to an
            assignment); larger spreads tokens over more experts until the capacities
            bind (then tokens' masses are only approximately matched, see docs/router.md).
            The default suits scores of unit scale.
        tol: stopping tolerance as a fraction of the total token mass (the solver's
            ``tol`` is ``tol * n_tokens``).
        max_iter: iterations per solve: the capacity solve, and its seed, each (a warm
            solve redone cold: up to twice each).
        plan_grad: ``"implicit"`` (exact derivative of the optimal plan) or ``"fixed"``
            (projection Jacobian with the duals held fixed; cheaper). At
            ``capacity_factor=1`` the optimal routing (every slot full) is locally constant in
            the scores: its exact derivative is 0 and the gate gets no gradient through
            the combine weights; ``"fixed"`` gives one (docs/router.md).
        warm_start: start each solve from the previous call's duals when the number of
            experts, the device and the dtype agree (capacity mode's seed takes the expert
            duals alone; token mode and capacity mode without a seed also need the token
            count). A
            warm solve that does not converge is redone cold and the better of the two kept
            (converged, then the smaller ``grad_norm``), with its duals for the next call.
            Kept in evaluation mode and under ``no_grad`` too, so a call's output depends on
            the calls before it: where the capacity binds, by more than ``tol`` (the solve
            stops at a kink whose plan depends on the path there; 0.018 of L1 per token on
            64 x 8 scores, docs/router.md). For outputs that depend on the scores alone,
            set ``router.warm_start = False``. Settings may be changed after construction
            (checked as here).
            ``result.info["warm_start"]`` says ``"none"``, ``"used"``, ``"retried cold"`` or
            ``"retried cold, warm kept"`` (``info["retry_iter"]``: the other solve's
            iterations).
        formulation, backend: passed to :func:`otcore.sparse_ot`.

    Input: scores ``(n_tokens, E)`` or ``(B, n_tokens, E)`` (higher = better match).
    Returns a :class:`RouterOutput`. Non-convergence within ``max_iter`` is reported in
    ``result.converged`` and warned about once per module (routing is approximate by
    design; the plan is still feasible for the per-expert / per-token sparsity).

    In capacity mode, where the capacity leaves spare slots (``capacity >= n_tokens / E +
    1``), each solve starts from the routing without the capacity, solved through its ``E``
    expert duals (``result.info["seed_iter"]`` its iterations, ``info["seed_time_s"]`` its
    time, included in ``info["time_s"]``; the warm start seeds that solve, so it serves a
    fresh batch of tokens too): where the capacity does not bind, that routing is the
    answer and the capacity solve stops at its first test (``result.n_iter == 0``); see
    docs/router.md.

    Example::

        router = otcore.SparseOTRouter(n_experts=8, capacity_factor=1.25)
        out = router(tokens @ w_gate)                 # (n_tokens, 8) scores
        for e in range(8):
            sel = out.dispatch_index[e]
            y.index_add_(0, sel, experts[e](x[sel]) * out.combine_weights[e, :, None])
    """

    def __init__(
        self,
        n_experts: int,
        mode: str = "capacity",
        capacity_factor: float = 1.25,
        k: int = 2,
        gamma: float = 0.1,
        tol: float = 1e-3,
        max_iter: int = 100,
        plan_grad: str = "implicit",
        warm_start: bool = False,
        formulation: str = "semi-dual",
        backend: str = "auto",
    ):
        super().__init__()
        # each setting through its check (__setattr__), here and when set later
        self.n_experts, self.mode, self.capacity_factor, self.k = n_experts, mode, capacity_factor, k
        self.gamma, self.tol, self.max_iter, self.plan_grad = gamma, tol, max_iter, plan_grad
        self.warm_start, self.formulation, self.backend = warm_start, formulation, backend
        self._init: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._seeded = True  # capacity mode's seed (False: from zero, as bench/router_op_count.py compares)
        self._warned = False
        self._warned_ties = False

    def __setattr__(self, name: str, value) -> None:
        """The settings are checked when set, at construction and after it (a review: a
        later ``router.mode = "Tokens"`` ran token mode, ``capacity_factor = 0.5`` failed
        inside the solver with a message about ``k``)."""
        check = _SETTINGS.get(name)
        super().__setattr__(name, value if check is None else check(value))

    def capacity(self, n_tokens: int) -> int:
        """Tokens per expert: ``ceil(n_tokens * capacity_factor / n_experts)`` (at most n_tokens),
        with the factor taken as written (``1.1`` is 11/10: in binary floating point
        ``100 * 1.1 / 10`` is 11.000000000000002, whose ceiling would be 12)."""
        n_tokens = _validate.positive_int("n_tokens", n_tokens)
        exact = Fraction(repr(self.capacity_factor)) * n_tokens / self.n_experts
        return min(n_tokens, math.ceil(exact))

    # torch.compile: the routing (data-dependent L-BFGS loop, host checks) is one opaque
    # call, as SinkhornLoss's solve; its gradients are autograd.Functions, so a compiled
    # model trains through it (traced, the loop broke the graph dozens of times)
    @torch.compiler.disable
    def forward(self, scores: torch.Tensor) -> RouterOutput:
        _validate.tensor("scores", scores, (2, 3), finite=False)  # (finite: through the cost's check below)
        if scores.shape[-1] != self.n_experts:
            raise ValueError(f"scores must have n_experts={self.n_experts} columns, got shape {tuple(scores.shape)}")
        batched = scores.dim() == 3
        n_tokens = scores.shape[-2]
        dt = _validate.compute_dtype(scores.dtype)
        lead = scores.shape[:-2]
        a = torch.ones(*lead, n_tokens, dtype=dt, device=scores.device)
        b = torch.full((*lead, self.n_experts), n_tokens / self.n_experts, dtype=dt, device=scores.device)
        axis, k = (0, self.capacity(n_tokens)) if self.mode == "capacity" else (1, min(self.k, self.n_experts))
        if axis == 1 and n_tokens * k < self.n_experts:
            raise ValueError(
                f"mode='tokens' needs n_tokens * k >= n_experts (every expert takes n_tokens / n_experts of the "
                f"token mass), got {n_tokens} token(s), k={k}, n_experts={self.n_experts}: no balanced routing "
                f"exists. To route a few tokens (decoding one at a time, say), take the top-k of their scores, "
                f"or route more tokens per call"
            )
        prev = self._init if self.warm_start else None
        # capacity mode with spare slots seeds its solve from the expert duals alone (see _seed),
        # so the previous call's beta serves a fresh batch of tokens too; otherwise the solve
        # starts from both duals (token mode: its alpha, per token, is not used by its semi-dual)
        seeded = axis == 0 and self._seeded and k * self.n_experts >= n_tokens + self.n_experts
        usable = prev is not None and prev[1].shape == b.shape and (seeded or prev[0].shape == a.shape) and all(
            t.device == scores.device and t.dtype == dt for t in prev
        )  # same problem shape, and the module not moved to another device or dtype since
        # both marginals are fixed (token masses 1, expert loads n_tokens / n_experts), so
        # a constant per token or per expert (a gate bias, say) leaves the plan unchanged:
        # the solve sees the double-centred scores, s - rows - cols + mean, so such offsets
        # cost no float resolution in the duals (per-expert offsets of 8e5 moved float32
        # plans by 0.55 with converged True when only the global mean was taken off; the
        # centring's own rounding is again a constant per row or column). Not detached:
        # result.value is the centred problem's, and so is its gradient. fp16/bf16 scores
        # are widened first, so the centring does not round in their dtype.
        wide = scores.to(dt)
        rows, cols = wide.mean(-1, keepdim=True), wide.mean(-2, keepdim=True)
        centred = (wide - cols) - (rows - rows.mean(-2, keepdim=True))
        try:
            cost = CostMatrix(-centred)
        except ValueError as e:  # scores with NaN or inf, or finite ones whose centring overflows (|s| ~ 2e38
            if "NaN or inf" not in str(e):  # in float32): which of the two, read only here (one read fewer a call)
                raise
            _validate.all_finite(("scores", scores))
            raise ValueError(f"scores overflow {_validate.dtype_name(dt)} when centred (largest |score| "
                             f"{float(wide.detach().abs().max()):.3g}): rescale them or pass float64 scores") from None
        cost._centred = True  # (CostMatrix._centred)
        # no continuation in gamma (sparse_ot's default where k >= the line length: the seed, token
        # mode with k = n_experts): at the router's loose tol each stage is a solve of its own, and
        # the seed took 1.3-2x longer with it (a review; 1024 x 128 at gamma 1e-3 ran out of max_iter)
        # nor sparse_ot's relaxed start: capacity mode has its own seed (through the E expert duals,
        # not the n_tokens token duals), and in tokens mode the solve from zero converges in a few
        # iterations at the router's tol, where the relaxed start (Newton on the E experts' duals
        # first) took 1.4x the CPU time at 64 experts (4096 tokens, k 2 and 8; fewer tensor
        # operations in 8 of 10 settings, more in 2)
        settings = dict(gamma=self.gamma, tol=self.tol * n_tokens, max_iter=self.max_iter, backend=self.backend,
                        verbose=False, gamma_schedule=None, relaxed_start=False)

        def solve(init):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                warnings.filterwarnings("ignore", message=r"tol=.* of the smallest total mass")  # said at construction
                seed = None
                if seeded:
                    init, seed = self._seed(cost, a, b, init, settings)
                res = sparse_ot(cost, a, b, k=k, formulation=self.formulation, axis=axis, init=init,
                                plan_grad=self.plan_grad, **settings)
            if seed is not None:
                res.info["seed_iter"] = seed.n_iter
                res.info["seed_time_s"] = seed.info["time_s"]
                res.info["time_s"] += seed.info["time_s"]
            return res, caught

        res, caught = solve(prev if usable else None)
        res.info["warm_start"] = "used" if usable else "none"
        if usable and not all_converged(res):
            # a warm start far from the new optimum (the duals of an outlier batch, of |beta| ~ 1e4
            # for unit scores, say) can fail where a cold start converges: without this retry one
            # spike misrouted the next 13 to 30+ calls (the duals of each failed solve seeding the
            # next). The better of the two is kept (a warm solve cut by max_iter can be ahead)
            cold, cold_caught = solve(None)
            if _score(cold) > _score(res):
                cold.info.update(warm_start="retried cold", retry_iter=res.n_iter)
                res, caught = cold, cold_caught
            else:
                res.info.update(warm_start="retried cold, warm kept", retry_iter=cold.n_iter)
        for w in caught:
            if not issubclass(w.category, ConvergenceWarning):
                reemit(w, self.__dict__.setdefault("_reemitted", set()))  # once per router
            elif not self._warned:
                self._warned = True
                warnings.warn(f"SparseOTRouter: {w.message} (warned once per router; result.converged reports "
                              f"every call)", ConvergenceWarning, stacklevel=user_stacklevel())
        self._check_ties(res, n_tokens, wide)
        if self.warm_start:  # the duals kept: those of the better solve, unless it stopped on non-finite values
            self._init = (res.alpha.detach(), res.beta.detach()) if _finite(res) else None
        vals = res.values
        if axis == 0:
            load = vals.sum(-1)
        else:
            idx = res.indices if batched else res.indices[None]
            v = vals if batched else vals[None]
            load = v.new_zeros(v.shape[0], self.n_experts).scatter_add(1, idx.reshape(v.shape[0], -1), v.reshape(v.shape[0], -1))
            load = load if batched else load[0]
        return RouterOutput(vals, res.indices, vals.detach() > 0, load, res)

    def _seed(self, cost, a, b, prev, settings) -> tuple[Optional[tuple], SparseOTResult]:
        """The capacity solve's starting duals, from the same routing without the capacity
        (quadratically regularized OT, ``k = n_experts`` per token) solved through its
        expert duals: ``E`` unknowns per group instead of ``n_tokens``, by Newton steps
        (``sparse_ot``'s solver for it; past 64 experts by conjugate gradient), each
        evaluation the same pass over the scores. Where the capacity does not bind (no
        expert's support exceeds it, as with the defaults on 4096 x 8 unit-scale scores, not
        on 64 x 8 ones: docs/router.md) that plan *is* the capacity problem's optimum, and
        the capacity solve from these duals stops at its first test (4096 x 8, float32: 2
        Newton steps and 0, against 19 L-BFGS iterations from zero; a call's forward and
        backward 597 tensor operations against 2,617, ``bench/router_op_count.py``,
        2026-12-03); where it binds, the capacity solve still starts near its optimum
        (4096 x 64: 3 + 35 iterations against 44).

        Only where the capacity leaves spare slots, ``capacity >= n_tokens / E + 1``: with
        none (``capacity_factor=1``, every slot needed: an assignment-like optimum, far
        from the unconstrained routing) the capacity solve started from the seed stopped at
        kinks that drop tokens (64 x 4, float32: token masses 0.00-1.83 with ``converged``,
        where the solve from zero reached 0.99-1.00), and with a capacity of 1 token per
        expert at a more lopsided optimum (3 tokens over 5 experts: token masses 0.6-1.8
        against 0.6-1.2, the same value). ``prev``: the previous call's duals (their
        ``beta``, per expert, seeds this solve; None: from zero). Returns the
        ``(alpha, beta)`` for the capacity solve (None if the seed came out non-finite) and
        the seed's result."""
        init = None if prev is None else (a.new_zeros(a.shape), prev[1])
        settings = dict(settings, tol=SEED_TOL * settings["tol"])
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # a seed cut short is still a start
            seed = sparse_ot(cost, a, b, k=self.n_experts, axis=1, init=init, plan_grad="fixed", **settings)
        return ((seed.alpha, seed.beta) if _finite(seed) else None), seed

    def _check_ties(self, res, n_tokens: int, scores: torch.Tensor) -> None:
        """Warn (once per router) when the routing misplaces over half of the token mass:
        scores tied across experts, which the k-sparse relaxation cannot split (every expert
        ranks the tokens alike whatever the duals). On 512 x 8 scores with gamma = 0.1, all
        zero scores misplace 1.5-1.7 of the token mass, N(0, 0.01) ones at most 0.28."""
        if self._warned_ties or (self.mode == "capacity" and self.capacity(n_tokens) == 1):
            return  # (a capacity of one token per expert has its own gap: docs/router.md; 3 x 5
            # N(0, 1) scores missed 0.53 of the token mass, no two scores within 0.029, a review)
        miss = float(torch.as_tensor(res.grad_norm).max()) / n_tokens
        if miss <= 0.5:
            return
        self._warned_ties = True
        what = "token masses" if self.mode == "capacity" else "expert loads"
        warnings.warn(
            f"SparseOTRouter: the routing misses its {what} by {miss:.2f} of the token mass (result.grad_norm / "
            f"n_tokens): the scores are tied across experts (score std {float(scores.detach().std()):.2g}; e.g. a gate "
            f"initialised at zero, or duplicated tokens), which the k-sparse relaxation cannot split between "
            f"experts. Break the ties, e.g. with a random gate initialisation (warned once per router)",
            stacklevel=user_stacklevel(),
        )

    def extra_repr(self) -> str:
        what = f"capacity_factor={self.capacity_factor}" if self.mode == "capacity" else f"k={self.k}"
        return f"n_experts={self.n_experts}, mode={self.mode!r}, {what}, gamma={self.gamma}"


def _capacity_factor(value) -> float:
    """``>= 1``; a float32, float16 or bfloat16 number (a NumPy scalar, a one-element tensor)
    as the shortest decimal that its dtype rounds to it, so that ``capacity`` takes it as
    written: ``np.float32(1.1)`` is 1.1, not 1.100000023841858 (whose capacity of 100 tokens
    over 10 experts came out 12, a review; bf16's 1.1015625 too, a later one)."""
    value = _validate.numpy_scalar(value)
    if isinstance(value, (np.float32, np.float16)):
        value = torch.tensor(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype in _NARROW_FLOATS \
            and not value.requires_grad:  # (one that does is refused by the check below, as float64's)
        value = _shortest_decimal(float(value.detach().reshape(())), value.dtype)
    factor = _validate.positive("capacity_factor", value)
    if factor < 1:
        raise ValueError(f"capacity_factor must be >= 1 (every expert must be able to take its n_tokens/n_experts "
                         f"share), got {factor}")
    return factor


_NARROW_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _shortest_decimal(v: float, dtype: torch.dtype) -> float:
    """The decimal of fewest digits that ``dtype`` rounds to ``v`` (``v`` itself if not finite)."""
    for digits in range(1, 18) if math.isfinite(v) else ():
        d = float(f"{v:.{digits}g}")
        if float(torch.tensor(d, dtype=dtype)) == v:
            return d
    return v


def _tol(value) -> float:
    tol = _validate.positive("tol", value)
    if tol > TOL_MASS_SHARE:  # (the solver's own warning, in its units, is left out of the calls)
        warnings.warn(f"SparseOTRouter: tol={tol:g} (a fraction of the token mass) lets a routing misplace that "
                      f"share of it and count as converged", UserWarning, stacklevel=user_stacklevel())
    return tol


#: SparseOTRouter's settings and their checks (SparseOTRouter.__setattr__)
_SETTINGS = {
    "n_experts": lambda v: _validate.positive_int("n_experts", v),
    "mode": lambda v: _validate.choice("mode", v, MODES),
    "capacity_factor": _capacity_factor,
    "k": lambda v: _validate.positive_int("k", v),
    "gamma": lambda v: _validate.positive("gamma", v),
    "tol": _tol,
    "max_iter": lambda v: _validate.positive_int("max_iter", v),
    "plan_grad": lambda v: _validate.choice("plan_grad", v, ("implicit", "fixed")),
    "warm_start": lambda v: _validate.flag("warm_start", v),
    "formulation": lambda v: _validate.choice("formulation", v, ("semi-dual", "dual")),
    "backend": lambda v: _validate.choice("backend", v, BACKENDS),
}


def _score(res: SparseOTResult) -> tuple:
    """The order in which two solves of one call compare: all problems converged, then the
    smaller worst gradient norm (the marginals' violation); NaN ranks last."""
    worst = float(torch.as_tensor(res.grad_norm).max())
    return all_converged(res), -(worst if worst == worst else float("inf"))


def _finite(res: SparseOTResult) -> bool:
    """Whether no problem of the solve stopped on non-finite values (read from the host
    strings of ``info["stop"]``: no synchronisation)."""
    stops = res.info["stop"] if isinstance(res.info["stop"], list) else [res.info["stop"]]
    return "non-finite values" not in stops
