"""The dense part's matmuls: 8-bit byte codes (ByteLinear) and 4-bit nibble codes (NibbleLinear)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from edge_moe.kernels.cpu.constants import HIGH_UNIT, ROWS_PER_ITEM
from edge_moe.kernels.cpu.digits import _digits_of, _int16_inputs
from edge_moe.kernels.cpu.simd.avx2 import _dot_nib128, _f8zero, _fma8, _i8zero
from edge_moe.kernels.cpu.simd.common import _addr, _dot_bytes, _fma_s, _fsum, _fzero, _i2f, _izero, _ldf


@njit(inline='always')
def _byte_row(Q, X, S, M, DS, DSUM, ng, G):
    """sum_g scale_g d_g (q_g . x16_g) + minimum_g sum(x_g) of one row of byte codes at address Q
    (scales at S, minima at M) and one token's int16 activations at X (scales at DS, sums at DSUM)."""
    acc, off = _fzero(), np.float32(0.0)
    for g in range(ng):
        h = _izero()
        for c in range(g * G, g * G + G, 32):
            h = _dot_bytes(h, Q + c, X + 2 * c)
        acc = _fma_s(acc, _i2f(h), _ldf(S + 4 * g) * _ldf(DS + 4 * g))
        off += _ldf(M + 4 * g) * _ldf(DSUM + 4 * g)
    return _fsum(acc) + off


@njit(inline='always')
def _nibble_row(Q, X, S, M, DS, DSUM, ng, G):
    """_byte_row for nibble codes and the int8 (high digit) activations, whose scale is 256 d_g."""
    acc, off = _f8zero(), np.float32(0.0)
    for g in range(ng):
        h = _i8zero()
        for c in range(g * G, g * G + G, 128):
            h = _dot_nib128(h, Q + c // 2, X + c, 15)
        acc = _fma8(acc, h, _ldf(S + 4 * g) * _ldf(DS + 4 * g) * HIGH_UNIT)
        off += _ldf(M + 4 * g) * _ldf(DSUM + 4 * g)
    return _fsum(acc) + off


@njit(inline='always')
def _nibble_row4(Q, X, xstride, S, M, DS, dstride, DSUM, ng, G, out, t, o):
    """_nibble_row for tokens t..t+3 (activations X + k xstride, scales DS + k dstride, sums
    DSUM + 2 k dstride) into out[t + k, o]: each group's nibbles loaded and unpacked once for 4 dots."""
    a0, a1, a2, a3 = _f8zero(), _f8zero(), _f8zero(), _f8zero()
    f0, f1, f2, f3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
    X1, X2, X3 = X + xstride, X + 2 * xstride, X + 3 * xstride
    D1, D2, D3 = DS + dstride, DS + 2 * dstride, DS + 3 * dstride
    for g in range(ng):
        h0, h1, h2, h3 = _i8zero(), _i8zero(), _i8zero(), _i8zero()
        for c in range(g * G, g * G + G, 128):
            q = Q + c // 2
            h0 = _dot_nib128(h0, q, X + c, 15)
            h1 = _dot_nib128(h1, q, X1 + c, 15)
            h2 = _dot_nib128(h2, q, X2 + c, 15)
            h3 = _dot_nib128(h3, q, X3 + c, 15)
        s, m, e = _ldf(S + 4 * g), _ldf(M + 4 * g), 4 * g
        a0 = _fma8(a0, h0, s * _ldf(DS + e) * HIGH_UNIT)  # (s d) H, as _nibble_row: the same sums
        a1 = _fma8(a1, h1, s * _ldf(D1 + e) * HIGH_UNIT)
        a2 = _fma8(a2, h2, s * _ldf(D2 + e) * HIGH_UNIT)
        a3 = _fma8(a3, h3, s * _ldf(D3 + e) * HIGH_UNIT)
        f0 += m * _ldf(DSUM + e)
        f1 += m * _ldf(DSUM + 2 * dstride + e)
        f2 += m * _ldf(DSUM + 4 * dstride + e)
        f3 += m * _ldf(DSUM + 6 * dstride + e)
    out[t, o] = _fsum(a0) + f0
    out[t + 1, o] = _fsum(a1) + f1
    out[t + 2, o] = _fsum(a2) + f2
    out[t + 3, o] = _fsum(a3) + f3


@njit(inline='always')  # its prange joins the caller's parallel region
def _code_rows(nibbles, codes, scale, minimum, xs, dsc, dsum, T, md, out):
    """out = x @ W.T for W as byte or (nibbles, a literal) nibble codes, with xs the int16 activations
    [T, n] or, for nibbles, the digits [T, 2, n] whose high digits they take (and the sums dsum[t, 1]).
    Rows and tokens go by address: array slices in the parallel loop cost atomic reference counts, about
    as much as the dots. The addresses are taken in the loop, so that its arrays stay alive through it
    (numba frees an array after its last use, and xs and dsum are the caller's scratch)."""
    rows, G, ng = md[0], md[2], md[3]
    n, xstride = codes.shape[1], xs.strides[0]
    quads = T // 4 if nibbles else 0  # nibbles: tokens 4 at a time (_nibble_row4), then one by one
    dstride = 4 * dsc.shape[1]
    for b in prange(-(-rows // ROWS_PER_ITEM)):
        Q, S, M, DS, X = _addr(codes), _addr(scale), _addr(minimum), _addr(dsc), _addr(xs)
        DSUM = _addr(dsum) + dstride if nibbles else _addr(dsum)
        for o in range(b * ROWS_PER_ITEM, min(rows, b * ROWS_PER_ITEM + ROWS_PER_ITEM)):
            for t4 in range(0, 4 * quads, 4):  # (its own name: numba mislowers a parfor body that reuses t)
                _nibble_row4(Q + n * o, X + xstride * t4, xstride, S + 4 * ng * o, M + 4 * ng * o,
                             DS + dstride * t4, dstride, DSUM + 2 * dstride * t4, ng, G, out, t4, o)
            for t in range(4 * quads, T):
                q, xt, s, m = Q + n * o, X + xstride * t, S + 4 * ng * o, M + 4 * ng * o
                ds, dsm = DS + dstride * t, DSUM + 2 * dstride * t
                if nibbles:
                    out[t, o] = _nibble_row(q, xt, s, m, ds, dsm, ng, G)
                else:
                    out[t, o] = _byte_row(q, xt, s, m, ds, dsm, ng, G)


@njit(cache=True, parallel=True, nogil=True)
def _byte_matmul_kernel(codes, scale, minimum, x, md, out):
    """out = x @ W.T for W as byte codes (ByteLinear), int16 activations as the planes' at >= 5 bits."""
    dig, dsc, dsum = _digits_of(x, md)
    _code_rows(False, codes, scale, minimum, _int16_inputs(dig), dsc, dsum, x.shape[0], md, out)


@njit(cache=True, parallel=True, nogil=True)
def _nibble_matmul_kernel(codes, scale, minimum, x, md, out):
    """out = x @ W.T for W as 4-bit nibble codes (NibbleLinear), int8 activations as the planes' at
    <= ACT8_MAX_BITS bits (their sums: dsum[t, 1])."""
    dig, dsc, dsum = _digits_of(x, md)
    _code_rows(True, codes, scale, minimum, dig, dsc, dsum, x.shape[0], md, out)
