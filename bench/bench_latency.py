"""Latency-bound Sinkhorn workloads: small problems, where launches cost more than math.

    python bench/bench_latency.py                  # on a GPU: the workloads below
    python bench/bench_latency.py --quick          # tiny versions on the CPU (torch backend)

Workloads (docs/benchmarks.md targets, issue 3 item 4), each run for a fixed number of iterations:

- ``swav``: SwAV-style assignment, ``C = -scores`` of 3000 features x 4096 prototypes
  (unit vectors, d = 128), eps = 0.05, 3 iterations (a full solve in SwAV).
- ``moe``: 4096 tokens x 64 experts, ``C = -scores``, eps = 0.05, 30 iterations.
- ``tiny4`` / ``tiny64``: B = 16,384 problems of 4 x 4 / 64 x 64 points in 3-D,
  eps = 0.05, 30 iterations, one batched call.
- ``cloud512``: one problem of 512 x 512 points in 3-D, 30 iterations: exactly at the
  tiled kernel's budget (``TILES_MAX_WORK``), so its eager and per-pass columns say on
  which side of the budget one SM stops paying.

Methods: a plain torch log-domain loop on the materialised cost (``torch.logsumexp``,
no convergence checks: the least a user would write), ``otcore.sinkhorn(tol=None)`` eager
(the fixed number of iterations, no convergence test either; problems
whose cost fits one tile, ``tiny4``/``tiny64``, run each block of ``check_every = 10``
iterations in one launch of ``kernels/sinkhorn_steps.py``, and so do problems up to
``TILES_MAX_WORK``, ``moe``, in its one-program tiled kernel), the same with those kernels
switched off (``per-pass``: two streamed softmin launches per iteration, each applying the
update: docs/kernels.md, "The fused Sinkhorn half-step"), and
``otcore.sinkhorn(tol=None, cuda_graph=True)`` (blocks of ``check_every`` iterations
replayed from CUDA graphs). A solve records its graph once, so every timed call of that column
includes one recording, and with 30 iterations two 10-iteration blocks are replayed
(SwAV's 3 iterations none): it shows what a user pays per solve, and pays off only for
solves that replay many blocks (the runs to a tolerance below). Before timing, otcore's potentials are compared with the plain loop's
after the same iterations (relative to the cost's scale). Times: median over
``--reps`` calls, CUDA events on the GPU, wall clock on the CPU. Writes ``latency.csv``.

Then the same workloads solved *to a tolerance* (marginal L1 error ``TOL``, tested every
10 iterations): the plain loop with a host-side test (one more row pass and a sync per
test) against ``otcore.sinkhorn(tol=TOL)``, whose tiny problems run their tests inside
the one-tile kernel; the check is that otcore converged.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import statistics
import sys
import time

import torch

import otcore
from otcore.kernels import sinkhorn_steps

EPS = 0.05


def workloads(quick: bool, device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def unit(*shape):
        v = torch.randn(*shape, generator=g)
        return (v / v.norm(dim=-1, keepdim=True)).to(device)

    s = (lambda n: max(2, n // 64)) if quick else (lambda n: n)
    feats, protos = unit(s(3000), 128), unit(s(4096), 128)
    tokens, experts = unit(s(4096), 32), unit(64, 32)
    B = s(16384)
    return [
        ("swav", otcore.CostMatrix(-(feats @ protos.T)), 3),
        ("moe", otcore.CostMatrix(-(tokens @ experts.T)), 30),
        ("tiny4", otcore.PointCloud(torch.rand(B, 4, 3, generator=g).to(device),
                                    torch.rand(B, 4, 3, generator=g).to(device)), 30),
        ("tiny64", otcore.PointCloud(torch.rand(B, 64, 3, generator=g).to(device),
                                     torch.rand(B, 64, 3, generator=g).to(device)), 30),
        # at the tiled kernel's budget (512 * 512 * 4 = TILES_MAX_WORK): is one SM still faster?
        ("cloud512", otcore.PointCloud(torch.rand(s(512) if quick else 512, 3, generator=g).to(device),
                                       torch.rand(s(512) if quick else 512, 3, generator=g).to(device)), 30),
    ]


def dense_cost(geom) -> torch.Tensor:
    return geom.C if geom.is_dense else torch.cdist(geom.x, geom.y) ** 2


def plain_torch(C: torch.Tensor, n_iter: int):
    """Log-domain Sinkhorn on a dense (B, n, m) cost, uniform weights, no checks."""
    B, n, m = C.shape
    loga, logb = -math.log(n), -math.log(m)
    f = C.new_zeros(B, n)
    g = C.new_zeros(B, m)
    for _ in range(n_iter):
        f = -EPS * torch.logsumexp((g[:, None, :] + EPS * logb - C) / EPS, dim=2)
        g = -EPS * torch.logsumexp((f[:, :, None] + EPS * loga - C) / EPS, dim=1)
    return f, g


TOL = 1e-4


def plain_torch_to_tol(C: torch.Tensor, tol: float, check_every: int = 10, max_iter: int = 5000):
    """The plain loop, stopped when every problem's row residual
    ``sum_i a_i |exp((f_i - s_i)/eps) - 1|`` (``s``: the next row pass) is <= tol.
    ``(iterations, converged)``: at ``max_iter`` unconverged (B = 16,384 of 4x4 needs up to
    ~6000, a review), its time is a lower bound, and the table says so."""
    B, n, m = C.shape
    loga, logb = -math.log(n), -math.log(m)
    f, g = C.new_zeros(B, n), C.new_zeros(B, m)
    for it in range(1, max_iter + 1):
        f = -EPS * torch.logsumexp((g[:, None, :] + EPS * logb - C) / EPS, dim=2)
        g = -EPS * torch.logsumexp((f[:, :, None] + EPS * loga - C) / EPS, dim=1)
        if it % check_every == 0:
            s = -EPS * torch.logsumexp((g[:, None, :] + EPS * logb - C) / EPS, dim=2)
            resid = (math.exp(loga) * (torch.exp((f - s) / EPS) - 1).abs()).sum(-1)
            if bool((resid <= tol).all()):
                return it, True
    return max_iter, False


@contextlib.contextmanager
def one_tile(enabled: bool):
    """The one-launch kernels on (the default) or off: ``SMALL_MAX_ELEMENTS = 0`` fits no
    problem in one tile, ``TILES_MAX_WORK = 0`` none in the tiled kernel."""
    saved = sinkhorn_steps.SMALL_MAX_ELEMENTS, sinkhorn_steps.TILES_MAX_WORK
    if not enabled:
        sinkhorn_steps.SMALL_MAX_ELEMENTS = sinkhorn_steps.TILES_MAX_WORK = 0
    try:
        yield
    finally:
        sinkhorn_steps.SMALL_MAX_ELEMENTS, sinkhorn_steps.TILES_MAX_WORK = saved


def ours_to_tol(geom, tol: float, cuda_graph: bool, backend: str, per_pass: bool = False):
    with one_tile(not per_pass):
        return otcore.sinkhorn(geom, eps=EPS, tol=tol, max_iter=5000, check_every=10, cuda_graph=cuda_graph,
                               backend=backend, verbose=False)


def ours(geom, n_iter: int, cuda_graph: bool, backend: str, per_pass: bool = False):
    with one_tile(not per_pass):  # tol=None: exactly n_iter iterations, no convergence test
        r = otcore.sinkhorn(geom, eps=EPS, tol=None, max_iter=n_iter, cuda_graph=cuda_graph, backend=backend,
                            verbose=False)
    return r.f, r.g


def time_ms(fn, device, reps: int) -> float:
    fn()  # warm-up: compilation, graph recording
    runs = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            runs.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - t) * 1e3)
    return statistics.median(runs)


def write_csv(rows, out_dir) -> None:
    """latency.csv, rewritten after every workload so that a run cut short keeps its rows."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "latency.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))  # every row's keys
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per method (default 20 GPU, 2 CPU)")
    ap.add_argument("--out", default=os.path.join("out", "bench_latency"))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "triton" if device.type == "cuda" else "torch"
    reps = args.reps or (20 if device.type == "cuda" else 2)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# latency-bound workloads on {name}, torch {torch.__version__}, otcore backend {backend}, eps {EPS}")
    rows = []
    head = (f"{'workload':8} {'shape':>18} {'iters':>5} {'max err':>8} {'torch ms':>9} {'otcore ms':>10} "
            f"{'per-pass ms':>11} {'graph+rec':>9} {'vs torch':>8}")
    print(head)
    for wl, geom, n_iter in workloads(args.quick, device):
        shape = f"{geom.batch}x{geom.n}x{geom.m}"
        C = dense_cost(geom)
        f0, g0 = plain_torch(C, n_iter)
        scale = float(C.abs().max())
        errs = []
        for graph, per_pass in ((False, False), (False, True), (True, False)):
            f, g = ours(geom, n_iter, graph, backend, per_pass)
            # balanced potentials are defined up to (f + c, g - c): compare f + g's shape
            shift = (f - f0).mean(-1, keepdim=True)
            errs.append(float(torch.maximum((f - f0 - shift).abs().amax(), (g - g0 + shift).abs().amax())) / scale)
        err = max(errs)
        t_torch = time_ms(lambda: plain_torch(C, n_iter), device, reps)
        t_ours = time_ms(lambda: ours(geom, n_iter, False, backend), device, reps)
        t_pass = time_ms(lambda: ours(geom, n_iter, False, backend, per_pass=True), device, reps)
        t_graph = time_ms(lambda: ours(geom, n_iter, True, backend), device, reps)
        best = min(t_ours, t_graph)
        print(f"{wl:8} {shape:>18} {n_iter:>5} {err:8.1e} {t_torch:9.3f} {t_ours:10.3f} {t_pass:11.3f} "
              f"{t_graph:9.3f} {t_torch / best:7.2f}x", flush=True)
        rows.append(dict(workload=wl, shape=shape, iters=n_iter, max_rel_err=err, torch_ms=t_torch,
                         otcore_ms=t_ours, otcore_per_pass_ms=t_pass, otcore_graph_ms=t_graph,
                         speedup_vs_torch=t_torch / best,
                         device=name, ok=err < 1e-4))
        write_csv(rows, args.out)
    print(f"# to a tolerance: marginal L1 error <= {TOL}, tested every 10 iterations; iters = torch/otcore (max)")
    for wl, geom, _ in workloads(args.quick, device):
        shape = f"{geom.batch}x{geom.n}x{geom.m}"
        C = dense_cost(geom)
        its_torch, torch_conv = plain_torch_to_tol(C, TOL)
        res = ours_to_tol(geom, TOL, False, backend)
        r = max(2, reps // 4)  # whole solves: fewer calls
        t_torch = time_ms(lambda: plain_torch_to_tol(C, TOL), device, r)
        t_ours = time_ms(lambda: ours_to_tol(geom, TOL, False, backend), device, r)
        t_pass = time_ms(lambda: ours_to_tol(geom, TOL, False, backend, per_pass=True), device, r)
        t_graph = time_ms(lambda: ours_to_tol(geom, TOL, True, backend), device, r)
        best = min(t_ours, t_graph)
        ok = bool(torch.as_tensor(res.converged).all())
        # torch unconverged at its cap: its time, and the speed-up, are lower bounds (">")
        its = f"{'' if torch_conv else '>'}{its_torch}/{int(torch.as_tensor(res.n_iter).max())}"
        print(f"{wl + ' tol':10} {shape:>16} {its:>9} {'conv' if ok else 'NOT conv':>8} {t_torch:9.3f} "
              f"{t_ours:10.3f} {t_pass:11.3f} {t_graph:9.3f} {'' if torch_conv else '>'}{t_torch / best:6.2f}x",
              flush=True)
        rows.append(dict(workload=f"{wl} to tol", shape=shape, iters=its, max_rel_err=float("nan"), torch_ms=t_torch,
                         otcore_ms=t_ours, otcore_per_pass_ms=t_pass, otcore_graph_ms=t_graph,
                         speedup_vs_torch=t_torch / best, device=name, ok=ok, torch_converged=torch_conv))
        write_csv(rows, args.out)
    bad = [r["workload"] for r in rows if not r["ok"]]
    print(f"wrote {args.out}/latency.csv" + (f"; CHECK FAILED for {bad}" if bad else "; all checks passed"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
