"""One-token GEMV of msb planes at group 128 on AVX-512 with GFNI: codes 512 at a time (_codes512)."""

from __future__ import annotations

from numba import njit

from edge_moe.kernels.cpu.constants import PREFETCH_BYTES
from edge_moe.kernels.cpu.row_common import _act_form, _coefs, _dot2, _flush, _plane_addrs, _prefetch_ahead
from edge_moe.kernels.cpu.simd.avx512 import _codes512
from edge_moe.kernels.cpu.simd.common import _addr, _fma_s, _fsum, _fzero, _izero, _ldf, _qload, _qload_n


@njit(inline='always')
def _group128(one, acc, q0, q1, xb, npad, cg):
    """acc + C[g] * (codes q0 q1) . (digits of 128 inputs at xb)."""
    h, lo = _dot2(one, _izero(), _izero(), q0, xb, npad)
    h, lo = _dot2(one, h, lo, q1, xb + 64, npad)
    return _fma_s(acc, _flush(one, h, lo), _ldf(cg))


@njit(inline='always')
def _plane_block(p, n):
    """The 64 bytes at address p; n < 64: the first n, zeros after (a masked load, which costs an
    extra uop, so full blocks pass the literal 64)."""
    if n < 64:
        return _qload_n(p, n)
    return _qload(p)


@njit(inline='always')
def _block512(NW, one, bits, a, n, acc, xb, cg, npad, p0, p1, p2, p3, p4, p5, p6, p7):
    """acc + the 4 groups of 512 weights whose plane bytes start at a (n of them)."""
    q = _codes512(NW, bits, _plane_block(p0 + a, n), _plane_block(p1 + a, n), _plane_block(p2 + a, n),
                  _plane_block(p3 + a, n), _plane_block(p4 + a, n), _plane_block(p5 + a, n),
                  _plane_block(p6 + a, n), _plane_block(p7 + a, n))
    acc = _group128(one, acc, q[0], q[1], xb, npad, cg)
    acc = _group128(one, acc, q[2], q[3], xb + 128, npad, cg + 4)
    acc = _group128(one, acc, q[4], q[5], xb + 256, npad, cg + 8)
    return _group128(one, acc, q[6], q[7], xb + 384, npad, cg + 12)


@njit(inline='always')
def _row_msb512(NW, one, bits, a, rb, xb, cg, npad, p0, p1, p2, p3, p4, p5, p6, p7):
    """sum_g C[g] * q_g . x_g over one msb row of group-128 codes (rb plane bytes), codes built 512
    at a time; a last block of 1-3 groups reads zeros past the row (and x digits and C[g] past it:
    padding that is there, C[g] = 0)."""
    acc = _fzero()
    full = rb // 64
    for k in range(full):
        acc = _block512(NW, one, bits, a + 64 * k, 64, acc, xb + 512 * k, cg + 16 * k, npad,
                        p0, p1, p2, p3, p4, p5, p6, p7)
    if rb > 64 * full:
        acc = _block512(NW, one, bits, a + 64 * full, rb - 64 * full, acc, xb + 512 * full, cg + 16 * full,
                        npad, p0, p1, p2, p3, p4, p5, p6, p7)
    return acc


@njit(cache=True)
def _gemv_msb128(NW, one, ca, md, bits, X, Dsc, Dsum, o0, o1, coef, y):
    """_gemv for msb at group 128 with bits <= NW (a literal: 2, 4 or 8, the shuffle network's width),
    one (a literal) = bits <= ACT8_MAX_BITS.
    Plane rows are also prefetched PREFETCH_BYTES ahead: the hardware prefetcher alone lags behind a
    low-bit row's short compute. So are the rows' metadata, twice as far, so that their loads overlap
    the planes' transfer instead of following it."""
    CA, C = _addr(ca), _addr(coef)
    ng, ngp, rb, poff, moff = md[3], md[4], md[5], md[6], md[7]
    npad, dist = ng * 128, -(-PREFETCH_BYTES // rb)
    unit, S = _act_form(one, Dsum, ngp)
    p0, p1, p2, p3, p4, p5, p6, p7 = _plane_addrs(CA, poff, bits)
    for o in range(o0, o1):
        yo = _coefs(CA, moff, ng, ngp, bits, False, o, C, 0, Dsc, S, unit)
        _prefetch_ahead(CA, md, bits, o, dist)
        acc = _row_msb512(NW, one, bits, o * rb, rb, X, C, npad, p0, p1, p2, p3, p4, p5, p6, p7)
        y[o - o0] = yo + _fsum(acc)
