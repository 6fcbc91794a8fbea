"""Command line: ``otcore demo`` (colour transfer) and ``otcore solve`` (one OT problem).

Run ``otcore --help``, ``otcore demo --help`` or ``otcore solve --help``;
``python -m otcore`` is the same program.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import math
import os
import re
import sys
import time
import warnings
from typing import NoReturn, Optional, Sequence

import numpy as np
import torch

from . import PointCloud, __version__, _dispatch, sinkhorn, sinkhorn_newton, sparse_ot
from .result import OTResult, SparseOTResult, all_converged


#: Exit status of a solve that ran to its end without converging (its output is still written).
NOT_CONVERGED = 3


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for but CUDA is not available")
    return torch.device(name)


def _schedule_arg(text: str) -> str:
    """argparse type of ``--eps-schedule``: ``none``, ``geometric`` or a number (a value
    that is none of them is a usage error, exit status 2, as for any flag that takes a
    number; the number's range is the solver's check)."""
    if text not in ("none", "geometric"):
        try:
            float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be none, geometric or a decay factor, got {text!r}") from None
    return text


def _gamma_schedule_arg(text: str):
    """argparse type of ``--gamma-schedule``: ``auto``, ``none`` or a decay factor (its range
    is the solver's check)."""
    if text in ("auto", "none"):
        return text  # ("none" is mapped to None by run_solve: the flag's absence is None)
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto, none or a decay factor in (0, 1), got {text!r}") from None


def _overrelax_arg(text: str):
    """argparse type of ``--overrelax``: ``auto``, ``on``, ``off`` or a fixed factor (its
    range is the solver's check)."""
    named = {"auto": "auto", "on": True, "off": False}
    if text in named:
        return named[text]
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto, on, off or a factor in (0, 2), got {text!r}") from None


def _schedule(text: Optional[str]):
    if text is None or text == "none":
        return None
    return text if text == "geometric" else float(text)


def _check_backend(backend: str, device: torch.device) -> None:
    """Exit with the solver's own message if ``backend`` cannot run on ``device`` (e.g.
    ``--backend triton --device cpu`` without the Triton interpreter), before any work;
    the message's ``backend='triton'`` is written as the flag, ``--backend triton``."""
    try:
        _dispatch.resolve(backend, device)
    except ValueError as e:
        raise SystemExit("error: " + re.sub(r"backend='(\w+)'", r"--backend \1", str(e)))


def _save_image(image, path: str) -> None:
    """Write ``image`` to ``path`` through a temporary file in the same folder, renamed over
    it once complete: a failed overwrite (a full disk, a quota) had left the old picture
    truncated (a review). The format follows ``path``'s extension."""
    import tempfile

    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=os.path.splitext(name)[1])
    try:
        with os.fdopen(fd, "wb") as fh:
            image.save(fh, format=_image_format(path))
        # the permissions a plain write gives (mkstemp's file is private): the old file's, else the umask's
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:  # checked up front; the folder may still vanish or fill up meanwhile
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise SystemExit(f"error: cannot write --out {path}: {e.strerror or e}")


def _image_format(path: str) -> Optional[str]:
    """Pillow's format for ``path``'s extension (None: not an image name)."""
    from PIL import Image

    return Image.registered_extensions().get(os.path.splitext(path)[1].lower())  # (registers the plugins)


def _as_flag(message: str, names) -> str:
    """A solver's message names its keyword argument (``max_iter must be ...``); the user
    of the command line typed a flag, so a message that starts with one of ``names`` names
    the flag instead (``--max-iter must be ...``), and so do the compound ones of ``names``
    elsewhere in it (``give max_iter > 9`` -> ``give --max-iter > 9``; a plain word such as
    ``eps`` is the quantity there, as in ``at eps=0.01``)."""
    first = re.match(r"\w+", message)
    if first and first.group(0) in names:
        message = "--" + first.group(0).replace("_", "-") + message[first.end():]
    for name in (n for n in names if "_" in n):
        message = re.sub(rf"(?<![-\w]){name}\b", "--" + name.replace("_", "-"), message)
    return message


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


def _check_int(flag: str, value: Optional[int], minimum: int = 1, maximum: Optional[int] = None) -> None:
    """``value`` (None: not given) must be an int in ``[minimum, maximum]``; else exit naming ``flag``."""
    if value is not None and value < minimum:
        raise SystemExit(f"error: {flag} must be an integer >= {minimum}, got {value}")
    if value is not None and maximum is not None and value > maximum:
        raise SystemExit(f"error: {flag} must be an integer <= {maximum}, got {value}")


#: torch's CPU generator (a Mersenne Twister) is seeded with the low 32 bits of
#: ``manual_seed``'s 64-bit argument: larger seeds would give another seed's points
_SEED_MAX = 2**32 - 1


def _check_positive(flag: str, value: Optional[float]) -> None:
    """``value`` (None: not given) must be a finite number > 0; else exit naming ``flag``."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise SystemExit(f"error: {flag} must be a finite number > 0, got {value:g}")


# --------------------------------------------------------------------------- demo
_DEMO_DEPS = 'error: the demo needs scikit-learn and pillow: pip install "otcore[demo]"'


def _load_photo(name: str) -> np.ndarray:
    try:
        from sklearn.datasets import load_sample_image
    except ImportError:  # pragma: no cover - depends on the environment
        raise SystemExit(_DEMO_DEPS)
    return load_sample_image(name)


def _check_out(path: str) -> None:
    """Exit unless the demo can write its picture to ``path``: an image extension Pillow
    can write, a folder that exists and is writable, and not a folder itself. Checked before
    the solve, so a bad ``--out`` does not cost a whole run."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - depends on the environment
        raise SystemExit(_DEMO_DEPS)
    if os.path.isdir(path):
        raise SystemExit(f"error: --out {path} is a folder; give a file name, e.g. {os.path.join(path, 'demo.png')}")
    fmt = _image_format(path)
    if fmt is None:
        raise SystemExit(f"error: --out {path}: not an image file name (use a .png extension)")
    try:  # a format Pillow reads but cannot write (PSD), a stub without its handler (HDF5), no RGB (XBM)
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
    except (OSError, ValueError, KeyError) as e:
        why = "it reads them only" if isinstance(e, KeyError) else str(e)
        raise SystemExit(f"error: --out {path}: Pillow cannot write an RGB {fmt} image ({why}; use a .png extension)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SystemExit(f"error: --out {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise SystemExit(f"error: --out {path}: not writable (permission denied)")


def _resize(img: np.ndarray, width: int) -> np.ndarray:
    from PIL import Image

    if img.shape[1] <= width:
        return img
    h = round(img.shape[0] * width / img.shape[1])
    return np.asarray(Image.fromarray(img).resize((width, h), Image.BILINEAR))


def entropic_map(res: OTResult, x_new: torch.Tensor, y: torch.Tensor, b: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Barycentric (entropic) map of new points through a solved problem.

    ``T(x) = sum_j w_j(x) y_j`` with ``w_j(x) ∝ b_j exp((g_j - C(x, y_j)) / eps)``:
    the conditional mean of the plan's target given the source point, extended
    to points that were not in the problem. Streamed in chunks of ``chunk`` points.
    """
    eps = res._eps
    G = (res.g + eps * torch.log(b))[None]
    out = []
    for s in range(0, x_new.shape[0], chunk):
        geom = PointCloud(x_new[s : s + chunk], y)
        F = geom.softmin(G, eps, 1, backend=res._backend)  # rows of P now sum to 1
        out.append(geom.apply_plan(F, G, eps, y[None], 1, backend=res._backend)[0])
    return torch.cat(out)


def run_demo(args) -> int:
    _check_int("--n", args.n)
    _check_int("--width", args.width)
    _check_positive("--eps", args.eps)
    _check_positive("--tol", args.tol)
    _check_int("--max-iter", args.max_iter)
    _check_int("--seed", args.seed, minimum=0, maximum=_SEED_MAX)
    _check_out(args.out)
    dev = _device(args.device)
    _check_backend(args.backend, dev)
    n = args.n if args.n is not None else (50_000 if dev.type == "cuda" else 2000)
    width = args.width if args.width is not None else (640 if dev.type == "cuda" else 320)
    src = _resize(_load_photo("china.jpg"), width)
    tgt = _resize(_load_photo("flower.jpg"), width)
    gen = torch.Generator().manual_seed(args.seed)
    xs = torch.from_numpy(src.reshape(-1, 3).astype(np.float32) / 255)
    ys = torch.from_numpy(tgt.reshape(-1, 3).astype(np.float32) / 255)
    x = xs[torch.randperm(len(xs), generator=gen)[:n]].to(dev)
    y = ys[torch.randperm(len(ys), generator=gen)[:n]].to(dev)
    b = torch.full((len(y),), 1.0 / len(y), device=dev)

    _sync(dev)
    t0 = time.perf_counter()
    try:
        res = sinkhorn(
            PointCloud(x, y), eps=args.eps, tol=args.tol, max_iter=args.max_iter,
            eps_schedule="geometric", backend=args.backend, verbose=True if args.verbose else None,
        )
        _sync(dev)
        t_solve = time.perf_counter() - t0
        mapped = entropic_map(res, xs.to(dev), y, b).clamp(0, 1)  # display only: colours live in [0, 1]
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {_as_flag(str(e), {'eps', 'tol', 'max_iter'})}")
    _sync(dev)
    t_map = time.perf_counter() - t0 - t_solve
    if not bool(torch.isfinite(mapped).all()):  # e.g. an eps far below float32's resolution
        raise SystemExit(f"error: the solve failed (converged={res.converged}, marginal error "
                         f"{res.marginal_error:.3g}): the mapped colours are not finite, no image written; "
                         f"try a larger --eps")
    out_img = (mapped.cpu().numpy().reshape(src.shape) * 255).round().astype(np.uint8)

    from PIL import Image

    h = src.shape[0]
    tgt_show = np.asarray(Image.fromarray(tgt).resize((round(tgt.shape[1] * h / tgt.shape[0]), h)))
    gap = np.full((h, 8, 3), 255, np.uint8)
    _save_image(Image.fromarray(np.concatenate([src, gap, tgt_show, gap, out_img], axis=1)), args.out)

    print("otcore demo: colour transfer china.jpg -> flower.jpg (left: source, middle: target, right: result)")
    print(_table([
        ("n = m (pixels sampled)", f"{len(x)}"),  # fewer than --n when the image is smaller
        ("eps", f"{args.eps:g} (RGB in [0,1], cost ||x-y||^2, geometric eps scaling)"),
        ("iterations", f"{res.n_iter}"),
        ("marginal error", f"{res.marginal_error:.2e} (tol {args.tol:g}, converged={res.converged})"),
        ("solve time", f"{t_solve:.2f} s"),
        ("map time", f"{t_map:.2f} s ({len(xs)} pixels through the entropic map)"),
        ("device", str(dev)),
        ("backend", res._backend),
        ("image", args.out),
    ]))
    return 0 if res.converged else NOT_CONVERGED


# --------------------------------------------------------------------------- solve
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


def _load_npy(flag: str, path: str) -> np.ndarray:
    """The array in the ``.npy`` file ``path``; exits with ``error: cannot read FLAG PATH: why``
    if the file cannot be read as one (missing, not an .npy, an .npz archive, pickled objects)."""
    def fail(reason: str) -> NoReturn:
        raise SystemExit(f"error: cannot read {flag} {path}: {reason}")

    try:
        with open(path, "rb") as fh:
            head = fh.read(len(_NPY_MAGIC))
    except OSError as e:
        fail(e.strerror or str(e))
    if not head:
        fail("the file is empty")
    if head.startswith(_ZIP_MAGIC):
        fail("it is an .npz archive, not an .npy file (save one array with np.save)")
    if head != _NPY_MAGIC:
        fail("not an .npy file (no NumPy header; save the array with np.save)")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if "bject arrays" in str(e):  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
            fail("it holds an object array (pickled Python objects), not numbers; otcore never unpickles")
        fail(str(e))
    except Exception as e:  # truncated or corrupt file: EOFError, OSError, ...
        fail(str(e) or type(e).__name__)


def _load_points(flag: str, path: str, dtype) -> torch.Tensor:
    """The points of ``flag`` (``--x``/``--y``) read from the ``.npy`` file ``path``, as ``dtype``."""
    arr = _load_npy(flag, path)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise SystemExit(f"error: {flag} {path} must hold real numbers (an integer or floating array), got dtype {arr.dtype}")
    if arr.ndim not in (2, 3):
        raise SystemExit(f"error: {flag} {path} must hold an (n, d) or (B, n, d) array, got shape {arr.shape}")
    if arr.size == 0:
        raise SystemExit(f"error: {flag} {path} is empty (shape {arr.shape})")
    if not np.isfinite(arr).all():
        raise SystemExit(f"error: {flag} {path} contains NaN or inf")
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr, dtype=np_dtype)  # native byte order, the solve's dtype
    if not np.isfinite(out).all():
        raise SystemExit(f"error: {flag} {path} has values too large for {np.dtype(np_dtype).name} (use --dtype float64)")
    return torch.from_numpy(out)


def _clouds(args, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of ``solve``: each read from its ``.npy`` file or drawn at random
    (``x ~ U[0,1]^d``, ``y ~ U[0.05,0.95]^d``). A random side takes the dimension ``d``
    and the batch size ``B`` of a ``(B, n, d)`` file on the other side (``--d``, if
    given, must agree); two files must agree with each other. Exits on a mismatch."""
    loaded = {flag: _load_points(flag, path, dtype) for flag, path in (("--x", args.x), ("--y", args.y)) if path}
    paths = {"--x": args.x, "--y": args.y}
    if len(loaded) == 2:
        x, y = loaded["--x"], loaded["--y"]
        both = f"--x {args.x} {tuple(x.shape)} and --y {args.y} {tuple(y.shape)}"
        if x.shape[-1] != y.shape[-1]:
            raise SystemExit(f"error: {both} must have the same dimension d, got {x.shape[-1]} and {y.shape[-1]}")
        if x.dim() != y.dim():
            raise SystemExit(f"error: {both} must both be batched (B, n, d) or both not (n, d)")
        if x.dim() == 3 and x.shape[0] != y.shape[0]:
            raise SystemExit(f"error: {both} must have the same batch size B, got {x.shape[0]} and {y.shape[0]}")
    d, batch = (args.d if args.d is not None else _DEFAULT_D), ()
    for flag, pts in loaded.items():  # the shape a random side takes from a file
        if args.d is not None and pts.shape[-1] != args.d:
            raise SystemExit(f"error: --d {args.d} does not match {flag} {paths[flag]}, whose points have "
                             f"d = {pts.shape[-1]} (leave --d out: a random cloud takes d from the file)")
        d, batch = pts.shape[-1], tuple(pts.shape[:-2])
    gen = torch.Generator().manual_seed(args.seed)

    def draw(flag, count, count_flag, lo, hi):
        if flag in loaded:
            return loaded[flag]
        try:
            # drawn in float64, then cast: --dtype changes the precision, not the points (a review: the same
            # --seed drew other clouds in float32, values 18-24% apart)
            return (lo + (hi - lo) * torch.rand(*batch, count, d, generator=gen, dtype=torch.float64)).to(dtype)
        except (RuntimeError, TypeError, OverflowError, MemoryError) as e:  # too large to allocate or to index
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SystemExit(f"error: cannot draw {count_flag} {count} random points of d = {d} ({why})") from None

    x = draw("--x", args.n, "--n", 0.0, 1.0)
    # a random target has --m points, else --n's number (also when --x gives the source)
    m, m_flag = (args.m, "--m") if args.m is not None else (args.n, "--n")
    y = draw("--y", m, m_flag, 0.05, 0.95)
    return x, y


#: Method-specific flags of ``solve`` (argparse dest -> methods that take it). Their
#: defaults are None so that a flag given with another method is an error, not ignored.
_METHOD_FLAGS = {
    "eps": ("sinkhorn", "newton"),
    "rho": ("sinkhorn",),
    "eps_schedule": ("sinkhorn", "newton"),
    "check_every": ("sinkhorn",),
    "cuda_graph": ("sinkhorn",),
    "overrelax": ("sinkhorn", "newton"),
    "warmup_iter": ("newton",),
    "sparsity": ("newton",),
    "k": ("sparse",),
    "gamma": ("sparse",),
    "formulation": ("sparse",),
    "axis": ("sparse",),
    "gamma_schedule": ("sparse",),
    "relaxed_start": ("sparse",),
}
_WHY_NOT = {
    ("rho", "newton"): "Sinkhorn-Newton-Sparse solves balanced OT only; use --method sinkhorn for unbalanced OT",
    ("eps", "sparse"): "sparse OT is regularized by --gamma (quadratic), not by an entropic eps",
}
_DEFAULT_EPS = 0.05
_DEFAULT_D = 3


def _check_method_flags(args) -> None:
    for dest, methods in _METHOD_FLAGS.items():
        if getattr(args, dest) is not None and args.method not in methods:
            flag = "--" + dest.replace("_", "-")
            only = " or ".join(f"--method {m}" for m in methods)
            why = _WHY_NOT.get((dest, args.method), f"it is for {only} only")
            raise SystemExit(f"error: {flag} does not apply to --method {args.method}: {why}")
    if args.method == "sparse":
        for dest, what in (("k", "nonzeros allowed per column, or per row with --axis 1; >= 1"),
                           ("gamma", "quadratic regularization, > 0")):
            if getattr(args, dest) is None:
                raise SystemExit(f"error: --method sparse needs --{dest} ({what})")


def _plain(v):
    """JSON-friendly: tensors and arrays to (nested) lists or numbers, and non-finite
    numbers to null (JSON has no Infinity or NaN; strict parsers reject them)."""
    if isinstance(v, (torch.Tensor, np.ndarray)):
        v = (v.detach().cpu() if isinstance(v, torch.Tensor) else v).tolist()
    if isinstance(v, list):
        return [_plain(e) for e in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _nonzeros(res: SparseOTResult) -> dict:
    """Nonzeros of a sparse plan: in all, and the most in one column and in one row."""
    vals, idx = res.values.detach(), res.indices
    if not res.batched:
        vals, idx = vals[None], idx[None]
    nz = vals != 0  # (B, lines, k)
    per_line = nz.sum(-1).amax(-1)
    size = res.shape[res.axis]  # positions: rows for axis=0, columns for axis=1
    counts = torch.zeros(vals.shape[0], size, dtype=torch.long, device=vals.device)
    per_pos = counts.scatter_add_(1, idx.flatten(1), nz.flatten(1).long()).amax(-1)
    per_col, per_row = (per_line, per_pos) if res.axis == 0 else (per_pos, per_line)
    out = {"nonzeros": nz.flatten(1).sum(-1), "max_nonzeros_per_column": per_col, "max_nonzeros_per_row": per_row}
    return {k: (v.tolist() if res.batched else int(v[0])) for k, v in out.items()}


def _check_scalars(args) -> None:
    """The solver's checks of the number flags that need no points (``--eps``, ``--tol``,
    ``--max-iter``, ``--rho``, ``--eps-schedule``), run before the clouds are drawn or read:
    they had come after, 17-20 s into ``--n 50000000`` (a review). The solver checks them
    again, with the rest."""
    from ._validate import positive, positive_int
    from .solvers._entropic import parse_rho
    from .solvers.sinkhorn import check_schedule

    try:
        eps = positive("eps", args.eps if args.eps is not None else _DEFAULT_EPS)
        positive("tol", args.tol)
        positive_int("max_iter", args.max_iter)
        if args.method == "sinkhorn":
            parse_rho(args.rho)
        if args.method != "sparse":
            check_schedule(_schedule(args.eps_schedule), eps)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {_as_flag(str(e), {'eps', 'tol', 'max_iter', 'rho', 'eps_schedule'})}")


def run_solve(args) -> int:
    _check_int("--n", args.n)
    _check_int("--m", args.m)
    _check_int("--d", args.d)
    _check_int("--seed", args.seed, minimum=0, maximum=_SEED_MAX)
    _check_method_flags(args)
    _check_int("--check-every", args.check_every)
    _check_int("--warmup-iter", args.warmup_iter, minimum=0)
    _check_int("--sparsity", args.sparsity)
    _check_int("--k", args.k)
    _check_positive("--gamma", args.gamma)
    dev = _device(args.device)
    _check_backend(args.backend, dev)
    _check_scalars(args)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    x, y = _clouds(args, dtype)
    x, y = x.to(dev), y.to(dev)
    eps = args.eps if args.eps is not None else _DEFAULT_EPS
    kw = dict(tol=args.tol, max_iter=args.max_iter, backend=args.backend,
              precision=args.precision, verbose=False if (args.quiet or args.json) else None)
    if args.method == "sinkhorn":
        solver = sinkhorn
        kw.update(eps=eps, rho=args.rho, eps_schedule=_schedule(args.eps_schedule),
                  check_every=args.check_every if args.check_every is not None else 10,
                  cuda_graph=bool(args.cuda_graph), overrelax=args.overrelax if args.overrelax is not None else "auto")
    elif args.method == "newton":
        solver = sinkhorn_newton
        kw.update(eps=eps, sparsity=args.sparsity)
        if args.warmup_iter is not None:
            kw.update(warmup_iter=args.warmup_iter)
        if args.overrelax is not None:  # else the solver's default (its warm-up over-relaxed by 1.8)
            kw.update(warmup_overrelax=args.overrelax)
        if args.eps_schedule is not None:  # else the solver's default (geometric)
            kw.update(eps_schedule=_schedule(args.eps_schedule))
    else:
        solver = sparse_ot
        kw.update(k=args.k, gamma=args.gamma, formulation=args.formulation or "semi-dual",
                  axis=args.axis if args.axis is not None else 0)
        if args.gamma_schedule is not None:  # else the solver's default (auto)
            kw.update(gamma_schedule=None if args.gamma_schedule == "none" else args.gamma_schedule)
        if args.relaxed_start is not None:  # else the solver's default (auto)
            kw.update(relaxed_start={"auto": "auto", "on": True, "off": False}[args.relaxed_start])
    _sync(dev)
    t0 = time.perf_counter()
    try:
        res = solver(PointCloud(x, y, cost=args.cost), **kw)
    except (ValueError, TypeError) as e:
        # newton takes --overrelax as its warm-up's factor (warmup_overrelax)
        raise SystemExit(f"error: {_as_flag(str(e).replace('warmup_overrelax', 'overrelax'), {*kw, 'overrelax'})}")
    _sync(dev)
    elapsed = time.perf_counter() - t0
    summary = {
        "method": args.method, "n": int(x.shape[-2]), "m": int(y.shape[-2]), "d": int(x.shape[-1]),
        "batch": int(x.shape[0]) if x.dim() == 3 else None, "cost_fn": args.cost,
    }
    if args.method == "sparse":
        # k as solved: at most the line length (a larger --k is capped, docs/sparse_ot.md)
        summary.update(k=res.info["k"], gamma=args.gamma, formulation=kw["formulation"], axis=kw["axis"],
                       gamma_stages=res.info["gamma_stages"], solver=res.info["solver"],
                       relaxed_iter=res.info.get("relaxed_iter"))
        summary.update(n_iter=res.n_iter, converged=res.converged, grad_norm=res.grad_norm,
                       marginal_error=res.marginal_error, cost=res.cost, value=res.value)
        summary.update(_nonzeros(res), stop=res.info.get("stop"))
        backend = res.info.get("backend")
    else:
        summary.update(eps=eps, rho=args.rho, n_iter=res.n_iter, converged=res.converged,
                       marginal_error=res.marginal_error, residual=res.info["residual"], cost=res.cost,
                       value=res.value)
        if args.method == "newton":  # the SNS stages
            summary.update({key: res.info[key] for key in (
                "warmup_iter", "newton_iter", "fallback_iter", "cg_iter", "line_search_evals", "sparsity",
                "time_warmup_s", "time_newton_s", "time_fallback_s") if key in res.info})
        backend = res._backend
    summary.update(time_s=elapsed, device=str(dev), backend=backend, dtype=args.dtype)
    if args.json:
        print(json.dumps({key: _plain(v) for key, v in summary.items()}, allow_nan=False))
    else:
        print(_table([(k, str(_plain(v) if isinstance(v, (torch.Tensor, np.ndarray)) else v))
                      for k, v in summary.items()]))
    return 0 if all_converged(res) else NOT_CONVERGED


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="otcore", description="GPU optimal transport for PyTorch.")
    p.add_argument("--version", action="version", version=f"otcore {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="colour transfer between two photos shipped with scikit-learn")
    d.add_argument("--n", type=int, default=None, help="pixels sampled per image (default 2000 on CPU, 50000 on GPU)")
    d.add_argument("--eps", type=float, default=0.01, help="entropic regularization (RGB in [0,1]; default 0.01)")
    d.add_argument("--tol", type=float, default=1e-4, help="stopping tolerance on the marginal error (default 1e-4)")
    d.add_argument("--max-iter", type=int, default=2000, help="iteration cap (default 2000)")
    d.add_argument("--width", type=int, default=None, help="image width (default 320 on CPU, 640 on GPU)")
    d.add_argument("--out", default="otcore_demo.png", help="output image (default otcore_demo.png)")
    d.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    d.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    d.add_argument("--seed", type=int, default=0, help="pixel sampling seed (default 0)")
    d.add_argument("--verbose", action="store_true", help="print progress in pipes and logs too (default: on a terminal)")
    d.set_defaults(func=run_demo)

    s = sub.add_parser(
        "solve", help="solve one OT problem between point clouds (.npy files or random)",
        description="Solve one OT problem between point clouds (.npy files or random) and print a summary. "
                    "Methods: sinkhorn (entropic, balanced or unbalanced), newton (Sinkhorn-Newton-Sparse, "
                    "entropic, balanced), sparse (sparsity-constrained OT: at most k nonzeros per column).",
    )
    s.add_argument("--x", help="source points, .npy of shape (n, d) or (B, n, d); random U[0,1]^d if absent "
                               "(with d and B from --y's file when there is one)")
    s.add_argument("--y", help="target points, .npy; random U[0.05,0.95]^d if absent (d and B from --x's file)")
    s.add_argument("--n", type=int, default=1000, help="random source size (default 1000)")
    s.add_argument("--m", type=int, default=None, help="random target size (default: --n's value, also with --x)")
    s.add_argument("--d", type=int, default=None,
                   help=f"random dimension (default {_DEFAULT_D}, or that of the --x/--y file)")
    s.add_argument("--seed", type=int, default=0, help="seed of the random points (default 0)")
    s.add_argument("--method", default="sinkhorn", choices=["sinkhorn", "newton", "sparse"])
    s.add_argument("--cost", default="sqeuclidean", choices=["sqeuclidean", "euclidean"])
    s.add_argument("--tol", type=float, default=1e-5,
                   help="stopping tolerance (default 1e-5): the residual of the optimality conditions, i.e. the "
                        "marginal error when balanced (sinkhorn, newton), the gradient L1 norm (sparse)")
    s.add_argument("--max-iter", type=int, default=1000,
                   help="iteration cap: Sinkhorn (sinkhorn), Newton (newton), L-BFGS (sparse) iterations "
                        "(default 1000)")
    e = s.add_argument_group("sinkhorn and newton")
    e.add_argument("--eps", type=float, default=None, help=f"entropic regularization (default {_DEFAULT_EPS})")
    e.add_argument("--rho", type=float, default=None, help="KL marginal penalty (unbalanced; sinkhorn only)")
    e.add_argument("--eps-schedule", type=_schedule_arg, default=None, help="none | geometric | decay factor in (0,1) (sinkhorn: none by default; newton: "
                   "of its warm-up, geometric by default)")
    e.add_argument("--check-every", type=int, default=None, help="iterations between convergence checks (sinkhorn only; default 10)")
    e.add_argument("--cuda-graph", action="store_const", const=True, default=None,
                   help="replay the iterations between checks from a CUDA graph (sinkhorn only; CUDA tensors)")
    e.add_argument("--overrelax", type=_overrelax_arg, default=None,
                   help="over-relaxed iterations: auto (default: adapted, with a --tol), on, off (plain Sinkhorn) "
                        "or a fixed factor in (0, 2); newton: its warm-up's, off or a factor (default 1.8)")
    e.add_argument("--warmup-iter", type=int, default=None, help="cap on Sinkhorn warm-up iterations (newton only; default 10)")
    e.add_argument("--sparsity", type=int, default=None, help="plan entries kept per row in the Hessian (newton only; default adaptive)")
    k = s.add_argument_group("sparse")
    k.add_argument("--k", type=int, default=None, help="nonzeros allowed per column (per row with --axis 1); required")
    k.add_argument("--gamma", type=float, default=None, help="quadratic regularization; required")
    k.add_argument("--formulation", default=None, choices=["semi-dual", "dual"], help="default semi-dual")
    k.add_argument("--axis", type=int, default=None, choices=[0, 1], help="0: k-sparse columns (default), 1: rows")
    k.add_argument("--gamma-schedule", type=_gamma_schedule_arg, default=None,
                   help="auto (default: from a large gamma down by factors of 4, for --k >= the column length and "
                        "for the relaxed start's solve) | none | decay factor in (0,1)")
    k.add_argument("--relaxed-start", default=None, choices=["auto", "on", "off"],
                   help="start from the optimum without --k (Newton), where --k < the column length: auto (default: "
                        "where the columns' slots leave one spare per column), on, off (L-BFGS from zero)")
    s.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    s.add_argument("--precision", default="fp32", choices=["fp32", "tf32"])
    s.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--quiet", action="store_true", help="no progress line")
    s.set_defaults(func=run_solve)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv``; returns 0, or ``NOT_CONVERGED`` (3) when the solve
    ran but did not converge (its summary or picture is still written). Bad input raises
    ``SystemExit`` (2: a malformed command line; else the ``error: ...`` message, status 1).
    Warnings go through Python's ``warnings`` as usual (a caller may record or filter them)."""
    args = build_parser().parse_args(argv)
    return args.func(args)


def entry() -> NoReturn:
    """The ``otcore`` program (console script and ``python -m otcore``): :func:`main` with
    each warning printed as one ``warning: ...`` line (not Python's file and source line).
    Output that cannot be written (standard output closed, a full disk) is an error, status 1."""
    warnings.showwarning = _show_warning
    if sys.stdout is None:  # fd 1 closed (``>&-``): the summary has nowhere to go, so no solve runs for it
        _say("error: cannot write the output: standard output is closed")  # (it had exited 0, silently)
        sys.exit(1)
    try:
        status = main()
        if sys.stdout is not None:
            sys.stdout.flush()  # (a write error shows here, not at exit)
    except KeyboardInterrupt:
        _say("error: interrupted")
        status = 130
    except BrokenPipeError:  # the reader left (``| head``): no traceback, nothing more to write
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 1
    except OSError as e:  # writing the output failed (a full disk: /dev/full); files read say so themselves
        if e.errno not in _WRITE_ERRORS:
            raise
        _say(f"error: cannot write the output: {e.strerror or e}")
        status = 1
    sys.exit(status)


_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EBADF}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _say(f"warning: {message}", file)


def _say(text: str, file=None) -> None:
    """A line on stderr (or ``file``); nothing without one, or where writing fails, as
    Python's own warnings do (``print(file=None)`` had written to stdout, into ``--json``'s
    output; a closed descriptor had ended the run before its summary, a review)."""
    file = sys.stderr if file is None else file
    if file is None:
        return
    with contextlib.suppress(OSError, ValueError):
        print(text, file=file)


if __name__ == "__main__":  # pragma: no cover
    entry()
