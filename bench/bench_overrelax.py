"""Over-relaxed against plain Sinkhorn: iterations and time to the same tolerance.

    python bench/bench_overrelax.py            # CPU (torch backend) or GPU (Triton), ~1 min on 2 CPU cores
    python bench/bench_overrelax.py --quick    # smaller problems (~10 s on the CPU)

For each problem, ``otcore.sinkhorn`` plain and with ``overrelax=True`` (the factor
adapted per problem from the residuals; otcore/solvers/_overrelax.py) to the same
``tol``: iterations, wall time (CUDA-synchronised on a GPU), the final factor, whether
both converged, and the relative difference of their values (the same fixed point: it is
~tol). Then ``SinkhornLoss`` forward + backward, plain and over-relaxed, with the value
and gradient differences. Iteration counts do not depend on the machine; times do.
Writes ``overrelax.csv`` under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import warnings

import torch

import otcore


def timed(fn, device):
    """``(fn(), seconds)`` of a second call on CUDA: the first compiles the Triton kernels it
    is the first to use (1-2 s each, against tens of ms a solve), which had been timed in
    the plain solves alone and inflated the speed-up (a review)."""
    if device.type == "cuda":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", otcore.ConvergenceWarning)
            fn()
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t


def problems(quick: bool, device, dtype):
    g = torch.Generator().manual_seed(0)
    n = 150 if quick else 1000
    x = torch.rand(n, 3, generator=g, dtype=dtype).to(device)
    y = torch.rand(n, 3, generator=g, dtype=dtype).to(device)
    na = 120 if quick else 500
    C = torch.rand(na, na, generator=g, dtype=dtype).to(device)
    tol = 1e-5 if dtype == torch.float32 else 1e-7
    return [
        (f"clouds {n}, d=3, eps=0.01", otcore.PointCloud(x, y), dict(eps=0.01, tol=tol)),
        (f"clouds {n}, d=3, eps=0.0025", otcore.PointCloud(x, y), dict(eps=0.0025, tol=tol)),
        (f"clouds {n}, eps=0.0025, eps scaling", otcore.PointCloud(x, y),
         dict(eps=0.0025, tol=tol, eps_schedule="geometric")),
        (f"clouds {n}, eps=0.0025, rho=1", otcore.PointCloud(x, y), dict(eps=0.0025, tol=tol, rho=1.0)),
        (f"random assignment {na}, eps=1/1200", otcore.CostMatrix(C), dict(eps=1 / 1200, tol=1e-4)),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--float64", action="store_true")
    p.add_argument("--out", default="out/bench_overrelax")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float64 if args.float64 else torch.float32
    print(f"# plain vs overrelax=True, {device}, {dtype}, torch {torch.__version__}, max_iter 50000")
    print(f"{'problem':40s} {'plain it':>8s} {'ms':>9s} {'relaxed it':>10s} {'ms':>9s} {'speed-up':>8s} "
          f"{'omega':>6s} {'conv':>5s} {'rel dvalue':>10s}")
    rows, ok = [], True
    for name, geom, kw in problems(args.quick, device, dtype):
        plain, tp = timed(lambda: otcore.sinkhorn(geom, max_iter=50000, overrelax=False, **kw), device)
        fast, tf = timed(lambda: otcore.sinkhorn(geom, max_iter=50000, overrelax=True, **kw), device)
        conv = bool(plain.converged) and bool(fast.converged)
        dv = abs(float(fast.value) - float(plain.value)) / abs(float(plain.value))
        ok &= conv and dv <= 10 * kw["tol"]
        print(f"{name:40s} {plain.n_iter:8d} {1e3 * tp:9.1f} {fast.n_iter:10d} {1e3 * tf:9.1f} {tp / tf:7.1f}x "
              f"{fast.info['overrelax']:6.3f} {str(conv):>5s} {dv:10.1e}", flush=True)
        rows.append(dict(problem=name, plain_iters=plain.n_iter, plain_ms=1e3 * tp, relaxed_iters=fast.n_iter,
                         relaxed_ms=1e3 * tf, omega=fast.info["overrelax"], converged=conv, rel_dvalue=dv))
    # the loss layer: three solves (one alternating, two symmetric: only the first relaxes)
    g = torch.Generator().manual_seed(1)
    n = 200 if args.quick else 2000
    x = torch.rand(n, 3, generator=g, dtype=dtype).to(device).requires_grad_()
    y = torch.rand(n, 3, generator=g, dtype=dtype).to(device)
    out = {}
    for ov in (False, True):
        loss = otcore.SinkhornLoss(eps=0.0025, overrelax=ov, max_iter=50000)

        def step():
            val = loss(x, y)
            return val, torch.autograd.grad(val, x)[0]

        with warnings.catch_warnings(record=True) as caught:  # a solve short of tol warns
            warnings.simplefilter("always", otcore.ConvergenceWarning)
            (val, grad), t = timed(step, device)
        conv = not any(issubclass(w.category, otcore.ConvergenceWarning) for w in caught)
        out[ov] = (val.detach(), grad, t, conv)
    (v0, g0, t0, c0), (v1, g1, t1, c1) = out[False], out[True]
    dv = abs(float(v1 - v0)) / abs(float(v0))
    dg = float((g1 - g0).abs().max() / g0.abs().max())
    print(f"SinkhornLoss fwd+bwd, n = {n}, d = 3, eps = 0.0025: plain {1e3 * t0:.1f} ms "
          f"({'converged' if c0 else 'a solve NOT converged'}), relaxed {1e3 * t1:.1f} ms "
          f"({'converged' if c1 else 'a solve NOT converged'}), {t0 / t1:.1f}x; value rel diff {dv:.1e}, "
          f"gradient {dg:.1e}")
    ok &= dv <= 1e-3 and dg <= 1e-2 and c1
    rows.append(dict(problem=f"SinkhornLoss fwd+bwd n={n}", plain_ms=1e3 * t0, relaxed_ms=1e3 * t1, rel_dvalue=dv,
                     converged=c0 and c1))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "overrelax.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}/overrelax.csv; {'all checks passed' if ok else 'CHECK FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
