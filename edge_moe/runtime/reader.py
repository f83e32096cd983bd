"""The reader thread: loads expert levels into the cache in hottest-expert-bit-first order.

A layer's work is a list of Want(expert, must, want, heat) in chunks. It becomes level reads
ordered HEBF: the base of the hottest expert first, then the next hottest's base, and higher
levels only after every base (D2MoE). Reads up to `must` wait for cache units (pinned experts
free theirs as the compute thread finishes them); reads above `must` are best effort and are
skipped when every unit is pinned. Classes order the queue: NEEDED (the compute thread may wait
on it), OPTIONAL (fetched for later tokens; they may evict nothing, so they are queued only as far
as the free units this layer's reads leave, and not while the cache evicts), PREFETCH (the next
layer's predicted experts), FILL (the whole model in the background, expert by expert into free
units only, when the budget holds it all); within a class newer layers go first.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from dataclasses import dataclass

import numpy as np

from edge_moe.format.container import Container
from edge_moe.format.nested import BASE_BITS, MAX_BITS
from edge_moe.runtime.expert_cache import ExpertCache

NEEDED, OPTIONAL, PREFETCH, FILL = 0, 1, 2, 3
STALE_EPOCHS = 64  # optional work queued this many submissions ago is dropped
ROOM_POLL_S = 0.5  # a reader short of room rechecks this often whether it was closed


@dataclass(frozen=True)
class Want:
    expert: int
    must: int  # chunks the compute cannot go without (2 = the 2-bit base)
    want: int  # chunks wanted (bits)
    heat: float  # tokens routed to the expert in this batch (ties: gate mass)


def hebf_reads(wants: list[Want]) -> list[tuple[int, int, Want]]:
    """[(target_chunks, rank, want)] in read order: each expert up to its `must` (one read), hottest
    first; then the levels above, level by level, hottest first within a level."""
    order = sorted(wants, key=lambda w: -w.heat)
    top = max((w.want for w in wants), default=0)
    reads = [(w.must, rank, w) for rank, w in enumerate(order)]
    return reads + [(t, rank, w) for t in range(BASE_BITS + 1, top + 1)
                    for rank, w in enumerate(order) if w.must < t <= w.want]


class Reader:
    """One daemon thread doing prefix reads of expert levels into cache units. Its queue and progress
    have their own lock; the cache's state is reached only through the cache's operations."""

    def __init__(self, container: Container, cache: ExpertCache, verify: bool = True):
        """verify: check each level's CRC32 the first time this process reads it."""
        self.container, self.cache, self.verify = container, cache, verify
        self._cv = threading.Condition()
        self._queue: list = []
        self._seq = itertools.count()
        self._epoch = 0
        self._tried: dict[tuple[int, int], int] = {}  # (layer, expert) -> highest target processed
        self._evicted_seen: dict[int, int] = {}  # layer -> cache evictions at its last submission
        # chunks whose CRC was checked once: later reads of the same bytes skip the CPU cost
        self._verified = np.zeros((*cache.held.shape, MAX_BITS), dtype=bool)
        self._row = {layer: i for i, layer in enumerate(cache.layers)}
        self.bytes_read, self.read_seconds, self.failed = 0, 0.0, None
        self.trace = None  # a runtime.trace.Trace records each read (edge-moe profile)
        self.blocked = False  # a must read waits for pinned experts to be released
        self._busy = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="edge-moe-reader", daemon=True)
        self._thread.start()

    def submit(self, layer: int, wants: list[Want], wait_upper: bool = True, prefetch: bool = False,
               floor: int = BASE_BITS) -> None:
        """Queue a layer's reads. Up to `must` they are NEEDED; above it NEEDED (best effort) when the
        compute waits for them, else OPTIONAL; a prefetch is all PREFETCH and never waits for room.
        `floor`: the request's min_bits, below which the cache evicts an expert whole."""
        held, free, evicted = self.cache.snapshot(layer)
        wants = [w for w in wants if held[w.expert] < w.want]  # resident: nothing to read
        if not wants:
            return
        with self._cv:
            self._epoch += 1
            # free units not yet claimed by this layer's reads, for reads for later tokens; none while
            # the cache evicts (since this layer's last submission): such a level would be the first
            # victim of the next miss, before any token used it
            calm = evicted == self._evicted_seen.get(layer, evicted)
            self._evicted_seen[layer] = evicted
            spare = free if calm else 0
            for target, rank, w in hebf_reads(wants):
                have = int(held[w.expert])
                if target <= have:
                    continue  # held already (a resident base under a wanted upper level)
                must = target <= w.must and not prefetch
                cls = PREFETCH if prefetch else (NEEDED if must or wait_upper else OPTIONAL)
                need = target - have if target <= w.must else 1  # an upper read adds one level
                if cls == OPTIONAL and need > spare:
                    continue  # it may only take free units (_reserve); queued, it would only cost CPU
                spare -= need
                key = (cls, -self._epoch, target > w.must, target, rank, next(self._seq))
                self._tried[(layer, w.expert)] = have
                heapq.heappush(self._queue, (key, layer, w.expert, target, must, self._epoch, floor))
            self._cv.notify_all()

    def fill(self) -> None:
        """Queue every expert whole as FILL reads, in file order (one sequential prefix read each:
        level-by-level reads of the whole model are several times slower); they only take free units."""
        with self._cv:
            for rank, (layer, expert) in enumerate(self._everything()):
                key = (FILL, 0, True, MAX_BITS, rank, next(self._seq))
                heapq.heappush(self._queue, (key, layer, expert, MAX_BITS, False, 0, BASE_BITS))
            self._cv.notify_all()

    def _everything(self):
        experts = self._verified.shape[1]
        return [(layer, e) for layer in self.cache.layers for e in range(experts)]

    def _next(self):
        with self._cv:
            while not self._queue and not self._stop:
                self._cv.wait()
            if self._stop:
                return None
            key, layer, expert, target, must, epoch, floor = heapq.heappop(self._queue)
            if key[0] in (OPTIONAL, PREFETCH) and self._epoch - epoch > STALE_EPOCHS:
                return ()
            self._busy = True
            return layer, expert, target, must, key[0], floor

    def _run(self) -> None:
        while (item := self._next()) is not None:
            if not item:
                continue
            try:
                self._load(*item)
            except BaseException as exc:  # handed to the compute thread, which re-raises it
                with self._cv:
                    self.failed = exc
                    self._busy = False
                    self._cv.notify_all()
                return

    def _reserve(self, layer: int, expert: int, target: int, must: bool, cls: int, floor: int):
        """(first_chunk, units) to load, or None if nothing to do / no room. Best-effort reads only
        evict chunks worth less than the lowest chunk they bring in; a prefetched expert counts one
        more routing than its hotness (it is about to be used). OPTIONAL and FILL reads evict nothing:
        in a full cache an upper level read for later tokens would be evicted by the next missing base
        before any token used it."""
        cache = self.cache
        worth = (np.inf if must else 0.0 if cls in (OPTIONAL, FILL)
                 else cache.value(layer, expert, target - 1, extra=1.0 if cls == PREFETCH else 0.0))
        while True:
            since = cache.releases
            reserved = cache.reserve(layer, expert, target, worth, floor)
            if reserved is not None or not must or cache.held_now(layer, expert) >= target or self._stop:
                self._set_blocked(False)
                return reserved
            self._set_blocked(True)  # every unit pinned: the compute thread frees some as it goes
            cache.wait_release(since, ROOM_POLL_S)

    def _set_blocked(self, blocked: bool) -> None:
        if blocked != self.blocked:
            with self._cv:
                self.blocked = blocked
                self._cv.notify_all()

    def _load(self, layer: int, expert: int, target: int, must: bool, cls: int, floor: int) -> None:
        cache = self.cache
        reserved = self._reserve(layer, expert, target, must, cls, floor)
        if reserved is not None:
            first, units = reserved
            t0 = time.perf_counter()
            seen = self._verified[self._row[layer], expert]
            verify = self.verify and not seen[first:target].all()
            n = cache.arena.load(self.container, layer, expert, first, target, units, cache.layout.chunk_sizes,
                                 verify)
            self.bytes_read += n
            seen[first:target] = True
            t1 = time.perf_counter()
            self.read_seconds += t1 - t0
            if self.trace is not None:
                self.trace.span("read", "io", t0, t1, layer=layer, expert=expert, bytes=n,
                                chunks=f"{first}..{target - 1}")
            cache.commit(layer, expert, first, units)
        with self._cv:
            self._tried[(layer, expert)] = max(self._tried.get((layer, expert), 0), target)
            self._busy = False
            self._cv.notify_all()

    def _ready(self, layer: int, expert: int, must: int, want: int) -> bool:
        """Holds `want`, or holds `must` and waiting for more is pointless (the reader tried the levels
        above, or is blocked for room). Never below `must`: a best-effort read that found no room
        (a stale prefetch) also counts as tried."""
        held = self.cache.held_now(layer, expert)
        return bool(self.failed is not None or held >= want
                    or (held >= must and (self._tried.get((layer, expert), 0) >= want or self.blocked)))

    def wait_for(self, layer: int, expert: int, must: int, want: int) -> int:
        """Block until the expert holds `want` chunks, or the reader tried, or it holds `must` and the
        reader is blocked for room (waiting longer could deadlock); returns the chunks held."""
        with self._cv:
            self._cv.wait_for(lambda: self._ready(layer, expert, must, want))
            if self.failed is not None:
                raise self.failed
            return self.cache.held_now(layer, expert)

    def poll(self, layer: int, experts: list[tuple[int, int, int]]) -> list[int | None]:
        """wait_for's answer for each (expert, must, want) that is ready now, else None; never blocks."""
        with self._cv:
            if self.failed is not None:
                raise self.failed
            return [self.cache.held_now(layer, e) if self._ready(layer, e, must, want) else None
                    for e, must, want in experts]

    def drain(self) -> None:
        """Wait until every queued read is done."""
        with self._cv:
            self._cv.wait_for(lambda: (not self._queue and not self._busy) or self.failed is not None)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join()
