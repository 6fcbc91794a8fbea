"""Merge the outputs of bench/gpu_check.sh's parts and print a compact summary.

    python bench/gpu_check_summary.py --work WORK --out OUT [--plot] [--quiet]

Reads ``WORK/env.json``, ``WORK/parts.tsv`` and each part's results (``a``, ``a2``,
``b``, ``e``: bench_sinkhorn_kernels ``results.json``; ``c1``, ``c2``: bench_newton
``newton.json``; ``d``: bench_sparse_ot ``sparse_ot.json``) and writes to OUT:
``summary.txt``, ``kernels.csv``, ``newton.csv``, ``sparse_ot.json``, ``raw.tar.gz``
(WORK without the staged packages) and, with ``--plot``, ``sinkhorn_kernels.png``.
Imports neither torch nor otcore unless ``--plot`` (so it can run after every part).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import shutil
import sys
import tarfile

KERNEL_PARTS = ("a", "a2", "b", "e")
NEWTON_PARTS = ("c1", "c2")


def load(path, default=None):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return default


def fmt(v, spec=".3g", none="-"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def write_csv(rows, path):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def kernel_rows(work):
    rows, meta = [], None
    for part in KERNEL_PARTS:
        res = load(os.path.join(work, part, "results.json"))
        if res:
            meta = meta or res["meta"]
            rows += [dict(r, part=part) for r in res["rows"]]
    return rows, meta


def section_kernels(rows, say):
    say("[a/a2/e] Sinkhorn iteration (row + column pass), eps 0.05, ms; floor = 2nm exp2 at 4.2e12/s (docs/benchmarks.md)")
    rows = [r for r in rows if r["section"] in ("pass_error", "solve_error", "iteration_ms")]
    sizes = list(dict.fromkeys((r["n"], r["d"]) for r in rows if r["section"] in ("pass_error", "iteration_ms")))
    if not sizes:
        say("  no results")
        return
    for n, d in sizes:
        at = [r for r in rows if r["n"] == n and r["d"] == d]
        err, sol = {}, {}  # the first part's rows (a; e repeats sizes with fewer warm iterations)
        for r in at:
            if r["section"] in ("pass_error", "solve_error"):
                (err if r["section"] == "pass_error" else sol).setdefault(r["method"], r)
        line = f"  n={n:<8d} d={d:<3d} pass relerr vs f64 (row/col[/pair: max abs error / max(|f|, |g|)]):"
        for m in ("fp32", "fp32 shifted", "tf32", "torch dense fp32"):
            if m in err:
                line += f" {m} {fmt(err[m]['row_relerr'], '.1e')}/{fmt(err[m]['col_relerr'], '.1e')}"
                if "pair_relerr" in err[m]:  # absent in results written before it was added
                    line += f"/{fmt(err[m]['pair_relerr'], '.1e')}"
        say(line)
        if sol:
            say("      full solve vs f64 (f/g/cost): " + "  ".join(
                f"{m} {fmt(r['f_relerr'], '.1e')}/{fmt(r['g_relerr'], '.1e')}/{fmt(r['cost_relerr'], '.1e')} ({r['n_iter']} it)"
                for m, r in sol.items()))
        seen = {}
        for r in at:
            if r["section"] == "iteration_ms":
                seen.setdefault(r["method"], []).append(r)
        for m, rs in seen.items():
            r = rs[0]
            again = f" (again in part {rs[1]['part']}: {rs[1]['ms']:.4g})" if len(rs) > 1 else ""
            tgt = ""
            if r.get("target_ms") is not None:
                tgt = f"  target <= {r['target_ms']:g}: {'met' if r['target_met'] else 'MISSED'}"
            say(f"      {m:24s} {r['ms']:10.4g} ms  {r['floor_fraction']:7.1%} of floor {r['floor_ms']:.3g}{tgt}{again}")


def section_costmatrix(rows, say):
    rows = [r for r in rows if r["section"].startswith("costmatrix_")]
    tim = [r for r in rows if r["section"] == "costmatrix_iteration_ms"]
    bw = f"{tim[0]['copy_Bps'] / 1e12:.3g} TB/s" if tim else "copy bandwidth"
    say(f"[a] dense CostMatrix input, float32, ms per iteration; floor = 2 reads of C (2nm*4 bytes) at {bw} "
        "(target: >= 80% of copy bandwidth)")
    if not rows:
        say("  no results")
        return
    for n in dict.fromkeys(r["n"] for r in rows):
        err = [r for r in rows if r["n"] == n and r["section"] == "costmatrix_pass_error"]
        line = f"  n=m={n:<8d}"
        if err:
            line += f" pass relerr vs f64 (row/col) {fmt(err[0]['row_relerr'], '.1e')}/{fmt(err[0]['col_relerr'], '.1e')}"
        for r in (r for r in tim if r["n"] == n):
            line += (f" | {r['ms']:.4g} ms = {r['floor_fraction']:.1%} of copy bandwidth (floor {r['floor_ms']:.3g} ms)"
                     f"  target >= {r['target_fraction']:.0%}: {'met' if r['target_met'] else 'MISSED'}")
        say(line)


def section_loss(rows, say):
    n = rows[0]["n"] if rows else "-"
    say(f"[b] SinkhornLoss fwd+bwd, debiased, n=m={n} d=3 (targets at n=10,000, blur 0.05: GeomLoss 73.7 ms on "
        "an H100, target 20x faster)")
    chk = [r for r in rows if r["section"] == "loss_check"]
    tim = [r for r in rows if r["section"] == "loss_fwd_bwd_ms"]
    if not chk and not tim:
        say("  no results")
    for r in chk:
        say(f"  check vs float64 torch path: value relerr {fmt(r.get('value_relerr'), '.1e')}, "
            f"grad relerr {fmt(r.get('grad_relerr'), '.1e')}")
    for r in tim:
        extra = ""
        if r.get("target_ms") is not None:
            extra = f"  target <= {r['target_ms']:.2f} ms: {'met' if r['target_met'] else 'MISSED'}"
        if r.get("geomloss_value_relerr") is not None:  # otcore at GeomLoss's accuracy
            extra = (f"  {r['speedup_of_otcore']:.1f}x faster than that GeomLoss; value/grad relerr vs f64 "
                     f"{fmt(r['value_relerr'], '.1e')}/{fmt(r['grad_relerr'], '.1e')} (GeomLoss "
                     f"{fmt(r['geomloss_value_relerr'], '.1e')}/{fmt(r['geomloss_grad_relerr'], '.1e')})")
        elif r.get("default_speedup") is not None:  # the plain loss (overrelax=False)
            extra += (f"  the default is {r['default_speedup']:.1f}x faster; value/grad relerr vs f64 "
                      f"{fmt(r.get('value_relerr'), '.1e')}/{fmt(r.get('grad_relerr'), '.1e')}")
        elif r.get("speedup_of_otcore") is not None:
            extra = (f"  otcore {r['speedup_of_otcore']:.1f}x faster; value/grad relerr vs otcore "
                     f"{fmt(r['value_relerr_vs_otcore'], '.1e')}/{fmt(r['grad_relerr_vs_otcore'], '.1e')}")
        say(f"  {r['method']:32s} {r['ms']:9.3f} ms{extra}")


def section_newton(rows, say):
    say("[c1/c2] SNS vs Sinkhorn to L1 marginal error 1e-6 (float32: 1e-5) (target: SNS >= 10x faster at small "
        "eps, same plan)")
    if not rows:
        say("  no results")
        return
    for r in rows:
        extra = ""
        if r.get("speedup_sns") not in (None, ""):
            sp = float(r["speedup_sns"])
            conv = r["converged"] in (True, "True")
            extra = f" floor {float(r['floor_fraction']):.1%}, SNS {'>=' if not conv else ''}{sp:.1f}x faster"
        say(f"  {r['problem'][:20]:20s} n={r['n']:<6} eps={float(r['eps']):<8.3g} {r['dtype']:7s} {r['solver'][:30]:30s} "
            f"{int(r['iters']):>7d} it {float(r['time_s']):8.3f}s err {float(r['marginal_error']):.1e} "
            f"{'conv' if r['converged'] in (True, 'True') else 'NOT conv'} "
            f"err64 {fmt(float(r['err64']) if r.get('err64') not in (None, '') else None, '.1e')} "
            f"|P-Psns| {fmt(float(r['plan_l1_vs_sns']) if r.get('plan_l1_vs_sns') not in (None, '') else None, '.1e')}"
            f"{extra}")


def section_sparse(rows, dev_ref, say):
    say("[d] sparse OT (k=4, gamma=10; target: >= 100x POT at n=2048) and OT router (target <= 2x softmax top-2)")
    if not rows:
        say("  no results")
        return
    for r in rows:
        if r["part"] == "solver":
            s = (f"  n={r['n']:<6d} ours {r['ours_s']:.3f}s ({r['ours_iters']} it) value {r['ours_value']:.7g}"
                 f" | {r.get('kernel_ms', float('nan')):.3f} ms per evaluation = {r['floor_fraction']:.1%} of one read"
                 f" of C (in the L-BFGS loop {r['eval_ms']:.3f} ms)"
                 f"{' at %.3g TB/s' % (r['copy_Bps'] / 1e12) if r.get('copy_Bps') else ''}")
            if r.get("value_relerr_vs_f64") is not None:
                s += f" | vs f64 {r['value_relerr_vs_f64']:.1e}"
            if r.get("value_backward_s") is not None:  # (rows since 2026-12-04)
                s += (f" | value backward {r['value_backward_s']:.3f}s"
                      f" ({'mixed at a kink' if r['value_grad_mixed'] else 'the plan'})")
            if r.get("pot_value") is not None:
                reached = r.get("ours_to_pot_value_s")
                key = f"n={r['n']},k={r['k']},gamma={r['gamma']:g},seed=0"
                pot_s, src, provisional = r["pot_s"], r["pot_source"], bool(r.get("pot_provisional"))
                if key in dev_ref:  # POT measured on this machine in the background
                    pot_s, src, provisional = dev_ref[key]["pot_s"], "this machine", False
                sp = f"{pot_s / reached:.3g}x" if reached else "POT's value not reached"
                cold = r.get("cold_to_pot_value_s")
                s += f" | POT {pot_s:.1f}s ({src[:40]}) -> {sp}"
                if "relaxed_s" in r:  # (rows since 2026-12-02)
                    s += (f" (relaxed start {r['relaxed_s']:.3f}s; from zero "
                          f"{f'{pot_s / cold:.3g}x' if cold else 'not reached'})")
                if r["n"] == 2048:
                    met = bool(reached) and pot_s / reached >= 100
                    s += f", target >= 100x: {'met' if met else 'MISSED'}"
                if provisional:
                    s += " -- provisional (stored POT reference)"
            say(s)
        else:
            say(f"  router T={r['tokens']:<6d} E={r['experts']:<4d} {r['mode']:8s} softmax {r['softmax_top2_ms']:8.3f} ms"
                f"  OT {r['ot_ms']:9.3f} ms ({r['ot_iters']} it)  ratio {r['ratio']:6.1f}"
                + (f"  warm start {r['ot_warm_ms']:9.3f} ms ({r['ot_warm_iters']} it)  ratio {r['ratio_warm']:6.1f}"
                   if "ot_warm_ms" in r else "")
                + f"  check {'ok' if r.get('check_ok') else 'FAILED'} ({fmt(r.get('check_deviation'), '.1e')})")


def make_tar(work, path):
    with tarfile.open(path, "w:gz") as tar:
        for name in sorted(os.listdir(work)):
            if name not in ("site", "peers"):
                tar.add(os.path.join(work, name), arcname=name)


def read_csv(work, part, name):
    """A part's CSV as a list of dicts, or None when the part wrote none."""
    try:
        with open(os.path.join(work, part, name)) as fh:
            return list(csv.DictReader(fh))
    except OSError:
        return None


def section_latency(work, say):
    """Part l: bench_latency.py's latency.csv (plain torch vs otcore, ms per call)."""
    rows = read_csv(work, "l", "latency.csv")
    if rows is None:
        return
    say("[l] latency-bound workloads, ms per call (fixed iterations; 'to tol': solves to the marginal "
        "tolerance, iterations torch/otcore): plain torch | otcore eager | per-pass (one-launch kernels off) | "
        "CUDA graph (each call records its graph once) ; check: potentials vs plain torch, or converged")
    for r in rows:
        try:
            say(f"  {r['workload']:14s} {r['shape']:>16s} {r['iters']:>9s} it  err {float(r['max_rel_err']):.1e}  "
                f"{float(r['torch_ms']):9.3f} | {float(r['otcore_ms']):9.3f} | {float(r['otcore_per_pass_ms']):9.3f} | "
                f"{float(r['otcore_graph_ms']):9.3f}  ({'>' if r.get('torch_converged') == 'False' else ''}"
                f"{float(r['speedup_vs_torch']):.2f}x torch"
                f"{', torch unconverged at its cap' if r.get('torch_converged') == 'False' else ''})"
                f"  check {'ok' if r.get('ok') == 'True' else 'FAILED'}")
        except (KeyError, TypeError, ValueError):  # a row cut short (the part killed while writing)
            say(f"  (an incomplete row skipped: {dict(r)})")


def section_overrelax(work, say):
    """Part o: bench_overrelax.py's overrelax.csv (plain vs over-relaxed Sinkhorn to one tol)."""
    rows = read_csv(work, "o", "overrelax.csv")
    if rows is None:
        return
    say("[o] plain vs overrelax=True to the same tol: iterations, ms (speed-up), final factor, both converged")
    for r in rows:
        try:
            ratio = float(r["plain_ms"]) / float(r["relaxed_ms"])
            its = f"{r['plain_iters']:>6s} -> {r['relaxed_iters']:>5s} it" if r.get("plain_iters") else " " * 19
            say(f"  {r['problem']:40s} {its}  {float(r['plain_ms']):9.2f} -> {float(r['relaxed_ms']):9.2f} ms "
                f"({ratio:.1f}x)  w {r.get('omega') or '-':>6.6s}  converged {r.get('converged') or '-'}")
        except (KeyError, TypeError, ValueError):  # a row cut short (the part killed while writing)
            say(f"  (an incomplete row skipped: {dict(r)})")


def section_plan(work, say):
    """Part p: bench_plan_kernels.py's plan.json (errors vs float64, ms per call)."""
    res = load(os.path.join(work, "p", "plan.json"))
    if not res:
        return
    say("[p] plan kernels: relerr vs float64 on sampled rows | ms per call (fraction of the exp floor)")
    rows = res["rows"]
    for n, d in dict.fromkeys((r["n"], r["d"]) for r in rows):
        at = [r for r in rows if r["n"] == n and r["d"] == d]
        err = {r["op"]: r["relerr"] for r in at if r["section"] == "plan_error"}
        say(f"  n={n:<8d} d={d:<3d} worst relerr {max(err.values()):.1e} ({max(err, key=err.get)})" if err else
            f"  n={n:<8d} d={d:<3d} no error rows")
        for r in at:
            if r["section"] == "plan_ms":
                say(f"      {r['op']:34s} {r['ms']:10.4g} ms  {r['floor_fraction']:7.1%} of floor")


def section_tests(work, say):
    """Part t: the kernel tests' outcome: pytest's last line where it got there; else (a run
    cut at its budget) the per-test lines of ``-v`` counted by outcome and file; and every
    test that failed or errored, by name."""
    try:
        with open(os.path.join(work, "t", "log.txt")) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return
    results = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
    # "path::name PASSED [ 2%]" in one process; "[gw3] [ 2%] PASSED path::name" under xdist
    serial = re.compile(rf"^(\S+?)::(\S.*?) ({results})\b")
    xdist = re.compile(rf"^\[gw\d+\] \[\s*\d+%\] ({results}) (\S+?)::(\S.*?)\s*$")

    def outcome(line):
        m = serial.match(line)
        if m:
            return m.groups()
        m = xdist.match(line)
        return m and (m[2], m[3], m[1])

    # one outcome per test: a test that passed and then errored in its teardown prints two
    # lines (counted twice, a review); the worse one stands
    worse = {"ERROR": 3, "FAILED": 2, "XPASS": 1}
    seen = {}
    for path, name, result in filter(None, map(outcome, lines)):
        if worse.get(result, 0) >= worse.get(seen.get((path, name)), 0):
            seen[(path, name)] = result
    tests = [(path, name, result) for (path, name), result in seen.items()]
    # pytest's closing line, "=== 3 passed, 1 xfailed in 2.5s ===" (any outcomes)
    last = [ln for ln in lines if re.match(r"^=+ \d+ \w+.* in [\d.]+s\b", ln)]
    if last:
        say("[t] kernel tests on this device: " + last[-1].strip("= ").strip())
    elif tests:
        counts = {}
        for path, _, result in tests:
            counts.setdefault(os.path.basename(path), {}).setdefault(result, 0)
            counts[os.path.basename(path)][result] += 1
        per_file = "; ".join(f"{name}: " + ", ".join(f"{n} {r.lower()}" for r, n in sorted(c.items()))
                             for name, c in counts.items())
        say(f"[t] kernel tests on this device, cut short after {len(tests)} tests: {per_file}")
    else:
        say("[t] kernel tests on this device: no test ran to its end (cut short?)")
    for path, name, result in tests:
        if result in ("FAILED", "ERROR"):
            say(f"  {result} {os.path.basename(path)}::{name}")
    for ln in lines:  # collection errors (no per-test line)
        if ln.startswith("ERROR") and "::" not in ln:
            say("  " + ln)


def section_phases(work, say):
    """Part f: ``gpu_profile.py --only phases``' lines as printed (the split of a solve's time
    by geometry primitive, and the host's time per softmin launch by function)."""
    try:
        with open(os.path.join(work, "f", "log.txt")) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return
    say("[f] where the time goes, by primitive (each call synchronised) and per launch (cProfile)")
    for ln in lines:
        if ln.startswith("  "):
            say(ln)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot", action="store_true", help="also draw sinkhorn_kernels.png (imports torch)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    buf = io.StringIO()

    def say(line=""):
        buf.write(line + "\n")

    env = load(os.path.join(args.work, "env.json"), {})
    peers = ", ".join(f"{k[5:]} {v or 'MISSING'}" for k, v in env.items() if k.startswith("peer_"))
    say(f"== otcore gpu_check: {env.get('gpu', 'no GPU')} ({env.get('sms', '-')} SMs, "
        f"copy {env.get('copy_TBps', '-')} TB/s measured), torch {env.get('torch')}, triton {env.get('triton')}, "
        f"python {env.get('python')}")
    say(f"   peers: {peers}")
    try:
        with open(os.path.join(args.work, "parts.tsv")) as fh:
            parts = list(csv.DictReader(fh, delimiter="\t"))
    except OSError:
        parts = []
    run = [p for p in parts if not p["status"].startswith("not selected")]
    left_out = [p["part"] for p in parts if p not in run]
    say("   parts: " + " | ".join(f"{p['part']} {p['status']} {p['used_s']}/{p['budget_s']}s" for p in run)
        + (f" | not selected (GPU_CHECK_PARTS): {' '.join(left_out)}" if left_out else ""))

    krows, meta = kernel_rows(args.work)
    section_kernels([r for r in krows if r["part"] != "b"], say)
    section_costmatrix([r for r in krows if r["part"] != "b"], say)
    section_loss([r for r in krows if r["part"] == "b" or r["section"].startswith("loss")], say)
    nrows = []
    for part in NEWTON_PARTS:
        res = load(os.path.join(args.work, part, "newton.json"))
        if res:
            nrows += res["rows"]
    section_newton(nrows, say)
    srows = load(os.path.join(args.work, "d", "sparse_ot.json"), [])
    section_sparse(srows, load(os.path.join(args.work, "pot_ref_device.json"), {}), say)
    section_latency(args.work, say)
    section_overrelax(args.work, say)
    section_plan(args.work, say)
    section_tests(args.work, say)
    section_phases(args.work, say)

    text = buf.getvalue()
    with open(os.path.join(args.out, "summary.txt"), "w") as fh:
        fh.write(text)
    if krows:
        write_csv(krows, os.path.join(args.out, "kernels.csv"))
    if nrows:
        write_csv(nrows, os.path.join(args.out, "newton.csv"))
    if srows:
        shutil.copyfile(os.path.join(args.work, "d", "sparse_ot.json"), os.path.join(args.out, "sparse_ot.json"))
    make_tar(args.work, os.path.join(args.out, "raw.tar.gz"))
    if args.plot and krows:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        try:
            from bench_sinkhorn_kernels import plot

            plot(krows, os.path.join(args.out, "sinkhorn_kernels.png"), meta or {"device": "?"})
        except Exception as e:  # noqa: BLE001 - the summary matters more than the picture
            print(f"plot failed: {type(e).__name__}: {e}")
    if not args.quiet:
        print(text, end="")


if __name__ == "__main__":
    main()
