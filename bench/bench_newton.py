"""Sinkhorn-Newton-Sparse vs Sinkhorn: time and iterations to a marginal error.

    python bench/bench_newton.py                       # GPU: the sweep and Table 1
    python bench/bench_newton.py --quick               # tiny sizes, runs on CPU
    python bench/bench_newton.py --table1-only --device cpu --threads 1 --budget 150

1. Sweep: x, y ~ U[0,1]^2, squared Euclidean cost, uniform weights, for
   ``--sizes`` (500, 4096, 16384; the outer loop) x ``--dtypes`` x ``--eps`` (1e-2, 1e-3, 1/1200).
   Solvers: ``otcore.sinkhorn_newton``; ``otcore.sinkhorn`` (the fused kernels on
   CUDA, the torch path on CPU), plain and with ``overrelax=True`` (otcore's fastest
   Sinkhorn); POT ``ot.sinkhorn(method="sinkhorn_log")`` on the
   materialised cost (torch backend, same device). ``--host-cg`` (CUDA) adds SNS with each
   Newton step's conjugate gradient issued from the host as whole-GPU sweeps
   (``kernels/sparse_cg_steps.py``, the path of systems past ``FUSED_MAX_ENTRIES``) instead of
   the one-launch solve (``kernels/sparse_cg.py``): which one wins at which size.
2. Table 1 in the style of Tang et al. (ICLR 2024), float64, eps = 1/1200 (costs
   scaled to a maximum of 1): random assignment (C ~ U[0,1], n = ``--table-n``,
   uniform weights) and handwritten digits (scikit-learn's ``load_digits``: each
   8x8 image normalised to a histogram on the pixel grid, coordinates in [0,1]^2,
   source image ``2k`` and target ``2k+1`` for ``k < --pairs``; zero pixels are
   zero weights) with the L1 (``|dx| + |dy|``) and L2 (``sqrt(dx^2 + dy^2)``) costs.

Every solver runs to ``--tol`` (float32 problems: ``--tol32``, default 1e-5, as float32
stalls near 1e-6) on the L1 marginal error ``|P1 - a|_1 + |P^T 1 - b|_1`` or until its time budget (``--budget`` for otcore.sinkhorn, ``--pot-budget`` for POT,
checked between warm-started chunks, so a run overshoots it by at most one chunk):
otcore.sinkhorn runs in chunks of about a quarter of the budget, POT in chunks of 50
iterations (its count is a multiple of 50). Each solver gets an untimed short run
first (compilation, caches). For n <= 4096 the marginal error of every result is
recomputed in float64 from its dense plan (``err64``) and each plan is compared with
the SNS plan (L1 distance): the correctness check. otcore.sinkhorn rows also carry the
fraction of the hardware floor (the targets' floor: ``2 n m`` exponentials at 4.2e12/s, or for
a dense cost ``2 n m`` element reads at copy bandwidth, whichever is larger; the copy
bandwidth is ``$OTCORE_COPY_BPS`` (set by gpu_check.sh from its measurement), else
measured now on CUDA, else the targets' H100 2.9e12 B/s, and is printed) its iterations
reached, and ``speedup_sns``: its time over SNS's (target: >= 10x at small eps;
a lower bound when Sinkhorn stopped on its budget). POT or scikit-learn missing: those
rows are skipped with a note. Times are wall clock with CUDA synchronised.

Writes ``newton.csv`` and ``newton.json`` to ``--out`` after every problem (a run
stopped by a time limit keeps what finished) and prints a table.
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
from otcore.kernels import sparse_cg  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bandwidth import H100_COPY_BPS, copy_bandwidth, describe  # noqa: E402

FIELDS = ["part", "problem", "n", "eps", "dtype", "solver", "iters", "time_s", "marginal_error", "converged",
          "err64", "plan_l1_vs_sns", "floor_fraction", "speedup_sns", "detail"]
EXP_PER_S = 4.2e12  # H100/H200 exp2 throughput (the targets' floor, docs/benchmarks.md)
COPY_BYTES_PER_S = H100_COPY_BPS  # replaced in main() by this device's copy bandwidth
PLAN_MAX_N = 4096  # dense plans (checks) up to this size


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
def reached(res, tol) -> bool:
    """The table's "converged": the L1 marginal error is at most ``tol``, as for POT. (otcore's
    own ``converged`` also accepts a result whose loop test passed a rounding step above tol:
    float32 at tol 1e-5 reported 1.24e-5 as converged, and a speedup over it is a bound.)"""
    return bool(res.converged) and float(res.marginal_error) <= tol


def run_sns(geom, a, b, eps, tol, device, args, host_cg=False):
    """``host_cg``: each Newton step's CG loop issued from the host (no one-launch solve)."""
    kw = dict(eps=eps, tol=tol, max_iter=args.newton_max_iter)
    limit = sparse_cg.FUSED_MAX_ENTRIES
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sparse_cg.FUSED_MAX_ENTRIES = 0 if host_cg else limit
            otcore.sinkhorn_newton(geom, a, b, **dict(kw, max_iter=2))  # compile / warm caches (untimed)
            res, t = timed(lambda: otcore.sinkhorn_newton(geom, a, b, **kw), device)
        finally:
            sparse_cg.FUSED_MAX_ENTRIES = limit
    i = res.info
    detail = (f"warmup {i['warmup_iter']} ({i['time_warmup_s']:.3g}s) newton {i['newton_iter']} "
              f"({i['time_newton_s']:.3g}s) fallback {i['fallback_iter']} cg {i['cg_iter']} s={i['sparsity']}")
    return res, dict(iters=res.n_iter, time_s=t, marginal_error=res.marginal_error,
                     converged=reached(res, tol), detail=detail)


def floor_s_per_iter(geom, dense: bool) -> float:
    """The targets' floor of one Sinkhorn iteration: 2 n m exponentials, or for a dense
    cost 2 n m element reads at copy bandwidth, whichever is larger."""
    nm = geom.n * geom.m
    t = 2.0 * nm / EXP_PER_S
    if dense:
        t = max(t, 2.0 * nm * geom.dtype.itemsize / COPY_BYTES_PER_S)
    return t


def run_sinkhorn(geom, a, b, eps, tol, device, args, overrelax=False):
    """otcore.sinkhorn to ``tol`` or ``args.budget`` seconds: warm-started chunks, the
    budget checked between them (an over-relaxed chunk adapts its factor anew)."""
    probe = 50
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        otcore.sinkhorn(geom, a, b, eps=eps, tol=1e-300, max_iter=probe, overrelax=overrelax)  # compile (untimed)
        _, t = timed(lambda: otcore.sinkhorn(geom, a, b, eps=eps, tol=1e-300, max_iter=probe, overrelax=overrelax),
                     device)
        per_it = max(t / probe, 1e-7)

        def loop():
            nonlocal per_it
            t0, done, init, chunks = time.perf_counter(), 0, None, 0
            while True:
                left = args.budget - (time.perf_counter() - t0)
                chunk = int(min(args.max_iter - done, max(probe, min(0.25 * args.budget, left) / per_it)))
                t1 = time.perf_counter()
                res = otcore.sinkhorn(geom, a, b, eps=eps, tol=tol, max_iter=chunk, init=init, overrelax=overrelax)
                sync(device)
                done, chunks = done + int(res.n_iter), chunks + 1
                per_it = max((time.perf_counter() - t1) / max(int(res.n_iter), 1), 1e-7)
                if bool(res.converged) or done >= args.max_iter or time.perf_counter() - t0 >= args.budget:
                    return res, done, chunks
                init = (res.f, res.g)

        (res, done, chunks), t = timed(loop, device)
    return res, dict(iters=done, time_s=t, marginal_error=res.marginal_error, converged=reached(res, tol),
                     detail=f"budget {args.budget:g}s, {chunks} chunk(s)")


def run_pot(C, a, b, eps, tol, device, args, chunk=50):
    """POT's log-domain Sinkhorn, run in chunks of ``chunk`` iterations (warm-started
    from the previous chunk's log-scalings) so that it stops on the same L1 marginal
    error as the others, or on ``args.pot_budget`` seconds; its own test (2-norm of the
    column error) is switched off."""
    import ot

    def solve(k, warm):
        return ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", numItermax=k, stopThr=0.0, log=True,
                           warn=False, warmstart=warm)

    solve(chunk, None)  # warm-up (untimed)

    def loop():
        warm, done, t0 = None, 0, time.perf_counter()
        while True:
            P, log = solve(chunk, warm)
            done += chunk
            err = l1_marginal_error(P, a, b)
            if err <= tol or done >= args.max_iter or time.perf_counter() - t0 >= args.pot_budget:
                return P, done, err
            warm = (log["log_u"], log["log_v"])

    (P, iters, err), t = timed(loop, device)
    return P, dict(iters=iters, time_s=t, marginal_error=err, converged=err <= tol,
                   detail=f"budget {args.pot_budget:g}s, checked every {chunk}")


def compare(name, geom, a, b, cdense, eps, dtype, tol, device, args, part, dense=False):
    rows = []
    base = dict(part=part, problem=name, n=geom.n, eps=eps, dtype=str(dtype).replace("torch.", ""))
    small = geom.n <= PLAN_MAX_N

    def check(P):
        """float64 marginal error of a dense plan, and its L1 distance to the SNS plan."""
        if not small:
            return dict(err64=float("nan"), plan_l1_vs_sns=float("nan"))
        P = P.double()
        return dict(err64=l1_marginal_error(P, a.double(), b.double()),
                    plan_l1_vs_sns=float((P - P_sns).abs().sum()))

    sns, row = run_sns(geom, a, b, eps, tol, device, args)
    P_sns = sns.plan().double() if small else None
    rows.append(dict(base, solver="otcore.sinkhorn_newton", **check(P_sns), **row))
    if args.host_cg and device.type == "cuda":
        host, row = run_sns(geom, a, b, eps, tol, device, args, host_cg=True)
        row["detail"] += f"; the one-launch CG solve is {row['time_s'] / rows[0]['time_s']:.2f}x faster"
        rows.append(dict(base, solver="otcore.sinkhorn_newton host CG", **check(host.plan() if small else None),
                         **row))
    for overrelax, label in ((False, "otcore.sinkhorn"), (True, "otcore.sinkhorn overrelax")):
        sk, row = run_sinkhorn(geom, a, b, eps, tol, device, args, overrelax)
        row["floor_fraction"] = row["iters"] * floor_s_per_iter(geom, dense) / row["time_s"]
        row["speedup_sns"] = row["time_s"] / rows[0]["time_s"]
        rows.append(dict(base, solver=label, **check(sk.plan() if small else None), **row))
    if not args.no_pot:
        try:
            P, row = run_pot(cdense(), a, b, eps, tol, device, args)
        except ImportError as e:
            print(f"  POT skipped: not importable ({e})", flush=True)
            args.no_pot = True
        else:
            rows.append(dict(base, solver="POT sinkhorn_log", **check(P), **row))
    for r in rows:
        print_row(r)
    return rows


def print_row(r):
    extra = ""
    if r.get("floor_fraction") is not None:
        sp = r["speedup_sns"]
        extra = (f" floor {r['floor_fraction']:.1%} SNS speedup {'>=' if not r['converged'] else ''}{sp:.1f}x"
                 f"{' (target >= 10x)' if r['eps'] <= 1e-3 else ''}")
    print(f"{r['part']:6s} {r['problem']:24s} n={r['n']:<6d} eps={r['eps']:<9.3g} {r['dtype']:8s} "
          f"{r['solver']:30s} iters={r['iters']!s:>7s} time={r['time_s']:9.3f}s err={r['marginal_error']:.2e} "
          f"err64={r.get('err64', float('nan')):.2e} conv={r['converged']!s:5s} "
          f"|P-P_sns|_1={r.get('plan_l1_vs_sns', float('nan')):.1e}{extra}  {r['detail']}", flush=True)


def write(rows, args, device):
    os.makedirs(args.out, exist_ok=True)
    env = dict(device=str(device), gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               torch=torch.__version__, threads=torch.get_num_threads(), otcore=otcore.__file__, argv=sys.argv[1:],
               copy_Bps=COPY_BYTES_PER_S, copy_source=args.copy_source)
    with open(os.path.join(args.out, "newton.json"), "w") as fh:
        json.dump(dict(env=env, rows=rows), fh, indent=1, default=str)
    with open(os.path.join(args.out, "newton.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    return env


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU friendly)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 4096, 16384])
    p.add_argument("--eps", type=float, nargs="+", default=[1e-2, 1e-3, 1 / 1200])
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--tol32", type=float, default=1e-5,
                   help="tolerance of float32 problems (the larger of this and --tol): in float32 SNS stalls "
                        "near 1.1e-6 (CPU, n = 256-1024, eps = 1e-3), so 1e-6 is not a fair stopping point")
    p.add_argument("--budget", type=float, default=60.0, help="seconds per otcore.sinkhorn run")
    p.add_argument("--pot-budget", type=float, default=None, help="seconds per POT run (default: --budget)")
    p.add_argument("--max-iter", type=int, default=200000, help="iteration cap of Sinkhorn / POT")
    p.add_argument("--newton-max-iter", type=int, default=100)
    p.add_argument("--table-n", type=int, default=500)
    p.add_argument("--table-tol", type=float, default=None, help="Table 1 tolerance (default: --tol)")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--table1-only", action="store_true")
    p.add_argument("--sweep-only", action="store_true")
    p.add_argument("--no-pot", action="store_true")
    p.add_argument("--host-cg", action="store_true", help="also SNS with the host-issued CG sweeps (CUDA)")
    p.add_argument("--out", default="bench/out/newton")
    if p.parse_known_args(argv)[0].quick:  # quick defaults; options given explicitly still win
        p.set_defaults(sizes=[64, 128], eps=[1e-2, 1e-3], dtypes=["float64"], table_n=100, pairs=1, budget=5.0,
                       max_iter=20000)
    args = p.parse_args(argv)
    if args.pot_budget is None:
        args.pot_budget = args.budget
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"# device {device}, torch {torch.__version__}, otcore from {os.path.dirname(otcore.__file__)}", flush=True)
    global COPY_BYTES_PER_S
    COPY_BYTES_PER_S, args.copy_source = copy_bandwidth(device)
    print(f"# dense-cost floors (Table 1): {describe(COPY_BYTES_PER_S, args.copy_source)}", flush=True)
    rows = []
    if not args.table1_only:
        for n in args.sizes:  # smallest first: a run cut by a time limit keeps every dtype of the small sizes
            for dt in args.dtypes:
                dtype = getattr(torch, dt)
                tol = args.tol if dtype == torch.float64 else max(args.tol, args.tol32)
                for eps in args.eps:
                    name, geom, a, b, cd = cloud_problem(n, dtype, device)
                    rows += compare(name, geom, a, b, cd, eps, dtype, tol, device, args, "sweep")
                    write(rows, args, device)
    if not args.sweep_only:
        eps, dtype = 1 / 1200, torch.float64
        probs = [random_assignment(args.table_n, dtype, device)]
        try:
            probs += [digits_problem(k, c, dtype, device) for c in ("L1", "L2") for k in range(args.pairs)]
        except ImportError as e:
            print(f"  digits problems skipped: scikit-learn not importable ({e})", flush=True)
        for name, geom, a, b, cd in probs:
            rows += compare(name, geom, a, b, cd, eps, dtype, args.table_tol or args.tol, device, args, "table1",
                            dense=True)
            write(rows, args, device)
    env = write(rows, args, device)
    print(f"wrote {args.out}/newton.csv and newton.json ({env})")


if __name__ == "__main__":
    main()
