"""Command line: ``otcore demo`` (colour transfer) and ``otcore solve`` (one OT problem).

Run ``otcore --help``, ``otcore demo --help`` or ``otcore solve --help``;
``python -m otcore`` is the same program.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch

from . import PointCloud, sinkhorn, sinkhorn_newton
from .result import OTResult


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for but CUDA is not available")
    return torch.device(name)


def _schedule(text: Optional[str]):
    if text is None or text == "none":
        return None
    if text == "geometric":
        return text
    try:
        return float(text)
    except ValueError:
        raise SystemExit(f"error: --eps-schedule must be none, geometric or a decay factor, got {text!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


# --------------------------------------------------------------------------- demo
def _load_photo(name: str) -> np.ndarray:
    try:
        from sklearn.datasets import load_sample_image
    except ImportError:  # pragma: no cover - depends on the environment
        raise SystemExit('error: the demo needs scikit-learn and pillow: pip install "otcore[demo]"')
    return load_sample_image(name)


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
    dev = _device(args.device)
    n = args.n or (50_000 if dev.type == "cuda" else 2000)
    width = args.width or (640 if dev.type == "cuda" else 320)
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
    res = sinkhorn(
        PointCloud(x, y), eps=args.eps, tol=args.tol, max_iter=args.max_iter,
        eps_schedule="geometric", backend=args.backend, verbose=None if args.verbose else False,
    )
    _sync(dev)
    t_solve = time.perf_counter() - t0
    mapped = entropic_map(res, xs.to(dev), y, b).clamp(0, 1)  # display only: colours live in [0, 1]
    _sync(dev)
    t_map = time.perf_counter() - t0 - t_solve
    out_img = (mapped.cpu().numpy().reshape(src.shape) * 255).round().astype(np.uint8)

    from PIL import Image

    h = src.shape[0]
    tgt_show = np.asarray(Image.fromarray(tgt).resize((round(tgt.shape[1] * h / tgt.shape[0]), h)))
    gap = np.full((h, 8, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([src, gap, tgt_show, gap, out_img], axis=1)).save(args.out)

    print("otcore demo: colour transfer china.jpg -> flower.jpg (left: source, middle: target, right: result)")
    print(_table([
        ("n = m (pixels sampled)", f"{n}"),
        ("eps", f"{args.eps:g} (RGB in [0,1], cost ||x-y||^2, geometric eps scaling)"),
        ("iterations", f"{res.n_iter}"),
        ("marginal error", f"{res.marginal_error:.2e} (tol {args.tol:g}, converged={res.converged})"),
        ("solve time", f"{t_solve:.2f} s"),
        ("map time", f"{t_map:.2f} s ({len(xs)} pixels through the entropic map)"),
        ("device", str(dev)),
        ("backend", res._backend),
        ("image", args.out),
    ]))
    return 0


# --------------------------------------------------------------------------- solve
def _points(path: Optional[str], count: int, d: int, gen, lo: float, hi: float, dtype) -> torch.Tensor:
    if path is not None:
        arr = np.load(path)
        if arr.ndim not in (2, 3):
            raise SystemExit(f"error: {path} must hold an (n, d) or (B, n, d) array, got shape {arr.shape}")
        return torch.from_numpy(np.ascontiguousarray(arr)).to(dtype)
    return lo + (hi - lo) * torch.rand(count, d, generator=gen, dtype=dtype)


def run_solve(args) -> int:
    dev = _device(args.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)
    x = _points(args.x, args.n, args.d, gen, 0.0, 1.0, dtype).to(dev)
    y = _points(args.y, args.m or args.n, args.d, gen, 0.05, 0.95, dtype).to(dev)
    kw = dict(eps=args.eps, tol=args.tol, max_iter=args.max_iter, backend=args.backend,
              precision=args.precision, verbose=False if (args.quiet or args.json) else None)
    if args.method == "sinkhorn":
        kw.update(rho=args.rho, eps_schedule=_schedule(args.eps_schedule), check_every=args.check_every)
    _sync(dev)
    t0 = time.perf_counter()
    try:
        res = (sinkhorn if args.method == "sinkhorn" else sinkhorn_newton)(PointCloud(x, y, cost=args.cost), **kw)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}")
    _sync(dev)
    elapsed = time.perf_counter() - t0
    tolist = lambda t: t.tolist() if isinstance(t, torch.Tensor) else t  # noqa: E731
    summary = {
        "method": args.method, "n": int(x.shape[-2]), "m": int(y.shape[-2]), "d": int(x.shape[-1]),
        "batch": int(x.shape[0]) if x.dim() == 3 else None, "cost_fn": args.cost, "eps": args.eps,
        "rho": args.rho, "n_iter": tolist(res.n_iter), "converged": tolist(res.converged),
        "marginal_error": tolist(res.marginal_error), "cost": tolist(res.cost.detach()),
        "value": tolist(res.value.detach()), "time_s": elapsed, "device": str(dev),
        "backend": res._backend, "dtype": args.dtype,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(_table([(k, str(v)) for k, v in summary.items()]))
    return 0


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="otcore", description="GPU optimal transport for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="colour transfer between two photos shipped with scikit-learn")
    d.add_argument("--n", type=int, default=None, help="pixels sampled per image (default 2000 on CPU, 50000 on GPU)")
    d.add_argument("--eps", type=float, default=0.01, help="entropic regularization (RGB in [0,1])")
    d.add_argument("--tol", type=float, default=1e-4)
    d.add_argument("--max-iter", type=int, default=2000)
    d.add_argument("--width", type=int, default=None, help="image width (default 320 on CPU, 640 on GPU)")
    d.add_argument("--out", default="otcore_demo.png", help="output PNG")
    d.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    d.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--verbose", action="store_true", help="always print progress")
    d.set_defaults(func=run_demo)

    s = sub.add_parser("solve", help="solve one OT problem between point clouds (.npy files or random)")
    s.add_argument("--x", help="source points, .npy of shape (n, d) or (B, n, d); random U[0,1]^d if absent")
    s.add_argument("--y", help="target points, .npy; random U[0.05,0.95]^d if absent")
    s.add_argument("--n", type=int, default=1000, help="random source size")
    s.add_argument("--m", type=int, default=None, help="random target size (default n)")
    s.add_argument("--d", type=int, default=3, help="random dimension")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--method", default="sinkhorn", choices=["sinkhorn", "newton"])
    s.add_argument("--cost", default="sqeuclidean", choices=["sqeuclidean", "euclidean"])
    s.add_argument("--eps", type=float, default=0.05)
    s.add_argument("--tol", type=float, default=1e-5)
    s.add_argument("--max-iter", type=int, default=1000)
    s.add_argument("--rho", type=float, default=None, help="KL marginal penalty (unbalanced)")
    s.add_argument("--eps-schedule", default=None, help="none | geometric | decay factor in (0,1)")
    s.add_argument("--check-every", type=int, default=10)
    s.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    s.add_argument("--precision", default="fp32", choices=["fp32", "tf32"])
    s.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--quiet", action="store_true", help="no progress line")
    s.set_defaults(func=run_solve)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
