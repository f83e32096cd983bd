"""The portable GEMV: every scheme and group, codes built 64 at a time by masked byte adds."""

from __future__ import annotations

from numba import njit

from edge_moe.format.nested import BASE_BITS
from edge_moe.kernels.cpu.constants import ACT8_MAX_BITS
from edge_moe.kernels.cpu.row_common import _act_form, _coefs, _dot2, _flush, _qbuild
from edge_moe.kernels.cpu.simd.common import (
    _addr,
    _fma_s,
    _fsum,
    _fzero,
    _izero,
    _ldf,
    _ldi,
    _qload,
    _qmask_add,
    _qzero,
)


@njit(cache=True)
def _gemv_masks(ca, md, bits, mwq, X, Dsc, Dsum, o0, o1, w, coef, y):
    """_gemv for every scheme and group: codes built 64 at a time by masked byte adds."""
    CA, W, C = _addr(ca), _addr(w), _addr(coef)
    G, ng, ngp, rbytes, poff, moff = md[2], md[3], md[4], md[5], md[6], md[7]
    npad, nch, gb = ng * G, G // 64, G // 8
    p0, p1, p2, p3 = _ldi(CA) + poff, _ldi(CA + 8) + poff, _ldi(CA + 16) + poff, _ldi(CA + 24) + poff
    p4, p5, p6, p7 = _ldi(CA + 32) + poff, _ldi(CA + 40) + poff, _ldi(CA + 48) + poff, _ldi(CA + 56) + poff
    w0, w1, w2, w3 = _qload(W), _qload(W + 64), _qload(W + 128), _qload(W + 192)
    w4, w5, w6, w7 = _qload(W + 256), _qload(W + 320), _qload(W + 384), _qload(W + 448)
    b = 2 if mwq else bits
    one = bits <= ACT8_MAX_BITS
    unit, S = _act_form(one, Dsum, ngp)
    for o in range(o0, o1):
        yo = _coefs(CA, moff, ng, ngp, bits, mwq, o, C, 0, Dsc, S, unit)
        acc = _fzero()
        for g in range(ng):
            a, xb = o * rbytes + g * gb, X + g * G
            h, lo = _izero(), _izero()
            for c in range(nch):
                h, lo = _dot2(one, h, lo, _qbuild(a + 8 * c, b, p0, p1, p2, p3, p4, p5, p6, p7,
                                                  w0, w1, w2, w3, w4, w5, w6, w7), xb + 64 * c, npad)
            acc = _fma_s(acc, _flush(one, h, lo), _ldf(C + 4 * g))
            if mwq:
                for p in range(BASE_BITS, bits):
                    pa = _ldi(CA + 8 * p) + poff + a
                    h, lo = _izero(), _izero()
                    for c in range(nch):
                        h, lo = _dot2(one, h, lo, _qmask_add(_qzero(), pa + 8 * c, w0), xb + 64 * c, npad)
                    acc = _fma_s(acc, _flush(one, h, lo), _ldf(C + 4 * ((p - 1) * ngp + g)))
        y[o - o0] = yo + _fsum(acc)
