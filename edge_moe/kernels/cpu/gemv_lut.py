"""GEMV of an msb expert in LUT form at 2 bits (AVX2): table lookups per block of 16 rows."""

from __future__ import annotations

import numpy as np
from numba import njit

from edge_moe.kernels.cpu.constants import LUT_ROWS, PASS_BYTES
from edge_moe.kernels.cpu.row_common import _act_form, _low_mean
from edge_moe.kernels.cpu.simd.avx2 import _fma16
from edge_moe.kernels.cpu.simd.avx2_lut import _lut2_dot16
from edge_moe.kernels.cpu.simd.common import _addr, _fma_s, _fma_v, _fmul, _fsplat, _fstore, _fzero, _ldf, _ldi
from edge_moe.kernels.cpu.simd.fp16 import _h2f16


@njit(cache=True)
def _gemv_lut2(ca, md, Tab, Tsc, Dsum, o0, o1, y):
    """y[o - o0] = W_2[o] . x for one token on rows o0..o1 (whole blocks of LUT_ROWS) of an msb expert
    held in LUT form (to_lut_form) at 2 bits: per block and group, the token's tables at Tab (_lut_tables)
    looked up by the rows' plane bits (_lut2_dot16), times the 16 rows' scales (stored side by side)
    s d_g st (Tsc) 64 HIGH_UNIT (the dots count codes 2 b0 + b1 = q / 64), plus their offsets
    (min + s (2^6 - 1) / 2) times the sum of the token's int8 inputs: every step 16 rows wide."""
    CA, Y = _addr(ca), _addr(y)
    ng, ngp, rb, poff, moff = md[3], md[4], md[5], md[6], md[7]
    unit, S = _act_form(True, Dsum, ngp)
    unit *= np.float32(64.0)
    kb = _low_mean(2)
    p0, p1 = _ldi(CA) + poff, _ldi(CA + 8) + poff
    sa, ma = _ldi(CA) + moff, _ldi(CA + 8) + moff
    for b0 in range(o0, o1, LUT_ROWS):
        q0, q1, m = p0 + b0 * rb, p1 + b0 * rb, 2 * b0 * ng
        acc = _fzero()
        for g in range(ng):
            vs, vm = _h2f16(sa + m + 32 * g), _h2f16(ma + m + 32 * g)
            dots = _lut2_dot16(q0 + 256 * g, q1 + 256 * g, Tab + 512 * g)
            acc = _fma16(acc, dots, _fmul(vs, _fsplat(_ldf(Tsc + 4 * g) * unit)))
            acc = _fma_v(acc, _fma_s(vm, vs, kb), _fsplat(_ldf(S + 4 * g)))
        _fstore(acc, Y + 4 * (b0 - o0))


@njit(inline='always')
def _lut_rows(ca, md, tab, tsc, dsum, drows, d0, n, o0, o1, y):
    """y[i] = rows o0..o1 of an expert in LUT form for the n tokens of digit rows drows[d0..]: a GEMV per
    token over blocks of rows whose plane bytes (PASS_BYTES) stay in L2 for the next token's."""
    ngp = md[4]
    step = o1 - o0 if n == 1 else max(LUT_ROWS, PASS_BYTES // (2 * md[5]) // LUT_ROWS * LUT_ROWS)
    for s0 in range(o0, o1, step):
        s1 = min(o1, s0 + step)
        for i in range(n):
            r = drows[d0 + i]
            _gemv_lut2(ca, md, _addr(tab) + tab.shape[1] * r, _addr(tsc) + 4 * ngp * r,
                       _addr(dsum) + 8 * ngp * r, s0, s1, y[i, s0 - o0:])
