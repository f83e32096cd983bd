"""Several tokens on one matrix: a group's codes built once into L1 and reused by 4 tokens per pass."""

from __future__ import annotations

import numpy as np
from numba import njit

from edge_moe.format.nested import BASE_BITS, MAX_BITS
from edge_moe.kernels.cpu.constants import _LOW_POWERS, ACT8_MAX_BITS, HIGH_UNIT, ONE_UNIT
from edge_moe.kernels.cpu.gemv_nibble import _nibble_addr, _nibble_mask
from edge_moe.kernels.cpu.row_common import _coefs, _dot2, _flush, _qbuild
from edge_moe.kernels.cpu.simd.avx2 import _dot_nibbles, _nib_codes64
from edge_moe.kernels.cpu.simd.common import (
    _addr,
    _dot_bytes,
    _fload,
    _fma_s,
    _fma_v,
    _fstore,
    _fsum,
    _fzero,
    _izero,
    _ldf,
    _ldi,
    _qload,
    _qmask_add,
    _qstore,
    _qzero,
)
from edge_moe.kernels.cpu.simd.isa import STRIDED


@njit(inline='always')
def _gemm_dot(form, one, h, lo, q, qa, x, x16, npad):
    """_dot2 of 64 codes (q, also at address qa) and a token's inputs: form 0 as _dot2; on AVX2
    form 1 takes codes <= 15 (vpmaddubsw) and form 2 the int16 inputs at x16 (vpmaddwd), both
    leaving the whole dot in h (flushed as one digit)."""
    if STRIDED:
        if form == 1:
            return _dot_nibbles(h, q, x), lo
        if form == 2:
            return _dot_bytes(_dot_bytes(h, qa, x16), qa + 32, x16 + 64), lo
    return _dot2(one, h, lo, q, x, npad)


@njit(inline='always')
def _nibble_codes(q, a, bits, form, CA, poff, w4, w5, w6, w7):
    """_qbuild's 64 codes for an expert in nibble form: the nibbles at q (the top 4 bits; as numbers
    q >> (8 - bits) in form 1) plus planes 4..bits-1 at offset a."""
    if form == 1:
        return _nib_codes64(q, 15, 8 - bits)
    c = _nib_codes64(q, _nibble_mask(bits), 0)
    if bits > 4:
        c = _qmask_add(c, _ldi(CA + 32) + poff + a, w4)
        if bits > 5:
            c = _qmask_add(c, _ldi(CA + 40) + poff + a, w5)
            if bits > 6:
                c = _qmask_add(c, _ldi(CA + 48) + poff + a, w6)
                if bits > 7:
                    c = _qmask_add(c, _ldi(CA + 56) + poff + a, w7)
    return c


@njit(cache=True)
def _gemm(ca, md, bits, mwq, nib, dig, x16, dsc, dsum, drows, d0, n, o0, o1, w, coef, off, qbuf, accs, y):
    """y[i, o - o0] = W_b[o] . x_i for n tokens (digit rows drows[d0 + i], int16 inputs x16); codes
    built once (nib: from an expert in nibble form)."""
    one = bits <= ACT8_MAX_BITS
    form = 0  # _gemm_dot: generic; on AVX2, 1 for msb codes <= 15, 2 for the int16 inputs
    if STRIDED:
        form = 2 if not one else 0 if mwq else 1
    if form == 1:  # codes q >> (8 - bits), so their coefficients take 2^(8 - bits)
        w = _LOW_POWERS[bits]
    CA, W, C, OFF = _addr(ca), _addr(w), _addr(coef), _addr(off)
    G, ng, ngp, rbytes, poff, moff = md[2], md[3], md[4], md[5], md[6], md[7]
    npad, nch, gb = ng * G, G // 64, G // 8
    p0, p1, p2, p3 = _ldi(CA) + poff, _ldi(CA + 8) + poff, _ldi(CA + 16) + poff, _ldi(CA + 24) + poff
    p4, p5, p6, p7 = _ldi(CA + 32) + poff, _ldi(CA + 40) + poff, _ldi(CA + 48) + poff, _ldi(CA + 56) + poff
    w0, w1, w2, w3 = _qload(W), _qload(W + 64), _qload(W + 128), _qload(W + 192)
    w4, w5, w6, w7 = _qload(W + 256), _qload(W + 320), _qload(W + 384), _qload(W + 448)
    ncode = bits - 1 if mwq else 1
    unit = HIGH_UNIT if one else ONE_UNIT
    if form == 1:
        unit *= np.float32(2 ** (MAX_BITS - bits))
    X16, n16 = _addr(x16), x16.shape[1]
    Q, A = _addr(qbuf), _addr(accs)
    X, Dsc, Dsum = _addr(dig), _addr(dsc), _addr(dsum)
    for o in range(o0, o1):
        _coefs(CA, moff, ng, ngp, bits, mwq, o, C, OFF, 0, 0, ONE_UNIT)
        for i in range(n):
            r = drows[d0 + i]
            voff = _fzero()
            for g0 in range(0, ng, 16):
                voff = _fma_v(voff, _fload(OFF + 4 * g0), _fload(Dsum + 4 * ((2 * r + one) * ngp + g0)))
            _fstore(voff, A + 64 * i)
        qn = _nibble_addr(CA, poff, rbytes, o) if nib else 0
        for g in range(ng):
            a = o * rbytes + g * gb
            for c in range(nch):
                if nib:
                    _qstore(_nibble_codes(qn + 4 * (a + 8 * c - o * rbytes), a + 8 * c, bits, form, CA, poff,
                                          w4, w5, w6, w7), Q + 64 * c)
                    continue
                b = 2 if mwq else bits
                _qstore(_qbuild(a + 8 * c, b, p0, p1, p2, p3, p4, p5, p6, p7,
                                w0, w1, w2, w3, w4, w5, w6, w7), Q + 64 * c)
                for p in range(BASE_BITS, bits if mwq else 0):
                    _qstore(_qmask_add(_qzero(), _ldi(CA + 8 * p) + poff + a + 8 * c, w0),
                            Q + 64 * ((p - 1) * nch + c))
            for i0 in range(0, n, 4):  # 4 tokens per pass share each code load
                # a short last block repeats token n-1: same inputs, same bits, harmless stores
                i1, i2, i3 = min(i0 + 1, n - 1), min(i0 + 2, n - 1), min(i0 + 3, n - 1)
                r0, r1, r2, r3 = drows[d0 + i0], drows[d0 + i1], drows[d0 + i2], drows[d0 + i3]
                x0, x1 = X + 2 * npad * r0 + g * G, X + 2 * npad * r1 + g * G
                x2, x3 = X + 2 * npad * r2 + g * G, X + 2 * npad * r3 + g * G
                e0, e1 = _ldf(Dsc + 4 * (r0 * ngp + g)), _ldf(Dsc + 4 * (r1 * ngp + g))
                e2, e3 = _ldf(Dsc + 4 * (r2 * ngp + g)), _ldf(Dsc + 4 * (r3 * ngp + g))
                f0, f1 = _fload(A + 64 * i0), _fload(A + 64 * i1)
                f2, f3 = _fload(A + 64 * i2), _fload(A + 64 * i3)
                for k in range(ncode):
                    h0, l0, h1, l1 = _izero(), _izero(), _izero(), _izero()
                    h2, l2, h3, l3 = _izero(), _izero(), _izero(), _izero()
                    for c in range(nch):
                        qa = Q + 64 * (k * nch + c)
                        q = _qload(qa)
                        Y = X16 + 2 * (g * G + 64 * c)  # + the token's row
                        h0, l0 = _gemm_dot(form, one, h0, l0, q, qa, x0 + 64 * c, Y + 2 * n16 * r0, npad)
                        h1, l1 = _gemm_dot(form, one, h1, l1, q, qa, x1 + 64 * c, Y + 2 * n16 * r1, npad)
                        h2, l2 = _gemm_dot(form, one, h2, l2, q, qa, x2 + 64 * c, Y + 2 * n16 * r2, npad)
                        h3, l3 = _gemm_dot(form, one, h3, l3, q, qa, x3 + 64 * c, Y + 2 * n16 * r3, npad)
                    ck = _ldf(C + 4 * (k * ngp + g)) * unit
                    whole = one or form == 2
                    f0 = _fma_s(f0, _flush(whole, h0, l0), ck * e0)
                    f1 = _fma_s(f1, _flush(whole, h1, l1), ck * e1)
                    f2 = _fma_s(f2, _flush(whole, h2, l2), ck * e2)
                    f3 = _fma_s(f3, _flush(whole, h3, l3), ck * e3)
                _fstore(f0, A + 64 * i0)
                _fstore(f1, A + 64 * i1)
                _fstore(f2, A + 64 * i2)
                _fstore(f3, A + 64 * i3)
        for i in range(n):
            y[i, o - o0] = _fsum(_fload(A + 64 * i))
