"""Tensor operations per L-BFGS iteration of sparse_ot, counted through PyTorch's dispatcher.

On a GPU every operation that computes is a kernel launch, and at router sizes launches,
not arithmetic, bound an iteration; this count is that cost, measured on any machine.
Views (select, view, slice, ...) launch nothing and are not counted. The count splits
into the objective's evaluations (``evaluate``: the k-sparse pass and its reductions)
and the rest of the L-BFGS iteration (direction, line search, memory, stopping tests).
Host reads in L-BFGS (``bool``/``float``/``item`` of a tensor, ``tolist``, and the
solvers' own ``_host.to_host``) are counted apart: on a GPU each one waits for the queue to
drain (a synchronisation). Their copies back to the device (``_host.to_device``) count as
operations. (The torch
twin's evaluation reads one flag per call on the CPU only, for its tie-break; the GPU
paths read none.)

    python bench/lbfgs_op_count.py                 # the router's 512 x 8 problem, then 150 x 200 with history 10 and 100

Every solve runs with ``relaxed_start=False`` (L-BFGS from zero): the relaxed start's Newton
steps, the default since 2026-12-02, would replace most of the loop this counts.
"""

from __future__ import annotations

import collections
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import otcore
import otcore.solvers._host as _host
import otcore.solvers.sparse as sparse_solver

VIEWS = {"select.int", "unsqueeze.default", "view.default", "alias.default", "slice.Tensor", "expand.default",
         "t.default", "transpose.int", "reshape.default", "squeeze.dim", "as_strided.default", "diagonal.default",
         "_unsafe_view.default", "detach.default", "permute.default", "unbind.int", "split.Tensor",
         "lift_fresh.default"}


class OpCounter(TorchDispatchMode):
    """Counts, by the phase set in ``self.phase``, the computing operations dispatched
    (``counts[phase]``) and the host reads (``counts["host reads in " + phase]``): ``bool``,
    ``float``, ``int``, ``item`` of a tensor, and ``tolist`` (patched while the counter is
    on: on a CPU it is no dispatched operation)."""

    def __init__(self, phase: str = "all"):
        super().__init__()
        self.counts = collections.Counter()
        self.phase = phase

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__ == "_local_scalar_dense.default":  # bool(t), float(t), t.item()
            self.counts["host reads in " + self.phase] += 1
        elif func.__name__ not in VIEWS:
            self.counts[self.phase] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        tolist = self._tolist = torch.Tensor.tolist
        to_host, to_device = self._moves = _host.to_host, _host.to_device

        def counted_tolist(t):  # one transfer to the host
            self.counts["host reads in " + self.phase] += 1
            return tolist(t)

        def counted_to_host(*rows):  # the solvers' reads of per-problem numbers (on a CPU, .cpu() dispatches nothing)
            self.counts["host reads in " + self.phase] += 1
            return to_host(*rows)

        def counted_to_device(mask, device):  # a copy to the device: one operation on a GPU
            self.counts[self.phase] += 1
            return to_device(mask, device)

        torch.Tensor.tolist = counted_tolist
        _host.to_host, _host.to_device = counted_to_host, counted_to_device
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        _host.to_host, _host.to_device = self._moves
        return super().__exit__(*exc)


def count(solve):
    """Run ``solve()`` with the solver's L-BFGS instrumented; returns (result, counts)."""
    counter = OpCounter("outside L-BFGS")
    plain = sparse_solver.lbfgs

    def instrumented(evaluate, *args, **kwargs):
        def timed_evaluate(theta):
            counter.phase = "evaluate"
            try:
                return evaluate(theta)
            finally:
                counter.phase = "L-BFGS"
        counter.phase = "L-BFGS"
        try:
            return plain(timed_evaluate, *args, **kwargs)
        finally:
            counter.phase = "outside L-BFGS"

    sparse_solver.lbfgs = instrumented
    try:
        with counter:
            result = solve()
    finally:
        sparse_solver.lbfgs = plain
    return result, counter.counts


def report(name, result, counts):
    n = int(torch.as_tensor(result.n_iter).sum())
    ops = counts["L-BFGS"] + counts["evaluate"] + counts["outside L-BFGS"]
    print(f"{name:<34} {n:>6} {counts['L-BFGS'] / n:>10.0f} {counts['evaluate'] / n:>10.0f} "
          f"{ops / n:>8.0f} {counts['host reads in L-BFGS'] / n:>21.2f}")


def main():
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    print(f"{'problem':<34} {'iters':>6} {'L-BFGS/it':>10} {'eval/it':>10} {'all/it':>8} {'L-BFGS host reads/it':>21}")
    scores = torch.randn(512, 8)
    cost = otcore.CostMatrix(-(scores - scores.mean(0) - scores.mean(1, keepdim=True) + scores.mean()))
    # the router's capacity problem solved from zero (the router itself seeds it: bench/router_op_count.py)
    out, counts = count(lambda: otcore.sparse_ot(cost, torch.ones(512), torch.full((8,), 64.0), k=80, gamma=0.1,
                                                 tol=1e-3 * 512, max_iter=100, relaxed_start=False))
    report("router's 512 x 8 capacity problem", out, counts)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(150, 2, generator=g, dtype=torch.float64)
    y = torch.randn(200, 2, generator=g, dtype=torch.float64)
    for history in (10, 100):
        out, counts = count(lambda: otcore.sparse_ot(otcore.PointCloud(x, y), k=5, gamma=0.05, history=history,
                                                     max_iter=300, tol=1e-30, relaxed_start=False))
        report(f"150 x 200, k=5, history {history}", out, counts)


if __name__ == "__main__":
    main()
