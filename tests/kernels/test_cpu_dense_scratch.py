"""The dense part's byte and nibble matmuls keep their activation scratch alive while they read it: a call
repeated gives the same output. With the scratch freed before its parallel loop (an address taken outside
it), memory reused meanwhile made some calls wrong, run to run."""

import numpy as np
import pytest

from edge_moe.kernels import cpu

SHAPES = [(24, 200, 128, 3), (40, 384, 128, 5), (300, 256, 64, 3)]  # O, N, G, T: N not always a group multiple
REPEATS = 50


@pytest.mark.parametrize("o, n, group, t", SHAPES, ids=str)
def test_dense_matmuls_repeat_exactly(o, n, group, t):
    rng = np.random.default_rng(o)
    ng = -(-n // group)
    scale = rng.random((o, ng)).astype(np.float32) * 0.01
    minimum = -rng.random((o, ng)).astype(np.float32) * 0.5
    codes = rng.integers(0, 256, (o, ng * group), dtype=np.uint8)
    x = rng.standard_normal((t, n)).astype(np.float32)
    ops = [(cpu.byte_matmul, codes)]
    if group % 128 == 0:  # nibble codes come in groups of 128
        ops.append((cpu.nibble_matmul, np.ascontiguousarray(codes[:, :ng * group // 2])))
    for op, c in ops:
        first = np.asarray(op(c, scale, minimum, x))
        for _ in range(REPEATS):
            np.testing.assert_array_equal(np.asarray(op(c, scale, minimum, x)), first, err_msg=op.__name__)
