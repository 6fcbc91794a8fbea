"""sparse_ot's continuation in gamma against none, for quadratically regularized OT.

At ``gamma`` small against the costs the plan is nearly a linear program's: each column's
support holds one or two rows, the semi-dual is almost piecewise linear and the support
changes at every step, so Newton's steps (and L-BFGS's) make little progress each.
``gamma_schedule="auto"`` (the default where ``k`` >= the line length) solves at
``gamma * 4^s`` first, from where ``gamma`` times the mean line weight is 1% of the cost's
range, each stage from the last one's duals. This script prints, per problem and
``gamma``, iterations, seconds, ``converged`` and the value's and plan's differences between
the two (both must reach the same optimum); the staged run is the default (``"auto"``).

Problems (``k = n``, random weights, ``axis=0``): Gaussian point clouds in 2-d (squared
Euclidean cost) and ``C ~ U[0,1]`` matrices, all solved by Newton steps: 12 x 9, 40 x 30
and 64 x 200 on the Hessian itself (at most 64 rows), 80 x 60 and 200 x 150 by conjugate
gradient (L-BFGS before 2026-12-02).

    python bench/sparse_ot_gamma_schedule.py              # float64, tol 1e-9; ~4 min on one CPU core
    python bench/sparse_ot_gamma_schedule.py --quick      # two sizes, two gammas
    python bench/sparse_ot_gamma_schedule.py --dtype float32 --tol 1e-5
    python bench/sparse_ot_gamma_schedule.py --warm       # warm starts from a nearby problem (~3 min)

``--warm``: Gaussian clouds 40 x 30 and 100 x 80; the duals of a solve at ``gamma`` are the
warm start of the same problem with the sources moved by ``delta * N(0, 1)``. Printed:
the warm solve (``"auto"``: where Newton stalls from the warm start, the stages run from
its best iterate), the warm solve without stages (``gamma_schedule=None``: Newton, then
L-BFGS from its stall, what a warm start did before 2026-12-02) and the cold solve.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import otcore


def problem(kind, n, m, seed, dtype, device):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(m, generator=g, dtype=torch.float64) + 0.1
    if kind == "clouds":
        geom = otcore.PointCloud(torch.randn(n, 2, generator=g, dtype=torch.float64).to(device, dtype),
                                 torch.randn(m, 2, generator=g, dtype=torch.float64).to(device, dtype))
    else:
        geom = otcore.CostMatrix(torch.rand(n, m, generator=g, dtype=torch.float64).to(device, dtype))
    return geom, (a / a.sum()).to(device, dtype), (b / b.sum()).to(device, dtype)


def solve(geom, a, b, n, gamma, tol, max_iter, schedule, init=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", otcore.ConvergenceWarning)
        t = time.perf_counter()
        r = otcore.sparse_ot(geom, a, b, k=n, gamma=gamma, tol=tol, max_iter=max_iter, gamma_schedule=schedule,
                             init=init)
        if a.is_cuda:
            torch.cuda.synchronize()
        return r, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--tol", type=float, default=1e-9)
    ap.add_argument("--max-iter", type=int, default=5000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--warm", action="store_true", help="warm starts from a nearby problem's duals")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.warm:
        return warm_starts(args, dtype)
    sizes = [(12, 9), (40, 30), (64, 200), (80, 60), (200, 150)]
    gammas = [1e-1, 1e-2, 1e-3, 1e-4]
    if args.quick:
        sizes, gammas = [(12, 9), (40, 30)], [1e-2, 1e-3]
    print(f"# {args.dtype}, tol {args.tol:g}, max_iter {args.max_iter}, device {args.device}, torch {torch.__version__}")
    print(f"{'problem':>18} {'gamma':>7} | {'none: solver':>20} {'iters':>5} {'s':>6} conv | "
          f"{'auto: solver':>20} {'iters':>5} {'s':>6} conv stages | {'value diff':>10} {'plan diff':>9} | "
          f"speed-up")
    tot = {"Newton (direct)": [0, 0.0, 0, 0.0], "Newton (CG)": [0, 0.0, 0, 0.0]}
    for kind in ("clouds", "uniform"):
        for n, m in sizes:
            geom, a, b = problem(kind, n, m, seed=0, dtype=dtype, device=args.device)
            for gamma in gammas:
                plain, t0 = solve(geom, a, b, n, gamma, args.tol, args.max_iter, None)
                staged, t1 = solve(geom, a, b, n, gamma, args.tol, args.max_iter, "auto")
                dv = float((staged.value - plain.value).abs() / plain.value.abs())
                dp = float((staged.to_dense() - plain.to_dense()).abs().max())
                key = "Newton (direct)" if n <= 64 else "Newton (CG)"
                tot[key] = [u + v for u, v in zip(tot[key], (int(plain.n_iter), t0, int(staged.n_iter), t1))]
                print(f"{kind + f' {n}x{m}':>18} {gamma:7.0e} | {plain.info['solver']:>20} {int(plain.n_iter):5d} "
                      f"{t0:6.2f} {'yes' if plain.converged else 'NO ':>4} | {staged.info['solver']:>20} "
                      f"{int(staged.n_iter):5d} {t1:6.2f} {'yes' if staged.converged else 'NO ':>4} "
                      f"{len(staged.info['gamma_stages']):6d} | {dv:10.1e} {dp:9.1e} | {t0 / t1:6.1f}x")
    for key, (i0, t0, i1, t1) in tot.items():
        if i0:
            print(f"# {key} sizes: none {i0} iterations, {t0:.1f} s; auto {i1} iterations, {t1:.1f} s "
                  f"({t0 / t1:.1f}x less time)")


def yes(r):
    return "yes" if r.converged else "NO "


def warm_starts(args, dtype):
    print(f"# warm starts, {args.dtype}, tol {args.tol:g}, max_iter {args.max_iter}, device {args.device}, "
          f"torch {torch.__version__}")
    print(f"{'problem':>16} {'gamma':>7} {'delta':>7} | {'warm: solver':>32} {'iters':>5} {'s':>6} conv | "
          f"{'warm, no stages':>20} {'iters':>5} {'s':>6} conv | {'cold':>5} {'s':>6} conv | plan diff")
    for n, m in [(40, 30), (100, 80)]:
        geom, a, b = problem("clouds", n, m, seed=0, dtype=dtype, device=args.device)
        for gamma in [1e-2, 1e-3, 1e-4, 1e-5]:
            near, _ = solve(geom, a, b, n, gamma, args.tol, args.max_iter, "auto")
            for delta in [1e-3, 1e-2, 1e-1]:
                g = torch.Generator().manual_seed(5)
                x = geom.x[0] + delta * torch.randn(geom.x[0].shape, generator=g, dtype=torch.float64).to(geom.x)
                moved = otcore.PointCloud(x, geom.y[0])
                init = (near.alpha, near.beta)
                warm, t0 = solve(moved, a, b, n, gamma, args.tol, args.max_iter, "auto", init)
                plain, t1 = solve(moved, a, b, n, gamma, args.tol, args.max_iter, None, init)
                cold, t2 = solve(moved, a, b, n, gamma, args.tol, args.max_iter, "auto")
                dp = float((warm.to_dense() - cold.to_dense()).abs().max())
                print(f"{f'clouds {n}x{m}':>16} {gamma:7.0e} {delta:7.0e} | {warm.info['solver']:>32} "
                      f"{int(warm.n_iter):5d} {t0:6.2f} {yes(warm):>4} | {plain.info['solver']:>20} "
                      f"{int(plain.n_iter):5d} {t1:6.2f} {yes(plain):>4} | {int(cold.n_iter):5d} {t2:6.2f} "
                      f"{yes(cold):>4} | {dp:9.1e}")


if __name__ == "__main__":
    main()
