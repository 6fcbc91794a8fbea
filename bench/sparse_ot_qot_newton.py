"""Quadratically regularized OT: sparse_ot's Newton steps against its L-BFGS, at any size.

Where no line's cardinality constraint can bind (``k`` >= the line length) the semi-dual
is piecewise quadratic and ``sparse_ot`` solves it by damped Newton steps: up to
``DIRECT_MAX`` positions on the Hessian itself, past that by conjugate gradient on the
plan's support (matrix-free, ``O(L s)`` per product, ``s`` the widest line's support).
This script solves the same problems both ways (L-BFGS by turning Newton off, as before
Newton reached past ``DIRECT_MAX``), both with the default continuation in gamma, and
prints per problem: iterations, passes over the costs (objective evaluations: the cost
that grows with ``n m``), seconds, ``converged``, the final gradient norm and the values'
relative difference.

Problems: Gaussian clouds in 2-d (``y`` shifted by 0.5), squared Euclidean costs divided
by their largest, uniform weights, ``k = n``, ``axis=0``, gamma 0.1, 0.01, 1e-3.

    python bench/sparse_ot_qot_newton.py                        # float64, tol 1e-9, 300 x 200 and 1000 x 800
    python bench/sparse_ot_qot_newton.py --dtype float32 --tol 1e-5
    python bench/sparse_ot_qot_newton.py --sizes 300x200 --gammas 0.01
    python bench/sparse_ot_qot_newton.py --device cuda --sizes 1000x800 4096x4096
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import otcore
from otcore.solvers import sparse as S


class Counted:
    """Counts ``_Problem.evaluate`` calls (one pass over the costs each) while active."""

    def __init__(self):
        self.n, self._orig = 0, S._Problem.evaluate

    def __enter__(self):
        orig, box = self._orig, self

        def evaluate(pb, theta):
            box.n += 1
            return orig(pb, theta)

        S._Problem.evaluate = evaluate
        return self

    def __exit__(self, *exc):
        S._Problem.evaluate = self._orig


def problem(n, m, dtype, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = torch.randn(m, 2, generator=g, dtype=torch.float64) + 0.5
    C = torch.cdist(x, y) ** 2
    C = (C / C.max()).to(device, dtype)
    a = torch.full((n,), 1.0 / n, dtype=dtype, device=device)
    b = torch.full((m,), 1.0 / m, dtype=dtype, device=device)
    return otcore.CostMatrix(C), a, b


def solve(geom, a, b, gamma, tol, max_iter, newton: bool):
    applies = S._newton_applies
    if not newton:
        S._newton_applies = lambda pb: False
    try:
        with warnings.catch_warnings(), Counted() as passes:
            warnings.simplefilter("ignore", otcore.ConvergenceWarning)
            t = time.perf_counter()
            r = otcore.sparse_ot(geom, a, b, k=a.shape[0], gamma=gamma, tol=tol, max_iter=max_iter)
            if a.is_cuda:
                torch.cuda.synchronize()
            return r, passes.n, time.perf_counter() - t
    finally:
        S._newton_applies = applies


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--tol", type=float, default=1e-9)
    ap.add_argument("--max-iter", type=int, default=20000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", nargs="+", default=["300x200", "1000x800"])
    ap.add_argument("--gammas", type=float, nargs="+", default=[0.1, 0.01, 1e-3])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"# {args.dtype}, tol {args.tol:g}, device {args.device}, torch {torch.__version__}")
    print(f"{'n x m':>10} {'gamma':>7} | {'solver':>20} {'iters':>6} {'passes':>6} {'s':>7} {'conv':>5} {'|g|_1':>8}"
          f" | {'L-BFGS':>6} {'passes':>6} {'s':>7} {'conv':>5} {'|g|_1':>8} | {'time x':>6} {'value rel diff':>14}")
    for size in args.sizes:
        n, m = (int(v) for v in size.split("x"))
        geom, a, b = problem(n, m, dtype, args.device)
        for gamma in args.gammas:
            rn, pn, tn = solve(geom, a, b, gamma, args.tol, args.max_iter, newton=True)
            rl, pl, tl = solve(geom, a, b, gamma, args.tol, args.max_iter, newton=False)
            diff = abs(float(rn.value) - float(rl.value)) / abs(float(rl.value))
            print(f"{size:>10} {gamma:>7g} | {rn.info['solver']:>20} {int(rn.n_iter):>6} {pn:>6} {tn:>7.2f} "
                  f"{str(bool(rn.converged)):>5} {float(rn.grad_norm):>8.1e} | {int(rl.n_iter):>6} {pl:>6} {tl:>7.2f} "
                  f"{str(bool(rl.converged)):>5} {float(rl.grad_norm):>8.1e} | {tl / tn:>6.1f} {diff:>14.1e}", flush=True)


if __name__ == "__main__":
    main()
