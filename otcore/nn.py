"""``nn.Module`` layers: the Sinkhorn divergence loss and the sparse-OT MoE router."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from . import _validate
from ._dispatch import BACKENDS
from .geometry import PointCloud
from .result import ConvergenceWarning, all_converged, reemit
from .router import SparseOTRouter
from .solvers._entropic import balanced_gauge, parse_rho, value_only_results
from .solvers._overrelax import check_overrelax
from .solvers.sinkhorn import check_schedule, sinkhorn

__all__ = ["SinkhornLoss", "SparseOTRouter"]


class SinkhornLoss(nn.Module):
    """(Debiased) Sinkhorn divergence between point clouds, differentiable.

    ``OT_eps(a, x; b, y)`` is the optimal value of
    ``<P, C> + eps KL(P | a x b)`` (:attr:`otcore.OTResult.value`). With
    ``debias=True`` the loss is the Sinkhorn divergence

        S(a, x; b, y) = OT_eps(a, x; b, y) - OT_eps(a, x; a, x)/2 - OT_eps(b, y; b, y)/2
                        + eps (m(a) - m(b))^2 / 2,

    (``m`` the total mass; the last term, of Sejourne et al. 2019, is zero unless
    ``rho`` lets the masses differ) which is >= 0, zero iff the measures agree, and interpolates between OT
    (eps -> 0) and an MMD (eps -> inf). Gradients to ``x``, ``y``, ``a``, ``b``
    come from the envelope theorem (exact at convergence, no unrolling). The two
    self-transport terms run Sinkhorn's symmetric update (see :func:`otcore.sinkhorn`),
    which converges in tens of iterations at any eps; when ``x`` and ``y`` have one shape
    (and the weights agree in kind) they are one batched solve of two problems.

    Float32 and a large eps: each term's potentials are ``-eps log`` of a sum near 1, so
    they carry an absolute rounding of ~``eps * 2^-24``, and the debiased loss is a small
    difference of three such terms (~1e4 times the loss at eps = 100 on the unit square).
    Each value is therefore taken from a float64 softmin at the float32 potentials once eps
    exceeds a quarter of the cost's diameter (see docs/conventions.md), with the default
    uniform weights as ``1/n`` in float64 (float64 weights as given), and the three are
    combined in float64 before the one rounding to float32: against float64 solves (200 vs
    150 uniform points in the unit square, 5 samples) within 5e-6 relative at eps = 10, 100
    and 1000, most within 4e-7. What is left grows like eps times float32's rounding
    squared: from eps ~ 1e8 (1e-4 to 6e-4 off at 1e8, 1e-3 to 6e-3 at 1e9 on 30 vs 25
    points) use float64 inputs.

    Args:
        eps: regularization in cost units (``||x - y||^2`` by default, no 1/2).
        debias: subtract the two self-transport terms.
        cost: ``"sqeuclidean"`` or ``"euclidean"``.
        reduction: ``"mean"`` / ``"sum"`` over the batch, or ``"none"``.
        rho: None (balanced) or KL marginal penalty (unbalanced divergence).
        eps_schedule: eps scaling for each solve (default ``"geometric"``).
        tol, max_iter, backend, precision, cuda_graph, overrelax: passed to :func:`otcore.sinkhorn`
            (``tol=None``: each solve runs exactly ``max_iter`` iterations, eps-scaling
            stages included, with no convergence test, like GeomLoss's fixed schedule; each
            result then skips the column marginals and the transport cost: one plan pass).
            ``overrelax="auto"`` (default) over-relaxes the cross term's iterations where
            there is a ``tol`` (2-8x fewer at small eps; the 2000-point loss at eps 0.0025:
            111 against 591 iterations, 3.7x less time; docs/conventions.md).
        warm_start: start each of the (up to three) solves from the potentials of the same
            term in the previous call, without eps scaling, when eps, the shapes, dtype,
            device and the zero-weight pattern agree (consecutive training steps move the
            points a little); otherwise, or if that solve does not converge, it solves cold.
            The potentials of converged solves are kept on the module (not in its state
            dict). Same values and gradients up to ``tol``, except that the gradients to the
            weights of a balanced problem, defined up to a constant, may differ by one.
            Needs a ``tol`` (``ValueError`` with ``tol=None``: a fixed number of iterations
            cannot tell a warm solve that failed).

    Shapes: ``x`` ``(n, d)`` or ``(B, n, d)``, ``y`` ``(m, d)`` or ``(B, m, d)``,
    optional weights ``a`` ``(n,)``/``(B, n)`` and ``b`` ``(m,)``/``(B, m)``.
    Returns a scalar (``reduction="none"``: ``(B,)`` for batched input).

    Example::

        loss = otcore.SinkhornLoss(eps=0.01)(x, y)   # x (n, 3), y (m, 3)
        loss.backward()
    """

    def __init__(
        self,
        eps: float = 0.01,
        debias: bool = True,
        cost: str = "sqeuclidean",
        reduction: str = "mean",
        rho: Optional[float] = None,
        eps_schedule="geometric",
        tol: Optional[float] = 1e-5,
        max_iter: int = 1000,
        backend: str = "auto",
        precision: str = "fp32",
        cuda_graph: bool = False,
        warm_start: bool = False,
        overrelax="auto",
    ):
        super().__init__()
        self._eps = _validate.positive("eps", eps)
        self.debias = debias
        self.cost = cost
        self.reduction = reduction
        # the solver's own checks, at construction rather than at the first forward call
        rho_a, rho_b = parse_rho(rho)  # each entry checked first (a pair of arrays cannot be compared)
        if rho_a != rho_b:
            # the mass term below makes S >= 0 only with one penalty on both sides: with
            # rho = (None, 0.5) and masses 5 and 3, S came out as -7.7 at eps = 10
            raise ValueError(f"rho must be None, one number or a pair of equal ones for SinkhornLoss (the "
                             f"divergence needs the same penalty on both sides), got {rho!r}; otcore.sinkhorn "
                             f"takes different ones")
        rho = rho_a
        _validate.positive("tol", tol, allow_none=True)
        _validate.positive_int("max_iter", max_iter)
        _validate.choice("backend", backend, BACKENDS)
        _validate.choice("precision", precision, _validate.PRECISIONS)
        _validate.flag("cuda_graph", cuda_graph)
        check_schedule(eps_schedule, self.eps)
        self.solver_kw = dict(
            rho=rho, eps_schedule=eps_schedule, tol=tol, max_iter=max_iter,
            backend=backend, precision=precision, cuda_graph=cuda_graph, verbose=False,
            overrelax=check_overrelax(overrelax, tol),
        )
        self.warm_start = warm_start
        self._last: dict = {}  # term ("xy", "xx", "yy", "xx+yy") -> its kept potentials, eps and support (_keep)
        self._reemitted: set = set()  # the warm solves' warnings passed on (result.reemit: once per module)

    def __setstate__(self, state):
        # a module pickled before eps became a property kept it in __dict__ and in solver_kw
        if "eps" in state:
            state["_eps"] = state.pop("eps")
            state["solver_kw"] = {k: v for k, v in state["solver_kw"].items() if k != "eps"}
        for name in ("debias", "cost", "reduction", "warm_start"):  # pickled before they were checked properties
            if name in state:
                state["_" + name] = state.pop(name)
        state.setdefault("_warm_start", False)  # or before warm starts existed
        state["solver_kw"].setdefault("overrelax", False)  # or before over-relaxation
        state.setdefault("_last", {})
        state.setdefault("_reemitted", set())
        super().__setstate__(state)
        # through the setters: a pickle of a module set to reduction="avg" (unchecked then) raises here
        self.debias, self.cost, self.reduction = self._debias, self._cost, self._reduction
        self.warm_start = self._warm_start

    @property
    def eps(self) -> float:
        """The regularization; may be set between calls (an eps annealed during training):
        every solve and the mass term read it then. (Once it was copied into the solver's
        arguments at construction, so a new value changed only the repr and the mass term.)"""
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        value = _validate.positive("eps", value)
        check_schedule(self.solver_kw["eps_schedule"], value)  # an explicit schedule must stay above it
        self._eps = value

    @property
    def debias(self) -> bool:
        """Subtract the self-transport terms; checked when set, as at construction."""
        return self._debias

    @debias.setter
    def debias(self, value: bool) -> None:
        self._debias = _validate.flag("debias", value)

    @property
    def cost(self) -> str:
        """``"sqeuclidean"`` or ``"euclidean"``; checked when set, as at construction (a bad
        value set between calls had shown in the repr and raised only at the next call)."""
        return self._cost

    @cost.setter
    def cost(self, value: str) -> None:
        self._cost = _validate.choice("cost", value, ("sqeuclidean", "euclidean"))

    @property
    def reduction(self) -> str:
        """``"mean"``, ``"sum"`` or ``"none"``; checked when set, as at construction."""
        return self._reduction

    @reduction.setter
    def reduction(self, value: str) -> None:
        self._reduction = _validate.choice("reduction", value, ("mean", "sum", "none"))

    @property
    def warm_start(self) -> bool:
        """Start each solve from the previous call's potentials; checked when set, as at
        construction. Needs a ``tol``: a warm solve that does not converge is redone cold,
        and with ``tol=None`` (fixed iterations) nothing tells (a review: after a jump of the
        points, warm gradients 55% off the converged ones, cold 5%)."""
        return self._warm_start

    @warm_start.setter
    def warm_start(self, value: bool) -> None:
        value = _validate.flag("warm_start", value)
        if value and self.solver_kw["tol"] is None:
            raise ValueError("warm_start=True needs a tol: a warm solve that does not converge is redone cold, and "
                             "with tol=None (a fixed number of iterations, no convergence test) nothing tells, so a "
                             "start far from the new solution (points that moved, a fresh batch) would be kept")
        self._warm_start = value

    # torch.compile: the solve (data-dependent loop, host checks) is one opaque call;
    # its envelope gradient is an autograd.Function, so a compiled model trains through it.
    @torch.compiler.disable
    def _ot(self, x, y, a, b, term: str) -> torch.Tensor:
        geom = PointCloud(x, y, cost=self.cost)
        res = self._warm_solve(geom, x, y, a, b, term) if self.warm_start else None
        if res is not None:  # a warm solve is only returned converged
            self._keep(term, res, a, b)
            return res.value
        # cold: with the configured eps scaling; its warnings are the user's
        with value_only_results(geom):  # only the value is read (tol=None: no marginals, no cost)
            res = sinkhorn(geom, a, b, eps=self.eps, **self.solver_kw)
        if self.warm_start:
            if all_converged(res):
                self._keep(term, res, a, b)
            else:  # a failed solve (NaN, say) must not seed the next call
                self._last.pop(term, None)
        return res.value

    def _warm_solve(self, geom, x, y, a, b, term: str):
        """The solve started from ``term``'s kept potentials, without eps scaling, if they
        fit (same eps, shapes, compute dtype, device and zero-weight pattern) and it converges;
        else None (the caller solves cold). A warm start far from the new solution (points
        that jumped, say) can fail where a cold start with eps scaling converges."""
        last = self._last.get(term)
        if last is None or last["eps"] != self.eps or not all(
                t.shape == p.shape[:-1] and t.dtype == geom.dtype and t.device == p.device
                for t, p in zip(last["fg"], (x, y))):  # (the geometry's dtype: x float32 with y float64
            # is solved in float64, and compared with x's dtype the cross term never started warm)
            return None
        for kept, w in zip(last["support"], (a, b)):  # a point that had zero weight holds any potential
            if (kept is None) != (w is None) or (w is not None and not torch.equal(kept, w > 0)):
                return None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with value_only_results(geom):
                res = sinkhorn(geom, a, b, eps=self.eps, init=last["fg"], **dict(self.solver_kw, eps_schedule=None))
        if not all_converged(res):
            return None
        for w in caught:  # anything but the (now moot) convergence warnings is passed on
            if not issubclass(w.category, ConvergenceWarning):
                reemit(w, self._reemitted)
        return res

    def _keep(self, term: str, res, a, b) -> None:
        """Keep a converged solve's potentials for the next call's warm start. Balanced
        ``(f, g)`` are defined up to ``(f + c, g - c)``, and warm starts never reset ``c``:
        it drifted by ~0.01 per call in a review (30 points, eps 0.01), until float32 could
        not reach tol. So the kept pair is shifted to ``<a, f> = <b, g>`` (the
        self-transport terms have ``f = g`` and need no shift)."""
        f, g = res.f.detach(), res.g.detach()
        a, b = (None if w is None else w.detach() for w in (a, b))  # plain tensors: weights that require
        # grad (a softmax's, say) made the kept pair part of their graph, which then lived on the
        # module until the next call and made copy.deepcopy of the module (or of its model) fail
        if self.solver_kw["rho"] is None and term == "xy":
            f, g = balanced_gauge(f, g, a, b)
        support = tuple(None if w is None else (w > 0) for w in (a, b))
        self._last[term] = dict(fg=(f, g), eps=self.eps, support=support)

    def forward(self, x: torch.Tensor, y: torch.Tensor, a=None, b=None) -> torch.Tensor:
        # fp16/bf16 inputs: upcast once, here, so the three terms (and their gradients,
        # which cancel) meet in float32 (the loss is float32); cast per solve, bf16 weights
        # of mass ~300 lost the mass term (28% off) and their gradient
        low = sorted({_validate.dtype_name(w.dtype) for w in (a, b)
                      if isinstance(w, torch.Tensor) and w.dtype in (torch.float16, torch.bfloat16)})
        x, y, a, b = _widen(x, y, a, b)
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype != y.dtype \
                and x.is_floating_point() and y.is_floating_point():
            # points of two dtypes: both in the wider (the loss's), as the cross term's geometry
            # reads them, so that the self terms are solved at the loss's precision too (float32
            # x with float64 y had solved OT(x, x) in float32: 1e-7 of a float64 loss, a review)
            wide = torch.promote_types(x.dtype, y.dtype)
            x, y = x.to(wide), y.to(wide)
        try:
            loss = self._ot(x, y, a, b, "xy")
        except ValueError as e:
            # the balanced check, on weights normalised in fp16/bf16 (a gap of their rounding, not a real one)
            if low and "same total mass" in str(e) and _rounding_gap(a, b):
                raise ValueError(f"{e}. The weights are {'/'.join(low)}, whose rounding (~1e-3 of a sum normalised "
                                 f"in that dtype) balanced OT cannot absorb: normalise them in float32, e.g. "
                                 f"a = a.float() / a.float().sum()") from None
            raise
        # the loss's dtype: the points' (the solve's; x and y checked by it), whatever the
        # weights' (float64 weights on float32 points had made only the debiased loss
        # float64, through its mass term)
        dtype = torch.promote_types(x.dtype, y.dtype)
        if self.debias:
            loss = loss - 0.5 * self._self_terms(x, y, a, b)
            # the generalized KL of the value holds + eps m(a) m(b); the debiasing leaves
            # - eps/2 (m(a) - m(b))^2 of it, which Sejourne et al. (2019) add back so that
            # the unbalanced divergence stays >= 0 (zero for balanced weights)
            loss = loss + 0.5 * self.eps * (self._mass(a) - self._mass(b)) ** 2
        # each value comes in the dtype it was computed in (value_only_results: float64 at a
        # float32 solve's large eps), so the terms, ~1e4 times their difference there, are
        # combined and reduced before the one rounding to the loss's dtype
        if self.reduction == "mean":
            loss = loss.mean()
        elif self.reduction == "sum":
            loss = loss.sum()
        return loss.to(dtype)

    def _self_terms(self, x, y, a, b) -> torch.Tensor:
        """``OT(a, x; a, x) + OT(b, y; b, y)``. Clouds of one shape, dtype and device (and
        weights both given, alike, or both not) solve as one batch of self-transport problems
        (term ``"xx+yy"``): one launch per pass for both, one set of per-solve costs
        (checks, eps-scaling stages, the result's passes), each problem stopping on its own;
        the eps-scaling stages then start from the larger of the two diameters."""
        same = x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
        if same and (a is None) == (b is None) and (a is None or (a.shape == b.shape and a.dtype == b.dtype)):
            join = torch.cat if x.dim() == 3 else torch.stack  # batched inputs: (2B, n, d)
            xs = join([x, y])
            ws = None if a is None else join([a, b])
            v = self._ot(xs, xs, ws, ws, "xx+yy")
            half = v.shape[0] // 2
            return v[:half] + v[half:] if x.dim() == 3 else v[0] + v[1]
        return self._ot(x, x, a, a, "xx") + self._ot(y, y, b, b, "yy")

    @staticmethod
    def _mass(w):
        """Total mass per problem: ``sum(w)``, or 1 for the default uniform weights."""
        return 1.0 if w is None else w.sum(-1)

    def extra_repr(self) -> str:
        warm = ", warm_start=True" if self.warm_start else ""
        return f"eps={self.eps}, debias={self.debias}, cost={self.cost!r}, reduction={self.reduction!r}{warm}"


def _rounding_gap(a, b) -> bool:
    """Whether the total masses of ``a`` and ``b`` (None: 1) differ by at most 1e-2 of the
    larger, in every problem: what normalising in fp16/bf16 leaves, unlike a real mismatch."""
    ma, mb = (torch.ones(()) if w is None else w.detach().double().sum(-1).cpu() for w in (a, b))
    return bool(((ma - mb).abs() <= 1e-2 * torch.maximum(ma, mb)).all())


def _widen(*ts):
    """fp16/bf16 tensors as float32 (differentiably), anything else as it is; one tensor
    passed twice stays one (so ``x is y`` still marks self-transport)."""
    done = {}
    for t in ts:
        if id(t) not in done:
            low = isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16)
            done[id(t)] = t.float() if low else t
    return tuple(done[id(t)] for t in ts)
