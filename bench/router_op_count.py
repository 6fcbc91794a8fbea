"""Tensor operations and host reads of one SparseOTRouter call (forward + backward), as it
is and as it was before 2026-12-01, counted through PyTorch's dispatcher.

On a GPU each counted operation is a kernel launch and each host read a synchronisation;
at router sizes they, not arithmetic, bound a call (docs/router.md#cost). Since then
capacity mode seeds its solve from the routing without the capacity, solved through the
expert duals by Newton steps (``SparseOTRouter._seed``), and the implicit plan gradient
solves its system directly (``sparse.DIRECT_MAX``); "before" undoes both (a cold capacity
solve, conjugate gradient: since 2026-12-02 with the semi-dual's products on the support,
not autograd's, 49-81 operations fewer). Same counts on any machine.

    python bench/router_op_count.py            # three sizes, plan_grad "fixed" and "implicit"
    python bench/router_op_count.py --sweep    # 243 settings, plan_grad "fixed" (~10 min on one CPU thread)
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import warnings

import torch

import otcore
import otcore.solvers.sparse as sparse_solver
from bench_sparse_ot import router_iters, weighted_sum
from lbfgs_op_count import OpCounter


def call(scores, now: bool, **kw):
    """One forward + backward, the router as it is (``now``) or as before 2026-12-01 (no
    seed: the capacity solve from zero; the implicit gradient by conjugate gradient); returns
    (output, operations, host reads). The loss is the benchmark's :func:`weighted_sum`."""
    router = otcore.SparseOTRouter(scores.shape[-1], **kw)
    if not now:
        router._seeded = False
    s = scores.clone().requires_grad_()
    counter = OpCounter()
    direct_max = sparse_solver.DIRECT_MAX
    try:
        if not now:
            sparse_solver.DIRECT_MAX = 0  # the implicit plan gradient by conjugate gradient
        with counter, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = router(s)
            weighted_sum(out.combine_weights).backward()
    finally:
        sparse_solver.DIRECT_MAX = direct_max
    return out, counter.counts["all"], counter.counts["host reads in all"]


def table():
    print(f"{'scores':>12} {'plan_grad':>9} | {'before: it':>10} {'ops':>6} {'reads':>5} | "
          f"{'now: it':>8} {'ops':>6} {'reads':>5} | ops ratio")
    for T, E in ((512, 8), (4096, 8), (4096, 64)):
        scores = torch.randn(T, E, generator=torch.Generator().manual_seed(0))
        for plan_grad in ("fixed", "implicit"):
            o0, n0, r0 = call(scores, False, plan_grad=plan_grad)
            o1, n1, r1 = call(scores, True, plan_grad=plan_grad)
            print(f"{f'{T} x {E}':>12} {plan_grad:>9} | {router_iters(o0.result):>10} {n0:>6} {r0:>5} | "
                  f"{router_iters(o1.result):>8} {n1:>6} {r1:>5} | {n1 / n0:.2f}", flush=True)


def sweep():
    """Settings: tokens, experts, gamma, capacity factor, score scale (float32, plan_grad "fixed")."""
    grid = list(itertools.product((64, 512, 2048), (4, 16, 64), (0.02, 0.1, 0.5), (1.0, 1.25, 2.0), (0.1, 1.0, 10.0)))
    both, slack, binds, only = [], [], [], {"before": 0, "now": 0, "neither": 0}
    total = [0, 0]
    for T, E, gamma, cf, scale in grid:
        scores = scale * torch.randn(T, E, generator=torch.Generator().manual_seed(T + E))
        kw = dict(gamma=gamma, capacity_factor=cf, plan_grad="fixed")
        (o0, n0, _), (o1, n1, _) = call(scores, False, **kw), call(scores, True, **kw)
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
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sweep() if args.sweep else table()


if __name__ == "__main__":
    main()
