"""How far below its optimum sparse_ot's L-BFGS stops when k binds (CPU, float64).

When ``k`` binds, the (semi-)dual of sparsity-constrained OT is concave but not smooth
at its optimum (rows tie for a column's k-th place), and quasi-Newton methods stall
below it. This script measures the relative gap ``(optimum - value) / optimum``:

- ``k = 1``: the semi-dual is the unregularized OT semi-dual plus ``(gamma/2)|b|^2``, so
  the optimum is exact: the LP value (``scipy.optimize.linprog``, HiGHS) plus that constant.
- ``k = 2``: no closed form; the reference is the best value any run reached, including
  a long run with ``history=300`` -- a lower bound of the optimum, so the gaps printed
  are lower bounds too.

Problems: ``C ~ U[0,1]^(n x m)``, random weights, float64, ``tol=1e-12`` (so only
``ftol`` or ``max_iter`` stop), ``max_iter=3000``; POT's ``smooth_ot_semi_dual``
(L-BFGS-B) for comparison when POT is installed.

    python bench/sparse_ot_accuracy.py            # about 6 minutes on one CPU core
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import warnings

import numpy as np
import torch
from scipy.optimize import linprog

import otcore

try:
    import ot
except ImportError:  # POT is optional here
    ot = None


def problem(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    C = torch.rand(n, m, dtype=torch.float64, generator=g)
    a = torch.rand(n, dtype=torch.float64, generator=g)
    b = torch.rand(m, dtype=torch.float64, generator=g)
    return C, a / a.sum(), b / b.sum()


def lp_value(C, a, b):
    n, m = C.shape
    A_eq = np.vstack([np.kron(np.eye(n), np.ones(m)), np.kron(np.ones(n), np.eye(m))])
    res = linprog(C.numpy().ravel(), A_eq=A_eq, b_eq=np.concatenate([a.numpy(), b.numpy()]),
                  bounds=(0, None), method="highs")
    assert res.status == 0, res.message
    return float(res.fun)


def semi_dual(alpha, C, a, b, k, gamma):
    """The semi-dual objective at ``alpha``, written out in NumPy (independent of otcore)."""
    total = float(alpha @ a)
    for j in range(C.shape[1]):
        u = np.sort(alpha - C[:, j])[::-1][:k]  # the k largest scores of column j
        thr = np.max((np.cumsum(u) - gamma * b[j]) / np.arange(1, len(u) + 1))
        t = np.maximum(u - thr, 0.0) / gamma  # the column of the plan, sums to b_j
        total -= float(t @ u - 0.5 * gamma * (t @ t))
    return total


def pot_value(C, a, b, k, gamma):
    """POT's semi-dual optimum: the objective at the alpha its L-BFGS-B returns."""
    with contextlib.redirect_stdout(io.StringIO()):
        _, log = ot.smooth.smooth_ot_semi_dual(a.numpy(), b.numpy(), C.numpy(), gamma, reg_type="sparsity_constrained",
                                               max_nz=k, stopThr=1e-12, numItermax=3000, log=True)
    return semi_dual(log["alpha"], C.numpy(), a.numpy(), b.numpy(), k, gamma)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="9x12,40x60,150x200")  # m >= n: room for k = 1
    p.add_argument("--seeds", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", otcore.ConvergenceWarning)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    print("relative gap below the optimum (k=1: exact LP + (gamma/2)|b|^2; k=2: best value found)")
    print(f"{'n x m':>9} {'k':>2} {'gamma':>5} {'seed':>4} | {'history 10 (default)':>26} | {'history 100':>26} | POT L-BFGS-B")
    for (n, m), k, gamma, seed in itertools.product(sizes, (1, 2), (0.05, 0.5), range(args.seeds)):
        C, a, b = problem(n, m, seed)
        runs = {h: otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=k, gamma=gamma, tol=1e-12, max_iter=3000, history=h)
                for h in (10, 100)}
        if k == 1:
            best = lp_value(C, a, b) + 0.5 * gamma * float((b * b).sum())
        else:
            long = otcore.sparse_ot(otcore.CostMatrix(C), a, b, k=k, gamma=gamma, tol=1e-12, ftol=1e-15,
                                    max_iter=5000, history=300)
            best = max(float(r.value) for r in (*runs.values(), long))
        cells = [f"{(best - float(r.value)) / abs(best):9.1e} {r.n_iter:5d} it {r.info['stop'][:9]:>9}" for r in runs.values()]
        pot = f"{(best - pot_value(C, a, b, k, gamma)) / abs(best):9.1e}" if ot is not None else "-"
        print(f"{n:>4}x{m:<4} {k:>2} {gamma:>5} {seed:>4} | {cells[0]} | {cells[1]} | {pot}", flush=True)


if __name__ == "__main__":
    main()
