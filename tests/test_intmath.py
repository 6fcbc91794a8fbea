"""The launchers' integer helpers agree with Triton's own ``cdiv`` / ``next_power_of_2``
(which they replace on the host because each call of those costs microseconds)."""

import numpy as np
import triton

from otcore.kernels._intmath import cdiv, next_pow2


def test_next_pow2_matches_triton():
    values = list(range(0, 4200)) + [2**31 - 1, 2**31, 2**31 + 1, 3 * 2**40 + 7]
    assert [next_pow2(n) for n in values] == [triton.next_power_of_2(n) for n in values]


def test_cdiv_matches_triton():
    pairs = [(a, b) for a in list(range(0, 300)) + [2**31 - 1, 10**12 + 5] for b in (1, 2, 3, 16, 64, 127)]
    assert [cdiv(a, b) for a, b in pairs] == [triton.cdiv(a, b) for a, b in pairs]


def test_numpy_integers():
    # a NumPy k reaches the k-sparse launcher's block_sizes (the torch backend accepts it)
    assert next_pow2(np.int64(5)) == 8 and next_pow2(np.int32(64)) == 64 and cdiv(np.int64(65), 64) == 2
