"""Resident expert chunks in a preallocated arena of equal units, with bit-granular eviction.

An expert holding b bits holds its first b chunks (a 2-bit base is chunks 0-1). When a unit is
needed and none is free, the chunk whose loss costs least goes: the top chunk of the expert with
the lowest hotness * 2^-chunk (each plane halves the error), so cold experts drop from 6 to 3 bits
before any base goes; bases go last, coldest first. Pinned experts (in use by the running layer)
are never evicted. Hotness is an exponential moving average of routing counts with a short memory
(DECAY 0.5 per forward): consecutive tokens reuse experts, so recency predicts the next routing
better than a long average. tools/bench_budget.py's workload (OLMoE shapes, 4..5 bits, medians of
3): at 1.5 GB 10.94 tok/s and 44.0 MB read per token against 8.13 and 74.9 MB with 0.9; equal at
1.35 GB (5.76 vs 5.68); at 2 GB 13.11 vs 13.57 (17.4 vs 15.1 MB).
"""

from __future__ import annotations

import threading

import numpy as np

from edge_moe.format.layout import ExpertLayout
from edge_moe.format.nested import MAX_BITS
from edge_moe.kernels import bookkeeping
from edge_moe.kernels.cpu import NIBBLE_FORM, PLANE_FORM

BASE_CHUNKS = 2
NIBBLE_CHUNKS = 4  # the chunks `rewrite` turns into 4-bit codes
DECAY = 0.5  # hotness = DECAY * hotness + this forward's routing counts
EVICTIONS = ("value", "lru")  # value: bit-granular (ours); lru: whole least-recently-used expert (baseline)


class ExpertCache:
    """(layer, expert) -> units of its resident chunks; all shared state guarded by `lock`.

    rewrite(units, old, new), when given, turns an expert from one form the kernels read into another
    (kernels.cpu.rewrite_form: planes, nibble form, and, where lut, the 2-bit LUT form); `form` holds each
    expert's. It is meant for a cache that holds every chunk (nothing is evicted); an expert's chunks
    0..3 in nibble form are below its floor, so an eviction takes them together."""

    def __init__(self, layout: ExpertLayout, arena, layers: list[int], num_experts: int,
                 decay: float = DECAY, eviction: str = "value", rewrite=None, lut: bool = False):
        if eviction not in EVICTIONS:
            raise ValueError(f"eviction {eviction!r}: choose one of {EVICTIONS}")
        self.layout, self.decay, self.eviction = layout, decay, eviction
        self.arena = arena  # HostArena or DeviceArena: the units themselves
        n_units = len(arena)
        self.layers = list(layers)
        self.row = {layer: i for i, layer in enumerate(layers)}
        shape = (len(layers), num_experts)
        self.units = np.full((*shape, MAX_BITS), -1, dtype=np.int64)
        self.held = np.zeros(shape, dtype=np.int64)  # chunks resident (0 or 2..8)
        self.rewrite, self.lut = rewrite, lut and rewrite is not None
        self.form = np.zeros(shape, dtype=np.int8)  # PLANE_FORM, or as rewritten
        self.hot = np.zeros(shape, dtype=np.float64)
        self.pins = np.zeros(shape, dtype=np.int64)
        # chunks an expert is useless without (the request's min_bits; 4 in nibble form): evicted
        # together, last
        self.floor = BASE_CHUNKS
        self.last_used = np.zeros(shape, dtype=np.int64)  # routing step, for the LRU baseline
        self._step = 0
        self.free = list(range(n_units - 1, -1, -1))
        self.lock = threading.Condition()
        self.evictions = np.zeros(MAX_BITS, dtype=np.int64)  # per chunk index

    @property
    def n_units(self) -> int:
        return len(self.arena)

    def record_routing(self, layer: int, counts: np.ndarray) -> None:
        """Fold one forward's per-expert token counts [E] into the layer's hotness."""
        r = self.row[layer]
        with self.lock:
            self._step += 1
            bookkeeping.fold_routing(self.hot[r], self.last_used[r], np.asarray(counts, np.int64), self._step,
                                     self.decay)

    def claim_resident(self, layer: int, experts: np.ndarray, bits: np.ndarray, nibble_bits: tuple[int, int]):
        """Pin one token's distinct experts [K] of a layer and record its routing, if every one holds the
        bits it wants [K]: (their units [K, 8], forms [K], how many are not in the form they want:
        bookkeeping.wanted_form), or None with nothing changed."""
        units, form = np.empty((len(experts), MAX_BITS), np.int64), np.empty(len(experts), np.int8)
        lo, hi = nibble_bits if self.rewrite is not None else (1, 0)
        r = self.row[layer]
        with self.lock:
            todo = bookkeeping.claim(self.held[r], self.pins[r], self.hot[r], self.last_used[r],
                                     self._step + 1, self.decay, self.form[r], self.units[r], experts, bits,
                                     lo, hi, self.lut, units, form)
            if todo < 0:
                return None
            self._step += 1
        return units, form, todo

    def value(self, row: int, expert: int, chunk: int, extra: float = 0.0) -> float:
        """What holding `chunk` of an expert is worth: hotness x 2^-chunk; a base is worth 4x hotness.
        `extra` adds expected routings (a prefetched expert is about to be used once)."""
        hot = self.hot[row, expert] + extra + 1e-3
        return hot * (4.0 if chunk < BASE_CHUNKS else 2.0 ** -chunk)

    def _victim(self, keep: tuple[int, int]) -> tuple[int, int, int, float] | None:
        """(row, expert, n_chunks_to_free, value) of the cheapest resident chunk; None if all pinned."""
        movable = (self.pins == 0) & (self.held > 0)
        movable[keep] = False
        if self.eviction == "lru":
            if not movable.any():
                return None
            r, e = np.unravel_index(np.argmin(np.where(movable, self.last_used, np.iinfo(np.int64).max)),
                                    movable.shape)
            return int(r), int(e), int(self.held[r, e]), 0.0
        upper = movable & (self.held > np.maximum(self.floor, NIBBLE_CHUNKS * (self.form == NIBBLE_FORM)))
        if upper.any():
            value = np.where(upper, (self.hot + 1e-3) * np.exp2(-(self.held - 1.0)), np.inf)
            r, e = np.unravel_index(np.argmin(value), value.shape)
            return int(r), int(e), 1, float(value[r, e])
        if movable.any():
            r, e = np.unravel_index(np.argmin(np.where(movable, self.hot, np.inf)), self.hot.shape)
            return int(r), int(e), int(self.held[r, e]), self.value(r, e, 0)
        return None

    def take_units(self, n: int, keep: tuple[int, int], worth: float = np.inf) -> list[int] | None:
        """n free units, evicting as needed: never from `keep` or pinned experts, and only chunks worth
        less than `worth` (what the caller will load; a must-read passes inf). Caller holds lock."""
        if len(self.free) < n and worth <= 0.0:
            return None  # it may evict nothing: skip the search (the reader holds the lock for it)
        while len(self.free) < n:
            victim = self._victim(keep)
            if victim is None or victim[3] >= worth:
                return None
            r, e, count, _ = victim
            top = int(self.held[r, e])
            for c in range(top - count, top):
                self.free.append(int(self.units[r, e, c]))
                self.units[r, e, c] = -1
                self.evictions[c] += 1
            self.held[r, e] = top - count
            if top <= count:
                self.form[r, e] = PLANE_FORM
        return [self.free.pop() for _ in range(n)]

    def drop(self, row: int, expert: int) -> None:
        """Free every chunk of an expert (the no-cache baseline); caller holds lock."""
        held = int(self.held[row, expert])
        self.free.extend(int(u) for u in self.units[row, expert, :held])
        self.units[row, expert, :] = -1
        self.held[row, expert] = 0
        self.form[row, expert] = PLANE_FORM

    def commit(self, row: int, expert: int, first_chunk: int, units: list[int]) -> None:
        """Record chunks first_chunk.. as resident in `units`; caller holds lock."""
        assert self.held[row, expert] == first_chunk, (row, expert, first_chunk)
        self.units[row, expert, first_chunk:first_chunk + len(units)] = units
        self.held[row, expert] = first_chunk + len(units)

    def rewrite_pinned(self, row: int, expert: int, held: int, form: int) -> None:
        """Rewrite an expert into `form` (planes instead of the nibble form while it holds fewer than its
        chunks 0..3); the caller pinned it, so only the caller reads it meanwhile (the reader only writes
        chunks it has not committed)."""
        old = int(self.form[row, expert])
        if form == NIBBLE_FORM and held < NIBBLE_CHUNKS:
            form = PLANE_FORM
        if self.rewrite is not None and form != old and old != NIBBLE_FORM:
            self.rewrite(self.units[row, expert], old, form)
            with self.lock:
                self.form[row, expert] = form

    def resident_bytes(self) -> int:
        return int(self.held.sum()) * self.layout.unit_bytes
