"""A decode token's host-side bookkeeping as single numba calls: the per-expert bit assignment and the
claim and release of a resident layer's experts. Each replaces 5-15 numpy ops of ~2.5 us each on a
2-core laptop-class CPU (measured: ~230 us per MoE layer in numpy, a tenth of the layer's time)."""

from __future__ import annotations

import numpy as np
from numba import njit

from edge_moe.kernels.cpu import LUT_FORM, NIBBLE_FORM, PLANE_FORM


@njit(cache=True, nogil=True)
def assign_bits(weights, quality, min_bits, max_bits):
    """Bits int64 [T, K] for gate weights [T, K]: ranked by weight (ties keep their order), an expert
    whose preceding cumulative share of the token's weight is below quality gets max_bits, the rest
    min_bits (the shares are summed in rank order, as numpy's cumsum does)."""
    T, K = weights.shape
    out = np.empty((T, K), np.int64)
    for t in range(T):
        w = weights[t].astype(np.float64)
        share = w / w.sum()
        order = np.argsort(-share, kind="mergesort")
        cum = 0.0
        for j in order:
            cum += share[j]
            out[t, j] = max_bits if cum - share[j] < quality else min_bits
    return out


@njit(cache=True, nogil=True)
def fold_routing(hot, last_used, counts, step, decay):
    """One forward's routing counts [E] folded into a cache row: hot = decay * hot + counts, and
    last_used = step where an expert was routed (ExpertCache.record_routing, and claim)."""
    for e in range(hot.shape[0]):
        hot[e] = decay * hot[e] + counts[e]
        if counts[e] > 0:
            last_used[e] = step


@njit(cache=True, nogil=True)
def wanted_form(bits, form, nib_lo, nib_hi, lut):
    """The form (kernels.cpu: PLANE_FORM, NIBBLE_FORM, LUT_FORM) an expert held in `form` should take to
    run at `bits`: the nibble form at nib_lo..nib_hi bits; the LUT form at 2 bits, from planes, where
    lut; planes again from the LUT form at other widths; else as it is (the nibble form serves every
    width, and there is no way back from it)."""
    if nib_lo <= bits <= nib_hi:
        return NIBBLE_FORM
    if bits == 2:
        return LUT_FORM if lut and form == PLANE_FORM else form
    return PLANE_FORM if form == LUT_FORM else form


@njit(cache=True, nogil=True)
def claim(held, pins, hot, last_used, step, decay, form, units, experts, bits, nib_lo, nib_hi, lut,
          out_units, out_form):
    """One token's distinct experts of one cache row, wanting bits [K]: -1 and nothing changed when
    one holds fewer chunks than it wants; else each is pinned, the routing is folded into the row's
    hotness (fold_routing), its units [K, 8] and forms are copied out, and the result is how many are
    not in the form they want (wanted_form)."""
    K = experts.shape[0]
    for k in range(K):
        if held[experts[k]] < bits[k]:
            return -1
    counts = np.zeros(hot.shape[0], np.int64)
    for e in experts:
        counts[e] += 1
    fold_routing(hot, last_used, counts, step, decay)
    todo = 0
    for k in range(K):
        e = experts[k]
        pins[e] += 1
        out_units[k] = units[e]
        out_form[k] = form[e]
        todo += wanted_form(bits[k], form[e], nib_lo, nib_hi, lut) != form[e]
    return todo


@njit(cache=True, nogil=True)
def unpin(pins, experts):
    """pins[experts] -= 1 (a claimed token's experts after its layer)."""
    for e in experts:
        pins[e] -= 1


@njit(cache=True, nogil=True)
def count(bits, *counters):
    """counter[b] += 1 for each b in bits, for each counter."""
    for b in bits:
        for c in counters:
            c[b] += 1
