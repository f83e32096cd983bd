"""A decode step's host-side bookkeeping as single numba calls: bit assignment, acquiring and releasing
a layer's experts in the cache, and width counters. Each replaces 5-15 numpy ops of ~2.5 us each,
which summed to a tenth of a resident MoE layer's time on a 2-core CPU."""

from __future__ import annotations

import numpy as np
from numba import njit


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
    last_used = step where an expert was routed."""
    for e in range(hot.shape[0]):
        hot[e] = decay * hot[e] + counts[e]
        if counts[e] > 0:
            last_used[e] = step


@njit(cache=True, nogil=True)
def acquire_row(held, pins, hot, last_used, step, decay, form, units, table, experts, counts, bits,
                out_units, out_form, out_held):
    """Pin a layer's distinct experts [n] (one cache row), fold their token counts [n] into the row's
    hotness, and copy out their units [n, 8], forms [n] and chunks held [n]. Returns how many hold
    fewer chunks than the bits they want [n], or, when all hold them, minus how many are not in the
    form the backend's table gives for (form, held, bits), minus one."""
    row_counts = np.zeros(hot.shape[0], np.int64)
    short, todo = 0, 0
    for k in range(experts.shape[0]):
        e = experts[k]
        row_counts[e] += counts[k]
        pins[e] += 1
        out_units[k] = units[e]
        out_form[k] = form[e]
        out_held[k] = held[e]
        short += held[e] < bits[k]
        if held[e] >= bits[k]:
            todo += table[form[e], held[e], bits[k]] != form[e]
    fold_routing(hot, last_used, row_counts, step, decay)
    return short if short > 0 else -todo - 1


@njit(cache=True, nogil=True)
def unpin(pins, experts):
    """pins[experts] -= 1, and whether one of them reached 0 (room for a reader waiting on it)."""
    freed = False
    for e in experts:
        pins[e] -= 1
        freed |= pins[e] == 0
    return freed


@njit(cache=True, nogil=True)
def count(bits, *counters):
    """counter[b] += 1 for each b in bits, for each counter."""
    for b in bits:
        for c in counters:
            c[b] += 1
