"""Parallel entry kernels: one numba call per matmul and per MoE layer (the fused FFN)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from edge_moe.kernels.cpu.constants import ACT8_MAX_BITS, LUT_FORM, LUT_ROWS, PLANE_FORM, ROWS_PER_ITEM
from edge_moe.kernels.cpu.digits import _avx2_inputs, _digit_arrays, _digit_row, _digits_of
from edge_moe.kernels.cpu.rows import _rows


@njit(cache=True, parallel=True, nogil=True)
def _matmul_kernel(ca, md, bits, mwq, form, x, W, out):
    """out (zeroed) = x @ W_b.T for the matrix md of an expert whose chunk c is at address ca[c], held in
    `form`."""
    T = x.shape[0]
    dig, dsc, dsum = _digits_of(x, md)
    xs = _avx2_inputs(dig, dsc, md, T > 1, form == PLANE_FORM or bits > ACT8_MAX_BITS, form == LUT_FORM)
    rows = np.arange(T)
    ones = np.ones(T, np.float32)
    nblk = -(-md[0] // ROWS_PER_ITEM)
    for b in prange(nblk):
        o0 = b * ROWS_PER_ITEM
        _rows(ca, md, bits, mwq, form, dig, xs, dsc, dsum, rows, 0, T, o0, min(md[0], o0 + ROWS_PER_ITEM),
              W, out, rows, ones)


@njit(cache=True, parallel=True, nogil=True)
def _ffn_kernel(cas, bits, forms, mwq, x, ptr, tokens, weights, md_gu, md_dn, W, out, H):
    """out[t] += sum_j weights * down_j(silu(gate_j(x_t)) * up_j(x_t)) over routed experts j (forms[j]:
    how expert j is held)."""
    E, P = cas.shape[0], ptr[cas.shape[0]]
    I2, D = md_gu[0], md_dn[0]
    inter = I2 // 2
    dig, dsc, dsum = _digits_of(x, md_gu)
    strided, lut = False, False
    for j in range(E):
        strided |= forms[j] == PLANE_FORM or bits[j] > ACT8_MAX_BITS
        lut |= forms[j] == LUT_FORM
    xs = _avx2_inputs(dig, dsc, md_gu, x.shape[0] > 1, strided, lut)
    pairs = np.arange(P)
    ones = np.ones(P, np.float32)
    hid = np.zeros((P, I2), np.float32)  # _rows adds into its outputs
    # H: numba's threads; thread h takes rows [h/H, (h+1)/H) of every expert, expert after expert:
    for h in prange(H):  # balanced whatever the bits, and a row's prefetches ahead are its own next rows
        for j in range(E):
            if ptr[j + 1] > ptr[j]:
                r0, r1 = _share(I2, h, H), _share(I2, h + 1, H)
                for o0 in range(r0, r1, ROWS_PER_ITEM):
                    _rows(cas[j], md_gu, bits[j], mwq, forms[j], dig, xs, dsc, dsum, tokens, ptr[j],
                          ptr[j + 1] - ptr[j], o0, min(r1, o0 + ROWS_PER_ITEM), W, hid, pairs, ones)
    act = np.empty((P, inter), np.float32)
    dig, dsc, dsum = _digit_arrays(P, md_dn)
    for k in prange(P):  # silu(gate) * up, then its digits
        for i in range(inter):
            g = hid[k, i]
            act[k, i] = g / (np.float32(1.0) + np.exp(-g)) * hid[k, inter + i]
        _digit_row(act[k], md_dn[2], md_dn[3], dig[k], dsc[k], dsum[k])
    xs = _avx2_inputs(dig, dsc, md_dn, x.shape[0] > 1, strided, lut)
    for h in prange(H):  # thread h owns output columns [h/H, (h+1)/H): no write races
        for j in range(E):
            if ptr[j + 1] > ptr[j]:
                r0, r1 = _share(D, h, H), _share(D, h + 1, H)
                for o0 in range(r0, r1, ROWS_PER_ITEM):
                    _rows(cas[j], md_dn, bits[j], mwq, forms[j], dig, xs, dsc, dsum, pairs, ptr[j],
                          ptr[j + 1] - ptr[j], o0, min(r1, o0 + ROWS_PER_ITEM), W, out, tokens, weights)


@njit(inline='always')
def _share(rows, h, H):
    """First of thread h's rows out of H threads: whole blocks of LUT_ROWS (the LUT form's unit)."""
    return rows if h == H else rows * h // H // LUT_ROWS * LUT_ROWS
