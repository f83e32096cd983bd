"""Resident expert chunks in a preallocated arena of equal units, with bit-granular eviction.

An expert holding b bits holds its first b chunks (a 2-bit base is chunks 0-1). When a unit is
needed and none is free, the chunk whose loss costs least goes: the top chunk of the expert with
the lowest hotness * 2^-chunk (each plane halves the error), so cold experts drop from 6 to 3 bits
before any base goes; bases go last, coldest first. Experts acquired by a running layer are pinned
and never evicted. Hotness is an exponential moving average of routing counts with a short memory
(DECAY 0.5 per forward): consecutive tokens reuse experts, so recency predicts the next routing
better than a long average.

The cache owns its lock. The compute thread acquires a layer's experts and releases them; the reader
thread reserves units, commits the chunks it read into them and waits for releases when every unit
is pinned. A backend's resident forms (kernels' faster layouts of resident experts) are opaque tags
here: the backend's table says which form an expert should take, and its rewrite makes it so.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from edge_moe.format.layout import ExpertLayout
from edge_moe.format.nested import BASE_BITS, MAX_BITS
from edge_moe.runtime import bookkeeping

FILE_FORM = 0  # an expert's chunks as the file stores them; every backend reads this form
DECAY = 0.5  # hotness = DECAY * hotness + this forward's routing counts
EVICTIONS = ("value", "lru")  # value: bit-granular (ours); lru: whole least-recently-used expert (baseline)
_NO_FORMS = np.zeros((1, MAX_BITS + 1, MAX_BITS + 1), np.int8)  # every expert stays in FILE_FORM


@dataclass
class Lease:
    """A layer's experts acquired for one forward: pinned until released."""

    layer: int
    experts: np.ndarray  # [n] distinct expert ids
    units: np.ndarray  # [n, MAX_BITS] their units when acquired (refresh after reads)
    forms: np.ndarray  # [n] int8 form tags
    held: np.ndarray  # [n] chunks held when acquired
    ready: bool  # every expert held the bits it wants: nothing to read
    todo: int  # with ready: experts not in the form their width wants
    pinned: np.ndarray | None = None  # [n] bool: not yet released, once some were (None: all or none)
    done: bool = False  # every expert released


class ExpertCache:
    """(layer, expert) -> units of its resident chunks; all state private and guarded by one lock."""

    def __init__(self, layout: ExpertLayout, arena, layers: list[int], num_experts: int,
                 decay: float = DECAY, eviction: str = "value", forms=None):
        """forms: the backend's ResidentForms (table, together, want, rewrite), or None to keep every
        expert in FILE_FORM. Meant for a cache that holds every chunk."""
        if eviction not in EVICTIONS:
            raise ValueError(f"eviction {eviction!r}: choose one of {EVICTIONS}")
        self.layout, self.decay, self.eviction, self.forms = layout, decay, eviction, forms
        self.arena = arena  # HostArena or DeviceArena: the units themselves
        self.layers = list(layers)
        self._row = {layer: i for i, layer in enumerate(layers)}
        shape = (len(layers), num_experts)
        self._units = np.full((*shape, MAX_BITS), -1, dtype=np.int64)
        self._held = np.zeros(shape, dtype=np.int64)  # chunks resident (0 or 2..8)
        self._form = np.zeros(shape, dtype=np.int8)
        self._table = forms.table if forms is not None else _NO_FORMS
        self._together = forms.together if forms is not None else np.zeros(1, np.int64)
        self._hot = np.zeros(shape, dtype=np.float64)
        self._pins = np.zeros(shape, dtype=np.int64)
        self._last_used = np.zeros(shape, dtype=np.int64)  # routing step, for the LRU baseline
        self._step = 0
        self._free = list(range(len(arena) - 1, -1, -1))
        self._lock = threading.Condition()
        self._releases = 0  # pins that reached zero: a reader short of room waits for this to move
        self._evictions = np.zeros(MAX_BITS, dtype=np.int64)  # per chunk index

    # -- what anyone may read (copies or scalars) -------------------------------------------------

    @property
    def n_units(self) -> int:
        return len(self.arena)

    @property
    def held(self) -> np.ndarray:
        """Chunks held [layers, experts] (a copy)."""
        with self._lock:
            return self._held.copy()

    @property
    def form(self) -> np.ndarray:
        """Form tags [layers, experts] (a copy)."""
        with self._lock:
            return self._form.copy()

    @property
    def evictions(self) -> np.ndarray:
        """Chunks evicted, by chunk index (a copy)."""
        with self._lock:
            return self._evictions.copy()

    def held_now(self, layer: int, expert: int) -> int:
        return int(self._held[self._row[layer], expert])  # one int read: no lock needed

    def layer_holds(self, layer: int, bits: int) -> bool:
        """Every expert of the layer holds at least `bits` chunks."""
        return bool((self._held[self._row[layer]] >= bits).all())

    def bytes_by_chunk(self) -> np.ndarray:
        """Cache bytes holding each chunk index [MAX_BITS] (chunks 0 and 1 are the 2-bit base)."""
        with self._lock:
            held = np.bincount(self._held.ravel(), minlength=MAX_BITS + 1)  # experts by chunks held
        return held[::-1].cumsum()[::-1][1:] * self.layout.unit_bytes  # chunk c: experts holding > c

    def resident_bytes(self) -> int:
        return int(self._held.sum()) * self.layout.unit_bytes

    # -- the compute thread -----------------------------------------------------------------------

    def acquire(self, layer: int, experts: np.ndarray, counts: np.ndarray, bits: np.ndarray) -> Lease:
        """Pin a layer's distinct experts [n] wanting `bits` [n] chunks, fold their token counts [n]
        into its hotness, and say whether all hold what they want (then the kernel can run at once)."""
        n, r = len(experts), self._row[layer]
        units, forms, held = np.empty((n, MAX_BITS), np.int64), np.empty(n, np.int8), np.empty(n, np.int64)
        with self._lock:
            self._step += 1
            got = bookkeeping.acquire_row(self._held[r], self._pins[r], self._hot[r], self._last_used[r],
                                          self._step, self.decay, self._form[r], self._units[r], self._table,
                                          experts, counts, bits, units, forms, held)
        return Lease(layer, experts, units, forms, held, got < 0, -got - 1 if got < 0 else 0)

    def refresh(self, lease: Lease, k: int) -> int:
        """Re-read the k-th leased expert's units and form after reads landed; returns chunks held."""
        r, e = self._row[lease.layer], int(lease.experts[k])
        with self._lock:
            lease.units[k] = self._units[r, e]
            lease.forms[k] = self._form[r, e]
            lease.held[k] = self._held[r, e]
            return int(lease.held[k])

    def release(self, lease: Lease, which=None, drop: bool = False) -> None:
        """Unpin the leased experts `which` (indices; default all still pinned); drop frees their chunks
        once unpinned (the keep-nothing baseline)."""
        if lease.done:
            return
        if which is None and lease.pinned is None:  # all at once: the decode step's case
            experts, lease.done = lease.experts, True
        else:
            if lease.pinned is None:
                lease.pinned = np.ones(len(lease.experts), bool)
            idx = np.flatnonzero(lease.pinned) if which is None else np.asarray(which, np.int64)
            idx = idx[lease.pinned[idx]]
            lease.pinned[idx] = False
            lease.done = not lease.pinned.any()
            experts = lease.experts[idx]
            if not len(experts):
                return
        r = self._row[lease.layer]
        with self._lock:
            freed = bookkeeping.unpin(self._pins[r], experts)
            if drop:
                for e in experts.tolist():
                    if self._pins[r, e] == 0:
                        self._drop(r, e)
            if freed:
                self._releases += 1
                self._lock.notify_all()

    def prepare_form(self, lease: Lease, k: int, widths) -> None:
        """Put the k-th leased (pinned) expert into the one form that serves every width it runs at in
        this call. Only the pinning thread reads it meanwhile; the reader writes only uncommitted chunks."""
        if self.forms is None:
            return
        old, held = int(lease.forms[k]), int(lease.held[k])
        new = self.forms.want(old, held, widths)
        if new != old:
            self.forms.rewrite(lease.units[k], old, new)
            with self._lock:
                self._form[self._row[lease.layer], lease.experts[k]] = new
            lease.forms[k] = new

    # -- the reader thread ------------------------------------------------------------------------

    def snapshot(self, layer: int) -> tuple[np.ndarray, int, int]:
        """(chunks held by each expert of the layer, free units, evictions so far)."""
        with self._lock:
            return self._held[self._row[layer]].copy(), len(self._free), int(self._evictions.sum())

    @property
    def releases(self) -> int:
        return self._releases

    def wait_release(self, since: int, timeout: float) -> None:
        """Block until an expert is released after `releases` read `since` (or timeout)."""
        with self._lock:
            self._lock.wait_for(lambda: self._releases != since, timeout)

    def value(self, layer: int, expert: int, chunk: int, extra: float = 0.0) -> float:
        """What holding `chunk` of an expert is worth: hotness x 2^-chunk; a base is worth 4x hotness.
        `extra` adds expected routings (a prefetched expert is about to be used once)."""
        hot = self._hot[self._row[layer], expert] + extra + 1e-3
        return hot * (4.0 if chunk < BASE_BITS else 2.0 ** -chunk)

    def reserve(self, layer: int, expert: int, target: int, worth: float,
                floor: int = BASE_BITS) -> tuple[int, list[int]] | None:
        """(first chunk, units) to read the expert's chunks up to `target` into, evicting chunks worth
        less than `worth` (inf: anything unpinned; 0: nothing) and never an expert's chunks below
        `floor` one by one; None if it holds them already or there is no room."""
        r = self._row[layer]
        with self._lock:
            held = int(self._held[r, expert])
            if held >= target:
                return None
            units = self._take_units(target - held, (r, expert), worth, floor)
            return None if units is None else (held, units)

    def commit(self, layer: int, expert: int, first: int, units: list[int]) -> None:
        """Record chunks first.. as resident in `units` (read by the reader since reserve)."""
        r = self._row[layer]
        with self._lock:
            assert self._held[r, expert] == first, (layer, expert, first)
            self._units[r, expert, first:first + len(units)] = units
            self._held[r, expert] = first + len(units)

    def record_routing(self, layer: int, counts: np.ndarray) -> None:
        """Fold one forward's per-expert token counts [E] into the layer's hotness (no pins)."""
        r = self._row[layer]
        with self._lock:
            self._step += 1
            bookkeeping.fold_routing(self._hot[r], self._last_used[r], np.asarray(counts, np.int64), self._step,
                                     self.decay)

    # -- eviction (lock held) ---------------------------------------------------------------------

    def _victim(self, keep: tuple[int, int], floor: int) -> tuple[int, int, int, float] | None:
        """(row, expert, n_chunks_to_free, value) of the cheapest resident chunk; None if all pinned."""
        movable = (self._pins == 0) & (self._held > 0)
        movable[keep] = False
        if self.eviction == "lru":
            if not movable.any():
                return None
            r, e = np.unravel_index(np.argmin(np.where(movable, self._last_used, np.iinfo(np.int64).max)),
                                    movable.shape)
            return int(r), int(e), int(self._held[r, e]), 0.0
        upper = movable & (self._held > np.maximum(floor, self._together[self._form]))
        if upper.any():
            value = np.where(upper, (self._hot + 1e-3) * np.exp2(-(self._held - 1.0)), np.inf)
            r, e = np.unravel_index(np.argmin(value), value.shape)
            return int(r), int(e), 1, float(value[r, e])
        if movable.any():
            r, e = np.unravel_index(np.argmin(np.where(movable, self._hot, np.inf)), self._hot.shape)
            return int(r), int(e), int(self._held[r, e]), self.value(self.layers[r], e, 0)
        return None

    def _take_units(self, n: int, keep: tuple[int, int], worth: float, floor: int) -> list[int] | None:
        """n free units, evicting as needed: never from `keep` or pinned experts, and only chunks worth
        less than `worth`."""
        if len(self._free) < n and worth <= 0.0:
            return None  # it may evict nothing: skip the search
        while len(self._free) < n:
            victim = self._victim(keep, floor)
            if victim is None or victim[3] >= worth:
                return None
            r, e, count, _ = victim
            top = int(self._held[r, e])
            for c in range(top - count, top):
                self._free.append(int(self._units[r, e, c]))
                self._units[r, e, c] = -1
                self._evictions[c] += 1
            self._held[r, e] = top - count
            if top <= count:
                self._form[r, e] = FILE_FORM
        return [self._free.pop() for _ in range(n)]

    def _drop(self, r: int, expert: int) -> None:
        """Free every chunk of an expert."""
        held = int(self._held[r, expert])
        self._free.extend(int(u) for u in self._units[r, expert, :held])
        self._units[r, expert, :] = -1
        self._held[r, expert] = 0
        self._form[r, expert] = FILE_FORM
