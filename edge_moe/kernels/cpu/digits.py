"""Activations -> signed 8-bit digits per group, and the forms the AVX2 kernels read them in
(strided, int16, LUT tables)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from edge_moe.kernels.cpu.constants import DIGIT_PAD, HIGH_UNIT, XDIGIT_MAX
from edge_moe.kernels.cpu.simd.isa import STRIDED


@njit(cache=True)
def _digit_row(x, G, ng, dig, scale, sums):
    """One row x [N] -> digits [2, ng*G] int8 (high, low), scale d [ng], sums [2, ng]: of x_g and
    of its int8 form 256 d h_g (which the high-digit-only dots use, so that they compute W . q8(x))."""
    N = x.shape[0]
    top_bits = scale.view(np.int32)
    for g in range(ng):  # per-group slices: numba vectorizes these loops, not ones over lo..hi of x
        lo, hi = g * G, min(N, g * G + G)
        top_bits[g], sums[0, g] = _top_and_sum(x[lo:hi])  # scale[g] = max|x_g|
        if scale[g] != 0:
            scale[g] /= np.float32(XDIGIT_MAX)
            high = _group_digits(x[lo:hi], np.float32(1.0) / scale[g], dig[0, lo:hi], dig[1, lo:hi])
            sums[1, g] = HIGH_UNIT * scale[g] * np.float32(high)


@njit(fastmath={"reassoc"})
def _top_and_sum(x):
    """(the bits of max|x| as int32, sum(x)): the max is taken on the float bits as integers with the
    sign cleared, as numba's float max does not vectorize."""
    bits = x.view(np.int32)
    top = np.int32(0)
    s = np.float32(0.0)
    for i in range(x.shape[0]):
        top = max(top, bits[i] & 0x7FFFFFFF)
        s += x[i]
    return top, s


@njit(inline='always')
def _group_digits(x, inv, high, low):
    """Balanced base-256 digits of rint(x * inv): x * inv ~ 256 high + low, both int8; sum(high)."""
    total = 0
    for i in range(x.shape[0]):
        xi = np.int32(np.rint(x[i] * inv))
        li = ((xi + 128) & 255) - 128
        hi = (xi - li) >> 8
        high[i] = hi
        low[i] = li
        total += hi
    return total


@njit(cache=True, parallel=True, nogil=True)
def _digits_of(x, md):
    """Digits, scales and sums (_digit_arrays) of every row of x; in parallel only when there are
    enough rows to pay for waking the other threads."""
    T = x.shape[0]
    dig, dsc, dsum = _digit_arrays(T, md)
    if T < 8:
        for t in range(T):
            _digit_row(x[t], md[2], md[3], dig[t], dsc[t], dsum[t])
    else:
        for t in prange(T):
            _digit_row(x[t], md[2], md[3], dig[t], dsc[t], dsum[t])
    return dig, dsc, dsum


@njit(cache=True)
def _digit_arrays(R, md):
    """Zeroed digits [R, 2, ng*G], scales [R, ngp], sums [R, 2, ngp] for inputs of matrix md; the digits
    are followed by DIGIT_PAD readable bytes (a last 512-input block reads up to 3 groups past)."""
    size = R * 2 * md[3] * md[2]
    dig = np.zeros(size + DIGIT_PAD, np.int8)[:size].reshape((R, 2, md[3] * md[2]))
    return dig, np.zeros((R, md[4]), np.float32), np.zeros((R, 2, md[4]), np.float32)


@njit(cache=True)
def _int16_inputs(dig):
    """The int16 activations 256 high + low of digits [T, 2, n] -> [T, n]."""
    T, n = dig.shape[0], dig.shape[2]
    out = np.empty((T, n), np.int16)
    for t in range(T):
        for i in range(n):
            out[t, i] = np.int16(dig[t, 0, i]) * 256 + dig[t, 1, i]
    return out


@njit(cache=True)
def _avx2_inputs(dig, dsc, md, gemm, strided=True, lut=False):
    """The AVX2 kernels' forms of the digits (empty where those kernels are not compiled): the GEMV's
    strided ones (_strided_digits; empty unless strided: no plane GEMV and no 5-8 bit nibble GEMV
    reads them), if gemm the GEMM's int16 inputs in order (_int16_inputs), and if lut the LUT form's
    tables and their scales (_lut_tables)."""
    x8, x16 = _strided_digits(dig, md, strided)
    tab, tsc = _lut_tables(dig, dsc, md, STRIDED and lut)
    return (x8, x16, _int16_inputs(dig) if STRIDED and gemm else np.zeros((dig.shape[0], 0), np.int16),
            tab, tsc)


@njit(cache=True)
def _lut_tables(dig, dsc, md, wanted):
    """Per row of digits [R, 2, ng*G] (group 128): int8 tables [R, ng*512] of the 16 subset sums of the
    high digits of every 4 inputs (_lut2_dot16's order), each group's requantized by st = max|sum| / 127
    where that passes 127 (T-MAC's int8 tables: error <= st / 2 per sum of 4), and the scales d_g st
    [R, ngp] the coefficients then take (empty unless wanted)."""
    R, ng = dig.shape[0], md[3] if wanted else 0
    tab, tsc = np.zeros((R, ng * 512), np.int8), np.zeros((R, md[4] if wanted else 0), np.float32)
    sums = np.empty(512, np.int32)
    for r in range(R):
        for g in range(ng):
            _lut_sums(dig[r, 0, 128 * g:128 * g + 128], sums)
            top = np.int32(0)
            for j in range(512):
                top = max(top, abs(sums[j]))
            st = max(np.float32(1.0), np.float32(top) / np.float32(127.0))
            inv = np.float32(1.0) / st
            out = tab[r, 512 * g:512 * g + 512]
            for j in range(512):
                out[j] = np.int8(np.rint(np.float32(sums[j]) * inv))
            tsc[r, g] = dsc[r, g] * st
    return tab, tsc


@njit(inline='always')
def _lut_sums(h, sums):
    """The 16 subset sums of every 4 of the 128 int8 h, table k (16 k ..) of inputs 16 (k // 4) +
    8 (k & 1) + 4 ((k >> 1) & 1) + 0..3 (_lut2_dot16's TA / TB lanes)."""
    for k in range(32):
        i = 16 * (k // 4) + 8 * (k & 1) + 4 * ((k >> 1) & 1)
        a, b, c, d = np.int32(h[i]), np.int32(h[i + 1]), np.int32(h[i + 2]), np.int32(h[i + 3])
        for e in range(16):
            sums[16 * k + e] = (e & 1) * a + ((e >> 1) & 1) * b + ((e >> 2) & 1) * c + (e >> 3) * d


@njit(cache=True)
def _strided_digits(dig, md, wanted):
    """The digits in the order the AVX2 GEMV reads them (_dot256): per block of 256 inputs, 8
    runs of 32 holding inputs 8k+j (j = run): high digits as int8 and 256 high + low as int16
    [R, 256 * blocks] each, zero past the row."""
    R, n = dig.shape[0], md[3] * md[2]
    nblk = (md[3] + 1) // 2 if STRIDED and md[2] == 128 and wanted else 0
    x8, x16 = np.zeros((R, 256 * nblk), np.int8), np.zeros((R, 256 * nblk), np.int16)
    for r in range(R):
        for k in range(nblk):
            for j in range(8):
                for b in range(32):
                    i = 256 * k + 8 * b + j
                    if i < n:
                        x8[r, 256 * k + 32 * j + b] = dig[r, 0, i]
                        x16[r, 256 * k + 32 * j + b] = np.int16(dig[r, 0, i]) * 256 + dig[r, 1, i]
    return x8, x16
