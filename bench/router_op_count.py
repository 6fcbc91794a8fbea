"""Tensor operations and host reads of one SparseOTRouter call (forward + backward), as it
is and as it was before 2026-12-01, counted through PyTorch's dispatcher.

On a GPU each counted operation is a kernel launch and each host read a synchronisation;
at router sizes they, not arithmetic, bound a call (docs/router.md#cost). Since then
capacity mode seeds its solve from the routing without the capacity, solved through the
expert duals by Newton steps (``SparseOTRouter._seed``), and the implicit plan gradient
solves its system directly (``sparse.DIRECT_MAX``); "before" undoes both (a cold capacity
solve, conjugate gradient: since 2026-12-02 with the semi-dual's products on the support,
not autograd's, 49-81 operations fewer). Same counts on any machine.

By default the router runs on the CPU's path (``backend="auto"``: the torch twins), whose
k-sparse pass is ~50 operations per evaluation; ``--backend triton`` counts the GPU's
path, where that pass is one Triton launch (the kernels run under the interpreter).

    python bench/router_op_count.py            # three sizes, plan_grad "fixed" and "implicit"
    TRITON_INTERPRET=1 python bench/router_op_count.py --backend triton   # the GPU's path, two sizes (~15 min)
    python bench/router_op_count.py --sweep    # 243 settings, plan_grad "fixed" (~10 min on one CPU thread)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import warnings

import torch

import otcore
import otcore.solvers.sparse as sparse_solver
from bench_sparse_ot import router_iters, weighted_sum
from lbfgs_op_count import OpCounter


def call(scores, now: bool, backend: str = "auto", **kw):
    """One forward + backward, the router as it is (``now``) or as before 2026-12-01 (no
    seed: the capacity solve from zero; the implicit gradient by conjugate gradient); returns
    (output, operations, host reads, Triton launches). The loss is the benchmark's
    :func:`weighted_sum`. ``backend="triton"`` (under ``TRITON_INTERPRET=1``): the GPU's
    path, the k-sparse pass a Triton launch (counted apart, the interpreter's own copies
    inside it not counted) instead of the torch twin's ~50 operations."""
    router = otcore.SparseOTRouter(scores.shape[-1], backend=backend, **kw)
    if not now:
        router._seeded = False
    s = scores.clone().requires_grad_()
    direct_max = sparse_solver.DIRECT_MAX
    with contextlib.ExitStack() as stack:
        if backend == "triton":
            from sinkhorn_launch_count import ComputeCounter, LaunchCounter  # (it needs TRITON_INTERPRET=1)

            from otcore.kernels import ksparse
            counter = stack.enter_context(ComputeCounter("all"))
            launches = stack.enter_context(LaunchCounter(ksparse, counter)).launches
        else:
            counter, launches = stack.enter_context(OpCounter()), {}
        try:
            if not now:
                sparse_solver.DIRECT_MAX = 0  # the implicit plan gradient by conjugate gradient
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = router(s)
                weighted_sum(out.combine_weights).backward()
        finally:
            sparse_solver.DIRECT_MAX = direct_max
    return out, counter.counts["all"], counter.counts["host reads in all"], sum(launches.values())


def table(backend: str):
    """``backend="triton"``: operations are the torch operations plus the Triton launches
    (each a launch on a GPU), listed apart as ``triton``."""
    launches = backend == "triton"
    head = f"{'ops':>6} {'triton':>6}" if launches else f"{'ops':>6}"
    print(f"{'scores':>12} {'plan_grad':>9} | {'before: it':>10} {head} {'reads':>5} | "
          f"{'now: it':>8} {head} {'reads':>5} | ops ratio")
    # (under the interpreter 4096 x 64 took over 20 minutes: left out there)
    for T, E in ((512, 8), (4096, 8)) if launches else ((512, 8), (4096, 8), (4096, 64)):
        scores = torch.randn(T, E, generator=torch.Generator().manual_seed(0))
        for plan_grad in ("fixed", "implicit"):
            o0, n0, r0, l0 = call(scores, False, backend, plan_grad=plan_grad)
            o1, n1, r1, l1 = call(scores, True, backend, plan_grad=plan_grad)
            c0 = f"{n0 + l0:>6} {l0:>6}" if launches else f"{n0:>6}"
            c1 = f"{n1 + l1:>6} {l1:>6}" if launches else f"{n1:>6}"
            print(f"{f'{T} x {E}':>12} {plan_grad:>9} | {router_iters(o0.result):>10} {c0} {r0:>5} | "
                  f"{router_iters(o1.result):>8} {c1} {r1:>5} | {(n1 + l1) / (n0 + l0):.2f}", flush=True)


def sweep():
    """Settings: tokens, experts, gamma, capacity factor, score scale (float32, plan_grad "fixed")."""
    grid = list(itertools.product((64, 512, 2048), (4, 16, 64), (0.02, 0.1, 0.5), (1.0, 1.25, 2.0), (0.1, 1.0, 10.0)))
    both, slack, binds, only = [], [], [], {"before": 0, "now": 0, "neither": 0}
    total = [0, 0]
    for T, E, gamma, cf, scale in grid:
        scores = scale * torch.randn(T, E, generator=torch.Generator().manual_seed(T + E))
        kw = dict(gamma=gamma, capacity_factor=cf, plan_grad="fixed")
        (o0, n0, _, _), (o1, n1, _, _) = call(scores, False, **kw), call(scores, True, **kw)
        total[0] += n0
        total[1] += n1
        c0, c1 = o0.result.converged, o1.result.converged
        if c0 and c1:
            both.append(n1 / n0)
            (slack if o1.result.n_iter == 0 else binds).append(n1 / n0)
        else:
            only["before" if c0 else "now" if c1 else "neither"] += 1
    print(f"{len(grid)} settings; both converged in {len(both)}: now / before operations median "
          f"{statistics.median(both):.2f}")
    for name, r in (("capacity slack (0 capacity iterations)", slack), ("capacity binds", binds)):
        if r:
            print(f"  {name}: {len(r)} settings, median {statistics.median(r):.2f}, range {min(r):.2f}-{max(r):.2f}")
    print(f"converged only before: {only['before']}, only now: {only['now']}, neither: {only['neither']}")
    print(f"operations in all: before {total[0]}, now {total[1]} ({total[1] / total[0]:.2f})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="the 243-setting comparison instead of the table")
    p.add_argument("--backend", choices=("auto", "triton"), default="auto",
                   help="triton: the GPU's path under TRITON_INTERPRET=1 (the table only; slower)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--backend triton needs TRITON_INTERPRET=1 (the kernels run under the interpreter)")
    sweep() if args.sweep else table(args.backend)


if __name__ == "__main__":
    main()
