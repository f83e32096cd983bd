"""One-token GEMV of msb planes at group 128 on AVX2 without AVX-512: 256 weights per step (_dot256)."""

from __future__ import annotations

import numpy as np
from numba import njit

from edge_moe.format.nested import MAX_BITS
from edge_moe.kernels.cpu.constants import ACT8_MAX_BITS, PREFETCH_BYTES
from edge_moe.kernels.cpu.row_common import _act_form, _plane_addrs, _prefetch_ahead, _row_coefs, _row_sum
from edge_moe.kernels.cpu.simd.avx2 import _f8zero, _fma_pair
from edge_moe.kernels.cpu.simd.avx2_strided import _dot256
from edge_moe.kernels.cpu.simd.common import _addr, _fsum


@njit(cache=True)
def _gemv_strided(W, ca, md, bits, X8, X16, Dsc, Dsum, o0, o1, coef, tile, y):
    """_gemv for msb at group 128 on AVX2 without AVX-512: 256 weights per step (_dot256) at
    width class W (a literal: 2, 4 or 8, as _gemv_msb128), with the strided activations."""
    CA, C = _addr(ca), _addr(coef)
    ng, ngp, rb, poff = md[3], md[4], md[5], md[6]
    dist = -(-PREFETCH_BYTES // rb)
    one = bits <= ACT8_MAX_BITS
    unit, S = _act_form(one, Dsum, ngp)
    X = X8 if one else X16
    xstep = 256 if one else 512
    scale = np.float32(2 ** (MAX_BITS - W))  # the codes are q >> (8 - W)
    p0, p1, p2, p3, p4, p5, p6, p7 = _plane_addrs(CA, poff, bits)
    full, n = ng // 2, (o1 - o0) * ng
    _row_coefs(CA, md, bits, o0, o1, Dsc, S, unit, C, tile)
    for o in range(o0, o1):
        c = C + 4 * (o - o0) * ng
        yo = _row_sum(c + 4 * (n + 16), ng)
        _prefetch_ahead(CA, md, bits, o, dist)
        a = o * rb
        acc = _f8zero()
        for k in range(full):
            dots = _dot256(W, 32, bits, a + 32 * k, X + xstep * k, p0, p1, p2, p3, p4, p5, p6, p7)
            acc = _fma_pair(acc, dots, c + 8 * k)
        if ng > 2 * full:  # a last lone group: its pair's second lane multiplies a zero dot
            acc = _fma_pair(acc, _dot256(W, 16, bits, a + 32 * full, X + xstep * full,
                                         p0, p1, p2, p3, p4, p5, p6, p7), c + 8 * full)
        y[o - o0] = yo + scale * _fsum(acc)
