"""The MoE layer pipeline: route -> bits -> acquire -> (HEBF reads) -> compute experts as their levels land.

Per layer the gate's choice and each pair's width are computed once, and the layer's experts are
acquired from the cache. When every one holds the bits it wants (a resident model's decode step),
the whole layer is one kernel call. Otherwise the reader is handed the missing levels (hottest
expert first), and until every expert is done the compute takes all experts that already hold what
they need (or, when none does, waits for the hottest one) and computes them in one kernel call, so
that a streamed layer overlaps its reads. Last it asks the reader to prefetch the next MoE layer's
likely experts by applying that layer's router to this layer's input (its best available guess of
the next hidden state).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from edge_moe.format.nested import BASE_BITS
from edge_moe.runtime.bit_policy import BitRequest
from edge_moe.runtime.expert_cache import ExpertCache, Lease
from edge_moe.runtime.reader import Reader, Want
from edge_moe.runtime.stats import RunStats

PREFETCH_MAX_TOKENS = 4  # prefetch during decode; a prefill chunk routes too widely to guess
PREFETCH_MIN_CORES = 4  # below this, the default streaming does not prefetch (default_streaming)


STREAMING = {  # name -> (eviction, prefetch, keep experts after use)
    "hebf": ("value", True, True),  # ours: bit-granular eviction, HEBF reads, speculative reads (next-layer
    # prefetch; and the whole model in the background when the budget holds it all)
    "hebf-no-prefetch": ("value", False, True),  # ours without prefetch (its reads compete for the cores)
    "lru": ("lru", False, True),  # baseline: whole-expert LRU, no prefetch (mixtral-offloading, EdgeMoE)
    "on-demand": ("value", False, False),  # baseline: read each expert when routed, keep nothing
}


def default_streaming(cores: int | None = None) -> str:
    """HEBF with speculative reads, or without them on fewer than PREFETCH_MIN_CORES cores: there the
    reader and the extra routing take cycles from the kernels' threads (tools/bench_budget.py)."""
    return "hebf" if (cores or os.cpu_count() or 1) >= PREFETCH_MIN_CORES else "hebf-no-prefetch"


@dataclass
class Call:
    """What one forward carries through the layers: the request's knobs and the counters it fills. A
    forward of several requests' rows (runtime.batch) gives `rows`: (row count, request) of each, in
    row order; each token then gets its own request's widths."""

    request: BitRequest = field(default_factory=BitRequest)
    stats: RunStats = field(default_factory=RunStats)
    rows: tuple[tuple[int, BitRequest], ...] = ()

    @property
    def requests(self) -> list[BitRequest]:
        return [r for _, r in self.rows] or [self.request]

    def assign(self, weights: np.ndarray) -> np.ndarray:
        """Bits [T, K] of each token's experts, by its own request."""
        if not self.rows:
            return self.request.assign(weights)
        parts = np.split(weights, np.cumsum([n for n, _ in self.rows])[:-1])
        return np.concatenate([r.assign(w) for (_, r), w in zip(self.rows, parts, strict=True)])

    def min_bits(self) -> int | np.ndarray:
        """min_bits of each token's request: one int, or [T, 1] when requests share the forward."""
        if not self.rows:
            return self.request.min_bits
        return np.repeat([r.min_bits for _, r in self.rows], [n for n, _ in self.rows])[:, None]

    @property
    def wait(self) -> bool:
        """Whether late levels are waited for (any request of the forward that waits decides)."""
        return any(r.wait for r in self.requests)

    @property
    def max_bits(self) -> int:
        return max(r.max_bits for r in self.requests)

    @property
    def floor(self) -> int:
        """Chunks below which an expert is useless to these requests (evicted together)."""
        return max(BASE_BITS, min(r.min_bits for r in self.requests))


class Routing(NamedTuple):
    """A layer's (token, expert) pairs grouped by expert: experts [n] and their pairs as CSR."""

    experts: np.ndarray  # [n] distinct expert ids
    want: np.ndarray  # [n] widest bits among the expert's pairs
    heat: np.ndarray  # [n] tokens routed to it (ties: gate mass)
    ptr: np.ndarray  # [n + 1] its pairs are ptr[k]:ptr[k + 1]
    tokens: np.ndarray  # [P] token rows
    weights: np.ndarray  # [P] float32 gate weights
    bits: np.ndarray  # [P] each pair's bits
    floor: np.ndarray  # [n] the largest min_bits among the expert's pairs' requests

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.ptr) if len(self.tokens) != len(self.experts) else _ones(len(self.experts))

    def must(self) -> np.ndarray:
        """Chunks each expert cannot run without: its requests' min_bits (never above what it wants)."""
        return np.maximum(np.minimum(self.floor, self.want), BASE_BITS)

    def wants(self, must: np.ndarray, order) -> list[Want]:
        """The reader's Want of each expert in `order` (indices)."""
        return [Want(int(self.experts[k]), int(must[k]), int(self.want[k]), float(self.heat[k])) for k in order]

    def hottest_first(self) -> np.ndarray:
        """Indices of the experts by heat, ties by expert id: the order of reads and waits."""
        return np.lexsort((self.experts, -self.heat))


def group_by_expert(experts: np.ndarray, weights: np.ndarray, bits: np.ndarray, min_bits=BASE_BITS) -> Routing:
    """Routing of gate choices experts [T, K] with weights and bits [T, K] and each token's requested
    min_bits (one int, or [T, 1]): one token keeps the gate's order (one pair per expert), several are
    grouped hottest first."""
    if experts.shape[0] == 1:
        ptr, tokens = _one_token_csr(experts.shape[1])
        w = weights[0].astype(np.float32, copy=False)
        floor = np.broadcast_to(np.ravel(min_bits)[0], bits[0].shape)
        return Routing(experts[0], bits[0], 1.0 + w / 2, ptr, tokens, w, bits[0], floor)
    flat = experts.ravel()
    order = np.argsort(flat, kind="stable")
    ids, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
    tokens, w, b = order // experts.shape[1], weights.ravel()[order].astype(np.float32), bits.ravel()[order]
    heat = counts + np.add.reduceat(w, starts).astype(np.float64) / (counts + 1)
    want = np.maximum.reduceat(b, starts)
    floor = np.maximum.reduceat(np.broadcast_to(min_bits, experts.shape).ravel()[order], starts)
    rank = np.argsort(-heat, kind="stable")  # pairs regrouped so that the hottest expert comes first
    pairs = np.concatenate([np.arange(starts[k], starts[k] + counts[k]) for k in rank])
    ptr = np.concatenate([[0], np.cumsum(counts[rank])])
    return Routing(ids[rank], want[rank], heat[rank], ptr, tokens[pairs], w[pairs], b[pairs], floor[rank])


@functools.cache
def _one_token_csr(k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ptr, tokens) of k experts on token 0, one pair each (shared: never written)."""
    return np.arange(k + 1), np.zeros(k, np.int64)


@functools.cache
def _ones(k: int) -> np.ndarray:
    return np.ones(k, np.int64)


def _host(a) -> np.ndarray:
    """An array's values as numpy: itself on the cpu, a copy of a cuda tensor."""
    return a if isinstance(a, np.ndarray) else a.cpu().numpy()


class MoePipeline:
    """The decoder's `experts` callable, streaming expert levels through the cache."""

    def __init__(self, cfg, cache: ExpertCache, reader: Reader, backend, routers: dict, route,
                 prefetch: bool = True, keep: bool = True):
        """routers: each MoE layer's router weights; route: the decoder's gate (x, router, cfg) ->
        (weights, experts), applied to guess the next layer's experts."""
        self.cfg, self.cache, self.reader, self.backend = cfg, cache, reader, backend
        self.prefetch, self.keep = prefetch, keep
        self.routers, self.gate = routers, route
        self.trace = None  # a runtime.trace.Trace records computes and stalls (edge-moe profile)
        self.next_layer = dict(zip(cfg.moe_layers, cfg.moe_layers[1:], strict=False))

    def route(self, weights, experts, call: Call) -> Routing:
        w = _host(weights).astype(np.float32, copy=False)  # bookkeeping on the host
        return group_by_expert(_host(experts), w, call.assign(w), call.min_bits())

    def __call__(self, layer: int, x, weights, experts, call: Call | None = None):
        call = call or Call()
        routing = self.route(weights, experts, call)
        lease = self.cache.acquire(layer, routing.experts, routing.counts, routing.want)
        try:
            if lease.ready:  # every expert holds the bits it wants: one kernel call, nothing to read
                if lease.todo:
                    self._prepare_forms(lease, routing, range(len(lease.experts)))
                y = self._compute(lease, routing, None, x, call, None)
            else:
                y = self._stream(lease, routing, x, call)
        finally:
            self.cache.release(lease, drop=not self.keep)
        self._prefetch(layer, x, call)
        return y

    def _stream(self, lease: Lease, routing: Routing, x, call: Call):
        """Hand the reader what is missing, then compute experts in batches as their levels land."""
        resident, must, wait = lease.held.copy(), routing.must(), call.wait
        pending = routing.hottest_first().tolist()
        self.reader.submit(lease.layer, routing.wants(must, pending), wait_upper=wait, floor=call.floor)
        target = routing.want if wait else must
        out = None
        while pending:
            ready, pending = self._take_ready(lease, pending, must, target, call)
            for k in ready:
                self.cache.refresh(lease, k)
            self._prepare_forms(lease, routing, ready)
            y = self._compute(lease, routing, np.array(ready), x, call, resident)
            if out is None:
                out = y
            else:
                out += y
            self.cache.release(lease, ready, drop=not self.keep)
        return out

    def _take_ready(self, lease: Lease, pending: list[int], must, target, call: Call):
        """(indices ready to compute, the rest); waits for the hottest when none is."""
        e = lease.experts
        held = self.reader.poll(lease.layer, [(int(e[k]), int(must[k]), int(target[k])) for k in pending])
        if all(h is None for h in held):
            t0, k = time.perf_counter(), pending[0]
            held[0] = self.reader.wait_for(lease.layer, int(e[k]), int(must[k]), int(target[k]))
            t1 = time.perf_counter()
            call.stats.stall_s += t1 - t0
            if self.trace is not None:
                self.trace.span("stall", "io", t0, t1, layer=lease.layer, expert=int(e[k]))
        ready = [k for k, h in zip(pending, held, strict=True) if h is not None]
        return ready, [k for k, h in zip(pending, held, strict=True) if h is None]

    def _prepare_forms(self, lease: Lease, routing: Routing, idx) -> None:
        if self.cache.forms is None:
            return
        for k in idx:
            pairs = routing.bits[routing.ptr[k]:routing.ptr[k + 1]]
            self.cache.prepare_form(lease, k, np.unique(np.minimum(pairs, lease.held[k])).tolist())

    def _compute(self, lease: Lease, routing: Routing, idx: np.ndarray, x, call: Call,
                 resident: np.ndarray):
        """One kernel call over the experts idx (None: all, in routing order); an expert's pairs split by
        width, each capped by the levels it holds. `resident`: chunks held when acquired, for the stats
        (None: every expert held its bits: a ready lease)."""
        units, bits, ptr, tokens, weights, forms, experts = _entries(lease, routing, idx)
        if resident is None and len(bits) == len(routing.experts):
            call.stats.record_resident(bits)  # one pair per expert, all hits: one numba call
        else:
            every = np.arange(len(routing.experts))
            _record(call.stats, lease, routing, every if idx is None else idx,
                    lease.held if resident is None else resident)
        t0 = time.perf_counter()
        form = {"form": forms} if self.cache.forms is not None else {}
        y = self.backend.moe_ffn_units(self.cache.layout, self.cache.arena.data, units, bits, x, ptr, tokens,
                                       weights, **form)
        t1 = time.perf_counter()
        call.stats.expert_compute_s += t1 - t0
        if self.trace is not None:
            self.trace.span("experts", "compute", t0, t1, layer=lease.layer, entries=len(bits))
            self.trace.used(lease.layer, experts, bits, np.diff(ptr))
        return y

    def _prefetch(self, layer: int, x, call: Call) -> None:
        nxt = self.next_layer.get(layer)
        if not self.prefetch or nxt is None or x.shape[0] > PREFETCH_MAX_TOKENS:
            return
        if self.cache.layer_holds(nxt, call.max_bits):
            return  # the whole next layer is resident at the widest width asked for: nothing to guess
        routing = self.route(*self.gate(x, self.routers[nxt], self.cfg), call)
        wants = routing.wants(routing.must(), range(len(routing.experts)))
        self.reader.submit(nxt, wants, prefetch=True, floor=call.floor)


def _entries(lease: Lease, routing: Routing, idx: np.ndarray | None):
    """The kernel's entries for experts idx (None: all, in routing order): (units [N, 8], bits [N], ptr
    [N + 1], tokens, weights, forms [N], expert ids [N]), one entry per (expert, width), each pair's
    width capped by the chunks its expert holds."""
    if idx is None and len(routing.tokens) == len(routing.experts):  # one pair per expert, all held
        return (lease.units, routing.bits, routing.ptr, routing.tokens, routing.weights, lease.forms,
                routing.experts)
    units, bits, ptr, pairs, forms, experts = [], [], [0], [], [], []
    for k in (range(len(routing.experts)) if idx is None else idx.tolist()):
        span = np.arange(routing.ptr[k], routing.ptr[k + 1])
        used = np.minimum(routing.bits[span], lease.held[k])
        for b in np.unique(used).tolist():
            sel = span[used == b]
            units.append(lease.units[k])
            forms.append(lease.forms[k])
            experts.append(int(routing.experts[k]))
            bits.append(b)
            pairs.append(sel)
            ptr.append(ptr[-1] + len(sel))
    pairs = np.concatenate(pairs)
    return (np.stack(units), np.array(bits, np.int64), np.array(ptr, np.int64), routing.tokens[pairs],
            routing.weights[pairs], np.array(forms, np.int8), np.array(experts, np.int64))


def _record(stats: RunStats, lease: Lease, routing: Routing, idx: np.ndarray, resident: np.ndarray) -> None:
    """Stats of one computation over experts idx: pairs per width, hits (held that width when acquired)
    and pairs computed below the bits they wanted."""
    for k in idx.tolist():
        wanted = routing.bits[routing.ptr[k]:routing.ptr[k + 1]]
        used = np.minimum(wanted, lease.held[k])
        for b in np.unique(used).tolist():
            sel = used == b
            stats.record(b, resident[k] >= b, int(wanted[sel].max()), n=int(sel.sum()))
