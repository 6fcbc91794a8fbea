"""Input checks shared by the public entry points.

Every check raises before any work is done, with the argument's name in the
message. Nothing is clamped or repaired silently.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Optional, Union

import numpy as np
import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 inputs are computed in float32; float32/float64 stay as they are."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tensor(name: str, t, ndims: tuple[int, ...], finite: bool = True) -> torch.Tensor:
    """Check that ``t`` is a floating tensor with one of ``ndims`` dimensions, and (``finite``;
    else the caller checks it with others through :func:`all_finite`) that its entries are finite."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    no_function_transform(t)
    strided(name, t)
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    if t.dim() not in ndims:
        want = " or ".join(str(k) for k in ndims)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if any(s == 0 for s in t.shape):
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if finite:
        all_finite((name, t))
    return t


def strided(name: str, t: torch.Tensor) -> None:
    """Raise ``TypeError`` for a sparse (COO, CSR, ...) tensor: the solvers read dense
    entries (a sparse one got past the checks and failed inside torch, unnamed)."""
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; use {name}.to_dense()")


@torch.compiler.disable  # run, not traced: torch.compile cannot trace the functorch queries (it warned)
def no_function_transform(t: torch.Tensor) -> None:
    """Raise ``TypeError`` for a tensor that a ``torch.func`` transform (``grad``, ``vmap``,
    ``jacrev``, ...) is tracking: batched by ``vmap``, or under a gradient transform with
    grad mode on. The solvers check their inputs on the host and take their gradients from
    ``torch.autograd.Function`` classes (the envelope and implicit function theorems), which
    those transforms cannot trace (without this check they failed inside torch, with
    messages about ``setup_context`` or data pointers). Constants from outside the transform,
    and tensors used under ``torch.no_grad()`` inside a gradient transform (an OT matching
    that only picks targets), are solved as usual."""
    functorch = getattr(torch._C, "_functorch", None)
    peek = getattr(functorch, "peek_interpreter_stack", None)
    if peek is None or peek() is None or not functorch.is_functorch_wrapped_tensor(t):
        return
    if functorch.is_batchedtensor(t) or torch.is_grad_enabled():
        raise TypeError("otcore does not support torch.func transforms (grad, vmap, jacrev, ...) of its "
                        "inputs: use torch.autograd.grad or .backward() (a per-sample gradient: a batched "
                        "call with reduction='none' and one backward per sample, or "
                        "torch.autograd.functional.jacobian); OT under torch.no_grad() inside a transform works")


@torch.compiler.disable  # (as no_function_transform)
def no_batched_grads(name: str, *grads) -> None:
    """Raise ``TypeError`` where a backward receives gradients batched by autograd's vmap
    (``torch.autograd.grad(..., is_grads_batched=True)``,
    ``torch.autograd.functional.jacobian(..., vectorize=True)``) and cannot take them (its
    host reads and in-place scatters had failed inside torch: "Batching rule not
    implemented for aten::is_nonzero")."""
    functorch = getattr(torch._C, "_functorch", None)
    batched = getattr(functorch, "is_legacy_batchedtensor", None)  # (autograd's vmap is the legacy one)
    if batched is not None and any(isinstance(g, torch.Tensor) and batched(g) for g in grads):
        raise TypeError(f"{name}'s gradients cannot be batched (is_grads_batched=True, or jacobian(..., "
                        f"vectorize=True)): take one backward per row (vectorize=False, the default)")


def all_finite(*named: tuple[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the first of the ``(name, tensor)`` pairs that holds NaN or
    inf. One host read for all of them (a sync on a GPU); each tensor costs one reduction,
    its largest ``|entry|``, through which NaN propagates (``torch.isfinite(t).all()`` is five
    launches on CUDA). A tensor passed twice is read once; meta tensors hold no values."""
    named = [(n, t) for i, (n, t) in enumerate(named)
             if t.device.type != "meta" and all(t is not u for _, u in named[:i])]
    if not named:
        return
    with torch.no_grad():
        tops = [torch.linalg.vector_norm(t, math.inf) for _, t in named]
        if len(tops) == 1 or len({m.device for m in tops}) > 1:  # (devices that differ: the caller's error)
            values = [float(m) for m in tops]
        else:
            dt = tops[0].dtype if all(m.dtype == tops[0].dtype for m in tops) else torch.float64
            values = torch.stack([m.to(dt) for m in tops]).tolist()
    for (name, _), v in zip(named, values):
        if not math.isfinite(v):
            raise ValueError(f"{name} contains NaN or inf")


def finite_rows(*ts: torch.Tensor) -> torch.Tensor:
    """(B,) bool: every entry of each problem's row is finite in all of ``ts``, each (B,) or
    (B, n). One reduction per (B, n) tensor, one for the (B,) ones of one dtype stacked
    together, and a maximum per further reduction, NaN propagating (``torch.isfinite`` is
    four launches on CUDA, and its ``all`` a fifth; a solve's result checks two rows and four
    numbers per problem in 7 operations, 12 with one per number)."""
    rows = [t for t in ts if t.dim() > 1]
    nums = [t for t in ts if t.dim() <= 1]
    if len(nums) > 1 and all(t.dtype == nums[0].dtype for t in nums):
        rows.append(torch.stack(nums, -1))
        nums = []
    top = None
    for m in [torch.linalg.vector_norm(t, math.inf, dim=-1) for t in rows] + [t.abs() for t in nums]:
        top = m if top is None else torch.maximum(top, m)  # promotes to the wider dtype
    return top <= torch.finfo(top.dtype).max


def _is_bool(v) -> bool:
    """Python, NumPy and torch booleans: ``True`` is not the number 1 here."""
    return isinstance(v, (bool, np.bool_)) or (isinstance(v, torch.Tensor) and v.dtype == torch.bool)


def numpy_scalar(v):
    """A 0-d NumPy array of bools, integers or floats as its NumPy scalar (``np.array(0.1)``,
    what NumPy reductions and ``np.asarray`` hand on); anything else as it is. (A bool stays
    a bool: where a number is asked for it is refused as before.)"""
    if isinstance(v, np.ndarray) and v.ndim == 0 and v.dtype.kind in "biuf":
        return v[()]
    return v


def positive(name: str, v, *, allow_none: bool = False) -> Optional[float]:
    """A finite number > 0 (``eps``, ``tol``, ``gamma``, ``rho``...): a Python or NumPy
    number (a 0-d array too), or a one-element tensor that does not require grad."""
    if v is None and allow_none:
        return None
    v = numpy_scalar(v)
    if _is_bool(v) or not isinstance(v, (numbers.Real, torch.Tensor)) or (isinstance(v, torch.Tensor) and v.is_complex()):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise TypeError(f"{name} must be a number, got a tensor of shape {tuple(v.shape)}")
        if v.requires_grad:  # float(v) would cut it from the graph without a word
            raise TypeError(f"{name} must be a number: a tensor that requires grad would get no gradient")
    v = float(v)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v}")
    return v


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def reciprocal_fits(name: str, v: float, dtype: torch.dtype) -> float:
    """``v`` > 0 whose reciprocal, times ``log2(e)`` (the kernels scale by ``log2(e)/v``, in
    base 2), is finite in ``dtype``: float32 rho = 3e-39 passed a check of ``1/v`` alone, and
    the Triton kernel's convergence test read inf (a review)."""
    big = torch.finfo(dtype).max
    if math.log2(math.e) / v > big:
        raise ValueError(f"{name}={v:g} is too small for {dtype_name(dtype)}: 1/{name} overflows "
                         f"(it must be >= {math.log2(math.e) / big:.1e}; rescale the cost"
                         f"{'' if dtype == torch.float64 else ', or use float64'})")
    return v


def magnitude_fits(name: str, v: float, dtype: torch.dtype, hint: str = "rho = None is the exact-marginal limit") -> float:
    """``v`` > 0 that, and whose reciprocal, are finite in ``dtype`` (a KL penalty's
    ``rho`` scales ``exp(-f/rho)`` by ``rho``; ``eps`` scales the log-sum-exp)."""
    reciprocal_fits(name, v, dtype)
    big = torch.finfo(dtype).max
    if v > big:
        raise ValueError(f"{name}={v:g} is too large for {dtype_name(dtype)} (it must be <= {big:.1e}; {hint})")
    return v


def flag(name: str, v, allowed: str = "a bool") -> bool:
    """A bool argument: Python or NumPy (a 0-d array of one too, as :func:`auto_flag` takes;
    ``np.bool_`` had been refused as "must be a bool, got bool", a review), taken as given
    (``"False"`` would be truthy). ``allowed`` words the error."""
    v = numpy_scalar(v)
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be {allowed}, got {type(v).__name__}")
    return bool(v)


def _int(name: str, v) -> int:
    """``v`` as an int: a Python or NumPy integer, or a one-element integer tensor (not a bool)."""
    try:
        if _is_bool(v):
            raise TypeError
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(v).__name__}") from None


def positive_int(name: str, v, *, minimum: int = 1) -> int:
    """An int ``>= minimum``: a Python or NumPy integer, or a one-element integer tensor."""
    v = _int(name, v)
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def top_k(k, m: int, name: str = "k") -> int:
    """``k`` for the k largest entries of each of the plan's rows: an int in ``[1, m]``."""
    k = positive_int(name, k)
    if k > m:
        raise ValueError(f"{name} must be <= m = {m} (the number of columns), got {k}")
    return k


def axis(v, meaning: str = "0 (a result per column) or 1 (a result per row)") -> int:
    """An ``axis``, 0 or 1 (a Python or NumPy int); for a primitive 1 reduces over the columns
    (a result per row), 0 over the rows."""
    i = _int("axis", v)
    if i not in (0, 1):
        raise ValueError(f"axis must be {meaning}, got {v!r}")
    return i


#: ``precision`` of every solver and primitive: float32-faithful or the fast tf32 kernels.
PRECISIONS = ("fp32", "tf32")


def auto_flag(name: str, v) -> Union[str, bool]:
    """``"auto"``, or a bool (Python or NumPy, a 0-d array of one too): ``"auto"``, True or False."""
    v = numpy_scalar(v)
    if isinstance(v, np.bool_):
        v = bool(v)
    if isinstance(v, str) and v != "auto":
        raise ValueError(f"{name} must be 'auto', True or False, got {v!r}")
    if not isinstance(v, (str, bool)):
        raise TypeError(f"{name} must be 'auto', True or False, got {type(v).__name__}")
    return v


def choice(name: str, v, options) -> str:
    if v not in options:
        raise ValueError(f"{name} must be one of {sorted(options)}, got {v!r}")
    return v


def weights(sides, batch: int, batched: bool, like: torch.Tensor) -> list[tuple[torch.Tensor, list, list]]:
    """Check each side's weights, ``sides`` being ``(name, w, size)`` triples, and return per
    side a ``(B, size)`` tensor in ``like``'s dtype and device, the number of positive
    entries of each problem and each problem's total mass (lists). One host read for all
    sides' checks and numbers (a sync on a GPU; it was two per side, and one more for the
    mass check, which now reads these masses).

    ``None`` means uniform weights ``1/size`` (mass 1). Weights must be finite,
    non-negative and not all zero in any problem of the batch.
    """
    out, pending, stats = [], [], []
    for name, w, size in sides:
        if w is None:
            out.append((torch.full((batch, size), 1.0 / size, dtype=like.dtype, device=like.device), [size] * batch,
                        [1.0] * batch))
            continue
        tensor(name, w, (2,) if batched else (1,), finite=False)
        if w.device != like.device:
            raise ValueError(f"{name} is on {w.device} but the geometry is on {like.device}")
        want = (batch, size) if batched else (size,)
        if tuple(w.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(w.shape)}")
        with torch.no_grad():  # as given: the largest |entry| (NaN propagates) and any negative one
            stats += [torch.linalg.vector_norm(w, math.inf).double().reshape(1), (w < 0).any().double().reshape(1)]
            w = w.detach().reshape(batch, size).to(like.dtype)
            stats += [(w > 0).sum(-1).double(), w.double().sum(-1)]
        pending.append((len(out), name))
        out.append(w)
    read = iter(torch.cat(stats).tolist() if stats else [])  # one sync
    for i, name in pending:
        top, negative = next(read), next(read)
        counts, masses = [int(next(read)) for _ in range(batch)], [next(read) for _ in range(batch)]
        if not math.isfinite(top):
            raise ValueError(f"{name} contains NaN or inf")
        if negative:
            raise ValueError(f"{name} has negative entries")
        if min(counts) == 0:
            raise ValueError(f"{name} is all zero (in at least one problem of the batch)")
        out[i] = (out[i], counts, masses)
    return out


def balanced_mass(mass_a: list, mass_b: list, tol: Optional[float], dtype: torch.dtype, given: tuple = (),
                  has_rho: bool = True) -> None:
    """Balanced OT needs equal total mass on both sides (``mass_a``, ``mass_b``: each
    problem's, read by :func:`weights`; no device work).

    The marginal error cannot fall below the gap ``|sum a - sum b|``, so a gap above
    ``tol / 2`` is an error (``tol`` None, a fixed number of iterations: only the share below); so is one above the dtype's share (``1e-8`` relative in
    float64, ``1e-4`` otherwise), whatever ``tol``. Within that share, a gap of a few
    rounding steps (``16 u`` of the mass: weights normalised in their own dtype) passes
    whatever ``tol`` (fp16/bf16 ones can exceed the share: normalise those in float32). The dtype
    is the coarsest of the weights' as solved (``dtype``) and as ``given`` (before a cast:
    float32 weights normalised in float32 keep their float32 gap on a float64 geometry).
    ``has_rho``: whether the caller takes ``rho=`` (the error's advice names it, or
    :func:`otcore.sinkhorn`'s for solvers without it).
    """
    dtypes = [dtype] + [w.dtype for w in given if isinstance(w, torch.Tensor) and w.is_floating_point()]
    unit = max(torch.finfo(d).eps for d in dtypes)
    rtol = 1e-8 if unit <= torch.finfo(torch.float64).eps else 1e-4
    for ma, mb in zip(mass_a, mass_b):
        big = max(ma, mb)
        share = rtol * big
        allowed = share if tol is None else min(share, max(16 * unit * big, tol / 2))
        if not abs(ma - mb) <= allowed:
            raise ValueError(
                f"a and b must have the same total mass in balanced mode (got {ma:.8g} vs {mb:.8g}, a gap of "
                f"{abs(ma - mb):.2g}; the marginal error cannot fall below it, and tol={tol}); normalise them"
                + (" or pass rho= for unbalanced OT" if has_rho else " (otcore.sinkhorn(..., rho=) solves unbalanced OT)")
            )

