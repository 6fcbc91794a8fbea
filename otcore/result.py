"""Result records returned by the solvers (small, immutable)."""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from . import _validate


class ConvergenceWarning(UserWarning):
    """A solver stopped at ``max_iter`` (or on non-finite values) before meeting ``tol``."""


#: Frames a warning is not attributed to: otcore's own (the kernels too, wherever installed)
#: and torch's (nn.Module's call, torch.compiler.disable's wrapper, autograd's backward).
_LIBRARY_DIRS = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def user_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` by the function calling this: the first frame
    outside otcore and torch, the user's line. (Fixed levels counted frames that change:
    behind ``torch.compiler.disable`` the solvers' warnings named torch's eval_frame.py, and
    the router's torch's module.py, a review.)"""
    kernels = sys.modules.get("otcore.kernels")
    skip = _LIBRARY_DIRS + ((os.path.dirname(os.path.abspath(kernels.__file__)) + os.sep,) if kernels else ())
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def reemit(w: warnings.WarningMessage, seen: set) -> None:
    """Pass on a warning recorded around a solve (``warnings.catch_warnings(record=True)``),
    unless one of the same category and text was passed on before (``seen``, kept by the
    module that solves: once per module). Python's own once-per-line filter cannot do it:
    every ``catch_warnings`` resets its registries, and a warm-started SinkhornLoss repeated
    a solver's warning on every call (a review: 13 times over 5 calls)."""
    key = (w.category, str(w.message))
    if key not in seen:
        seen.add(key)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def all_converged(res) -> bool:
    """Whether every problem of an :class:`OTResult` or :class:`SparseOTResult` converged
    (a bool unbatched; one host read batched)."""
    return bool(torch.as_tensor(res.converged).all())


# eq=False: identity comparison and hashing (field-wise ones compared tensors, which raised)
@dataclass(frozen=True, eq=False)
class OTResult:
    """Solution of an entropic OT problem.

    The plan is ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``; it is never stored,
    the methods below stream it from the potentials.

    Attributes (unbatched shapes; batched ones have a leading ``B``):
        f: ``(n,)`` and g: ``(m,)`` dual potentials, detached.
        cost: ``<P, C>``, a scalar tensor (``(B,)`` batched); differentiable.
        value: the regularized objective ``<P,C> + eps*KL(P | a x b)`` (plus
            ``rho*KL(P1 | a) + rho*KL(P^T 1 | b)`` when unbalanced), evaluated
            through its dual at ``(f, g)``; differentiable by the envelope theorem.
        n_iter: iterations run (int; ``(B,)`` long tensor batched).
        marginal_error: ``|P1 - a|_1 + |P^T 1 - b|_1`` (float; ``(B,)`` batched).
        converged: whether the stopping test passed (bool; ``(B,)`` batched).
        info: extra diagnostics (residual used for stopping, eps stages, times).
    """

    f: torch.Tensor
    g: torch.Tensor
    cost: torch.Tensor
    value: torch.Tensor
    n_iter: Union[int, torch.Tensor]
    marginal_error: Union[float, torch.Tensor]
    converged: Union[bool, torch.Tensor]
    info: dict = field(default_factory=dict, repr=False)
    # what the methods need to stream the plan (internal, batched)
    _geom: Any = field(default=None, repr=False)
    _F: Optional[torch.Tensor] = field(default=None, repr=False)
    _G: Optional[torch.Tensor] = field(default=None, repr=False)
    _eps: float = field(default=1.0, repr=False)
    _backend: str = field(default="torch", repr=False)
    _precision: str = field(default="fp32", repr=False)
    _versions: Optional[tuple] = field(default=None, repr=False)  # the geometry's inputs at the solve

    @property
    def batched(self) -> bool:
        return bool(self._geom.batched)

    def __getstate__(self):
        # a copy (copy.deepcopy, pickle, torch.save) gets new input tensors whose version
        # counters start again at 0: it keeps whether the result was up to date, not the counts.
        # (copy.deepcopy of a result whose value is in autograd's graph raises in torch, as for
        # any non-leaf tensor; pickle and torch.save copy it)
        state = dict(self.__dict__)
        if self._versions is not None:
            state["_versions"] = self._versions == self._geom.input_versions()
        return state

    def __setstate__(self, state):
        fresh = state.get("_versions")
        if isinstance(fresh, bool):  # (a tuple: pickled before this flag; kept as it was)
            state["_versions"] = state["_geom"].input_versions() if fresh else ("modified before the copy",)
        self.__dict__.update(state)

    def _stream(self, method: str, primitive: str, *args):
        """The geometry primitive ``primitive`` (behind the method ``method``) at the
        solution's potentials, without autograd and autocast (the plan is float32/float64
        whatever autocast says). The methods re-read the geometry's inputs, so after an
        in-place change of them (an optimizer step on ``x``) they would mix the new points
        with the old potentials: that raises."""
        if self._versions is not None and self._geom.input_versions() != self._versions:  # (None: made by hand)
            raise RuntimeError(f"OTResult.{method}(): the geometry's inputs were modified in place since the "
                               "solve, so its potentials no longer describe their plan; solve again (or keep a "
                               "copy of the inputs)")
        self._geom._reread_untracked()  # inference tensors: no counter tells a change; read as they are now
        with torch.no_grad(), torch.autocast(self._geom.device.type, enabled=False):
            return getattr(self._geom, primitive)(self._F, self._G, self._eps, *args, **self._kw())

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.batched else t[0]

    def _kw(self):
        return dict(backend=self._backend, precision=self._precision)

    def plan(self) -> torch.Tensor:
        """The dense plan ``(n, m)`` (``(B, n, m)`` batched). Small problems only."""
        return self._out(self._stream("plan", "plan"))

    def apply(self, v: torch.Tensor, axis: int = 1) -> torch.Tensor:
        """Apply the plan without forming it.

        ``axis=1``: ``P @ v`` (sum over j) with ``v`` of shape ``(m,)`` or ``(m, k)``,
        giving ``(n,)`` / ``(n, k)``. ``axis=0``: ``P^T @ u`` with ``u`` ``(n,)`` or
        ``(n, k)``, giving ``(m,)`` / ``(m, k)``. Batched results take and give a
        leading ``B``. E.g. the barycentric map is ``res.apply(y) / res.apply(ones)[..., None]``
        (``ones`` of ``y``'s shape without its last dimension; a source point of weight
        zero carries no mass, and its row is 0 / 0 = NaN).
        Differentiable with respect to ``v``, the plan held fixed (its gradient is the
        product along the other axis).
        """
        axis = _validate.axis(axis, "0 or 1")
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"v must be a torch.Tensor, got {type(v).__name__}")
        _validate.no_function_transform(v)
        _validate.strided("v", v)
        if not v.is_floating_point():
            raise TypeError(f"v must be a real floating-point tensor, got {v.dtype}")
        if v.device != self._F.device:
            raise ValueError(f"v is on {v.device} but the solution is on {self._F.device}")
        size = self._geom.m if axis == 1 else self._geom.n
        lead = 1 if self.batched else 0
        if v.dim() not in (lead + 1, lead + 2) or v.shape[lead] != size or (
            self.batched and v.shape[0] != self._geom.batch
        ):
            raise ValueError(f"v must have shape ({'B, ' if self.batched else ''}{size}[, k]) for axis={axis}, got {tuple(v.shape)}")
        V = (v if self.batched else v[None]).to(self._F.dtype)
        if not (V.requires_grad and torch.is_grad_enabled()):  # (a constant, also inside a torch.func transform)
            return self._out(self._stream("apply", "apply_plan", V, axis))
        return self._out(_ApplyPlan.apply(self, V, axis))

    def topk(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` largest plan entries of each row: values and column indices, ``(n, k)`` each."""
        vals, idx = self._stream("topk", "plan_topk", _validate.top_k(k, self._geom.m))
        return self._out(vals), self._out(idx)


class _ApplyPlan(torch.autograd.Function):
    """``P V`` (``axis=1``) or ``P^T V`` (``axis=0``) with the plan held fixed: linear in
    ``V``, so its gradient is the product along the other axis."""

    @staticmethod
    def forward(ctx, res: OTResult, V, axis: int):
        ctx.res, ctx.axis = res, axis
        return res._stream("apply", "apply_plan", V, axis)

    @staticmethod
    def backward(ctx, grad):
        # itself an _ApplyPlan: linear in grad, so it differentiates again (Hessians, gradient
        # penalties through a barycentric map)
        return None, _ApplyPlan.apply(ctx.res, grad.to(ctx.res._F.dtype), 1 - ctx.axis), None


@dataclass(frozen=True, eq=False)
class SparseOTResult:
    """Solution of a sparsity-constrained (top-k) OT problem (:func:`otcore.sparse_ot`).

    The plan ``T`` has at most ``k`` nonzeros per column (``axis=0``) or per row
    (``axis=1``) and is stored line by line, positions ascending within a line.

    Attributes (unbatched shapes; batched ones have a leading ``B``):
        values: ``(m, k)`` plan entries ``T[indices[j, s], j]`` (``axis=0``), or
            ``(n, k)`` entries ``T[i, indices[i, s]]`` (``axis=1``); zeros allowed.
            Differentiable with respect to the inputs (see ``plan_grad``).
        indices: int64, same shape: the row (``axis=0``) or column (``axis=1``) of each entry.
        alpha: ``(n,)`` and beta: ``(m,)`` dual variables, detached. On the support
            ``T_ij = (alpha_i + beta_j - C_ij) / gamma``; for the semi-dual the line
            multipliers (``beta`` for ``axis=0``) are the ones that make the line sums exact.
        cost: ``<T, C>``, a scalar tensor (``(B,)`` batched); gradient with ``T`` held fixed.
        value: optimum of the (semi-)dual objective (a lower bound of the primal
            ``<T, C> + (gamma/2)|T|^2`` over k-sparse couplings, equal to it when
            ``k`` is large); differentiable by the envelope theorem (at a kink, a tie
            across a line's ``k``-th place: a supergradient, the plan mixed over the tied
            supports, docs/sparse_ot.md#gradients).
        n_iter: L-BFGS iterations (int; ``(B,)`` long tensor batched).
        converged: whether ``grad_norm <= tol`` was reached, or the objective stopped
            improving (``ftol``: the optimum of a binding k-constraint, where the gradient
            need not vanish; ``info["stop"]`` says which) (bool; ``(B,)`` batched).
        grad_norm: L1 norm of the objective's gradient at the end, i.e. the violation
            of the dualized marginal constraints (float; ``(B,)`` batched).
        marginal_error: ``|T1 - a|_1 + |T^T 1 - b|_1`` (float; ``(B,)`` batched).
        axis: 0 (columns are k-sparse) or 1 (rows are k-sparse).
        shape: ``(n, m)``, the dense plan's shape (without the batch).
        info: extra diagnostics (formulation, gamma, k, time).
    """

    values: torch.Tensor
    indices: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    cost: torch.Tensor
    value: torch.Tensor
    n_iter: Union[int, torch.Tensor]
    converged: Union[bool, torch.Tensor]
    grad_norm: Union[float, torch.Tensor]
    marginal_error: Union[float, torch.Tensor]
    axis: int = 0
    shape: tuple = (0, 0)
    info: dict = field(default_factory=dict, repr=False)

    @property
    def batched(self) -> bool:
        return self.values.dim() == 3

    def to_dense(self) -> torch.Tensor:
        """The dense plan ``(n, m)`` (``(B, n, m)`` batched); differentiable like ``values``."""
        vals = self.values if self.batched else self.values[None]
        idx = self.indices if self.batched else self.indices[None]
        n, m = self.shape
        B = vals.shape[0]
        if self.axis == 0:  # line j holds rows idx[:, j, :]
            dense = vals.new_zeros(B, n, m).scatter_add(1, idx.transpose(1, 2), vals.transpose(1, 2))
        else:
            dense = vals.new_zeros(B, n, m).scatter_add(2, idx, vals)
        return dense if self.batched else dense[0]
