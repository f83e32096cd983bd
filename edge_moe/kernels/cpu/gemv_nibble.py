"""GEMVs of an msb expert in nibble form (AVX2): one token, four tokens at once, and the nibble rows
built from planes in scratch for several tokens."""

from __future__ import annotations

import numpy as np
from numba import njit

from edge_moe.kernels.cpu.constants import ACT8_MAX_BITS, PREFETCH_BYTES
from edge_moe.kernels.cpu.row_common import _act_form, _row_coefs, _row_sum, _token_addrs
from edge_moe.kernels.cpu.simd.avx2 import _dot_nib128, _f8add, _f8zero, _fma8, _fma_pair, _i8zero
from edge_moe.kernels.cpu.simd.avx2_strided import _dot256_low
from edge_moe.kernels.cpu.simd.common import _addr, _f8load, _fsum, _ldb, _ldf, _ldi, _prefetch


@njit(inline='always')
def _nibble_addr(CA, poff, rb, o):
    """Address of row o's nibble codes in an expert held in nibble form (to_nibble_form): the rows
    4k..4k+3 take the bytes their 4 planes held, row 4k+j in chunk j."""
    return _ldi(CA + 8 * (o & 3)) + poff + (o - (o & 3)) * rb


@njit(inline='always')
def _nibble_mask(bits):
    """The mask that keeps a nibble's top min(bits, 4) bits."""
    return (0xF0 >> min(bits, 4)) & 0x0F


@njit(inline='always')
def _prefetch_meta(CA, md, o):
    """Prefetch the first line of row o's fp16 scales and minima."""
    ma = 2 * o * md[3] + md[7]
    _prefetch(_ldi(CA) + ma)
    _prefetch(_ldi(CA + 8) + ma)


@njit(inline='always')
def _prefetch_nibble_row(CA, md, bits, o):
    """Prefetch row o's nibble codes, its planes 4.. (bits > 4) and the first line of its metadata."""
    if o < md[0]:
        rb, poff = md[5], md[6]
        q = _nibble_addr(CA, poff, rb, o)
        for k in range(0, 4 * rb, 64):
            _prefetch(q + k)
        for p in range(4, bits):
            for k in range(o * rb, o * rb + rb, 64):
                _prefetch(_ldi(CA + 8 * p) + poff + k)
        _prefetch_meta(CA, md, o)


@njit(inline='always')
def _row_offsets(p, n):
    """A row's n offsets at address p (_row_coefs) as (8 float lanes, a float) whose sums add up to
    theirs: in the lanes, 8 at a time, where 8 divides n (one vector add per 8 offsets, and the row's
    one horizontal sum), else in the float (_row_sum)."""
    if n % 8:
        return _f8zero(), _row_sum(p, n)
    acc = _f8load(p)
    for k in range(8, n, 8):
        acc = _f8add(acc, _f8load(p + 4 * k))
    return acc, np.float32(0.0)


@njit(cache=True)
def _gemv_nibble(ca, md, bits, X, X16, Dsc, Dsum, o0, o1, coef, tile, y, nq=0):
    """_gemv for an msb expert held in nibble form (group 128, on AVX2): the top 4 bits of each code
    from its nibble (masked to the top bits below 4 bits) and, above 4 bits, the rest from planes
    4..bits-1 (_dot256_low, strided int16 activations X16) in the same group sums.
    q = 16 n + r: int8 activations (bits <= 4) give C[g] (n . h), the 16 taken into C; int16 ones
    C[g] * (4096 (n . h) + 16 (n . l)) + C[g] * (r . x16).
    nq != 0 (bits <= 4 only): row o's nibbles are at nq + (o - o0) 4 rb instead (_nibble_rows)."""
    CA, C = _addr(ca), _addr(coef)
    ng, ngp, rb, poff = md[3], md[4], md[5], md[6]
    npad, dist = ng * 128, -(-PREFETCH_BYTES // (4 * rb))
    one = bits <= ACT8_MAX_BITS
    unit, S = _act_form(one, Dsum, ngp)
    mask = _nibble_mask(bits)
    p4 = _ldi(CA + 32) + poff if bits > 4 else 0
    p5 = _ldi(CA + 40) + poff if bits > 5 else p4
    p6 = _ldi(CA + 48) + poff if bits > 6 else p4
    p7 = _ldi(CA + 56) + poff if bits > 7 else p4
    full, n = ng // 2, (o1 - o0) * ng
    # int8 activations: the codes' 16 folded into C (no scalar multiply per group in the loop)
    _row_coefs(CA, md, bits, o0, o1, Dsc, S, unit * np.float32(16.0) if one else unit, C, tile)
    for o in range(o0, o1):
        c = C + 4 * (o - o0) * ng
        acc, yo = _row_offsets(c + 4 * (n + 16), ng)
        q = nq + (o - o0) * 4 * rb if nq else _nibble_addr(CA, poff, rb, o)
        if one:
            ahead = o + dist < md[0] and not nq
            qa = _nibble_addr(CA, poff, rb, o + dist)
            if ahead:
                _prefetch_meta(CA, md, o + dist)
            for g in range(ng):  # a line of the row ahead per group: no prefetch loop of its own
                if ahead:
                    _prefetch(qa + 64 * g)
                acc = _fma8(acc, _dot_nib128(_i8zero(), q + 64 * g, X + 128 * g, mask), _ldf(c + 4 * g))
        else:
            _prefetch_nibble_row(CA, md, bits, o + dist)
            for g in range(ng):
                cg, qg = _ldf(c + 4 * g), q + 64 * g
                acc = _fma8(acc, _dot_nib128(_i8zero(), qg, X + 128 * g, 15), cg * np.float32(4096.0))
                acc = _fma8(acc, _dot_nib128(_i8zero(), qg, X + npad + 128 * g, 15), cg * np.float32(16.0))
            a = o * rb
            for k in range(full):
                low = _dot256_low(32, bits - 4, a + 32 * k, X16 + 512 * k, p4, p5, p6, p7)
                acc = _fma_pair(acc, low, c + 8 * k)
            if ng > 2 * full:
                low = _dot256_low(16, bits - 4, a + 32 * full, X16 + 512 * full, p4, p5, p6, p7)
                acc = _fma_pair(acc, low, c + 8 * full)
        y[o - o0] = yo + _fsum(acc)


@njit(cache=True)
def _gemv_nibble4(ca, md, bits, dig, dsc, dsum, drows, d, o0, o1, coef, tile, y, i0, yoff, nq):
    """_gemv_nibble with int8 activations for the 4 tokens of digit rows drows[d..d+3], token k's row o
    into y[i0 + k, yoff + o - o0]: the 4 dots of a group share its nibbles' load and unpacking (LLVM
    merges the 4 identical loads and masks). coef holds 4 x (2 n + 32) floats (n = (o1 - o0) ng)."""
    CA = _addr(ca)
    ng, ngp, rb, poff = md[3], md[4], md[5], md[6]
    n = (o1 - o0) * ng
    dist = -(-PREFETCH_BYTES // (4 * rb))
    mask = _nibble_mask(bits)
    stride = 4 * (2 * n + 32)
    C0 = _addr(coef)
    C1, C2, C3 = C0 + stride, C0 + 2 * stride, C0 + 3 * stride
    for k in range(4):
        _, ds, dsm = _token_addrs(dig, dsc, dsum, md, drows[d + k])
        unit, S = _act_form(True, dsm, ngp)
        _row_coefs(CA, md, bits, o0, o1, ds, S, unit * np.float32(16.0), C0 + k * stride, tile)
    X0 = _token_addrs(dig, dsc, dsum, md, drows[d])[0]
    X1 = _token_addrs(dig, dsc, dsum, md, drows[d + 1])[0]
    X2 = _token_addrs(dig, dsc, dsum, md, drows[d + 2])[0]
    X3 = _token_addrs(dig, dsc, dsum, md, drows[d + 3])[0]
    for o in range(o0, o1):
        r = 4 * (o - o0) * ng
        f = r + 4 * (n + 16)
        a0, y0 = _row_offsets(C0 + f, ng)
        a1, y1 = _row_offsets(C1 + f, ng)
        a2, y2 = _row_offsets(C2 + f, ng)
        a3, y3 = _row_offsets(C3 + f, ng)
        q = nq + (o - o0) * 4 * rb if nq else _nibble_addr(CA, poff, rb, o)
        ahead = o + dist < md[0] and not nq
        qa = _nibble_addr(CA, poff, rb, o + dist)
        for g in range(ng):
            if ahead:
                _prefetch(qa + 64 * g)
            qg, c = q + 64 * g, r + 4 * g
            a0 = _fma8(a0, _dot_nib128(_i8zero(), qg, X0 + 128 * g, mask), _ldf(C0 + c))
            a1 = _fma8(a1, _dot_nib128(_i8zero(), qg, X1 + 128 * g, mask), _ldf(C1 + c))
            a2 = _fma8(a2, _dot_nib128(_i8zero(), qg, X2 + 128 * g, mask), _ldf(C2 + c))
            a3 = _fma8(a3, _dot_nib128(_i8zero(), qg, X3 + 128 * g, mask), _ldf(C3 + c))
        at = yoff + o - o0
        y[i0, at] = y0 + _fsum(a0)
        y[i0 + 1, at] = y1 + _fsum(a1)
        y[i0 + 2, at] = y2 + _fsum(a2)
        y[i0 + 3, at] = y3 + _fsum(a3)


_SPREAD = np.array([sum(((b >> j) & 1) << (8 * j) for j in range(8)) for b in range(256)], np.uint64)


@njit(inline='always')
def _nibble_rows(CA, md, bits, o0, o1, out):
    """Rows o0..o1 of an msb matrix held as planes (chunk addresses at CA) as nibble codes of their top
    min(bits, 4) planes (zeros below; to_nibbles' order), row o at out[(o - o0) 4 rb]."""
    rb, poff = md[5], md[6]
    words = out.view(np.uint64)
    p0, p1 = _ldi(CA) + poff, _ldi(CA + 8) + poff  # loaded once: the stores below could alias CA
    p2 = _ldi(CA + 16) + poff if bits > 2 else 0
    p3 = _ldi(CA + 24) + poff if bits > 3 else 0
    for o in range(o0, o1):
        at = (o - o0) * rb // 2  # in words: 4 rb bytes per row
        for b in range(rb // 8):
            for h in range(4):  # out bytes 32b + 8h + i: weights 64b + 8h + i (low), + 32 (high)
                a = o * rb + 8 * b + h
                v = _nibble_bits(p0 + a, 3) | _nibble_bits(p1 + a, 2)
                if bits > 2:
                    v |= _nibble_bits(p2 + a, 1)
                    if bits > 3:
                        v |= _nibble_bits(p3 + a, 0)
                words[at + 4 * b + h] = v


@njit(inline='always')
def _nibble_bits(a, shift):
    """Plane bytes a (weights 8h..8h+7) and a + 4 (weights 8h+32..) spread into 8 nibble-code bytes, at
    bit `shift` of the low nibbles and shift + 4 of the high ones."""
    return (_SPREAD[_ldb(a)] << np.uint64(shift)) | (_SPREAD[_ldb(a + 4)] << np.uint64(shift + 4))
