"""The rows of one matrix for n tokens: which GEMV or the GEMM runs (by ISA, form, width and token
count), and where the outputs go."""

from __future__ import annotations

import numpy as np
from numba import njit

from edge_moe.format.nested import MAX_BITS
from edge_moe.kernels.cpu.constants import ACT8_MAX_BITS, LUT_FORM, NIBBLE_FORM, PASS_BYTES
from edge_moe.kernels.cpu.gemm import _gemm
from edge_moe.kernels.cpu.gemv_avx512 import _gemv_msb128
from edge_moe.kernels.cpu.gemv_lut import _lut_rows
from edge_moe.kernels.cpu.gemv_masks import _gemv_masks
from edge_moe.kernels.cpu.gemv_nibble import _gemv_nibble, _gemv_nibble4, _nibble_rows
from edge_moe.kernels.cpu.gemv_strided import _gemv_strided
from edge_moe.kernels.cpu.row_common import _token_addrs
from edge_moe.kernels.cpu.simd.common import _addr
from edge_moe.kernels.cpu.simd.isa import GFNI, STRIDED


@njit(cache=True)
def _gemv(ca, md, bits, mwq, nib, X, X8, X16, Dsc, Dsum, o0, o1, w, coef, tile, y):
    """y[o - o0] = W_b[o] . x for one token: X digits, X8 / X16 strided digits, Dsc scales, Dsum sums
    (addresses); nib: the expert is held in nibble form (only where STRIDED: nibble_form)."""
    if STRIDED:  # a constant, as GFNI
        if nib:
            _gemv_nibble(ca, md, bits, X, X16, Dsc, Dsum, o0, o1, coef, tile, y)
            return
        if md[2] == 128 and not mwq:
            if bits == 2:
                _gemv_strided(2, ca, md, bits, X8, X16, Dsc, Dsum, o0, o1, coef, tile, y)
            elif bits <= 4:
                _gemv_strided(4, ca, md, bits, X8, X16, Dsc, Dsum, o0, o1, coef, tile, y)
            else:
                _gemv_strided(8, ca, md, bits, X8, X16, Dsc, Dsum, o0, o1, coef, tile, y)
            return
    if GFNI:  # a constant: numba prunes the other branch, so no target compiles what it lacks
        if md[2] == 128 and not mwq:  # the default format: the shuffle-network kernel
            if bits == 2:  # (width class, int8 activations: bits <= ACT8_MAX_BITS) as literals
                _gemv_msb128(2, True, ca, md, bits, X, Dsc, Dsum, o0, o1, coef, y)
            elif bits <= 4:
                _gemv_msb128(4, True, ca, md, bits, X, Dsc, Dsum, o0, o1, coef, y)
            else:
                _gemv_msb128(8, False, ca, md, bits, X, Dsc, Dsum, o0, o1, coef, y)
            return
    _gemv_masks(ca, md, bits, mwq, X, Dsc, Dsum, o0, o1, w, coef, y)


@njit(cache=True)
def _rows(ca, md, bits, mwq, form, dig, xs, dsc, dsum, drows, d0, n, o0, o1, W, out, orows, oscale):
    """Rows o0..o1 of one matrix for n tokens of an expert held in `form`; out[orows[d0+i], o] +=
    oscale[d0+i] * y (callers zero out: one signature for every caller, so numba compiles this tree once)."""
    # scratch is passed as arrays, never as bare addresses: numba frees an array after its last use
    ngp = md[4]
    nib = form == NIBBLE_FORM
    y = np.empty((n, o1 - o0), np.float32)
    if STRIDED and form == LUT_FORM:  # (2 bits: _unit_addresses) one GEMV per token and block of rows
        _lut_rows(ca, md, xs[3], xs[4], dsum, drows, d0, n, o0, o1, y)
        _put_rows(y, n, o0, o1, out, orows, oscale, d0)
        return
    # more than one token, at <= 4 bits on AVX2: a GEMV per token over blocks of rows (PASS_BYTES),
    # from the nibble form, or from nibbles of the block's msb planes (at group 128) written in scratch
    planes = not nib and not mwq and STRIDED and md[2] == 128
    if n == 1 or (bits <= ACT8_MAX_BITS and (nib or planes)):
        x8, x16 = xs[0], xs[1]
        quads = n // 4 if STRIDED and n > 1 else 0  # tokens 4 at a time (_gemv_nibble4), then one by one
        # also _row_coefs' C, one per token of a quad
        coef = np.empty(max(8 * ngp, (4 if quads else 1) * (2 * (o1 - o0) * md[3] + 32)), np.float32)
        tile = np.empty(2 * (md[3] + 16), np.float32)
        step = o1 - o0 if n == 1 else max(4, PASS_BYTES // (64 * md[3]))
        scratch = n > 1 and planes
        nib_rows = np.empty(step * 4 * md[5] if scratch else 0, np.uint8)
        for s0 in range(o0, o1, step):
            s1 = min(o1, s0 + step)
            if STRIDED:  # a constant (as in _gemv): no other target compiles the nibble kernels
                if scratch:
                    _nibble_rows(_addr(ca), md, bits, s0, s1, nib_rows)
                for i in range(0, 4 * quads, 4):
                    _gemv_nibble4(ca, md, bits, dig, dsc, dsum, drows, d0 + i, s0, s1, coef, tile, y, i,
                                  s0 - o0, _addr(nib_rows) if scratch else 0)
            for i in range(4 * quads, n):
                r = drows[d0 + i]
                X, ds, dsm = _token_addrs(dig, dsc, dsum, md, r)
                if STRIDED:
                    if scratch:
                        _gemv_nibble(ca, md, bits, X, 0, ds, dsm, s0, s1, coef, tile, y[i, s0 - o0:],
                                     _addr(nib_rows))
                        continue
                X8, X16 = _addr(x8) + x8.shape[1] * r, _addr(x16) + 2 * x16.shape[1] * r
                _gemv(ca, md, bits, mwq, nib, X, X8, X16, ds, dsm, s0, s1, W, coef, tile, y[i, s0 - o0:])
    else:
        qbuf = np.empty(MAX_BITS * md[2], np.uint8)
        _gemm(ca, md, bits, mwq, nib, dig, xs[2], dsc, dsum, drows, d0, n, o0, o1, W,
              np.empty(8 * ngp, np.float32), np.empty(ngp, np.float32), qbuf, np.empty(16 * n, np.float32), y)
    _put_rows(y, n, o0, o1, out, orows, oscale, d0)


@njit(inline='always')
def _put_rows(y, n, o0, o1, out, orows, oscale, d0):
    """out[orows[d0+i], o0..o1] += oscale[d0+i] * y[i]."""
    for i in range(n):
        dst = out[orows[d0 + i]]
        s = oscale[d0 + i]
        for k in range(o1 - o0):
            dst[o0 + k] += s * y[i, k]
