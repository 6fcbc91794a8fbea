"""Benchmark: sparsity-constrained OT against POT, and the OT router against softmax top-k.

Part 1 (``solver``): ``otcore.sparse_ot`` (semi-dual, fp32) against POT's
``ot.smooth.smooth_ot_semi_dual(reg_type="sparsity_constrained")`` (NumPy + SciPy
L-BFGS-B, float64, CPU) on n = m points, x ~ U[0,1]^2, y ~ U[0.05,0.95]^2, squared
Euclidean cost, uniform weights, k = 4, gamma = 10 (the constraint binds). Reported:
POT's time and value; ours to our own stopping rule; and ours *to POT's value* (the
wall time when our objective first reaches the value POT stopped at) -- the
"same value" speedup.

Part 2 (``router``): forward + backward of :class:`otcore.SparseOTRouter` (capacity
mode, capacity factor 1.25, and token mode, k = 2) against a plain softmax top-2 router
(softmax, top-k, renormalized weights, Switch load-balancing loss) on random
``tokens x experts`` scores, ``loss = sum(weights * W)``. Median wall time of the
whole call (host syncs included: the OT solve has them).

    python bench/bench_sparse_ot.py                 # GPU: sizes of the issue
    python bench/bench_sparse_ot.py --quick         # CPU-sized smoke run
    python bench/bench_sparse_ot.py --part solver --sizes 256 2048 --out results.json

Results go to stdout as a table and, with ``--out``, to JSON (one record per row).
Timing is never done inside pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time
import warnings

import numpy as np
import torch

import otcore
from otcore.result import ConvergenceWarning
from otcore.solvers import sparse as S
from otcore.solvers._lbfgs import lbfgs


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _points(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=torch.float64)
    y = 0.05 + 0.9 * torch.rand(n, 2, generator=g, dtype=torch.float64)
    return x, y


def pot_solve(C: np.ndarray, k: int, gamma: float):
    """POT's semi-dual solver (its defaults: L-BFGS-B, stopThr 1e-9, 500 iterations)."""
    import ot

    n, m = C.shape
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # its projection prints shapes
        warnings.simplefilter("ignore")
        _, log = ot.smooth.smooth_ot_semi_dual(a, b, C, gamma, reg_type="sparsity_constrained", max_nz=k, log=True)
        elapsed = time.perf_counter() - t0
        reg = ot.smooth.SparsityConstrained(max_nz=k, gamma=gamma)
        value = ot.smooth.semi_dual_obj_grad(log["alpha"], a, b, C, reg)[0]
    return elapsed, float(value), int(log["res"].nit)


def ours_solve(C: torch.Tensor, k: int, gamma: float, backend: str, target: float | None, max_iter: int):
    """Our default solve, then the same L-BFGS again recording when the objective first reaches ``target``."""
    geom = otcore.CostMatrix(C)
    device = C.device
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        otcore.sparse_ot(geom, k=k, gamma=gamma, max_iter=5, backend=backend)  # warm-up (compilation)
        _sync(device)
        t0 = time.perf_counter()
        res = otcore.sparse_ot(geom, k=k, gamma=gamma, max_iter=max_iter, backend=backend)
        _sync(device)
        full = time.perf_counter() - t0
    reached = None
    if target is not None:
        pb, theta0, _ = S._make_problem(geom, None, None, k, gamma, "semi-dual", 0, "fixed", backend, "fp32", None)
        t0 = time.perf_counter()
        hit = []

        def evaluate(theta):
            out = pb.evaluate(theta)
            if not hit and -float(out[0][0]) >= target:  # one sync per evaluation
                hit.append(time.perf_counter() - t0)
            return out

        lbfgs(evaluate, theta0, S._first_step(pb), 1e-5, 1e-8, max_iter, 10, max_step=S._max_step(pb))
        reached = hit[0] if hit else None
    return full, float(res.value), res.n_iter, res.info["stop"], reached


def bench_solver(args, device) -> list[dict]:
    rows = []
    for n in args.sizes:
        x, y = _points(n, args.seed)
        C64 = torch.cdist(x, y) ** 2
        pot = pot_solve(C64.numpy(), args.k, args.gamma) if n <= args.pot_max else None
        C = C64.to(device=device, dtype=torch.float32)
        full, value, iters, stop, reached = ours_solve(C, args.k, args.gamma, args.backend, pot[1] if pot else None, args.max_iter)
        row = {"part": "solver", "device": str(device), "n": n, "k": args.k, "gamma": args.gamma,
               "ours_s": full, "ours_value": value, "ours_iters": iters, "ours_stop": stop}
        if pot:
            row.update(pot_s=pot[0], pot_value=pot[1], pot_iters=pot[2], ours_to_pot_value_s=reached,
                       speedup_same_value=(pot[0] / reached) if reached else None)
        rows.append(row)
        print(_fmt_solver(row), flush=True)
    return rows


def _fmt_solver(r):
    s = f"n={r['n']:6d} ours {r['ours_s']:8.3f}s value {r['ours_value']:.7g} ({r['ours_iters']} it, {r['ours_stop']})"
    if "pot_s" in r:
        to = "not reached" if r["ours_to_pot_value_s"] is None else f"{r['ours_to_pot_value_s']:.3f}s"
        sp = "" if r["speedup_same_value"] is None else f" -> {r['speedup_same_value']:.1f}x"
        s += f" | POT {r['pot_s']:8.3f}s value {r['pot_value']:.7g} ({r['pot_iters']} it) | ours to POT's value {to}{sp}"
    return s


def softmax_topk_router(scores: torch.Tensor, k: int):
    """Plain token-choice router: top-k of the softmax, renormalized, plus the Switch balance loss."""
    E = scores.shape[-1]
    probs = scores.softmax(-1)
    w, idx = probs.topk(k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    frac = torch.zeros(E, device=scores.device, dtype=scores.dtype).scatter_add_(0, idx.flatten(), torch.ones_like(w).flatten())
    aux = E * (frac / frac.sum() * probs.mean(0)).sum()
    return w, idx, aux


def _median_time(fn, device, reps):
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_router(args, device) -> list[dict]:
    rows = []
    for T in args.tokens:
        for E in args.experts:
            g = torch.Generator().manual_seed(args.seed)
            scores0 = torch.randn(T, E, generator=g).to(device)

            def softmax_step():
                s = scores0.clone().requires_grad_()
                w, _, aux = softmax_topk_router(s, 2)
                (w.sum() + aux).backward()

            base = _median_time(softmax_step, device, args.reps)
            for mode in ("capacity", "tokens"):
                router = otcore.SparseOTRouter(E, mode=mode, k=2, capacity_factor=1.25, gamma=args.router_gamma,
                                               max_iter=args.router_iter, plan_grad=args.plan_grad, backend=args.backend)
                info = {}

                def ot_step():
                    s = scores0.clone().requires_grad_()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", ConvergenceWarning)
                        out = router(s)
                    out.combine_weights.sum().backward()
                    info["iters"] = out.result.n_iter

                t = _median_time(ot_step, device, args.reps)
                row = {"part": "router", "device": str(device), "tokens": T, "experts": E, "mode": mode,
                       "softmax_top2_ms": 1e3 * base, "ot_ms": 1e3 * t, "ratio": t / base, "ot_iters": info["iters"],
                       "plan_grad": args.plan_grad}
                rows.append(row)
                print(f"T={T:6d} E={E:4d} {mode:8s} softmax-top2 {row['softmax_top2_ms']:8.3f} ms | OT {row['ot_ms']:9.3f} ms "
                      f"({row['ot_iters']} it) | ratio {row['ratio']:7.1f}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description="sparse OT vs POT; OT router vs softmax top-k")
    p.add_argument("--quick", action="store_true", help="CPU-sized run: n=256, tokens 4096, experts 8 and 64")
    p.add_argument("--part", choices=("solver", "router", "all"), default="all")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--pot-max", type=int, default=2048, help="skip POT above this n (it is O(n^2 log n) per step on CPU)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--gamma", type=float, default=10.0)
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--tokens", type=int, nargs="+", default=None)
    p.add_argument("--experts", type=int, nargs="+", default=None)
    p.add_argument("--router-gamma", type=float, default=0.1)
    p.add_argument("--router-iter", type=int, default=50)
    p.add_argument("--plan-grad", default="fixed", choices=("fixed", "implicit"))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.sizes = args.sizes or ([256] if args.quick else [256, 2048, 8192])
    args.tokens = args.tokens or ([4096] if args.quick else [4096, 65536])
    args.experts = args.experts or ([8, 64] if args.quick else [8, 64, 256])
    device = torch.device(args.device)
    print(f"# device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU, torch threads %d' % torch.get_num_threads()}), "
          f"torch {torch.__version__}, otcore {otcore.__version__}")
    rows = []
    if args.part in ("solver", "all"):
        rows += bench_solver(args, device)
    if args.part in ("router", "all"):
        rows += bench_router(args, device)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
