"""Integer helpers for the launchers' grid and tile arithmetic.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` wrappers in
Triton 3.6 and later: called from the host they unwrap their arguments on every call,
~4 us each on a 2-core CPU, and a softmin launch made seven such calls. On the H200 a
``launch_softmin`` call cost 105 us of host time (bench/gpu_profile.py,
docs/benchmarks.md), and launches took most of a Sinkhorn iteration at n = 8192, so the
launchers use these plain versions.
"""

import operator


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ``a`` and positive ``b``."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ``>= n`` for ``n >= 1``, and 0 for 0 (as Triton's); any
    integer type (a NumPy ``k``, say) is taken through ``operator.index``."""
    n = operator.index(n)
    return 1 << (n - 1).bit_length() if n > 0 else 0
