"""Launches per iteration of ``otcore.sinkhorn`` on the Triton backend's streamed passes,
counted on any machine (the kernels run under the Triton interpreter).

On a GPU a Sinkhorn iteration of a small or mid-sized problem is bound by host time per
launch (docs/benchmarks.md, "Where the time goes"): each Triton launch and each torch
operation costs the host microseconds whatever its size. This script counts both per
iteration: torch operations that compute through PyTorch's dispatcher
(``lbfgs_op_count.OpCounter``: views and allocations launch nothing and are not counted
as such; a composite such as ``logsumexp`` counts once here but launches several CUDA
kernels) and Triton kernel launches by wrapping the kernels. The count per iteration is ``(count of a 41-iteration solve - count of a
21-iteration solve) / 20``, so the set-up and the result cancel; it includes the
convergence test (every ``check_every = 10`` iterations) and its host read.

The problem (150 points) is within the one-program tiled kernel's budget
(``kernels.sinkhorn_steps.TILES_MAX_WORK``), which runs a whole block in one launch; it is
switched off here, so the counts are those of the streamed passes, as for larger problems.

A split pass (``S > 1`` slices of the reduced axis, as the GPU launcher chooses for
e.g. 8192 points on 132 SMs: ``softmin.num_splits``) adds the combine of the partial
results; ``--splits`` sets ``S`` here (the interpreter itself never splits).

    TRITON_INTERPRET=1 python bench/sinkhorn_launch_count.py          # ~1 min on 2 CPU cores
    TRITON_INTERPRET=1 python bench/sinkhorn_launch_count.py --loss   # SinkhornLoss forward + backward
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import warnings

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1 (the kernels run under the Triton interpreter on CPU tensors)")

import torch  # noqa: E402
from lbfgs_op_count import OpCounter  # noqa: E402  (bench/ is the script's directory)

import otcore  # noqa: E402
from otcore.kernels import sinkhorn_steps  # noqa: E402
from otcore.kernels import plan  # noqa: E402
from otcore.kernels import softmin as K  # noqa: E402


class ComputeCounter(OpCounter):
    """``OpCounter`` with allocations (``empty``, ``empty_strided``, ...) counted apart,
    under ``"allocations in " + phase``: they launch nothing."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith("empty"):
            self.counts["allocations in " + self.phase] += 1
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


class LaunchCounter:
    """Wraps a module's ``*_kernel`` Triton functions: each ``kernel[grid](...)`` counts one
    launch, and the counter's torch-op phase is ``"inside a launch"`` meanwhile (the
    interpreter's own copies are not the library's operations)."""

    def __init__(self, module, ops: OpCounter):
        self.module, self.ops, self.launches = module, ops, collections.Counter()
        self.saved = {k: v for k, v in vars(module).items() if k.endswith("_kernel")}

    def __enter__(self):
        for name, kernel in self.saved.items():
            setattr(self.module, name, _Counted(kernel, name, self))
        return self

    def __exit__(self, *exc):
        for name, kernel in self.saved.items():
            setattr(self.module, name, kernel)


class _Counted:
    def __init__(self, kernel, name, counter):
        self.kernel, self.name, self.counter = kernel, name, counter

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counter.launches[self.name] += 1
            phase, self.counter.ops.phase = self.counter.ops.phase, "inside a launch"
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.counter.ops.phase = phase
        return launch


def solve_counts(geom, a, b, iters: int, splits: int, **kw) -> collections.Counter:
    """Torch operations, Triton launches and host reads of one ``iters``-iteration solve."""
    rule, budget = K.num_splits, sinkhorn_steps.TILES_MAX_WORK
    K.num_splits = lambda programs, tiles_oth, device, dense=False: min(splits, tiles_oth)
    sinkhorn_steps.TILES_MAX_WORK = 0  # the streamed passes, not the one-program tiled kernel
    try:
        with ComputeCounter("solve") as ops, LaunchCounter(K, ops) as launches:
            res = otcore.sinkhorn(geom, a, b, eps=0.05, tol=1e-30, max_iter=iters, backend="triton", **kw)
    finally:
        K.num_splits, sinkhorn_steps.TILES_MAX_WORK = rule, budget
    assert int(torch.as_tensor(res.n_iter).max()) == iters, res.n_iter
    out = collections.Counter(torch_ops=ops.counts["solve"], host_reads=ops.counts["host reads in solve"],
                              allocations=ops.counts["allocations in solve"])
    out["triton"] = sum(launches.launches.values())
    return out


def per_iteration(geom, a, b, splits: int, **kw) -> dict:
    lo, hi = solve_counts(geom, a, b, 21, splits, **kw), solve_counts(geom, a, b, 41, splits, **kw)
    return {k: (hi[k] - lo[k]) / 20 for k in ("triton", "torch_ops", "allocations", "host_reads")}


def loss_counts(n: int, **kw) -> dict:
    """Torch operations, Triton launches (softmin and plan kernels) and host reads of one
    ``SinkhornLoss`` forward and backward on two clouds of ``n`` points (d = 3, streamed
    passes: the self-transport terms are one batched solve)."""
    x, y = torch.rand(n, 3, requires_grad=True), torch.rand(n, 3, requires_grad=True)
    loss = otcore.SinkhornLoss(backend="triton", **kw)
    budget = sinkhorn_steps.TILES_MAX_WORK
    sinkhorn_steps.TILES_MAX_WORK = 0
    out = {}
    try:
        for phase in ("forward", "backward"):
            with ComputeCounter(phase) as ops, LaunchCounter(K, ops) as l1, LaunchCounter(plan, ops) as l2:
                if phase == "forward":
                    value = loss(x, y)
                else:
                    value.backward()
            out[phase] = dict(triton=sum(l1.launches.values()) + sum(l2.launches.values()),
                              torch_ops=ops.counts[phase], host_reads=ops.counts["host reads in " + phase])
    finally:
        sinkhorn_steps.TILES_MAX_WORK = budget
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=150, help="points per side (> 64 for the streamed passes)")
    p.add_argument("--splits", type=int, nargs="+", default=[1, 5], help="slices per pass (S)")
    p.add_argument("--loss", action="store_true", help="count a SinkhornLoss forward and backward instead")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    n = args.n
    if args.loss:
        print(f"# SinkhornLoss, n = m = {n}, d = 3, eps = 0.05, Triton backend (streamed passes)")
        print(f"{'schedule':44s} {'phase':9s} {'triton':>6s} {'torch ops':>9s} {'host reads':>10s}")
        for name, kw in (("tol=None, eps_schedule=0.5, max_iter=8", dict(tol=None, eps_schedule=0.5, max_iter=8)),
                         ("tol=1e-5 (default), eps_schedule='geometric'", {})):
            for phase, c in loss_counts(n, eps=0.05, **kw).items():
                print(f"{name:44s} {phase:9s} {c['triton']:6d} {c['torch_ops']:9d} {c['host_reads']:10d}")
        return 0
    x, y = torch.rand(n, 3), torch.rand(n + 7, 3)
    a, b = torch.rand(n) + 0.1, torch.rand(n + 7) + 0.1
    a, b = a / a.sum(), b / b.sum()
    cases = [
        ("balanced", otcore.PointCloud(x, y), a, b, {}),
        ("unbalanced, rho = 1", otcore.PointCloud(x, y), a, b, dict(rho=1.0)),
        ("symmetric (self-transport)", otcore.PointCloud(x, x), a, a, {}),
    ]
    print(f"# per Sinkhorn iteration, n = {n}, d = 3, Triton backend (streamed passes), check_every = 10")
    print(f"{'case':28s} {'S':>2s} {'triton':>7s} {'torch ops':>9s} {'launches':>8s} {'allocs':>6s} "
          f"{'host reads':>10s}")
    for name, geom, wa, wb, kw in cases:
        for s in args.splits:
            c = per_iteration(geom, wa, wb, s, **kw)
            print(f"{name:28s} {s:2d} {c['triton']:7.2f} {c['torch_ops']:9.2f} {c['triton'] + c['torch_ops']:8.2f} "
                  f"{c['allocations']:6.2f} {c['host_reads']:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
