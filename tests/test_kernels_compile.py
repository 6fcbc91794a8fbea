"""The kernels compile for an H100 (sm_90) on a machine without a GPU.

The interpreter runs a kernel's Python, not the compiler: it accepts things the compiler
rejects (a non-constexpr global read inside a kernel, for one). So each kernel family
that the interpreter tests cover is also compiled here, through Triton's own
``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` with the ``ptxas`` that ships in
the Triton wheel, in a subprocess (``TRITON_INTERPRET`` is set in this one). The streamed
passes must not spill at the tile sizes their launchers choose.
"""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

if platform.system() != "Linux":
    pytest.skip("the Triton wheel with ptxas is a dependency on Linux only", allow_module_level=True)

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from sass_counts import compile_sm90, resources, softmin_ints  # the bench's compiler call, shared
    from otcore.kernels import ksparse, plan, sinkhorn_steps, softmin, sparse, sparse_cg, sparse_cg_steps
    from otcore.kernels._intmath import next_pow2

    steps = dict(EUCLID=False, SYMMETRIC=False, CHECK=False, RELAX=False, BLOCK_N=64, BLOCK_M=64)
    cases = [
        (sinkhorn_steps.sinkhorn_steps_kernel, "fp32", dict(steps, D=3, COST=1), 8),
        (sinkhorn_steps.sinkhorn_steps_kernel, "fp32", dict(steps, D=3, COST=1, CHECK=True), 8),
        (sinkhorn_steps.sinkhorn_steps_kernel, "fp32", dict(steps, D=3, COST=1, CHECK=True, RELAX=True), 8),
        (sinkhorn_steps.sinkhorn_steps_kernel, "fp32", dict(steps, D=64, COST=1), 8),
        (sinkhorn_steps.sinkhorn_steps_kernel, "fp32", dict(steps, D=1, COST=0, BLOCK_N=4, BLOCK_M=8), 1),
        (sinkhorn_steps.sinkhorn_steps_kernel, "fp64", dict(steps, D=3, COST=1, EUCLID=True, SYMMETRIC=True,
                                                            CHECK=True), 8),
    ]
    sm = dict(EUCLID=False, BLOCK_I=64, BLOCK_J=64, PARTIAL=False, LANE=True, LOWEST=-3.4e38, SHIFT=False,
              FIXUP=False, BIAS=False, UPDATE=0)
    fused = dict(sm, BIAS=True, UPDATE=1)  # a Sinkhorn iteration's passes (reference.softmin_update)
    cases += [
        (softmin.softmin_kernel, "fp32", dict(sm, D=3, DP=4, COST=1, IP="tf32x3"), 8),
        (softmin.softmin_kernel, "fp32", dict(sm, D=3, DP=4, COST=1, IP="tf32x3", SHIFT=True, PARTIAL=True), 8),
        (softmin.softmin_kernel, "fp32", dict(sm, D=64, DP=64, COST=2, IP="tf32x3", FIXUP=True), 8),
        (softmin.softmin_kernel, "fp32", dict(sm, D=64, DP=64, COST=2, IP="tf32x3"), 8),
        # d > 64: feature slices per tile; as launched (contiguous features: unit strides)
        (softmin.softmin_kernel, "fp32", dict(sm, D=200, DP=256, COST=2, IP="tf32x3", SHIFT=True), 8,
         softmin_ints(32768, 2 * 256 + 16)),
        (softmin.softmin_kernel, "fp64", dict(sm, D=64, DP=64, COST=1, IP="ieee", LOWEST=-1.7e308), 8),
        (softmin.softmin_kernel, "fp32", dict(fused, D=3, DP=4, COST=1, IP="tf32x3"), 8),
        (softmin.softmin_kernel, "fp32", dict(fused, D=3, DP=4, COST=1, IP="tf32x3", SHIFT=True, PARTIAL=True), 8),
        (softmin.softmin_kernel, "fp32", dict(fused, D=1, DP=1, COST=0, IP="ieee", UPDATE=2, FIXUP=True), 8),
        (softmin.softmin_kernel, "fp64", dict(fused, D=3, DP=4, COST=1, IP="ieee", LOWEST=-1.7e308, UPDATE=2), 8),
        (softmin.softmin_kernel, "fp32", dict(fused, D=3, DP=4, COST=1, IP="tf32x3", UPDATE=3), 8),
        (softmin.softmin_combine_kernel, "fp32", dict(BLOCK=softmin.COMBINE_BLOCK, UPDATE=3), 4),
        (softmin.softmin_combine_kernel, "fp32", dict(BLOCK=softmin.COMBINE_BLOCK, UPDATE=0), 4),
        (softmin.softmin_combine_kernel, "fp32", dict(BLOCK=softmin.COMBINE_BLOCK, UPDATE=1), 4),
        (softmin.softmin_combine_kernel, "fp64", dict(BLOCK=softmin.COMBINE_BLOCK, UPDATE=2), 4),
    ]
    # the FMA expansion (large float32 passes at d <= 8), as launched: features of width d + 1
    for d in (3, 8):
        for flags in (dict(sm, SHIFT=True), dict(sm, SHIFT=False), dict(fused, SHIFT=True, PARTIAL=True)):
            cases.append((softmin.softmin_kernel, "fp32", dict(flags, D=d, DP=next_pow2(d), COST=3, IP="tf32x3"), 8,
                          softmin_ints(32768, d + 1)))
    # the dot path's own pass tiles (softmin.pass_tiles: 128 rows up to d = 64), d = 64 and wider
    for d, dp in ((64, 64), (200, 256)):
        bi, bj, warps = softmin.pass_tiles(32768, 32768, softmin.COST_DOT, d)
        for flags in (sm, fused):
            cases.append((softmin.softmin_kernel, "fp32", dict(flags, D=d, DP=dp, COST=2, IP="tf32x3", BLOCK_I=bi,
                                                                 BLOCK_J=bj, SHIFT=True), warps,
                          softmin_ints(32768, 2 * dp + 16)))
    tile = dict(D=3, DP=4, COST=1, EUCLID=False, IP="tf32x3", BLOCK_I=64, BLOCK_J=64)
    reduce = dict(BLOCK_K=16, HAS_V=True, V_MATRIX=True, WITH_SUM=True, WEIGHT=0, VIP="tf32x3", DIFF=False,
                  V_COST=False)
    # a result's column marginals with <P, C> (V_COST) at the launcher's tiles: dense, the point
    # costs' direct differences, FMA expansion and dot path, float64
    for dt, mode, d in ((torch.float32, softmin.COST_DENSE, 1), (torch.float32, softmin.COST_DIRECT, 3),
                        (torch.float32, softmin.COST_EXPAND, 3), (torch.float32, softmin.COST_DOT, 64),
                        (torch.float64, softmin.COST_DIRECT, 3)):
        pts = torch.empty(1, 32768, d, device="meta", dtype=dt)
        op = softmin.CostOperand(pts, pts, None, False, False, mode, "tf32x3")
        bi, bj, warps = plan.reduce_block_sizes(op, True, False, 16, with_cost=True)
        const = dict(reduce, V_MATRIX=False, V_COST=True, D=d, DP=next_pow2(d), COST=mode, EUCLID=False,
                     IP="tf32x3", BLOCK_I=bi, BLOCK_J=bj)
        cases.append((plan.plan_reduce_kernel, "fp64" if dt == torch.float64 else "fp32", const, warps))
    cases += [
        (plan.plan_reduce_kernel, "fp32", dict(tile, **reduce), 8),
        (plan.plan_topk_kernel, "fp32", dict(tile, K=5, KP=8, LOWEST=-3.4e38), 8),
        (plan.plan_dense_kernel, "fp32", dict(tile, COST=0, D=1, DP=1), 8),
        (plan.plan_reduce_kernel, "fp32", dict(tile, **reduce, COST=3), 8),
        (plan.plan_topk_kernel, "fp32", dict(tile, K=5, KP=8, LOWEST=-3.4e38, COST=3), 8),
        (sparse._ell_rows_kernel, "fp32", dict(S=12, S_PAD=16, BLOCK_M=64), 4),
        (sparse._ell_cols_kernel, "fp32", dict(S=12, S_PAD=16, BLOCK_M=64), 4),
    ]
    # the k-sparse pass at the launcher's CUDA sizes (ksparse.block_sizes), small and largest k
    for k, cost, semi, dtype in ((4, 0, True, "fp32"), (4, 1, True, "fp32"), (4, 2, False, "fp32"),
                                 (64, 1, True, "fp64"), (256, 1, True, "fp32"), (256, 0, False, "fp32")):
        bl, bn, warps = ksparse.block_sizes(k, torch.device("cuda"))
        cases.append((ksparse._ksparse_kernel, dtype, dict(COST=cost, SEMI=semi, BLOCK_L=bl, BLOCK_N=bn,
                                                           LOG_N=bn.bit_length() - 1), warps))
    # d = 64 values next to the dot path's own tiles, at the launcher's tile sizes
    pts = torch.empty(1, 32768, 64, device="meta")
    op = softmin.CostOperand(pts, pts, None, False, False, softmin.COST_DOT, "tf32x3")
    for matrix, bk in ((True, 64), (True, 32), (True, 16), (False, 16)):
        bi, bj, warps = plan.reduce_block_sizes(op, True, matrix, bk)
        const = dict(tile, **reduce, D=64, DP=64, COST=2, BLOCK_I=bi, BLOCK_J=bj)
        cases.append((plan.plan_reduce_kernel, "fp32", dict(const, BLOCK_K=bk, V_MATRIX=matrix), warps))
    # the point costs' gradient: per-entry differences, at the launcher's tile sizes
    for d, dtype, weight, euclid in ((3, "fp32", 2, True), (8, "fp32", 0, False), (3, "fp64", 2, True),
                                     (5, "fp64", 0, False)):
        pts = torch.empty(1, 32768, d, device="meta", dtype=torch.float64 if dtype == "fp64" else torch.float32)
        op = softmin.CostOperand(pts, pts, None, False, euclid, softmin.COST_DIRECT, "ieee")
        bk = min(plan.DIFF_BLOCK_K, 1 << (d - 1).bit_length())  # as the launcher: a power of 2
        bi, bj, warps = plan.reduce_block_sizes(op, True, True, bk, diff=True)
        const = dict(tile, **reduce, **op.constexprs(), BLOCK_I=bi, BLOCK_J=bj)
        const.update(BLOCK_K=bk, WITH_SUM=False, WEIGHT=weight, DIFF=True, VIP="ieee")
        cases.append((plan.plan_reduce_kernel, dtype, const, warps))
    # SNS's top-s extraction at the launcher's sizes: dense and point costs, narrow and wide rows
    for dtype, cost, s, s_pad in (("fp32", 1, 12, 16), ("fp32", 0, 128, 128), ("fp64", 0, 128, 128),
                                  ("fp64", 1, 64, 64)):
        bm, bn, warps = sparse.topk_blocks(s_pad, dtype == "fp64")
        cases.append((sparse._topk_rows_kernel, dtype, dict(COST=cost, S=s, S_PAD=s_pad, BLOCK_M=bm, BLOCK_N=bn),
                      warps))
    # the one-program tiled iterations at the launcher's tiles (sinkhorn_steps.tile_blocks)
    tiles = dict(steps, BLOCK_N=64, BLOCK_M=64)
    LOWEST = {"fp32": -3.4e38, "fp64": -1.7e308}
    for dtype, flags in (("fp32", dict(D=3, COST=1, CHECK=True, RELAX=True)), ("fp32", dict(D=1, COST=0, CHECK=True)),
                         ("fp32", dict(D=64, COST=1, CHECK=True)),
                         ("fp64", dict(D=3, COST=1, EUCLID=True, SYMMETRIC=True, CHECK=True))):
        bn, bm, warps = sinkhorn_steps.tile_blocks(4096, 4096)
        cases.append((sinkhorn_steps.sinkhorn_tiles_kernel, dtype, dict(tiles, **flags, BLOCK_N=bn, BLOCK_M=bm,
                                                                        LOWEST=LOWEST[dtype]), warps))
    for dtype, n, m in (("fp32", 16, 16384), ("fp64", 3, 5000)):  # skinny problems: longer tiles
        bn, bm, warps = sinkhorn_steps.tile_blocks(n, m)
        cases.append((sinkhorn_steps.sinkhorn_tiles_kernel, dtype, dict(tiles, D=3, COST=1, CHECK=True, BLOCK_N=bn,
                                                                        BLOCK_M=bm, LOWEST=LOWEST[dtype]), warps))
    # SNS's one-launch CG solve at the launcher's sizes (sparse_cg.block_sizes): narrow and wide rows
    for dtype, s in (("fp32", 8), ("fp64", 12), ("fp64", 64)):
        cases.append((sparse_cg._ell_pcg_kernel, dtype, dict(S=s, **sparse_cg.block_sizes(s)), sparse_cg.NUM_WARPS))
    # its host-issued sweeps for larger systems (sparse_cg_steps), at s = 32
    rows = dict(S=32, S_PAD=32, BLOCK_R=sparse_cg.block_sizes(32)["BLOCK_R"])
    sums = dict(BLOCK=sparse_cg_steps.BLOCK_V, BLOCK_SUM=sparse_cg_steps.BLOCK_SUM)
    for dtype in ("fp32", "fp64"):
        for kernel, const in ((sparse_cg_steps._cg_setup_cols_kernel, dict(BLOCK=sparse_cg_steps.BLOCK_C)),
                              (sparse_cg_steps._cg_setup_rows_kernel, rows),
                              (sparse_cg_steps._cg_start_kernel, dict(BLOCK=sparse_cg_steps.BLOCK_SUM)),
                              (sparse_cg_steps._cg_cols_kernel, dict(BLOCK=sparse_cg_steps.BLOCK_C, FINAL=False)),
                              (sparse_cg_steps._cg_cols_kernel, dict(BLOCK=sparse_cg_steps.BLOCK_C, FINAL=True)),
                              (sparse_cg_steps._cg_rows_kernel, rows),
                              (sparse_cg_steps._cg_step_kernel, sums),
                              (sparse_cg_steps._cg_direction_kernel, sums)):
            cases.append((kernel, dtype, const, sparse_cg_steps.NUM_WARPS))
    # the streamed passes' block-size rules promise no spills (registers only); the top-s
    # extraction at most a few words (ptxas's choice varies by version: 0-56 bytes at these
    # sizes, where 4 warps and 32 rows had spilled 136 bytes to 2 KB)
    no_spill = (softmin.softmin_kernel, softmin.softmin_combine_kernel, plan.plan_reduce_kernel, sinkhorn_steps.sinkhorn_steps_kernel,
                ksparse._ksparse_kernel, *(k for k, *_ in cases if k.__module__.endswith("sparse_cg_steps")))
    # (the tiled kernel: a few words at some of its tiles, by ptxas's choice)
    stack_max = {sparse._topk_rows_kernel: 64, sparse_cg._ell_pcg_kernel: 64, sinkhorn_steps.sinkhorn_tiles_kernel: 32}
    for kernel, dtype, const, warps, *ints in cases:
        compiled = compile_sm90(kernel, const, num_warps=warps, dtype=dtype, ints=ints[0] if ints else None)
        assert compiled.asm["cubin"], (kernel.__name__, const)
        regs, stack = resources(compiled)
        assert stack == 0 or kernel not in no_spill, (kernel.__name__, const, regs, stack)
        # shared memory within an H100/H200 SM's 227 KB (a launch asking for more fails)
        assert compiled.metadata.shared <= 232448, (kernel.__name__, const, compiled.metadata.shared)
        assert stack <= stack_max.get(kernel, stack), (kernel.__name__, const, regs, stack)
        if kernel in (sparse_cg_steps._cg_setup_rows_kernel, sparse_cg_steps._cg_rows_kernel):
            # the sweeps address a problem's ELL entries in 64 bits (it may hold 2^31 or more; a
            # review found the offsets rows * S + slot in 32): the product rows * S in 64
            ttir = compiled.asm["ttir"].splitlines()
            assert [l for l in ttir if "arith.muli" in l and f"tensor<{const['BLOCK_R']}x1xi64>" in l], kernel
            assert not [l for l in ttir if "arith.muli" in l and f"tensor<{const['BLOCK_R']}x1xi32>" in l], kernel
        print(kernel.__name__, dtype, const, regs, stack, compiled.metadata.shared, "ok", flush=True)
    print("cases", len(cases))
    """
)


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the documented default; silences Triton 3.9's notice
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, bench], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # every case compiled (the count from the script itself, not a number kept here in step with it)
    n_cases = int(proc.stdout.rsplit("cases ", 1)[1])
    assert n_cases >= 80 and proc.stdout.count(" ok") == n_cases, proc.stdout
