"""Benchmark: sparsity-constrained OT against POT, and the OT router against softmax top-k.

Part 1 (``solver``): ``otcore.sparse_ot`` (semi-dual, fp32) against POT's
``ot.smooth.smooth_ot_semi_dual(reg_type="sparsity_constrained")`` (NumPy + SciPy
L-BFGS-B, float64, CPU) on n = m points, x ~ U[0,1]^2, y ~ U[0.05,0.95]^2, squared
Euclidean cost, uniform weights, k = 4, gamma = 10 (the constraint binds). First a
correctness check (n <= ``--check-max``): our value against the same problem solved in
float64 on the torch path to a tight tolerance. Reported: POT's time and value; ours to
our own stopping rule; ours *to POT's value* (the wall time when our objective first
reaches the value POT stopped at, along the solver's path: its relaxed start, timed
whole, then L-BFGS) -- the "same value" speedup (target: >= 100x at n = 2048); the same
from zero (``relaxed_start=False``, the default before 2026-12-02); and the time per
objective evaluation as a fraction of the floor of one
read of C at copy bandwidth (dense-input target 80%): ``$OTCORE_COPY_BPS`` (set by
gpu_check.sh from its measurement), else measured now on CUDA (a device-to-device copy
timed with CUDA events), else the targets' H100 2.9e12 B/s; the one used is printed.

POT runs on the CPU whatever the device, and its result depends only on (n, k, gamma,
seed): ``--pot-only --pot-ref FILE`` measures it and writes FILE (JSON), and
``--pot-ref FILE`` reuses those entries instead of running POT again (so a GPU run
need not spend its time limit on POT, or can do without POT installed).
``bench/data/pot_sparse_ref.json`` holds such entries measured on a CPU machine. An
entry not measured on this machine since its last boot (``--pot-only`` records the
kernel's boot id as ``host_id``; the stored entries have none) makes the speedup
*provisional*: the row says so (``pot_provisional``), since the stored reference was
measured on a shared 2-core machine and is pessimistic for POT.

Part 2 (``router``): forward + backward of :class:`otcore.SparseOTRouter` (capacity
mode, capacity factor 1.25, and token mode, k = 2) against a plain softmax top-2 router
(softmax, top-k, renormalized weights, Switch load-balancing loss) on random
``tokens x experts`` scores, ``loss = sum(weights * W)``. Median wall time of the
whole call (host syncs included: the OT solve has them); target: ratio <= 2.
Checked first: weights finite and >= 0, every expert's load ``tokens / experts``
(capacity mode) or every token's weights summing to 1 (token mode).

    python bench/bench_sparse_ot.py                 # GPU: sizes of the issue
    python bench/bench_sparse_ot.py --quick         # CPU-sized smoke run
    python bench/bench_sparse_ot.py --part solver --sizes 256 2048 --out results.json
    python bench/bench_sparse_ot.py --pot-only --sizes 2048 --pot-ref pot_ref.json  # POT alone, CPU

Results go to stdout as a table and, with ``--out``, to JSON (one record per row,
rewritten after every row).
Timing is never done inside pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: backend="triton" runs in the interpreter

import otcore  # noqa: E402
from otcore._progress import Progress  # noqa: E402
from otcore.result import ConvergenceWarning  # noqa: E402
from otcore.solvers import sparse as S  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bandwidth import copy_bandwidth, describe  # noqa: E402

POT_SPEEDUP_TARGET = 100.0
ROUTER_RATIO_TARGET = 2.0


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


def host_id() -> str:
    """This machine, this boot: Linux's boot id, else the host name."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return platform.node() or "?"


def pot_key(n, k, gamma, seed):
    return f"n={n},k={k},gamma={gamma:g},seed={seed}"


def load_pot_ref(path):
    if path and os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    return {}


def pot_reference(args, n, C64, refs):
    """POT's (time, value, iterations, source, provisional) for this problem: from
    ``--pot-ref`` when it holds the entry (provisional unless measured on this machine
    since its last boot), else measured now when POT is importable and n <= --pot-max."""
    key = pot_key(n, args.k, args.gamma, args.seed)
    if key in refs:
        r = refs[key]
        provisional = r.get("host_id") != host_id()  # measured elsewhere (or before a reboot)
        return r["pot_s"], r["pot_value"], r["pot_iters"], f"{args.pot_ref} ({r.get('machine', '?')})", provisional
    if n > args.pot_max:
        return None
    try:
        import ot  # noqa: F401
    except ImportError as e:
        print(f"  POT skipped: not importable ({e}) and no --pot-ref entry for {key}", flush=True)
        return None
    t, value, iters = pot_solve(C64.numpy(), args.k, args.gamma)
    return t, value, iters, "measured now", False


def check_value(C64, k, gamma, value, device):
    """Our (fp32) value against the float64 torch-path solve to a tight tolerance."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = otcore.sparse_ot(otcore.CostMatrix(C64.to(device)), k=k, gamma=gamma, backend="torch", tol=1e-9,
                               ftol=1e-14, max_iter=5000)
    return float(ref.value), abs(value - float(ref.value)) / abs(float(ref.value)), float(ref.marginal_error)


class _Reached(Exception):
    """Raised by the evaluation that first reaches the target value: ends a timed run there."""


def to_value(pb, theta0, target: float | None, relaxed: bool, max_iter: int, device):
    """Along the solver's own path from ``theta0``: with ``relaxed`` its relaxed start
    (Newton on the problem without ``k``, timed whole: its passes evaluate that problem's
    objective, below this one's, so none of them is tested against ``target``), then its
    L-BFGS with its settings; without, L-BFGS from zero (``relaxed_start=False``). Returns the
    wall time at which the objective first reaches ``target`` (None: not within
    ``max_iter``; the run stops there), the L-BFGS evaluations made, their seconds, and the
    relaxed start's seconds and iterations. One sync per evaluation (the test)."""
    evals = [0]
    _sync(device)
    t0 = time.perf_counter()
    theta, used, relaxed_s = theta0, 0, 0.0
    if relaxed:
        theta, its = S._relaxed_start(pb, theta0, "auto", 1e-5, 1e-8, max_iter, 10, Progress(False, "bench"))[:2]
        used = int(its[0])
        _sync(device)
        relaxed_s = time.perf_counter() - t0

    def evaluate(theta):
        out = pb.evaluate(theta)
        evals[0] += 1
        if target is not None and -float(out[0][0]) >= target:
            raise _Reached(time.perf_counter() - t0)
        return out

    try:
        S.run_lbfgs(pb, evaluate, theta, 1e-5, 1e-8, max_iter - used, 10)  # the solver's own L-BFGS and settings
        reached = None
    except _Reached as hit:
        reached = hit.args[0]
    _sync(device)
    return reached, evals[0], time.perf_counter() - t0 - relaxed_s, relaxed_s, used


def ours_solve(C: torch.Tensor, k: int, gamma: float, backend: str, target: float | None, max_iter: int):
    """Our default solve (its own stop), the value's backward after it (its cost gradient:
    at a kink the plan mixed over the tied supports, docs/sparse_ot.md#gradients), then the
    time to ``target`` along its path (the relaxed start, then L-BFGS) and along L-BFGS from
    zero (the default before 2026-12-02), and the time per evaluation in the L-BFGS loop
    (from zero)."""
    geom = otcore.CostMatrix(C)
    device = C.device
    Cg = C.detach().clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        otcore.sparse_ot(geom, k=k, gamma=gamma, max_iter=5, backend=backend)  # warm-up (compilation)
        _sync(device)
        t0 = time.perf_counter()
        res = otcore.sparse_ot(otcore.CostMatrix(Cg), k=k, gamma=gamma, max_iter=max_iter, backend=backend)
        _sync(device)
        full = time.perf_counter() - t0
    t0 = time.perf_counter()
    (G,) = torch.autograd.grad(res.value, Cg)
    _sync(device)
    backward = time.perf_counter() - t0
    T = res.to_dense().detach()
    n = C.shape[0]
    pb, theta0, _ = S._make_problem(geom, None, None, k, gamma, "semi-dual", 0, "fixed", backend, "fp32", None, 1e-5)
    if target is None:  # no POT value (sizes past --pot-max): nothing to reach, and a relaxed path
        # and 1000 L-BFGS iterations measured nothing (~10 s at 8192 on the H200, a review); 100
        # iterations from zero give the time per evaluation in the loop
        reached = evals = relaxed_s = relaxed_iter = None
        cold, cold_evals, cold_s, _, _ = to_value(pb, theta0, None, False, min(max_iter, 100), device)
    else:
        reached, evals, _, relaxed_s, relaxed_iter = to_value(pb, theta0, target, True, max_iter, device)
        cold, cold_evals, cold_s, _, _ = to_value(pb, theta0, target, False, max_iter, device)
    return dict(ours_s=full, ours_value=float(res.value.detach()), ours_iters=res.n_iter, ours_stop=res.info["stop"],
                value_backward_s=backward, value_grad_mixed=not torch.equal(G, T),
                value_grad_row_error=float((G.sum(1) - 1 / n).abs().sum()),
                ours_solver=res.info["solver"], ours_marginal_error=float(res.marginal_error),
                ours_to_pot_value_s=reached, relaxed_s=relaxed_s, relaxed_iter=relaxed_iter, evals_to_pot=evals,
                cold_to_pot_value_s=cold, cold_evals_to_pot=cold_evals, eval_ms=1e3 * cold_s / max(cold_evals, 1),
                evals=cold_evals, kernel_ms=evaluation_ms(pb, theta0, device))


def evaluation_ms(pb, theta, device, reps: int = 20) -> float:
    """One objective + gradient evaluation alone (the k-sparse kernel pass and its
    reductions), median of ``reps`` back-to-back calls, without the L-BFGS loop's host work
    (``eval_ms`` is the whole loop per evaluation)."""
    pb.evaluate(theta)
    runs = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            pb.evaluate(theta)
            end.record()
            end.synchronize()
            runs.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            pb.evaluate(theta)
            runs.append(1e3 * (time.perf_counter() - t))
    return statistics.median(runs)


def bench_solver(args, device, emit) -> list[dict]:
    rows = []
    copy_bps, source = copy_bandwidth(device)
    print(f"# floors: one read of C at {describe(copy_bps, source)}", flush=True)
    refs = load_pot_ref(args.pot_ref)
    for n in args.sizes:
        x, y = _points(n, args.seed)
        C64 = torch.cdist(x, y) ** 2
        row = {"part": "solver", "device": str(device), "n": n, "k": args.k, "gamma": args.gamma}
        C = C64.to(device=device, dtype=torch.float32)
        pot = pot_reference(args, n, C64, refs)
        row.update(ours_solve(C, args.k, args.gamma, args.backend, pot[1] if pot else None, args.max_iter))
        floor_ms = 1e3 * n * n * 4 / copy_bps
        row.update(floor_ms_per_eval=floor_ms, floor_fraction=floor_ms / row["kernel_ms"], copy_Bps=copy_bps,
                   copy_source=source)
        if n <= args.check_max:
            ref_value, rel, ref_err = check_value(C64, args.k, args.gamma, row["ours_value"], device)
            row.update(ref64_value=ref_value, value_relerr_vs_f64=rel, ref64_marginal_error=ref_err)
        if pot:
            reached = row["ours_to_pot_value_s"]
            cold = row["cold_to_pot_value_s"]
            row.update(pot_s=pot[0], pot_value=pot[1], pot_iters=pot[2], pot_source=pot[3],
                       pot_provisional=pot[4],
                       speedup_same_value=(pot[0] / reached) if reached else None,
                       cold_speedup_same_value=(pot[0] / cold) if cold else None)
        rows.append(row)
        emit(row)
        print(_fmt_solver(row), flush=True)
    return rows


def _fmt_solver(r):
    s = (f"n={r['n']:6d} ours {r['ours_s']:8.3f}s value {r['ours_value']:.7g} ({r['ours_iters']} it, {r['ours_stop']}, "
         f"marginal err {r['ours_marginal_error']:.1e}) | one evaluation {r['kernel_ms']:.3f} ms = "
         f"{r['floor_fraction']:.1%} of one read of C at {r['copy_Bps'] / 1e12:.3g} TB/s; "
         f"{r['eval_ms']:.3f} ms per evaluation in the L-BFGS loop | value backward {r['value_backward_s']:.3f}s "
         f"({'the plan mixed at a kink' if r['value_grad_mixed'] else 'the plan'}; its row sums off by "
         f"{r['value_grad_row_error']:.1e})")
    if "value_relerr_vs_f64" in r:
        s += f" | value vs float64 torch {r['value_relerr_vs_f64']:.1e}"
    if "pot_s" in r:
        to = "not reached" if r["ours_to_pot_value_s"] is None else f"{r['ours_to_pot_value_s']:.3f}s"
        sp = ""
        if r["speedup_same_value"] is not None:
            sp = f" -> {r['speedup_same_value']:.1f}x (target >= {POT_SPEEDUP_TARGET:g}x at n=2048)"
            if r.get("pot_provisional"):
                sp += " provisional (stored POT reference)"
        cold = "not reached" if r["cold_to_pot_value_s"] is None else f"{r['cold_to_pot_value_s']:.3f}s"
        s += (f" | POT {r['pot_s']:8.3f}s value {r['pot_value']:.7g} ({r['pot_iters']} it; {r['pot_source']})"
              f" | ours to POT's value {to} (relaxed start {r['relaxed_s']:.3f}s, {r['relaxed_iter']} it, then "
              f"{r['evals_to_pot']} L-BFGS evaluations){sp} | from zero (relaxed_start=False) {cold} "
              f"({r['cold_evals_to_pot']} evaluations)")
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


#: the largest relative deviation of the exact sums a router check accepts (float32 rounding
#: of a sum of up to 65,536 weights is ~1e-5 at most)
ROUTER_SUM_TOL = 1e-4


def router_check(out, mode, T, E):
    """Invariants of a router output: finite non-negative weights, and exact sums (within
    :data:`ROUTER_SUM_TOL`): capacity mode, every expert's load is T/E (semi-dual); token
    mode, every token's weights sum to 1. ``(ok, deviation)``: the deviation is checked,
    not only printed (a check that cannot fail on its main invariant, a review)."""
    w = out.combine_weights.detach().double()
    if mode == "capacity":
        dev = float((w.sum(-1) - T / E).abs().max() / (T / E))
    else:
        dev = float((w.sum(-1) - 1).abs().max())
    ok = bool(torch.isfinite(w).all()) and bool((w >= 0).all()) and dev <= ROUTER_SUM_TOL
    return ok, dev


def weighted_sum(w: torch.Tensor) -> torch.Tensor:
    """The router's loss in the benchmark: the combine weights weighed by fixed random
    numbers (their plain sum has a zero plan gradient, every expert's load being fixed, so
    the implicit gradient's solve would have nothing to do)."""
    g = torch.Generator().manual_seed(1)
    return (w * torch.randn(w.shape, generator=g).to(w.device, w.dtype)).sum()


def router_iters(res) -> str:
    """A router call's L-BFGS iterations: ``"seed+capacity"`` in capacity mode (the seed
    through the expert duals, then the capacity solve), the solve's in token mode; the
    largest of a batch."""
    n = str(int(torch.as_tensor(res.n_iter).max()))
    return f"{int(torch.as_tensor(res.info['seed_iter']).max())}+{n}" if "seed_iter" in res.info else n


def _warm_router_time(kw, scores0, device, reps, seed, drift=0.01):
    """Forward + backward of a ``warm_start=True`` router as in training: each step's scores
    are the previous ones plus ``drift`` x N(0, 1) (a random walk, fixed by ``seed``), and
    each solve starts from the previous step's duals. Returns (median seconds, the
    median step's iterations, :func:`router_iters`)."""
    router = otcore.SparseOTRouter(warm_start=True, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    steps = [scores0]
    for _ in range(reps):
        steps.append(steps[-1] + drift * torch.randn(scores0.shape, generator=g).to(device))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        router(scores0.clone())  # the first solve, cold: primes the duals
        times, iters = [], []
        for s0 in steps[1:]:
            s = s0.clone().requires_grad_()
            _sync(device)
            t0 = time.perf_counter()
            out = router(s)
            weighted_sum(out.combine_weights).backward()
            _sync(device)
            times.append(time.perf_counter() - t0)
            iters.append(router_iters(out.result))
    order = sorted(range(len(times)), key=times.__getitem__)
    mid = order[len(order) // 2]
    return times[mid], iters[mid]


def bench_router(args, device, emit) -> list[dict]:
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
            def router_kw(mode):
                return dict(n_experts=E, mode=mode, k=2, capacity_factor=1.25, gamma=args.router_gamma,
                            max_iter=args.router_iter, plan_grad=args.plan_grad, backend=args.backend)

            for mode in ("capacity", "tokens"):
                router = otcore.SparseOTRouter(**router_kw(mode))
                info = {}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    ok, dev = router_check(router(scores0.clone()), mode, T, E)
                print(f"  check T={T} E={E} {mode}: weights finite and >= 0 and "
                      f"{'max |load - T/E| / (T/E)' if mode == 'capacity' else 'max |token sum - 1|'} = {dev:.1e} "
                      f"<= {ROUTER_SUM_TOL:g}: {ok}", flush=True)

                def ot_step():
                    s = scores0.clone().requires_grad_()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", ConvergenceWarning)
                        out = router(s)
                    weighted_sum(out.combine_weights).backward()
                    info["iters"] = router_iters(out.result)

                t = _median_time(ot_step, device, args.reps)
                t_warm, warm_iters = _warm_router_time(router_kw(mode), scores0, device, args.reps, args.seed)
                row = {"part": "router", "device": str(device), "tokens": T, "experts": E, "mode": mode,
                       "softmax_top2_ms": 1e3 * base, "ot_ms": 1e3 * t, "ratio": t / base, "ot_iters": info["iters"],
                       "ot_warm_ms": 1e3 * t_warm, "ratio_warm": t_warm / base, "ot_warm_iters": warm_iters,
                       "plan_grad": args.plan_grad, "check_ok": ok, "check_deviation": dev}
                rows.append(row)
                emit(row)
                print(f"T={T:6d} E={E:4d} {mode:8s} softmax-top2 {row['softmax_top2_ms']:8.3f} ms | OT {row['ot_ms']:9.3f} ms "
                      f"({row['ot_iters']} it) | ratio {row['ratio']:7.1f} (target <= {ROUTER_RATIO_TARGET:g}) | "
                      f"warm start {row['ot_warm_ms']:9.3f} ms ({warm_iters} it) ratio {row['ratio_warm']:7.1f}", flush=True)
    return rows


def pot_only(args):
    """Measure POT at ``args.sizes`` and merge the entries into ``--pot-ref``."""
    import ot

    refs = load_pot_ref(args.pot_ref)
    for n in args.sizes:
        x, y = _points(n, args.seed)
        t, value, iters = pot_solve((torch.cdist(x, y) ** 2).numpy(), args.k, args.gamma)
        refs[pot_key(n, args.k, args.gamma, args.seed)] = dict(
            pot_s=t, pot_value=value, pot_iters=iters, pot_version=ot.__version__, host_id=host_id(),
            machine=f"{platform.node() or '?'}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
        print(f"POT n={n}: {t:.2f}s value {value:.9g} ({iters} it)", flush=True)
        if args.pot_ref:
            with open(args.pot_ref, "w") as fh:
                json.dump(refs, fh, indent=1)
    return refs


def main(argv=None):
    p = argparse.ArgumentParser(description="sparse OT vs POT; OT router vs softmax top-k")
    p.add_argument("--quick", action="store_true", help="CPU-sized run: n=256, tokens 4096, experts 8 and 64")
    p.add_argument("--part", choices=("solver", "router", "all"), default="all")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--pot-max", type=int, default=2048, help="skip POT above this n (it is O(n^2 log n) per step on CPU)")
    p.add_argument("--pot-ref", default=None, help="JSON of POT results to reuse (or, with --pot-only, to write)")
    p.add_argument("--pot-only", action="store_true", help="only measure POT at --sizes and write --pot-ref")
    p.add_argument("--check-max", type=int, default=2048, help="largest n checked against a float64 torch solve")
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
    if args.pot_only:
        return pot_only(args)
    device = torch.device(args.device)
    print(f"# device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU, torch threads %d' % torch.get_num_threads()}), "
          f"torch {torch.__version__}, otcore {otcore.__version__} from {os.path.dirname(otcore.__file__)}", flush=True)
    rows = []

    def emit(row):
        """Record a row and rewrite --out, so a run stopped by a time limit keeps what finished."""
        rows.append(row)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)

    if args.part in ("solver", "all"):
        bench_solver(args, device, emit)
    if args.part in ("router", "all"):
        bench_router(args, device, emit)
    return rows


if __name__ == "__main__":
    main()
