"""Geometries: the only code that knows the cost.

A geometry holds either two point clouds (cost computed on the fly) or a dense
cost matrix, always internally with a leading batch dimension ``B`` (``B = 1``
for unbatched input, remembered in ``batched``). Solvers only call the
primitives below; each dispatches to the torch reference or the Triton kernels
(:mod:`otcore._dispatch`).

Primitives take *biased* potentials ``F = f + eps*log a`` (B,n) and
``G = g + eps*log b`` (B,m) so that ``P_ij = exp((F_i + G_j - C_ij)/eps)``.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import torch

from . import _dispatch, _validate, reference

COSTS = ("sqeuclidean", "euclidean")

#: stamps for the loads of inputs without version counters (:meth:`Geometry._stamp`)
_UNTRACKED_LOADS = itertools.count()


def _eps(eps) -> float:
    """A primitive's ``eps``: a finite number > 0 (a negative one gave silent nonsense, different
    on each backend, and 0 a bare ZeroDivisionError)."""
    return _validate.positive("eps", eps)


class Geometry:
    """Common part of :class:`PointCloud` and :class:`CostMatrix`."""

    is_dense: bool
    batched: bool
    batch: int
    n: int
    m: int

    @property
    def dtype(self) -> torch.dtype:
        return self._ref.dtype

    @property
    def device(self) -> torch.device:
        return self._ref.device

    def diameter(self, a: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None) -> float:
        """The largest of :meth:`diameters` over the batch (the start of eps scaling)."""
        return float(self.diameters(a, b).max())

    def diameters(self, a: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per problem, an upper bound of the costs between the points of positive weight,
        ``(B,)`` (see each geometry's ``_diameters``). Weights are checked as a solver checks
        them: a tensor, finite, non-negative, not all zero (negative or NaN ones had counted
        as zero, and all-zero ones gave a cost matrix -inf, a review); ``(n,)``/``(m,)`` or,
        as for a batch of one, ``(1, n)``/``(1, m)`` for an unbatched geometry."""
        if a is not None or b is not None:
            def one(w):  # (1, size) for an unbatched geometry: as (size,)
                flat = isinstance(w, torch.Tensor) and not self.batched and w.dim() == 2 and w.shape[0] == 1
                return w[0] if flat else w
            _validate.weights((("a", one(a), self.n), ("b", one(b), self.m)), self.batch, self.batched,
                              self._ref)  # one host read
        return self._diameters(a, b)

    def _live(self, name: str, w: Optional[torch.Tensor], size: int) -> Optional[torch.Tensor]:
        """(B, size) bool ``w > 0`` of weights ``w`` given as (B, size), or (size,) for an
        unbatched geometry; None stays None."""
        if w is None:
            return None
        shapes = [(self.batch, size)] + ([] if self.batched else [(size,)])
        if tuple(w.shape) not in shapes:
            raise ValueError(f"{name} must have shape {' or '.join(map(str, shapes))}, got {tuple(w.shape)}")
        return w.reshape(self.batch, size) > 0

    def input_versions(self) -> tuple[Optional[int], ...]:
        """The version counters of :meth:`inputs` (bumped by in-place ops), one per
        tensor; None for an inference tensor, which carries none."""
        return tuple(_version(t) for t in self.inputs())

    def _stamp(self) -> tuple:
        """What ``loaded_versions`` records at a load: :meth:`input_versions`, each input
        without a version counter (an inference tensor, made under ``torch.inference_mode()``)
        given a stamp of this load instead, so that what is cached from it (the cost of a
        small problem, fp16 copies, the Triton path's centred points) is made again after the
        next :meth:`_reread_untracked`. (Such loads had all recorded ``None``: a geometry
        reused after ``x.copy_(batch)`` under inference mode solved its old cost, a review.)"""
        return tuple(("untracked load", next(_UNTRACKED_LOADS)) if v is None else v for v in self.input_versions())

    def _stale(self) -> bool:
        """Whether an input with a version counter changed in place since the last load
        (inputs without one are never known to: :meth:`_reread_untracked` reloads those; a
        tracked input beside an inference tensor still counts, a review)."""
        return any(v is not None and v != loaded for v, loaded in zip(self.input_versions(), self.loaded_versions))

    def _reread_untracked(self) -> None:
        """Load again inputs whose in-place changes cannot be seen (inference tensors): at
        the start of every solve and of every result method, which then read the inputs as
        they are."""
        if None in self.input_versions():
            self._load()

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_dense", None)  # made again from the copy's inputs
        return state

    def __setstate__(self, state):
        # a copy (pickle, copy.deepcopy, torch.save) loads its inputs again: their version
        # counters restart, and could equal the versions of a stale load (a copy taken after
        # x.add_(5) and before the geometry re-read x solved the old cost, a review)
        self.__dict__.update(state)
        self._load()

    # --- primitives -------------------------------------------------------
    def _call(self, name, backend, *args, **kw):
        if "precision" in kw:  # (the torch twins take it without reading it: checked here for both paths)
            _validate.choice("precision", kw["precision"], _validate.PRECISIONS)
        return _dispatch.primitive(name, backend)(self, *args, **kw)

    def softmin(self, h, eps, axis, backend="torch", precision="fp32", hint=None):
        """``axis=1``: ``-eps log sum_j exp((h_j - C_ij)/eps)`` (B,n); ``axis=0``: over i, (B,m).
        ``hint``: an estimate of the result (e.g. the previous iteration's), which the
        Triton kernel uses as its log-sum-exp shift; the result does not depend on it."""
        axis = _validate.axis(axis)
        self._check_vector("h", h, axis)
        return self._call("softmin", backend, h, _eps(eps), axis, precision=precision, hint=hint)

    def sinkhorn_steps(self, f, g, loga, logb, eps, tau, k, active, symmetric=False, check=None,
                       backend="torch", precision="fp32", omega=None):
        """``k`` Sinkhorn iterations at ``eps`` of the ``active`` problems: new ``(f, g)``
        (unbiased potentials), and with ``check = (tol, rho_a)`` the convergence test and
        its residual, ``(f, g, resid)`` (see reference.sinkhorn_steps); ``omega`` (B,):
        over-relaxed iterations. On the Triton backend a problem whose cost fits one tile
        runs it all in one launch. ``symmetric`` (self-transport) expects ``f = g`` and
        ``loga = logb``: the twin iterates on ``f`` with ``loga``, the kernels on ``g`` with
        ``logb`` (the solver passes them so)."""
        self._check_rows(("f", f, "n"), ("g", g, "m"), ("loga", loga, "n"), ("logb", logb, "m"))
        if not isinstance(active, torch.Tensor) or tuple(active.shape) != (self.batch,) or active.dtype != torch.bool:
            raise ValueError(f"active must be a (B={self.batch},) bool tensor, got {_described(active)}")
        return self._call("sinkhorn_steps", backend, f, g, loga, logb, _eps(eps), tau, k, active,
                          symmetric=symmetric, check=check, precision=precision, omega=omega)

    # The plan primitives take the shifted potentials ``F`` (B,n), ``G`` (B,m) of
    # ``P_ij = exp((F_i + G_j - C_ij) / eps)``; their shapes are checked (no device work):
    # the Triton kernels index them by the geometry's sizes, so a shorter one was read past its end.
    def apply_plan(self, F, G, eps, v, axis, backend="torch", precision="fp32"):
        """``axis=1``: ``P v`` with v (B,m[,k]); ``axis=0``: ``P^T u`` with u (B,n[,k])."""
        axis = _validate.axis(axis)
        self._check_potentials(F, G)
        self._check_vector("v", v, axis, columns=True)
        return self._call("apply_plan", backend, F, G, _eps(eps), v, axis, precision=precision)

    def marginals(self, F, G, eps, axis, backend="torch", precision="fp32"):
        """``axis=1``: ``P 1`` (B,n); ``axis=0``: ``P^T 1`` (B,m)."""
        self._check_potentials(F, G)
        return self._call("marginals", backend, F, G, _eps(eps), _validate.axis(axis), precision=precision)

    def marginals_and_cost(self, F, G, eps, axis, backend="torch", precision="fp32"):
        """:meth:`marginals` along ``axis`` and :meth:`plan_cost`, ``((B,n) or (B,m), (B,))``,
        in one pass over the plan instead of two."""
        self._check_potentials(F, G)
        return self._call("marginals_and_cost", backend, F, G, _eps(eps), _validate.axis(axis), precision=precision)

    def plan(self, F, G, eps, backend="torch", precision="fp32"):
        """Dense plan (B,n,m)."""
        self._check_potentials(F, G)
        return self._call("plan_dense", backend, F, G, _eps(eps), precision=precision)

    def plan_cost(self, F, G, eps, backend="torch", precision="fp32"):
        """``<P, C>`` per problem (B,)."""
        self._check_potentials(F, G)
        return self._call("plan_cost", backend, F, G, _eps(eps), precision=precision)

    def plan_topk(self, F, G, eps, k, backend="torch", precision="fp32"):
        """The k largest entries of each row of P: values, column indices (B,n,k)."""
        self._check_potentials(F, G)
        return self._call("plan_topk", backend, F, G, _eps(eps), k, precision=precision)

    def plan_cost_grad(self, F, G, eps, backend="torch", precision="fp32"):
        """Gradient of ``<P, C>`` w.r.t. :meth:`inputs`, P fixed (see reference.plan_cost_grad)."""
        self._check_potentials(F, G)
        return self._call("plan_cost_grad", backend, F, G, _eps(eps), precision=precision)

    def _check_potentials(self, F, G) -> None:
        self._check_rows(("F", F, "n"), ("G", G, "m"))

    def _check_rows(self, *named) -> None:
        """Each ``(name, tensor, side)``: a (B, n) or (B, m) tensor (``side`` "n" or "m")."""
        for name, t, side in named:
            size = self.n if side == "n" else self.m
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (self.batch, size):
                raise ValueError(f"{name} must be a (B={self.batch}, {side}={size}) tensor, got {_described(t)}")

    def _check_vector(self, name: str, t, axis: int, columns: bool = False) -> None:
        """``t`` (B, m) for ``axis=1`` (it lives on the reduced side, the columns), (B, n) for
        ``axis=0``; ``columns``: also (B, m|n, k)."""
        size = self.m if axis == 1 else self.n
        ok = isinstance(t, torch.Tensor) and tuple(t.shape[:2]) == (self.batch, size) and \
            (t.dim() == 2 or (columns and t.dim() == 3))
        if not ok:
            side = "m" if axis == 1 else "n"
            shapes = f"(B={self.batch}, {side}={size})" + (f" or (B, {side}, k)" if columns else "")
            raise ValueError(f"{name} must be a {shapes} tensor for axis={axis}, got {_described(t)}")

    def ksparse_columns(self, h, gamma, k, axis, mass=None, beta=None, backend="torch", precision="fp32"):
        """k-sparse plan ``T = [h_r + beta_l - C_rl]_+ / gamma`` on the top k of each column
        (``axis=0``) or row (``axis=1``); see :mod:`otcore.reference_ksparse`. ``h`` on the
        positions, (B, n) for ``axis=0``, (B, m) for ``axis=1``; ``mass`` / ``beta`` on the
        lines, the other side (shapes checked: the kernel indexes them by these sizes)."""
        axis = _validate.axis(axis)
        pos, line = ("n", "m") if axis == 0 else ("m", "n")
        self._check_rows(("h", h, pos), *((name, t, line) for name, t in (("mass", mass), ("beta", beta))
                                           if t is not None))
        k, length = _validate.positive_int("k", k), self.n if axis == 0 else self.m
        if k > length:  # (the kernel stored indices past the line for k > N; the solvers cap k at N)
            raise ValueError(f"k must be <= {length}, the length of a {'column' if axis == 0 else 'row'} "
                             f"(axis={axis}), got {k}")
        return self._call("ksparse_columns", backend, h, _validate.positive("gamma", gamma), k, axis,
                          mass=mass, beta=beta, precision=precision)

    def plan_sparse_rows(self, F, G, eps, s, backend="torch", precision="fp32"):
        """The s largest entries of each row of P in ELL form: values, int64 column
        indices (B,n,s), values decreasing; see :mod:`otcore.reference_sparse`."""
        self._check_potentials(F, G)
        return self._call("plan_sparse_rows", backend, F, G, _eps(eps), _validate.top_k(s, self.m, "s"),
                          precision=precision)

    def ell_matvec(self, vals, idx, v, axis, backend="torch"):
        """ELL matrix S (vals, idx (B,n,s), column indices in ``[0, m)``) times a vector:
        ``axis=1`` ``S v`` (B,n) for v (B,m); ``axis=0`` ``S^T u`` (B,m) for u (B,n). The
        indices' range is checked (one host read): the Triton kernels do not mask them,
        and an index out of range read or wrote past the vectors."""
        self._check_ell(vals, idx)
        want = self.m if _validate.axis(axis) == 1 else self.n
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != (self.batch, want):
            raise ValueError(f"v must have {want} entries per problem for axis={axis} ({'m' if axis else 'n'}), "
                             f"as a (B={self.batch}, {want}) tensor, got shape {tuple(getattr(v, 'shape', ()))}")
        return self._call("ell_matvec", backend, vals, idx, v, axis)

    def _check_ell(self, vals, idx, check_idx: bool = True) -> None:
        """``vals`` a float32/float64 (B, n, s) tensor, ``idx`` int64 of its shape, and
        (``check_idx``; one host read) in ``[0, m)``."""
        B = self.batch
        if not isinstance(vals, torch.Tensor) or vals.dim() != 3 or vals.shape[:2] != (B, self.n) or \
                vals.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"vals must be a float32/float64 (B={B}, n={self.n}, s) tensor, got "
                             f"{getattr(vals, 'dtype', type(vals).__name__)} {tuple(getattr(vals, 'shape', ()))}")
        if not isinstance(idx, torch.Tensor) or idx.shape != vals.shape or idx.dtype != torch.int64:
            raise ValueError(f"idx must be an int64 tensor of vals' shape {tuple(vals.shape)}")
        if check_idx and idx.numel() and bool(((idx < 0) | (idx >= self.m)).any()):
            raise ValueError(f"idx must hold column indices in [0, m={self.m})")

    def ell_pcg(self, vals, idx, diag, rhs, inv_diag, rtol, max_iter, active, backend="torch", check_idx=True):
        """Solve ``[[diag(d_a), S], [S^T, diag(d_b)]] x = rhs`` per problem by PCG on its
        Schur complement (``x_b`` eliminated), S the ELL matrix ``vals, idx`` (B,n,s)
        (indices in ``[0, m)``, as from :meth:`plan_sparse_rows`); ``diag``, ``rhs``,
        ``inv_diag`` (``1 / diag``, 0 for entries left out) pairs of (B,n) and (B,m) of vals'
        dtype; ``rtol`` a number or (B,); ``active`` (B,) bool or None (all); returns
        ``((x_a, x_b), its (B,))`` (see reference_sparse.ell_pcg). The indices' range is
        checked (one host read: the Triton kernels do not mask them, an index out of range
        read past the vectors), unless ``check_idx=False`` (SNS, whose indices come from
        :meth:`plan_sparse_rows`: no read per Newton step)."""
        B = self.batch
        self._check_ell(vals, idx, check_idx)
        for name, pair in (("diag", diag), ("rhs", rhs), ("inv_diag", inv_diag)):
            if len(pair) != 2 or any(not isinstance(t, torch.Tensor) or t.shape != (B, k) or t.dtype != vals.dtype
                                     for t, k in zip(pair, (self.n, self.m))):
                raise ValueError(f"{name} must be a pair of (B={B}, n={self.n}) and (B, m={self.m}) tensors of "
                                 f"vals' dtype {vals.dtype}, got {[(t.dtype, tuple(t.shape)) for t in pair]}")
        if active is None:
            active = torch.ones(B, dtype=torch.bool, device=vals.device)
        elif not isinstance(active, torch.Tensor) or active.shape != (B,) or active.dtype != torch.bool:
            raise ValueError(f"active must be None or a ({B},) bool tensor")
        if isinstance(rtol, torch.Tensor):
            if rtol.shape not in ((), (B,)) or rtol.dtype != vals.dtype:
                raise ValueError(f"rtol must be a number or a (B={B},) tensor of vals' dtype {vals.dtype}")
        else:
            rtol = _validate.positive("rtol", rtol)
        max_iter = _validate.positive_int("max_iter", max_iter)
        # a left-out row's diagonal and right-hand side play no part, even inf or NaN (0 * inf
        # in its products had stopped the solve after one iteration, 0.28 off, and a NaN
        # right-hand side made <r, pre r> NaN: no iteration ran; reviews). The b side's left-out
        # entries are never read.
        out = inv_diag[0] == 0
        diag, rhs = (diag[0].masked_fill(out, 0.0), diag[1]), (rhs[0].masked_fill(out, 0.0), rhs[1])
        return self._call("ell_pcg", backend, vals, idx, diag, rhs, inv_diag, rtol, max_iter, active)

    def sparse_cost_grad(self, W, idx, axis, backend="torch"):
        """Gradient of ``sum W * C`` over a (B, lines, k) support w.r.t. :meth:`inputs`."""
        return self._call("sparse_cost_grad", backend, W, idx, _validate.axis(axis))


def _described(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _version(t: torch.Tensor) -> Optional[int]:
    # asked before reading: an inference tensor's t._version raises, and torch.compile
    # does not trace the exception's handler (the compiled solve failed, a RuntimeError)
    return None if t.is_inference() else t._version


class PointCloud(Geometry):
    """Two point clouds with a cost computed on the fly.

    Args:
        x: ``(n, d)`` or ``(B, n, d)`` source points.
        y: ``(m, d)`` or ``(B, m, d)`` target points (same batch, same ``d``).
        cost: ``"sqeuclidean"`` for ``C_ij = ||x_i - y_j||^2`` (no 1/2 factor) or
            ``"euclidean"`` for ``C_ij = ||x_i - y_j||``.

    fp16/bf16 inputs are computed in float32; float64 stays float64. The tensors
    are kept as given (not copied), so gradients flow back to them, and they are read
    live: after an in-place change (an optimizer step on ``x``, say) the next call sees
    the new points, and the cached cost of a small problem is recomputed.
    """

    is_dense = False

    def __init__(self, x: torch.Tensor, y: torch.Tensor, cost: str = "sqeuclidean"):
        _validate.tensor("x", x, (2, 3), finite=False)
        _validate.tensor("y", y, (2, 3), finite=False)
        _validate.choice("cost", cost, COSTS)
        if x.dim() != y.dim():
            raise ValueError(f"x and y must both be batched or both not: shapes {tuple(x.shape)}, {tuple(y.shape)}")
        if x.device != y.device:
            raise ValueError(f"x is on {x.device} but y is on {y.device}")
        _validate.all_finite(("x", x), ("y", y))  # one host sync for both (one check when y is x)
        if x.shape[-1] != y.shape[-1]:
            raise ValueError(f"x and y must have the same dimension d, got {x.shape[-1]} and {y.shape[-1]}")
        if x.dim() == 3 and x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must have the same batch size, got {x.shape[0]} and {y.shape[0]}")
        self.batched = x.dim() == 3
        self.x_in, self.y_in = x, y
        self._dt = _validate.compute_dtype(torch.promote_types(x.dtype, y.dtype))
        self._load()
        self.cost = cost
        self.batch, self.n, self.d = self._x.shape
        self.m = self._y.shape[1]

    def _load(self) -> None:
        """Batched views of the inputs in the compute dtype (copies only for fp16/bf16)
        and an empty cost cache, as of the inputs' current versions."""
        self._x = (self.x_in if self.batched else self.x_in[None]).detach().to(self._dt)
        self._y = (self.y_in if self.batched else self.y_in[None]).detach().to(self._dt)
        self._ref = self._x
        self._dense: Optional[torch.Tensor] = None
        self.loaded_versions = self._stamp()

    def _fresh(self) -> None:
        if torch.compiler.is_compiling():  # a compiled graph reads the inputs as traced
            return
        if self._stale():
            self._load()

    @property
    def x(self) -> torch.Tensor:
        """The source points, (B, n, d) in the compute dtype."""
        self._fresh()
        return self._x

    @property
    def y(self) -> torch.Tensor:
        """The target points, (B, m, d) in the compute dtype."""
        self._fresh()
        return self._y

    def inputs(self) -> tuple[torch.Tensor, ...]:
        """The user's tensors the cost depends on (for autograd)."""
        return (self.x_in, self.y_in)

    @property
    def symmetric(self) -> bool:
        """``C = C^T`` by construction: both clouds are the same tensor (self-transport)."""
        return self.x_in is self.y_in

    def cost_block(self) -> torch.Tensor:
        """The whole cost ``C`` computed from the points, (B, n, m); kept while the
        inputs are unchanged when it has at most ``reference.BLOCK_ELEMENTS`` entries
        (larger clouds are streamed by the primitives and never ask for it).

        Distances are computed directly (no ``|x|^2 + |y|^2 - 2xy`` expansion), so
        they keep full relative accuracy for large or far-from-origin coordinates.
        """
        x, y = self.x, self.y  # reloads (and drops the cache) after an in-place change
        # while compiling, never the cache: a compiled graph that read it kept returning the
        # cost of its first call after x.add_(0.5) (the reload above is skipped there, a review)
        compiling = torch.compiler.is_compiling()
        if self._dense is not None and not compiling:
            return self._dense
        D = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
        D = D * D if self.cost == "sqeuclidean" else D
        if self.batch * self.n * self.m <= reference.BLOCK_ELEMENTS and not compiling:
            self._dense = D  # small problem: keep the cost instead of recomputing it every pass
        return D

    def _diameters(self, a: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per problem, the cost across the diagonal of the box holding both clouds (an
        upper bound of every cost), ``(B,)``. With weights ``a`` (B,n) / ``b`` (B,m) (or
        ``(n,)``/``(m,)`` unbatched), only points of positive weight count: far zero-weight
        padding does not stretch the box."""

        def box(p, live):  # (B, d) corners of the points with weight
            if live is None:
                return torch.aminmax(p, dim=1)
            return torch.where(live[..., None], p, math.inf).amin(1), torch.where(live[..., None], p, -math.inf).amax(1)

        live_a, live_b = self._live("a", a, self.n), self._live("b", b, self.m)
        lo, hi = box(self.x, live_a)
        if self.y_in is not self.x_in or live_b is not live_a:  # a cloud against itself: one box
            ylo, yhi = box(self.y, live_b)
            lo, hi = torch.minimum(lo, ylo), torch.maximum(hi, yhi)
        ext = ((hi - lo) ** 2).sum(-1)
        return ext if self.cost == "sqeuclidean" else ext.sqrt()


class CostMatrix(Geometry):
    """A dense cost matrix ``C`` of shape ``(n, m)`` or ``(B, n, m)``.

    fp16/bf16 inputs are computed in float32. The tensor is kept as given, so
    gradients flow back to it.
    """

    is_dense = True
    cost = "matrix"
    #: set on matrices otcore centred itself (the router's double-centred scores): sparse_ot
    #: then looks for no offset to take off (a host read per solve)
    _centred = False

    def __init__(self, C: torch.Tensor):
        _validate.tensor("C", C, (2, 3))
        self._hold(C)

    @classmethod
    def _checked(cls, C: torch.Tensor) -> "CostMatrix":
        """A cost matrix made by otcore from one already checked (finite, real, 2-D or 3-D):
        without the check's host read."""
        geom = cls.__new__(cls)
        geom._hold(C)
        return geom

    def _hold(self, C: torch.Tensor) -> None:
        self.batched = C.dim() == 3
        self.C_in = C
        self._load()
        self.batch, self.n, self.m = self._C.shape

    def _load(self) -> None:
        """A batched view of ``C`` in the compute dtype (a copy for fp16/bf16), as of its
        current version."""
        C = self.C_in if self.batched else self.C_in[None]
        self._C = self._ref = C.detach().to(_validate.compute_dtype(C.dtype))
        self.loaded_versions = self._stamp()

    @property
    def C(self) -> torch.Tensor:
        """The cost, (B, n, m) in the compute dtype. A view of the input in float32/float64;
        an fp16/bf16 one's float32 copy is made again after an in-place change (it kept the
        old cost, where the view sees the new one, a review)."""
        if self._C.dtype != self.C_in.dtype and not torch.compiler.is_compiling() and self._stale():
            self._load()
        return self._C

    def inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.C_in,)

    #: A cost matrix is not assumed symmetric (checking would read all of it).
    symmetric = False

    def cost_block(self) -> torch.Tensor:
        return self.C

    def _diameters(self, a: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per problem, ``max C - min C``, ``(B,)``; with weights ``a`` (B,n) / ``b`` (B,m),
        over the entries whose row and column have positive weight (streamed by row blocks;
        ``(n,)``/``(m,)`` weights for an unbatched matrix)."""
        if a is None and b is None:
            C = self.C
            if C.is_contiguous():  # both extremes in one read of C (a view, no copy)
                lo, hi = torch.aminmax(C.view(C.shape[0], -1), dim=1)
                return hi - lo
            return C.amax((1, 2)) - C.amin((1, 2))

        def live(name, w, size):
            out = self._live(name, w, size)
            return torch.ones(self.batch, size, dtype=torch.bool, device=self.device) if out is None else out

        live_a, live_b = live("a", a, self.n), live("b", b, self.m)
        hi = torch.full((self.batch,), -math.inf, dtype=self.dtype, device=self.device)
        lo = torch.full_like(hi, math.inf)
        for sl, Cl, Z in reference._tiles(self, 1, self.dtype):
            dead = ~(live_a[:, sl, None] & live_b[:, None, :])
            hi = torch.maximum(hi, Z.copy_(Cl).masked_fill_(dead, -math.inf).amax((1, 2)))
            lo = torch.minimum(lo, Z.copy_(Cl).masked_fill_(dead, math.inf).amin((1, 2)))
        return hi - lo
