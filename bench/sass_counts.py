"""Static counts of the Sinkhorn kernels' sm_90 code, on a machine without a GPU.

    python bench/sass_counts.py            # the table of docs/kernels.md ("Shifted log-sum-exp")

Compiles the softmin kernel (online and shifted log-sum-exp) and the one-tile kernel for
an H100 with Triton's own compiler and the ``ptxas``/``cuobjdump`` shipped in the Triton
wheel, then reads from the cubin the registers and stack per thread, and from the SASS
the instructions of the innermost loop (the largest backward branch) per ``MUFU.EX2``.

An SM issues 4 x 32 thread-instructions and 16 ``exp2`` per clock, so a loop with more
than ~8 instructions per ``exp2`` is issue-bound above the exp floor by that ratio. These
are counts, not timings: latency, occupancy and memory are not in them.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from otcore.kernels import sinkhorn_steps, softmin  # noqa: E402

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
FP32 = ("FADD", "FFMA", "FMUL", "FMNMX", "FSEL", "FSETP")
#: pointer arguments that are not of the compute dtype: int64 indices, the bool mask
INDEX_POINTERS = {"idx_ptr": "*i64", "I_ptr": "*i64", "active_ptr": "*i1", "rows_t_ptr": "*i32", "off_ptr": "*i64",
                  "its_ptr": "*i64", "RUN_ptr": "*i32", "FLAG_ptr": "*i32"}


def compile_sm90(kernel, constexprs: dict, num_warps: int = 8, dtype: str = "fp32", ints: dict | None = None):
    """The kernel compiled for sm_90 (also used by tests/test_kernels_compile.py): pointers
    (``*_ptr``) of ``dtype`` but :data:`INDEX_POINTERS`, other runtime arguments int32.

    ``ints`` (name -> value) specialises the build as a launch with those values does:
    an integer equal to 1 becomes a constant, one divisible by 16 and every pointer (fresh
    torch tensors) get Triton's 16-divisibility attribute. Without it nothing is assumed.
    """
    sig, attrs, consts = {}, {}, dict(constexprs)
    for i, p in enumerate(kernel.params):
        value = (ints or {}).get(p.name)
        if p.is_constexpr or value == 1:
            sig[p.name] = "constexpr"
            if value == 1:
                consts[p.name] = 1
            continue
        if p.name.endswith("_ptr"):
            sig[p.name] = INDEX_POINTERS.get(p.name, "*" + dtype)
        else:
            sig[p.name] = "i32"
        if ints is not None and (p.name.endswith("_ptr") or (value is not None and value % 16 == 0)):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps))


def softmin_ints(n: int, width: int) -> dict:
    """The softmin kernel's integer arguments for an unsplit ``n x n`` pass of one problem
    over contiguous point rows of ``width`` numbers (d, or the dot features' width)."""
    return dict(n_own=n, n_oth=n, tiles_own=n // 64, split_len=n, s_outb=n, s_outs=0, s_hb=n, s_hib=n, s_pb=n,
                s_ob=n * width, s_or=width, s_ok=1, s_tb=n * width, s_tr=width, s_tk=1, s_cb=0, s_co=0, s_ct=0)


def cuobjdump(compiled, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(compiled.asm["cubin"])
    try:
        return subprocess.run([os.path.join(TOOLS, "cuobjdump"), *flags, fh.name], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.unlink(fh.name)


def resources(compiled) -> tuple[int, int]:
    """(registers, stack bytes) per thread."""
    line = next(ln for ln in cuobjdump(compiled, "--dump-resource-usage").splitlines() if "REG:" in ln)
    return int(re.search(r"REG:(\d+)", line).group(1)), int(re.search(r"STACK:(\d+)", line).group(1))


def inner_loop(compiled) -> collections.Counter:
    """Opcode counts of the largest loop body in the SASS (instructions between a backward
    branch and its target)."""
    lines = [ln for ln in cuobjdump(compiled, "-sass").splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]{4})\*/", ln).group(1), 16) for ln in lines]
    best = []
    for ln, a in zip(lines, addr):
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", ln)
        if m and int(m.group(1), 16) < a:
            body = [x for x, ax in zip(lines, addr) if int(m.group(1), 16) <= ax <= a]
            best = max(best, body, key=len)
    ops = collections.Counter()
    for ln in best:
        m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", ln)
        if m:
            ops[m.group(1)] += 1
    return ops


def row(name, compiled):
    regs, stack = resources(compiled)
    ops = inner_loop(compiled)
    total, ex2 = sum(ops.values()), ops["MUFU"]
    fp32 = sum(ops[k] for k in FP32)
    per = f"{total / ex2:5.1f} {fp32 / ex2:5.1f}" if ex2 else "    -     -"
    print(f"{name:44s} {regs:4d} {stack:5d} {total:6d} {ex2:4d} {per}")


def main():
    n = 32768
    print(f"# sm_90 cubins, Triton {triton.__version__}; loop = innermost loop body, per tile and thread;")
    print(f"# softmin specialised as launched at n = m = {n} (compile_sm90's ints), one-tile kernel unspecialised")
    print(f"{'kernel':44s} {'regs':>4s} {'stack':>5s} {'loop':>6s} {'ex2':>4s} {'/ex2':>5s} {'fp32/ex2':>5s}")
    sm = dict(EUCLID=False, PARTIAL=False, LANE=True, LOWEST=-3.4e38, FIXUP=False, BIAS=False, UPDATE=0)
    dense = dict(softmin_ints(n, 0), s_ob=0, s_or=0, s_ok=0, s_tb=0, s_tr=0, s_tk=0, s_cb=n * n, s_co=n, s_ct=1)
    for label, c, ints in (
            ("d=3 direct", dict(D=3, DP=4, COST=softmin.COST_DIRECT, IP="tf32x3"), softmin_ints(n, 3)),
            ("d=3 FMA expansion", dict(D=3, DP=4, COST=softmin.COST_EXPAND, IP="tf32x3"), softmin_ints(n, 4)),
            ("d=8 direct", dict(D=8, DP=8, COST=softmin.COST_DIRECT, IP="tf32x3"), softmin_ints(n, 8)),
            ("d=8 FMA expansion", dict(D=8, DP=8, COST=softmin.COST_EXPAND, IP="tf32x3"), softmin_ints(n, 9)),
            ("d=64 3xTF32 dot", dict(D=64, DP=64, COST=softmin.COST_DOT, IP="tf32x3"),
             softmin_ints(n, 2 * softmin.dot_padding(64) + 16)),
            ("dense C", dict(D=1, DP=1, COST=softmin.COST_DENSE, IP="ieee"), dense)):
        bi, bj, warps = softmin.pass_tiles(n, n, c["COST"], c["D"])  # the launcher's tiles
        for name, flags in (("online (lanes)", dict(SHIFT=False)), ("shifted", dict(SHIFT=True)),
                            ("FIXUP", dict(SHIFT=False, FIXUP=True)),
                            ("online + update", dict(SHIFT=False, BIAS=True, UPDATE=1))):
            row(f"softmin {label} {bi}x{bj}, {name}",
                compile_sm90(softmin.softmin_kernel, dict(sm, **c, **flags, BLOCK_I=bi, BLOCK_J=bj), num_warps=warps,
                             ints=ints))
    st = dict(EUCLID=False, SYMMETRIC=False, RELAX=False, BLOCK_N=64, BLOCK_M=64)
    for label, c in (("d=3", dict(D=3, COST=softmin.COST_DIRECT)), ("d=64", dict(D=64, COST=softmin.COST_DIRECT)),
                     ("dense C", dict(D=1, COST=softmin.COST_DENSE))):
        for check in (False, True):
            row(f"one-tile 64x64 {label}{', CHECK' if check else ''}",
                compile_sm90(sinkhorn_steps.sinkhorn_steps_kernel, dict(st, **c, CHECK=check)))


if __name__ == "__main__":
    main()
