"""Sinkhorn-Newton-Sparse vs Sinkhorn: time and iterations to a marginal error.

    python bench/bench_newton.py                       # GPU: the sweep and Table 1
    python bench/bench_newton.py --quick               # tiny sizes, runs on CPU
    python bench/bench_newton.py --table1-only --device cpu --threads 1 --budget 150

1. Sweep: x, y ~ U[0,1]^2, squared Euclidean cost, uniform weights, for
   ``--eps`` (1e-2, 1e-3, 1/1200) x ``--sizes`` (500, 4096, 16384) x ``--dtypes``.
   Solvers: ``otcore.sinkhorn_newton``; ``otcore.sinkhorn`` (the fused kernels on
   CUDA, the torch path on CPU); POT ``ot.sinkhorn(method="sinkhorn_log")`` on the
   materialised cost (torch backend, same device).
2. Table 1 in the style of Tang et al. (ICLR 2024), float64, eps = 1/1200 (costs
   scaled to a maximum of 1): random assignment (C ~ U[0,1], n = ``--table-n``,
   uniform weights) and handwritten digits (scikit-learn's ``load_digits``: each
   8x8 image normalised to a histogram on the pixel grid, coordinates in [0,1]^2,
   source image ``2k`` and target ``2k+1`` for ``k < --pairs``; zero pixels are
   zero weights) with the L1 (``|dx| + |dy|``) and L2 (``sqrt(dx^2 + dy^2)``) costs.

Every solver runs to ``--tol`` on the L1 marginal error ``|P1 - a|_1 + |P^T 1 - b|_1``
(POT is run in chunks of 50 warm-started iterations and stopped on that error,
so its count is a multiple of 50) or until its time budget: Sinkhorn-type solvers
are timed on a short run first and given ``max_iter = budget / (time per iteration)``. The
marginal error of every result is recomputed the same way, and each plan is
compared with the SNS plan (L1 distance, n <= 4096). SNS runs twice and the second
(warm, kernels compiled) run is reported. Times are wall clock with CUDA synchronised.

Writes ``newton.csv`` and ``newton.json`` to ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import otcore  # noqa: E402

FIELDS = ["part", "problem", "n", "eps", "dtype", "solver", "iters", "time_s", "marginal_error", "converged",
          "plan_l1_vs_sns", "detail"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def l1_marginal_error(P, a, b):
    return float((P.sum(1) - a).abs().sum() + (P.sum(0) - b).abs().sum())


# ---------------------------------------------------------------------------
# problems: (name, geometry, a, b, dense cost for POT)
# ---------------------------------------------------------------------------
def cloud_problem(n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=torch.float64).to(device, dtype)
    y = torch.rand(n, 2, generator=g, dtype=torch.float64).to(device, dtype)
    geom = otcore.PointCloud(x, y)
    w = torch.full((n,), 1.0 / n, dtype=dtype, device=device)
    return "cloud2d-sqeuclid", geom, w, w.clone(), lambda: geom.cost_block()[0]


def random_assignment(n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = torch.rand(n, n, generator=g, dtype=torch.float64).to(device, dtype)
    w = torch.full((n,), 1.0 / n, dtype=dtype, device=device)
    return "random-assignment", otcore.CostMatrix(C), w, w.clone(), lambda: C


def digits_problem(pair, cost, dtype, device):
    from sklearn.datasets import load_digits

    imgs = torch.as_tensor(load_digits().images, dtype=torch.float64).reshape(-1, 64)
    a, b = imgs[2 * pair], imgs[2 * pair + 1]
    a, b = a / a.sum(), b / b.sum()
    r = torch.arange(8, dtype=torch.float64) / 7
    pts = torch.stack(torch.meshgrid(r, r, indexing="ij"), -1).reshape(64, 2)
    diff = (pts[:, None, :] - pts[None, :, :]).abs()
    C = diff.sum(-1) if cost == "L1" else diff.pow(2).sum(-1).sqrt()
    C = (C / C.max()).to(device, dtype)
    return f"digits-{cost}-pair{pair}", otcore.CostMatrix(C), a.to(device, dtype), b.to(device, dtype), lambda: C


# ---------------------------------------------------------------------------
# solvers
# ---------------------------------------------------------------------------
def run_sns(geom, a, b, eps, tol, device, args):
    kw = dict(eps=eps, tol=tol, max_iter=args.newton_max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        otcore.sinkhorn_newton(geom, a, b, **kw)  # compile / warm caches
        res, t = timed(lambda: otcore.sinkhorn_newton(geom, a, b, **kw), device)
    i = res.info
    detail = (f"warmup {i['warmup_iter']} ({i['time_warmup_s']:.3g}s) newton {i['newton_iter']} "
              f"({i['time_newton_s']:.3g}s) fallback {i['fallback_iter']} cg {i['cg_iter']} s={i['sparsity']}")
    return res, dict(iters=res.n_iter, time_s=t, marginal_error=res.marginal_error, converged=res.converged,
                     detail=detail)


def run_sinkhorn(geom, a, b, eps, tol, device, args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = 50
        _, t = timed(lambda: otcore.sinkhorn(geom, a, b, eps=eps, tol=1e-300, max_iter=probe), device)
        cap = max(probe, min(args.max_iter, int(args.budget / (t / probe))))
        res, t = timed(lambda: otcore.sinkhorn(geom, a, b, eps=eps, tol=tol, max_iter=cap), device)
    return res, dict(iters=res.n_iter, time_s=t, marginal_error=res.marginal_error, converged=res.converged,
                     detail=f"max_iter {cap}")


def run_pot(C, a, b, eps, tol, device, args, chunk=50):
    """POT's log-domain Sinkhorn, run in chunks of ``chunk`` iterations (warm-started
    from the previous chunk's log-scalings) so that it stops on the same L1 marginal
    error as the others; its own test (2-norm of the column error) is switched off."""
    import ot

    def solve(k, warm):
        return ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", numItermax=k, stopThr=0.0, log=True,
                           warn=False, warmstart=warm)

    _, t = timed(lambda: solve(chunk, None), device)
    cap = max(chunk, min(args.max_iter, int(args.budget / (t / chunk))))

    def loop():
        warm, done = None, 0
        while True:
            P, log = solve(chunk, warm)
            done += chunk
            err = l1_marginal_error(P, a, b)
            if err <= tol or done >= cap:
                return P, done, err
            warm = (log["log_u"], log["log_v"])

    (P, iters, err), t = timed(loop, device)
    return P, dict(iters=iters, time_s=t, marginal_error=err, converged=err <= tol,
                   detail=f"max_iter {cap}, checked every {chunk}")


def compare(name, geom, a, b, cdense, eps, dtype, tol, device, args, part):
    rows = []
    sns, row = run_sns(geom, a, b, eps, tol, device, args)
    base = dict(part=part, problem=name, n=geom.n, eps=eps, dtype=str(dtype).replace("torch.", ""))
    P_sns = sns.plan() if geom.n <= 4096 else None
    rows.append(dict(base, solver="otcore.sinkhorn_newton", plan_l1_vs_sns=0.0, **row))
    sk, row = run_sinkhorn(geom, a, b, eps, tol, device, args)
    diff = float((sk.plan() - P_sns).abs().sum()) if P_sns is not None else float("nan")
    rows.append(dict(base, solver="otcore.sinkhorn", plan_l1_vs_sns=diff, **row))
    if not args.no_pot:
        P, row = run_pot(cdense(), a, b, eps, tol, device, args)
        diff = float((P - P_sns).abs().sum()) if P_sns is not None else float("nan")
        rows.append(dict(base, solver="POT sinkhorn_log", plan_l1_vs_sns=diff, **row))
    for r in rows:
        print_row(r)
    return rows


def print_row(r):
    print(f"{r['part']:6s} {r['problem']:24s} n={r['n']:<6d} eps={r['eps']:<9.3g} {r['dtype']:8s} "
          f"{r['solver']:24s} iters={r['iters']!s:>7s} time={r['time_s']:9.3f}s err={r['marginal_error']:.2e} "
          f"conv={r['converged']!s:5s} |P-P_sns|_1={r['plan_l1_vs_sns']:.1e}  {r['detail']}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU friendly)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 4096, 16384])
    p.add_argument("--eps", type=float, nargs="+", default=[1e-2, 1e-3, 1 / 1200])
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--budget", type=float, default=60.0, help="seconds per Sinkhorn / POT run")
    p.add_argument("--max-iter", type=int, default=200000, help="iteration cap of Sinkhorn / POT")
    p.add_argument("--newton-max-iter", type=int, default=100)
    p.add_argument("--table-n", type=int, default=500)
    p.add_argument("--table-tol", type=float, default=None, help="Table 1 tolerance (default: --tol)")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--table1-only", action="store_true")
    p.add_argument("--sweep-only", action="store_true")
    p.add_argument("--no-pot", action="store_true")
    p.add_argument("--out", default="bench/out/newton")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.eps, args.dtypes = [64, 128], [1e-2, 1e-3], ["float64"]
        args.table_n, args.pairs, args.budget, args.max_iter = 100, 1, 5.0, 20000
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    if not args.table1_only:
        for dt in args.dtypes:
            dtype = getattr(torch, dt)
            for n in args.sizes:
                for eps in args.eps:
                    name, geom, a, b, cd = cloud_problem(n, dtype, device)
                    rows += compare(name, geom, a, b, cd, eps, dtype, args.tol, device, args, "sweep")
    if not args.sweep_only:
        eps, dtype = 1 / 1200, torch.float64
        probs = [random_assignment(args.table_n, dtype, device)]
        probs += [digits_problem(k, c, dtype, device) for c in ("L1", "L2") for k in range(args.pairs)]
        for name, geom, a, b, cd in probs:
            rows += compare(name, geom, a, b, cd, eps, dtype, args.table_tol or args.tol, device, args, "table1")
    os.makedirs(args.out, exist_ok=True)
    env = dict(device=str(device), gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               torch=torch.__version__, threads=torch.get_num_threads(), argv=sys.argv[1:])
    with open(os.path.join(args.out, "newton.json"), "w") as fh:
        json.dump(dict(env=env, rows=rows), fh, indent=1, default=str)
    with open(os.path.join(args.out, "newton.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}/newton.csv and newton.json ({env})")


if __name__ == "__main__":
    main()
