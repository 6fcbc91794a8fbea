"""Host synchronisations per Newton iteration of sinkhorn_newton, counted on any machine.

On a GPU each read of a device value by the host (``bool``/``float``/``int``/``item`` of a
tensor, ``tolist``; counted by ``lbfgs_op_count.OpCounter``) waits for the queue to drain. The count per Newton iteration is taken
as (syncs of a full solve - syncs of the same solve stopped after one Newton iteration)
/ (Newton iterations - 1), so the warm-up and the result's set-up cancel.

    python bench/newton_sync_count.py
"""

from __future__ import annotations

import warnings

import torch
from lbfgs_op_count import OpCounter  # its host-read count (bench/ is the script's directory)

import otcore


def syncs(geom, eps, **kw):
    with OpCounter("solve") as counter:
        result = otcore.sinkhorn_newton(geom, eps=eps, **kw)
    return result, counter.counts["host reads in solve"]


def main():
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    cases = {
        "200 x 150 cloud, eps = 1e-2": (otcore.PointCloud(torch.rand(200, 2, dtype=torch.float64),
                                                          torch.rand(150, 2, dtype=torch.float64)), 1e-2),
        "300 x 300 random assignment, eps = 1/1200": (otcore.CostMatrix(torch.rand(300, 300, dtype=torch.float64)),
                                                      1 / 1200),
    }
    print(f"{'problem':<44} {'Newton its':>10} {'CG / Newton it':>15} {'syncs / Newton it':>18}")
    for name, (geom, eps) in cases.items():
        full, n_full = syncs(geom, eps, tol=1e-8)
        _, n_one = syncs(geom, eps, tol=1e-8, max_iter=1)
        its = full.info["newton_iter"]
        print(f"{name:<44} {its:>10} {full.info['cg_iter'] / its:>15.1f} {(n_full - n_one) / max(its - 1, 1):>18.1f}")


if __name__ == "__main__":
    main()
