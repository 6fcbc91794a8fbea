"""Where the GPU time goes: tile sweeps of the streamed kernels and traces of whole solves.

    python bench/gpu_profile.py --out DIR            # on the GPU (about 4 minutes)
    python bench/gpu_profile.py --quick --out DIR    # plumbing dry run on the CPU (interpreter)

Written after the first GPU run (docs/benchmarks.md), to explain its misses with numbers:

1. ``sweep``: one softmin pass (``kernels/softmin.py``) per tile shape ``(BLOCK_I, BLOCK_J,
   num_warps)``, for the d = 3 direct cost, the d = 64 3xTF32 and tf32 dots (32768 points)
   and the dense cost read along rows and down columns (8192 and 32768); also the dense
   pass with the reduced axis unsplit and without the log-sum-exp shift. Every variant's
   output is compared with the default tile's (max relative difference), so a faster tile
   is also a correct one.
2. ``ksparse``: one k-sparse column pass (``kernels/ksparse.py``, k = 4, 2048 x 2048 and
   8192 x 8192 dense cost) per ``(BLOCK_L, BLOCK_N, num_warps)``: the number of programs is
   ``cdiv(columns, BLOCK_L)``: 32 at 2048 columns with the layout of the first run (64
   lines per program), 2048 with the CUDA default since (one line per program).
3. ``traces``: torch.profiler over an eager Sinkhorn solve (8192 x 8192, d = 3, 50
   iterations), the SwAV solve (3000 x 4096 dense, 3 iterations), SinkhornLoss forward +
   backward (10,000 points, d = 3), 20 L-BFGS iterations of sparse_ot (2048) and 5 Newton
   steps of sinkhorn_newton (500-point random assignment, float64): wall time
   against the summed GPU kernel time (the rest is the host: launches, syncs), kernels
   launched, and the top kernels by GPU time.
4. ``phases``: where a solve's wall time goes by geometry primitive: every primitive call
   (each goes through ``otcore._dispatch.primitive``) timed with the device synchronised
   around it, outermost calls only, and the rest (the solver's own torch operations and
   host reads) as the remainder; for SNS on the 4096-point cloud at eps 1e-3 (float64, the
   GPU check's c1 row: 62 ms in 4 Newton steps on the H200, not broken down), the SwAV
   solve, 20 L-BFGS iterations of sparse_ot (2048) and a router call (4096 x 8, forward +
   backward). The synchronisations add host waits, so the totals exceed a plain run's
   wall time (printed beside). Also a cProfile of 200 queued softmin launches: the
   host's time per launch by function (Triton's launcher, otcore's wrapper, torch).
5. ``ncu`` (if on PATH): Nsight Compute's speed-of-light, compute-pipe and warp-stall
   sections for the d = 3 and d = 64 softmin passes and the dense column pass.

Every section writes ``profile.json`` when it ends and stops at its share of ``--budget``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: the kernels run in the interpreter

import triton  # noqa: E402

import otcore  # noqa: E402
from otcore.kernels import ksparse as _ksparse  # noqa: E402
from otcore.kernels import softmin as _softmin  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bandwidth import copy_bandwidth  # noqa: E402
from bench_latency import time_ms  # noqa: E402  (median ms: CUDA events, or wall clock on a CPU)

EPS = 0.05
T0 = time.time()
REPS = 20  # timed calls per variant (2 with --quick)


def relerr(a, b) -> float:
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    return float((a[fin] - b[fin]).abs().max() / b[fin].abs().max().clamp_min(1e-30))


class Tiles:
    """Patches ``kernels.softmin.pass_tiles`` (and ``num_splits``) for the ``with`` block."""

    def __init__(self, tile=None, splits=None):
        self.tile, self.splits = tile, splits

    def __enter__(self):
        self.old = _softmin.pass_tiles, _softmin.num_splits
        if self.tile is not None:
            _softmin.pass_tiles = lambda *a, **k: self.tile
        if self.splits is not None:
            _softmin.num_splits = lambda *a, **k: self.splits
        return self

    def __exit__(self, *exc):
        _softmin.pass_tiles, _softmin.num_splits = self.old


def floor_ms(n: int, m: int) -> float:
    """One pass's exp floor: n m exp2 at 4.2e12/s (TARGETS.md's H100 figure)."""
    return n * m / 4.2e12 * 1e3


def points_case(n, d, mode, ip, g, device):
    x = torch.rand(1, n, d, generator=g).to(device)
    y = (torch.rand(1, n, d, generator=g) * 0.9 + 0.05).to(device)
    mu = (x.sum(1, keepdim=True) + y.sum(1, keepdim=True)) / (2 * n)
    x, y = (x - mu).contiguous(), (y - mu).contiguous()
    feats = (_softmin.dot_features(x, ip), _softmin.dot_features(y, ip)) if mode == _softmin.COST_DOT else None
    op = _softmin.point_operand(x, y, False, "tf32" if ip == "tf32" else "fp32", mode=mode, features=feats)
    how = {_softmin.COST_DIRECT: "direct", _softmin.COST_EXPAND: "FMA expansion"}.get(mode, "dot " + ip)
    return f"points n={n} d={d} {how}", op, n, n


def sweep(device, quick: bool, deadline: float, rec: dict):
    n = 96 if quick else 32768
    nd = 80 if quick else 8192
    g = torch.Generator().manual_seed(0)
    tiles = [(64, 64, 8), (128, 64, 8), (64, 128, 8), (128, 128, 8), (64, 64, 4), (128, 64, 4)]
    if quick:
        tiles = [(64, 64, 8), (32, 32, 4)]
    cases = []
    for d, mode, ip in ((3, _softmin.COST_DIRECT, "tf32x3"), (3, _softmin.COST_EXPAND, "tf32x3"),
                        (64, _softmin.COST_DOT, "tf32x3")):
        cases.append(points_case(n, d, mode, ip, g, device))
    C = torch.rand(1, nd, nd, generator=g).to(device)
    cases.append((f"dense {nd} cols", _softmin.dense_operand(C, transposed=True), nd, nd))
    cases.append((f"dense {nd} rows", _softmin.dense_operand(C, transposed=False), nd, nd))
    cases.append(points_case(n, 64, _softmin.COST_DOT, "tf32", g, device))
    if not quick:
        C = torch.rand(1, 32768, 32768, generator=g).to(device)
        cases.append(("dense 32768 cols", _softmin.dense_operand(C, transposed=True), 32768, 32768))
    out = rec.setdefault("sweep", [])
    for name, op, n_own, n_oth in cases:
        h = (torch.rand(1, n_oth, generator=g) * 0.1).to(device)
        hint = _softmin.launch_softmin(op, h, EPS)
        base = None
        variants = [(f"tile {t}", Tiles(tile=t), hint) for t in tiles]
        if name.startswith("dense"):
            variants += [("default, unsplit", Tiles(splits=1), hint), ("default, no shift hint", Tiles(), None)]
        for label, patch, hv in variants:
            if time.time() > deadline:
                print(f"  sweep: out of time before {name} {label}")
                return
            try:
                with patch:
                    res = _softmin.launch_softmin(op, h, EPS, hint=hv)
                    ms = time_ms(lambda: _softmin.launch_softmin(op, h, EPS, hint=hv), device, REPS)
            except Exception as e:  # noqa: BLE001 (a tile that does not compile is a result too)
                print(f"  {name:32s} {label:28s} FAILED {type(e).__name__}: {str(e)[:120]}")
                out.append(dict(case=name, variant=label, error=f"{type(e).__name__}: {str(e)[:300]}"))
                continue
            base = res if base is None else base
            err = relerr(res, base)
            frac = floor_ms(n_own, n_oth) / ms
            print(f"  {name:32s} {label:28s} {ms:9.4f} ms  {100 * frac:5.1f}% of exp floor  diff vs first {err:.1e}")
            out.append(dict(case=name, variant=label, ms=ms, exp_floor_frac=frac, diff=err))


def ksparse_sweep(device, quick: bool, deadline: float, rec: dict):
    g = torch.Generator().manual_seed(1)
    k, gamma = 4, 10.0
    configs = [(64, 32, 8), (16, 32, 4), (8, 32, 4), (4, 32, 4), (2, 32, 2), (1, 32, 1), (1, 64, 1), (16, 64, 4),
               (4, 64, 4), (1, 128, 2), (4, 128, 4)]
    if quick:
        configs = [(64, 32, 8), (4, 32, 4)]
    out = rec.setdefault("ksparse", [])
    copy_bps = copy_bandwidth(device)[0]  # (measured once where gpu_check.sh did not pass it)
    for n in ((48,) if quick else (2048, 8192)):
        C = torch.rand(1, n, n, generator=g).to(device)
        geom = otcore.CostMatrix(C)
        h = (torch.rand(1, n, generator=g) * 0.1).to(device)
        mass = torch.full((1, n), 1.0 / n, device=device)
        base = None
        old_bs = _ksparse.block_sizes
        for bl, bn, w in configs:
            if time.time() > deadline:
                print("  ksparse: out of time")
                return
            _ksparse.block_sizes = lambda k_, dev_, bl=bl, bn=bn, w=w: (bl, bn, w)
            try:
                run = lambda: _ksparse.ksparse_columns(geom, h, gamma, k, 0, mass=mass)  # noqa: E731
                res = run()
                ms = time_ms(run, device, REPS)
            except Exception as e:  # noqa: BLE001
                print(f"  ksparse n={n} BLOCK_L={bl} BLOCK_N={bn} warps={w} FAILED {type(e).__name__}: {str(e)[:120]}")
                out.append(dict(n=n, block_l=bl, block_n=bn, warps=w, error=str(e)[:300]))
                continue
            finally:
                _ksparse.block_sizes = old_bs
            base = res if base is None else base
            err = max(relerr(res.beta, base.beta), relerr(res.vals, base.vals))
            same_idx = bool((res.idx == base.idx).all())
            # one read of C at copy bandwidth (_bandwidth's convention, as bench_sparse_ot's:
            # N bytes read in N / copy_Bps; the environment's figure was a string divided by 2)
            read_ms = n * n * 4 / copy_bps * 1e3
            print(f"  ksparse n={n:5d} BLOCK_L={bl:3d} BLOCK_N={bn:4d} warps={w} programs={triton.cdiv(n, bl):5d} "
                  f"{ms:8.4f} ms  ({100 * read_ms / ms:5.1f}% of one read of C)  diff {err:.1e} same idx {same_idx}")
            out.append(dict(n=n, block_l=bl, block_n=bn, warps=w, ms=ms, read_frac=read_ms / ms, diff=err,
                            same_idx=same_idx))


def trace(name: str, fn, device, rec: dict, top: int = 6):
    """Wall ms of one ``fn()`` (after a warm-up), the summed GPU kernel time and the launches."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    t = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall_prof = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t) * 1e3
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.device_time for e in kernels) / 1e3 if kernels else 0.0
    by_name: dict = {}
    for e in kernels:
        c = by_name.setdefault(e.name[:70], [0, 0.0])
        c[0] += 1
        c[1] += e.device_time / 1e3
    syncs = sum(1 for e in prof.events() if e.name in ("aten::_local_scalar_dense", "cudaStreamSynchronize",
                                                      "cudaDeviceSynchronize", "aten::item"))
    print(f"  {name}: wall {wall:.2f} ms (under the profiler {wall_prof:.2f}), GPU kernels {gpu_ms:.2f} ms "
          f"({100 * gpu_ms / max(wall, 1e-9):.0f}% busy), {len(kernels)} launches, {syncs} host reads")
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    for kname, (cnt, ms) in rows:
        print(f"      {ms:9.3f} ms in {cnt:5d} x {kname}")
    rec.setdefault("traces", []).append(dict(name=name, wall_ms=wall, gpu_ms=gpu_ms, launches=len(kernels),
                                             host_reads=syncs, top=[dict(kernel=k, count=c, ms=m)
                                                                    for k, (c, m) in rows]))


def launch_overhead(device, rec: dict):
    """Host microseconds per call, queued without a sync: a softmin launch on a 64 x 64
    problem, and a torch addition of two 64-vectors."""
    g = torch.Generator().manual_seed(3)
    op = points_case(64, 3, _softmin.COST_DIRECT, "tf32x3", g, device)[1]
    h = torch.zeros(1, 64, device=device)
    res = {}
    for name, fn in (("softmin launch", lambda: _softmin.launch_softmin(op, h, EPS)), ("torch add", lambda: h + h)):
        for _ in range(5):
            fn()
        reps = 200 if device.type == "cuda" else 5
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        res[name] = (time.perf_counter() - t) / reps * 1e6
        if device.type == "cuda":
            torch.cuda.synchronize()
    print("  host us per call (queued, no sync): " + ", ".join(f"{k} {v:.1f}" for k, v in res.items()))
    rec["launch_us"] = res


def traces(device, quick: bool, deadline: float, rec: dict):
    launch_overhead(device, rec)
    g = torch.Generator().manual_seed(2)
    s = (lambda v: max(8, v // 128)) if quick else (lambda v: v)
    x = torch.rand(s(8192), 3, generator=g).to(device)
    y = torch.rand(s(8192), 3, generator=g).to(device)
    geom = otcore.PointCloud(x, y)
    jobs = [("sinkhorn 8192 d=3, 50 iterations, eager",
             lambda: otcore.sinkhorn(geom, eps=EPS, tol=1e-30, max_iter=50, verbose=False))]
    feats = torch.nn.functional.normalize(torch.randn(s(3000), 128, generator=g), dim=1).to(device)
    protos = torch.nn.functional.normalize(torch.randn(s(4096), 128, generator=g), dim=1).to(device)
    sw = otcore.CostMatrix(-(feats @ protos.T))
    jobs.append(("swav 3000x4096 dense, 3 iterations", lambda: otcore.sinkhorn(sw, eps=EPS, tol=1e-30, max_iter=3,
                                                                              verbose=False)))
    xl = torch.rand(s(10000), 3, generator=g).to(device).requires_grad_(True)
    yl = (torch.rand(s(10000), 3, generator=g) * 0.9 + 0.05).to(device)
    loss = otcore.SinkhornLoss(eps=2 * 0.05**2)

    def loss_step():
        v = loss(xl, yl)
        torch.autograd.grad(v, xl)

    jobs.append(("SinkhornLoss fwd+bwd 10000 d=3 eps 0.005", loss_step))
    Cs = torch.rand(s(2048), s(2048), generator=g).to(device)
    jobs.append(("sparse_ot 2048 k=4 gamma=10, 20 L-BFGS iterations",
                 lambda: otcore.sparse_ot(otcore.CostMatrix(Cs), k=4, gamma=10.0, max_iter=20, verbose=False)))
    # SNS on Table 1's random assignment (float64): 5 Newton steps after the warm-up, each CG
    # solve one launch (kernels/sparse_cg.py)
    Ca = torch.rand(s(500), s(500), generator=g, dtype=torch.float64).to(device)
    jobs.append(("sinkhorn_newton random assignment 500 f64 eps 1/1200, 5 Newton steps",
                 lambda: otcore.sinkhorn_newton(otcore.CostMatrix(Ca), eps=1 / 1200, tol=1e-30, max_iter=5,
                                                verbose=False)))
    run_jobs("traces", trace, jobs, device, deadline, rec)


def run_jobs(section: str, measure, jobs, device, deadline: float, rec: dict):
    """``measure(name, fn, device, rec)`` for each ``(name, fn)`` of ``jobs`` until the deadline,
    warnings silenced; a job's failure is printed and the next one runs."""
    import warnings

    for name, fn in jobs:
        if time.time() > deadline:
            print(f"  {section}: out of time before {name}")
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                measure(name, fn, device, rec)
            except Exception as e:  # noqa: BLE001
                print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:200]}")


class PrimitiveTimes:
    """While on: each outermost geometry primitive call's milliseconds (device synchronised
    before and after) and calls, by name, through a patched ``otcore._dispatch.primitive``."""

    def __init__(self, device):
        self.device, self.ms, self.calls, self.depth = device, {}, {}, 0

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def __enter__(self):
        from otcore import _dispatch

        self.module, self.orig = _dispatch, _dispatch.primitive

        def primitive(name, backend):
            fn = self.orig(name, backend)

            def timed(*args, **kwargs):
                if self.depth:
                    return fn(*args, **kwargs)
                self.sync()
                t = time.perf_counter()
                self.depth += 1
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.depth -= 1
                    self.sync()
                    self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t) * 1e3
                    self.calls[name] = self.calls.get(name, 0) + 1
            return timed

        _dispatch.primitive = primitive
        return self

    def __exit__(self, *exc):
        self.module.primitive = self.orig


def phase_split(name: str, fn, device, rec: dict):
    """One ``fn()`` plain (wall ms) and one under :class:`PrimitiveTimes` (after a warm-up)."""
    fn()
    timer = PrimitiveTimes(device)
    timer.sync()
    t = time.perf_counter()
    fn()
    timer.sync()
    wall = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    with timer:
        fn()
        timer.sync()
    total = (time.perf_counter() - t) * 1e3
    inside = sum(timer.ms.values())
    print(f"  {name}: wall {wall:.2f} ms; with each primitive synchronised {total:.2f} ms, "
          f"{inside:.2f} in primitives, {total - inside:.2f} outside (the solver's own operations)")
    for prim, ms in sorted(timer.ms.items(), key=lambda kv: -kv[1]):
        print(f"      {ms:9.3f} ms in {timer.calls[prim]:5d} x {prim}")
    rec.setdefault("phases", []).append(dict(name=name, wall_ms=wall, synced_ms=total, primitives_ms=timer.ms,
                                             calls=timer.calls))


def launch_profile(device, rec: dict, top: int = 12):
    """cProfile of queued softmin launches on a 64 x 64 problem: host microseconds per launch
    by function (own time), the biggest ``top``."""
    import cProfile
    import pstats

    g = torch.Generator().manual_seed(3)
    op = points_case(64, 3, _softmin.COST_DIRECT, "tf32x3", g, device)[1]
    h = torch.zeros(1, 64, device=device)
    reps = 200 if device.type == "cuda" else 3
    for _ in range(3):
        _softmin.launch_softmin(op, h, EPS)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        _softmin.launch_softmin(op, h, EPS)
    prof.disable()
    if device.type == "cuda":
        torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, prim calls, own s, cumulative s, callers)
    rows = sorted(((v[2], k, v[0]) for k, v in stats.items()), reverse=True)[:top]
    total = sum(v[2] for v in stats.values()) / reps * 1e6
    print(f"  softmin launch under cProfile: {total:.1f} us of host time per launch (profiler overhead included); "
          f"own time by function, us per launch:")
    out = []
    for own, (path, line, fn_name), calls in rows:
        where = f"{os.path.basename(path)}:{line} {fn_name}"
        print(f"      {own / reps * 1e6:8.2f}  {calls / reps:5.1f} calls  {where}")
        out.append(dict(where=where, us=own / reps * 1e6, calls=calls / reps))
    rec["launch_profile"] = dict(total_us=total, top=out)


def phases(device, quick: bool, deadline: float, rec: dict):
    launch_profile(device, rec)
    g = torch.Generator().manual_seed(4)
    s = (lambda v: max(8, v // 64)) if quick else (lambda v: v)
    n = s(4096)
    cloud = otcore.PointCloud(torch.rand(n, 2, generator=g, dtype=torch.float64).to(device),
                              torch.rand(n, 2, generator=g, dtype=torch.float64).to(device))
    feats = torch.nn.functional.normalize(torch.randn(s(3000), 128, generator=g), dim=1).to(device)
    protos = torch.nn.functional.normalize(torch.randn(s(4096), 128, generator=g), dim=1).to(device)
    sw = otcore.CostMatrix(-(feats @ protos.T))
    Cs = torch.rand(s(2048), s(2048), generator=g).to(device)
    scores = torch.randn(s(4096), 8, generator=g).to(device).requires_grad_(True)
    router = otcore.SparseOTRouter(n_experts=8)
    weights = torch.rand(8, 1, generator=g).to(device)

    def route():
        out = router(scores)
        torch.autograd.grad((out.combine_weights * weights).sum(), scores)

    jobs = [("sinkhorn_newton cloud 4096 2-D f64 eps 1e-3 tol 1e-6",
             lambda: otcore.sinkhorn_newton(cloud, eps=1e-3, tol=1e-6, verbose=False)),
            ("swav 3000x4096 dense, 3 iterations", lambda: otcore.sinkhorn(sw, eps=EPS, tol=None, max_iter=3)),
            ("sparse_ot 2048 k=4 gamma=10, 20 L-BFGS iterations",
             lambda: otcore.sparse_ot(otcore.CostMatrix(Cs), k=4, gamma=10.0, max_iter=20, verbose=False)),
            ("router 4096 x 8 capacity, forward + backward", route)]
    run_jobs("phases", phase_split, jobs, device, deadline, rec)


NCU_SCRIPT = r"""
import sys, torch
from otcore.kernels import softmin as sm
g = torch.Generator().manual_seed(0)
for d, mode in ((3, sm.COST_DIRECT), (3, sm.COST_EXPAND), (64, sm.COST_DOT)):
    n = 32768
    x = (torch.rand(1, n, d, generator=g) - 0.5).cuda(); y = (torch.rand(1, n, d, generator=g) - 0.5).cuda()
    f = (sm.dot_features(x, "tf32x3"), sm.dot_features(y, "tf32x3")) if mode == sm.COST_DOT else None
    op = sm.point_operand(x, y, False, "fp32", mode=mode, features=f)
    h = torch.zeros(1, n, device="cuda")
    sm.launch_softmin(op, h, 0.05)
C = torch.rand(1, 8192, 8192, generator=g).cuda()
sm.launch_softmin(sm.dense_operand(C, transposed=True), torch.zeros(1, 8192, device="cuda"), 0.05)
torch.cuda.synchronize()
"""


def ncu(device, deadline: float, out_dir: str, rec: dict):
    exe = shutil.which("ncu") or next((p for p in ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/ncu")
                                       if os.path.exists(p)), None)
    if device.type != "cuda" or exe is None:
        print("  ncu: skipped (no CUDA or no ncu)")
        return
    left = int(deadline - time.time())
    if left < 20:
        print("  ncu: skipped (no time left)")
        return
    script = os.path.join(out_dir, "ncu_target.py")
    with open(script, "w") as fh:
        fh.write(NCU_SCRIPT)
    cmd = [exe, "--clock-control", "none", "--kernel-name", "regex:softmin", "--launch-count", "4",
           "--section", "SpeedOfLight", "--section", "ComputeWorkloadAnalysis", "--section", "WarpStateStats",
           sys.executable, script]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
        text = p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        text += "\n(ncu stopped at its time limit)"
    keep = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("==PROF==")]
    print("\n".join(keep[-400:]))
    rec["ncu"] = "\n".join(keep)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/gpu_profile")
    ap.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (interpreter)")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for all sections")
    ap.add_argument("--only", nargs="*", default=["sweep", "ksparse", "traces", "phases", "ncu"])
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    global REPS
    REPS = 2 if args.quick else REPS
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (interpreter)"
    print(f"# gpu_profile on {name}, torch {torch.__version__}, triton {triton.__version__}, budget {args.budget}s")
    rec: dict = dict(device=name, torch=torch.__version__, triton=triton.__version__)
    shares = dict(sweep=0.35, ksparse=0.15, traces=0.20, phases=0.15, ncu=0.15)
    path = os.path.join(args.out, "profile.json")
    for part in ("sweep", "ksparse", "traces", "phases", "ncu"):
        if part not in args.only:
            continue
        share = shares[part] / sum(shares[p] for p in args.only if p in shares)  # of the sections run
        deadline = min(T0 + args.budget, time.time() + share * args.budget)
        if part == "ncu":
            deadline = T0 + args.budget
        print(f"== {part} (at {time.time() - T0:.0f}s, until {deadline - T0:.0f}s)")
        fn = dict(sweep=lambda: sweep(device, args.quick, deadline, rec),
                  ksparse=lambda: ksparse_sweep(device, args.quick, deadline, rec),
                  traces=lambda: traces(device, args.quick, deadline, rec),
                  phases=lambda: phases(device, args.quick, deadline, rec),
                  ncu=lambda: ncu(device, deadline, args.out, rec))[part]
        try:
            fn()
        except Exception as e:  # noqa: BLE001 (one part's failure must not lose the others)
            print(f"  {part}: FAILED {type(e).__name__}: {e}")
        with open(path, "w") as fh:
            json.dump(rec, fh, indent=1)
    print(f"# done in {time.time() - T0:.0f}s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
