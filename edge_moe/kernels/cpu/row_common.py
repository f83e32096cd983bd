"""What every row kernel shares: byte codes from plane masks, coefficients and offsets from fp16
metadata, digit dots and flushes, plane addresses and prefetches.

md (matrix descriptor, int64): O, N, G, ng, ngp, row_bytes, plane_off, meta_off. ca (int64 [8]): address
of each chunk of the expert; plane p of a matrix lives in chunk p, its scales in chunk 0, minimums in
chunk 1, mwq residual scales of plane p in chunk p."""

from __future__ import annotations

import numpy as np
from numba import njit

from edge_moe.format.nested import BASE_BITS, MAX_BITS
from edge_moe.kernels.cpu.constants import HIGH_UNIT, ONE_UNIT
from edge_moe.kernels.cpu.simd.common import (
    _addr,
    _dpbusd,
    _fload,
    _fma_s,
    _fma_v,
    _fmul,
    _fone,
    _fsplat,
    _fstore,
    _fsub,
    _fsum,
    _fzero,
    _i2f,
    _join_digits,
    _ldf,
    _ldi,
    _prefetch,
    _qmask_add,
    _qzero,
)
from edge_moe.kernels.cpu.simd.fp16 import _h2f, _h2f16


@njit(inline='always')
def _qbuild(a, bits, p0, p1, p2, p3, p4, p5, p6, p7, w0, w1, w2, w3, w4, w5, w6, w7):
    """Byte codes sum_p 2^(7-p) bit_p of 64 inputs; plane p's word at p_p + a."""
    q = _qmask_add(_qzero(), p0 + a, w0)
    q = _qmask_add(q, p1 + a, w1)
    if bits > 2:
        q = _qmask_add(q, p2 + a, w2)
        if bits > 3:
            q = _qmask_add(q, p3 + a, w3)
            if bits > 4:
                q = _qmask_add(q, p4 + a, w4)
                if bits > 5:
                    q = _qmask_add(q, p5 + a, w5)
                    if bits > 6:
                        q = _qmask_add(q, p6 + a, w6)
                        if bits > 7:
                            q = _qmask_add(q, p7 + a, w7)
    return q


@njit(inline='always')
def _low_mean(bits):
    """An msb row's offset is min + s * this: the mean of the code's dropped low bits, (2^(8-b) - 1) / 2."""
    return np.float32((2 ** (MAX_BITS - bits) - 1) / 2)


@njit(inline='always')
def _coefs(CA, moff, ng, ngp, bits, mwq, o, C, OFF, Dsc, Dsum, unit):
    """Row o's coefficient of each code per group (C [k, ngp]) and offsets (OFF [ngp]), from fp16.

    msb: one code q = sum_p 2^(7-p) bit_p with coefficient s, offset min + s (2^(8-b) - 1) / 2.
    mwq: code 0 = 128 b0 + 64 b1 with s / 64; code k >= 1 = 128 bit_(k+1) with alpha / 64;
    offset min - sum alpha (nested.group_coefficients). With one token (Dsc != 0) the coefficients
    take its digit scales d_g (times unit, the digit's weight) and the offsets . sums(x_g) are
    returned; else 0."""
    kb = _low_mean(bits)
    voff = _fzero()
    for g0 in range(0, ng, 16):
        n = min(16, ng - g0)
        m = 2 * (o * ng + g0) + moff
        vs = _h2f(_ldi(CA) + m, n)
        vm = _h2f(_ldi(CA + 8) + m, n)
        vd = _fmul(_fload(Dsc + 4 * g0), _fsplat(unit)) if Dsc else _fone()
        if mwq:
            vd64 = _fmul(vd, _fsplat(np.float32(1 / 64)))
            _fstore(_fmul(vs, vd64), C + 4 * g0)
            for p in range(BASE_BITS, bits):
                va = _h2f(_ldi(CA + 8 * p) + m, n)
                _fstore(_fmul(va, vd64), C + 4 * ((p - 1) * ngp + g0))
                vm = _fsub(vm, va)
        else:
            _fstore(_fmul(vs, vd), C + 4 * g0)
            vm = _fma_s(vm, vs, kb)
        if Dsc:
            voff = _fma_v(voff, vm, _fload(Dsum + 4 * g0))
        else:
            _fstore(vm, OFF + 4 * g0)
    return _fsum(voff)


@njit(inline='always')
def _row_coefs(CA, md, bits, o0, o1, Dsc, Dsum, unit, C, T):
    """_coefs of msb rows o0..o1 with one token, in one pass over their contiguous fp16 metadata, 16
    at a time: C[(o - o0) ng + g] = s d_g unit and C[n + 16 + (o - o0) ng + g] = (min + s kb) sum_g,
    n = (o1 - o0) ng (C holds 2 n + 32 floats). T (2 (ng + 16) floats) is scratch: d_g unit and
    sum_g repeated, so that 16 lanes starting at any group read theirs with one load. C[n..n+16) is
    zeroed: the GEMVs' pairs of groups read C[n] after a last row of odd ng (times a zero dot, so it
    must not be NaN, also when 16 divides n). One pass for all rows: _coefs per row spends on masks and
    reductions about what a short row's dots take."""
    ng, moff = md[3], md[7]
    kb = _low_mean(bits)
    span = ng + 16
    for k0 in range(0, span, ng):  # (no k % ng: a 64-bit division per element costs more than the loop)
        for g in range(min(ng, span - k0)):
            T[k0 + g] = _ldf(Dsc + 4 * g) * unit
            T[span + k0 + g] = _ldf(Dsum + 4 * g)
    TA, n, m = _addr(T), (o1 - o0) * ng, 2 * o0 * ng + moff
    sa, ma = _ldi(CA) + m, _ldi(CA + 8) + m
    k = 0  # i % ng
    for i in range(0, n, 16):
        r = min(16, n - i)
        if r == 16:
            vs, vm = _h2f16(sa + 2 * i), _h2f16(ma + 2 * i)
        else:
            vs, vm = _h2f(sa + 2 * i, r), _h2f(ma + 2 * i, r)
        _fstore(_fmul(vs, _fload(TA + 4 * k)), C + 4 * i)
        _fstore(_fmul(_fma_s(vm, vs, kb), _fload(TA + 4 * (span + k))), C + 4 * (n + 16 + i))
        k += 16
        while k >= ng:
            k -= ng
    _fstore(_fzero(), C + 4 * n)  # the gap: a lone last group's pair reads C[n] past the last row


@njit(inline='always')
def _row_sum(p, n):
    """The sum of the n floats at address p (two chains)."""
    s0, s1 = np.float32(0.0), np.float32(0.0)
    for g in range(0, n - 1, 2):
        s0 += _ldf(p + 4 * g)
        s1 += _ldf(p + 4 * g + 4)
    if n & 1:
        s0 += _ldf(p + 4 * (n - 1))
    return s0 + s1


@njit(inline='always')
def _dot2(one, h, lo, q, x, npad):
    """Accumulate q . (high, low digits) of 64 inputs at address x; only the high digit if one."""
    if one:
        return _dpbusd(h, q, x), lo
    return _dpbusd(h, q, x), _dpbusd(lo, q, x + npad)


@njit(inline='always')
def _flush(one, h, lo):
    """The group's dot as floats, in units of the high digit (one) or of the low digit."""
    if one:
        return _i2f(h)
    return _join_digits(h, lo)


@njit(inline='always')
def _act_form(one, Dsum, ngp):
    """(digit unit, address of the sums the offsets take) for int8 (one) or int16 activations of a row
    whose sums [2, ngp] start at Dsum (_digit_row)."""
    if one:
        return HIGH_UNIT, Dsum + 4 * ngp
    return ONE_UNIT, Dsum


@njit(inline='always')
def _plane_addrs(CA, poff, bits):
    """Addresses of the 8 planes of a matrix (chunk addresses at CA); planes at or above bits alias
    plane 0: the GEMVs read them, then mask them out."""
    p0 = _ldi(CA) + poff
    p1 = _ldi(CA + 8) + poff
    p2 = _ldi(CA + 16) + poff if bits > 2 else p0
    p3 = _ldi(CA + 24) + poff if bits > 3 else p0
    p4 = _ldi(CA + 32) + poff if bits > 4 else p0
    p5 = _ldi(CA + 40) + poff if bits > 5 else p0
    p6 = _ldi(CA + 48) + poff if bits > 6 else p0
    p7 = _ldi(CA + 56) + poff if bits > 7 else p0
    return p0, p1, p2, p3, p4, p5, p6, p7


@njit(inline='always')
def _prefetch_ahead(CA, md, bits, o, dist):
    """Prefetch the planes of row o + dist and the first line of row o + 2 dist's fp16 scales and
    minima (the first only: prefetching every line costs more than it saves)."""
    rb, poff, moff = md[5], md[6], md[7]
    if o + dist < md[0]:
        pa = (o + dist) * rb
        for k in range(pa, pa + rb, 64):
            for p in range(bits):
                _prefetch(_ldi(CA + 8 * p) + poff + k)
    if o + 2 * dist < md[0]:
        ma = 2 * (o + 2 * dist) * md[3] + moff
        _prefetch(_ldi(CA) + ma)
        _prefetch(_ldi(CA + 8) + ma)


@njit(inline='always')
def _token_addrs(dig, dsc, dsum, md, r):
    """Addresses of digit row r's digits, scales and sums (_digits_of's arrays) for matrix md."""
    ngp = md[4]
    return _addr(dig) + 2 * md[3] * md[2] * r, _addr(dsc) + 4 * ngp * r, _addr(dsum) + 8 * ngp * r
