"""The plan kernels (kernels/plan.py): correctness against float64 and time per call.

    python bench/bench_plan_kernels.py              # on a GPU: n = m = 8192/d3, 32768/d3, 32768/d64
    python bench/bench_plan_kernels.py --quick      # tiny sizes on the CPU (Triton interpreter)

For each size, realistic potentials (``--warm-iters`` Sinkhorn iterations on the kernels),
then every plan primitive on the Triton kernels, checked against the float64 torch
reference on sampled rows (sampled columns for the transposed ones):

- ``apply_plan``: ``P v`` (a vector), ``P V`` (3 columns) and ``P^T u``;
- ``marginals`` (``P 1``); ``plan_topk`` (k = 8, values; indices agree where values are
  not tied); ``plan_cost`` (``<P, C>``, all rows); ``plan_cost_grad`` (the gradient with
  respect to ``x`` and ``y``).

Then ms per call with the fraction of the exp floor: each primitive is one pass of
``n m`` exponentials (``plan_cost_grad`` two) at the H100's 4.2e12 ``exp2``/s. A torch
peer (``P`` materialised, then ``P @ v``) where the ``n x m`` matrix fits. Writes
``plan.csv`` and ``plan.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: the kernels run in the interpreter

import otcore  # noqa: E402
from otcore import reference, triton_ops  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sinkhorn_kernels import (  # noqa: E402
    EPS, EXP_PER_S, check_rows, free_bytes, parse_size, problem, relerr, time_ms, warm_potentials,
)

SIZES = ["8192x3", "32768x3", "32768x64"]
QUICK_SIZES = ["64x3", "96x17"]
TOPK = 8


def biased(geom, logw, f, g):
    """``F = f + eps log a``, ``G = g + eps log b`` (uniform weights)."""
    return f + EPS * logw, g + EPS * logw


def checks(geom, F, G, S, x, y):
    """``(name, kernel output on the sample, float64 reference)`` for every primitive.

    Row-side outputs are compared on rows ``S`` (the reference is the geometry of
    ``x[S]`` and all of ``y``), column-side ones on columns ``S``."""
    dev = F.device
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(1, geom.m, generator=gen).to(dev)
    V = torch.randn(1, geom.m, 3, generator=gen).to(dev)
    u = torch.randn(1, geom.n, generator=gen).to(dev)
    rows = otcore.PointCloud(x[S].double(), y.double())
    cols = otcore.PointCloud(x.double(), y[S].double())
    F64, G64 = F.double(), G.double()
    Fr, Gc = F64[:, S], G64[:, S]
    out = [
        ("apply_plan P v", triton_ops.apply_plan(geom, F, G, EPS, v, 1)[:, S],
         reference.apply_plan(rows, Fr, G64, EPS, v.double(), 1)),
        ("apply_plan P V (3 columns)", triton_ops.apply_plan(geom, F, G, EPS, V, 1)[:, S],
         reference.apply_plan(rows, Fr, G64, EPS, V.double(), 1)),
        ("apply_plan P^T u", triton_ops.apply_plan(geom, F, G, EPS, u, 0)[:, S],
         reference.apply_plan(cols, F64, Gc, EPS, u.double(), 0)),
        ("marginals P 1", triton_ops.marginals(geom, F, G, EPS, 1)[:, S], reference.marginals(rows, Fr, G64, EPS, 1)),
        (f"plan_topk k={TOPK} (values)", triton_ops.plan_topk(geom, F, G, EPS, TOPK)[0][:, S],
         reference.plan_topk(rows, Fr, G64, EPS, TOPK)[0]),
        ("plan_cost <P, C>", triton_ops.plan_cost(geom, F, G, EPS),
         reference.plan_cost(otcore.PointCloud(x.double(), y.double()), F64, G64, EPS)),
    ]
    gx, gy = triton_ops.plan_cost_grad(geom, F, G, EPS)
    out.append(("plan_cost_grad d/dx", gx[:, S], reference.plan_cost_grad(rows, Fr, G64, EPS)[0]))
    out.append(("plan_cost_grad d/dy", gy[:, S], reference.plan_cost_grad(cols, F64, Gc, EPS)[1]))
    return out


def timed_calls(geom, F, G, device):
    """``(name, fn, passes)`` of the calls to time."""
    v = torch.randn(1, geom.m, device=device)
    V = torch.randn(1, geom.m, 3, device=device)
    return [
        ("apply_plan P v", lambda: triton_ops.apply_plan(geom, F, G, EPS, v, 1), 1),
        ("apply_plan P V (3 columns)", lambda: triton_ops.apply_plan(geom, F, G, EPS, V, 1), 1),
        ("apply_plan P^T u", lambda: triton_ops.apply_plan(geom, F, G, EPS, v, 0), 1),
        ("marginals P 1", lambda: triton_ops.marginals(geom, F, G, EPS, 1), 1),
        (f"plan_topk k={TOPK}", lambda: triton_ops.plan_topk(geom, F, G, EPS, TOPK), 1),
        ("plan_cost <P, C>", lambda: triton_ops.plan_cost(geom, F, G, EPS), 1),
        ("plan_cost_grad", lambda: triton_ops.plan_cost_grad(geom, F, G, EPS), 2),
    ]


def run_size(n, d, device, args, rows_out):
    x, y = problem(n, d, device)
    geom = otcore.PointCloud(x, y)
    logw, f, g = warm_potentials(geom, n, args.warm_iters, device)
    F, G = biased(geom, logw, f, g)
    S = check_rows(n, args.check_rows, device)
    print(f"n = m = {n}, d = {d}", flush=True)
    for name, got, want in checks(geom, F, G, S, x, y):
        err = relerr(got, want)
        rows_out.append(dict(section="plan_error", n=n, d=d, op=name, relerr=err, ok=bool(err < args.max_err)))
        print(f"  error {name:32s} {err:.2e}{'' if err < args.max_err else '  > ' + format(args.max_err, 'g')}",
              flush=True)
    floor1 = n * n / EXP_PER_S * 1e3
    for name, fn, passes in timed_calls(geom, F, G, device):
        ms = time_ms(fn, device)
        floor = passes * floor1
        rows_out.append(dict(section="plan_ms", n=n, d=d, op=name, ms=ms, floor_ms=floor, floor_fraction=floor / ms))
        print(f"  {name:32s} {ms:9.3f} ms  ({floor / ms:6.1%} of the exp floor {floor:.3g} ms)", flush=True)
    if 2 * n * n * 4 < 0.6 * free_bytes(device) and not args.skip_dense:
        v = torch.randn(1, n, device=device)

        def dense():
            C = torch.cdist(x, y) ** 2
            return torch.exp((F[0, :, None] + G[0, None, :] - C) / EPS) @ v[0]

        ms = time_ms(dense, device)
        rows_out.append(dict(section="plan_ms", n=n, d=d, op="torch dense P v (P materialised)", ms=ms,
                             floor_ms=floor1, floor_fraction=floor1 / ms))
        print(f"  {'torch dense P v (P materialised)':32s} {ms:9.3f} ms  ({floor1 / ms:6.1%} of the exp floor)",
              flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    ap.add_argument("--sizes", nargs="+", default=None, help="n x d, e.g. 8192x3 (default: the target sizes)")
    ap.add_argument("--warm-iters", type=int, default=5)
    ap.add_argument("--check-rows", type=int, default=256, help="rows (columns) compared with float64")
    ap.add_argument("--max-err", type=float, default=1e-4, help="relative error counted as a failure")
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--out", default=os.path.join("out", "bench_plan"))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"# plan kernels on {name}, torch {torch.__version__}, eps {EPS}", flush=True)
    rows = []
    os.makedirs(args.out, exist_ok=True)
    for s in sizes:
        n, d = parse_size(s)
        run_size(n, d, device, args, rows)
        with open(os.path.join(args.out, "plan.json"), "w") as fh:  # after every size: a cut run keeps it
            json.dump({"device": name, "rows": rows}, fh, indent=1)
    keys = sorted({k for r in rows for k in r})
    with open(os.path.join(args.out, "plan.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    bad = [f"{r['op']} at n={r['n']}" for r in rows if r["section"] == "plan_error" and not r["ok"]]
    print(f"wrote {args.out}/plan.csv, plan.json" + (f"; CHECK FAILED: {bad}" if bad else "; all checks passed"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
