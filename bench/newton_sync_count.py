"""Host synchronisations (and, on the Triton backend, launches) per Newton iteration of
sinkhorn_newton, counted on any machine.

On a GPU each read of a device value by the host (``bool``/``float``/``int``/``item`` of a
tensor, ``tolist``; counted by ``lbfgs_op_count.OpCounter``) waits for the queue to drain,
and each Triton launch and torch operation that computes costs the host microseconds. The
count per Newton iteration is taken as (count of the solve stopped after k - 1 Newton
iterations - count of it stopped after one) / (k - 2), k the iterations of the full
solve: the warm-up, the result's set-up and the unconverged result's warning cancel.

    python bench/newton_sync_count.py                                   # torch backend
    TRITON_INTERPRET=1 python bench/newton_sync_count.py --backend triton  # the kernels (interpreter)
    TRITON_INTERPRET=1 python bench/newton_sync_count.py --backend triton --host-cg

With the Triton backend each Newton step's conjugate-gradient solve is one launch
(:mod:`otcore.kernels.sparse_cg`) that reads nothing back; ``--host-cg`` runs the
host-issued sweeps instead (:mod:`otcore.kernels.sparse_cg_steps`, as systems past
``FUSED_MAX_ENTRIES`` do: four launches per CG iteration), which (like the torch backend)
read their stopping test every 8 CG iterations.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import warnings

import torch
from lbfgs_op_count import OpCounter  # its host-read count (bench/ is the script's directory)

import otcore
from otcore.kernels import sparse_cg, sparse_cg_steps


def counts(geom, eps, backend, **kw):
    """The result and the counts of one solve: host reads, and on the Triton backend the
    torch operations that compute and the Triton launches (sinkhorn_launch_count's counters)."""
    with contextlib.ExitStack() as stack:
        if backend == "triton":
            from sinkhorn_launch_count import ComputeCounter, LaunchCounter
            from otcore.kernels import plan, softmin, sparse

            ops = stack.enter_context(ComputeCounter("solve"))
            launches = [stack.enter_context(LaunchCounter(mod, ops)) for mod in (softmin, plan, sparse, sparse_cg,
                                                                                    sparse_cg_steps)]
        else:
            ops, launches = stack.enter_context(OpCounter("solve")), []
        result = otcore.sinkhorn_newton(geom, eps=eps, backend=backend, **kw)
    out = collections.Counter(syncs=ops.counts["host reads in solve"], torch_ops=ops.counts["solve"])
    out["triton"] = sum(sum(c.launches.values()) for c in launches)
    return result, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch", choices=("torch", "triton"))
    parser.add_argument("--host-cg", action="store_true",
                        help="Triton backend: the host-issued CG sweeps (kernels/sparse_cg_steps.py, as for systems "
                             "past sparse_cg.FUSED_MAX_ENTRIES), not the one-launch solve")
    args = parser.parse_args()
    if args.backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--backend triton on a CPU needs TRITON_INTERPRET=1")
    if args.host_cg:
        sparse_cg.FUSED_MAX_ENTRIES = 0
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    cases = {
        "200 x 150 cloud, eps = 1e-2": (otcore.PointCloud(torch.rand(200, 2, dtype=torch.float64),
                                                          torch.rand(150, 2, dtype=torch.float64)), 1e-2),
        "300 x 300 random assignment, eps = 1/1200": (otcore.CostMatrix(torch.rand(300, 300, dtype=torch.float64)),
                                                      1 / 1200),
    }
    print(f"# per Newton iteration, backend {args.backend}" + (", host-issued CG" if args.host_cg else ""))
    print(f"{'problem':<44} {'Newton its':>10} {'CG':>6} {'syncs':>6} {'triton':>7} {'torch ops':>9}")
    for name, (geom, eps) in cases.items():
        full, _ = counts(geom, eps, args.backend, tol=1e-8)
        its = full.info["newton_iter"]
        _, one = counts(geom, eps, args.backend, tol=1e-8, max_iter=1)
        _, last = counts(geom, eps, args.backend, tol=1e-8, max_iter=its - 1)
        per = {k: (last[k] - one[k]) / max(its - 2, 1) for k in ("syncs", "triton", "torch_ops")}
        print(f"{name:<44} {its:>10} {full.info['cg_iter'] / its:>6.1f} {per['syncs']:>6.1f} {per['triton']:>7.1f} "
              f"{per['torch_ops']:>9.1f}")


if __name__ == "__main__":
    main()
