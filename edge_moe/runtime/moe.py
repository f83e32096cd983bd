"""The MoE layer pipeline: route -> bits -> HEBF reads -> compute experts in batches as their levels land.

The compute thread pins the layer's experts and hands the reader their wanted levels (hottest
expert first). Then, until every expert is done, it takes all experts that already hold what they
need (or, when none does, waits for the hottest one) and computes them in one kernel call, so a
fully resident layer is one call and a streamed one overlaps its reads. Last it asks the reader to
prefetch the next MoE layer's likely experts by applying that layer's router to this layer's input
(its best available guess of the next hidden state).
"""

from __future__ import annotations

import functools
import os
import time
from typing import NamedTuple

import numpy as np
import torch

from edge_moe.format.nested import BASE_BITS
from edge_moe.kernels.bookkeeping import unpin, wanted_form
from edge_moe.model.layers import route
from edge_moe.runtime.bit_policy import BitRequest
from edge_moe.runtime.expert_cache import ExpertCache
from edge_moe.runtime.reader import Reader, Want
from edge_moe.runtime.stats import RunStats

NIBBLE_BITS = (3, 4)  # widths at which an expert is worth rewriting (ExpertCache.rewrite): the nibble
# form reads 4 bits, so at 2 bits the planes read half as much; above 4 it adds planes 4.. (slower
# than the planes' own 8-plane transpose: decode with 8-bit experts 33 -> 37.5 ms/token on a Zen 3
# when experts of every width were rewritten)
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
    reader and the extra routing take cycles from the kernels' threads. tools/bench_budget.py on 2
    cores: "hebf-no-prefetch" 12-33% faster at 1.2-2 GB; at 12 GB the background fill halved decode
    speed for the ~50 s it took (not measured on more cores)."""
    return "hebf" if (cores or os.cpu_count() or 1) >= PREFETCH_MIN_CORES else "hebf-no-prefetch"


class Routed(NamedTuple):
    """One routed expert of a layer: its Want and its (token, expert) pairs."""

    want: Want
    tokens: np.ndarray  # [n] token rows
    weights: np.ndarray  # [n] gate weights
    bits: np.ndarray  # [n] each pair's bits


def group_by_expert(experts: np.ndarray, weights: np.ndarray, bits: np.ndarray, min_bits: int) -> list[Routed]:
    """Routed experts, hottest first (heat: tokens routed, ties broken by gate mass)."""
    if experts.shape[0] == 1:
        return _one_token(experts[0], weights[0], bits[0], min_bits)
    return _many_tokens(experts, weights, bits, min_bits)


def _many_tokens(experts: np.ndarray, weights: np.ndarray, bits: np.ndarray, min_bits: int) -> list[Routed]:
    flat = experts.ravel()
    order = np.argsort(flat, kind="stable")
    ids, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
    tokens, w, b = order // experts.shape[1], weights.ravel()[order], bits.ravel()[order]
    routed = []
    for e, s, n in zip(ids.tolist(), starts.tolist(), counts.tolist(), strict=True):
        pair = slice(s, s + n)
        want = int(b[pair].max())
        heat = n + float(w[pair].sum()) / (n + 1)
        routed.append(Routed(Want(e, max(min(min_bits, want), BASE_BITS), want, heat), tokens[pair], w[pair],
                             b[pair]))
    return sorted(routed, key=lambda r: -r.want.heat)


def _one_token(experts: np.ndarray, weights: np.ndarray, bits: np.ndarray, min_bits: int) -> list[Routed]:
    """group_by_expert of one token (decode), without its sorts and slices: 10x less time, which was
    a tenth of a decode step's non-kernel time on 2 cores."""
    token = np.zeros(1, np.int64)
    pairs = enumerate(zip(experts.tolist(), weights.tolist(), bits.tolist(), strict=True))
    routed = [Routed(Want(e, max(min(min_bits, b), BASE_BITS), b, 1.0 + w / 2), token, weights[k:k + 1],
                     bits[k:k + 1]) for k, (e, w, b) in pairs]
    return sorted(sorted(routed, key=lambda r: r.want.expert), key=lambda r: -r.want.heat)


def _host(t: torch.Tensor) -> np.ndarray:
    """A tensor's values as numpy, without a copy on the cpu."""
    return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()


def _by_width(r: Routed, held: int):
    """(bits, pairs) of a routed expert's pairs grouped by the width they run at: each pair's bits
    capped by the levels held."""
    used = np.minimum(r.bits, held)
    if len(used) == 1:
        return [(int(used[0]), slice(None))]
    return [(b, used == b) for b in np.unique(used).tolist()]


class MoePipeline:
    """The decoder's `experts` callable, streaming expert levels through the cache."""

    def __init__(self, cfg, cache: ExpertCache, reader: Reader, backend,
                 routers: dict[int, torch.Tensor], prefetch: bool = True, keep: bool = True):
        self.cfg, self.cache, self.reader, self.backend = cfg, cache, reader, backend
        self.prefetch, self.keep = prefetch, keep
        self.routers = routers
        self.next_layer = dict(zip(cfg.moe_layers, cfg.moe_layers[1:], strict=False))
        self.request = BitRequest()
        self.stats = RunStats()

    def _route(self, weights: torch.Tensor, experts: torch.Tensor) -> tuple[list[Routed], np.ndarray]:
        experts, weights = experts.cpu().numpy(), weights.float().cpu().numpy()  # bookkeeping on the host
        return group_by_expert(experts, weights, self.request.assign(weights), self.request.min_bits), experts

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor,
                 experts: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            out = self._resident_token(layer, x, weights, experts)
            if out is not None:
                return out
        cache, row = self.cache, self.cache.row[layer]
        routed, experts = self._route(weights, experts)
        with cache.lock:
            resident = {r.want.expert: int(cache.held[row, r.want.expert]) for r in routed}
            cache.pins[row, list(resident)] += 1
        cache.record_routing(layer, np.bincount(experts.ravel(), minlength=self.cfg.num_experts))
        self.reader.submit(layer, [r.want for r in routed], wait_upper=self.request.wait)
        out, pending, pinned = None, routed, set(resident)
        try:
            while pending:
                ready, pending = self._take_ready(layer, pending)
                y = self._compute(row, ready, x, resident)
                out = y if out is None else out.add_(y)
                done = [r.want.expert for r, _ in ready]
                pinned.difference_update(done)
                self._unpin(row, done)
        finally:
            self._unpin(row, list(pinned))  # only after an error
        self._prefetch(layer, x)
        return out

    def _resident_token(self, layer: int, x: torch.Tensor, weights: torch.Tensor,
                        experts: torch.Tensor) -> torch.Tensor | None:
        """One token whose experts all hold the bits it wants (a decode step on a resident model): the
        same single kernel call with the bookkeeping in two numba calls (claim, unpin), as nothing is read
        or waited for (the general path's per-expert lists took about 0.8 ms per layer on 2 cores, and
        the same steps in numpy ~0.23 ms: 2.5 us per op). None when an expert lacks levels."""
        cache = self.cache
        e, w = _host(experts)[0], _host(weights.float())[0]  # top-k: distinct experts
        bits = self.request.assign(w[None])[0]
        claimed = cache.claim_resident(layer, e, bits, (NIBBLE_BITS[0], NIBBLE_BITS[-1]))
        if claimed is None:
            return None
        units, forms, todo = claimed
        row = cache.row[layer]
        try:
            if todo:  # experts not yet in the form their bits want (3-4: nibble form, 2: LUT form)
                for k in range(len(e)):
                    self._rewrite_for(row, int(e[k]), int(cache.held[row, e[k]]), [int(bits[k])])
                forms = cache.form[row, e]
            form = {"form": forms} if cache.rewrite is not None else {}
            t0 = time.perf_counter()
            ptr, tokens = self._one_token_csr(len(e))
            y = self.backend.moe_ffn_units(cache.layout, cache.arena.data, units, bits, x, ptr, tokens, w,
                                           **form)
            self.stats.expert_compute_s += time.perf_counter() - t0
        finally:
            with cache.lock:  # waking the reader costs a thread switch: only when it waits for units
                quiet = self.keep and not self.reader.blocked
                if quiet:
                    unpin(cache.pins[row], e)
            if not quiet:
                self._unpin(row, e.tolist())
        self.stats.record_resident(bits)
        self._prefetch(layer, x)
        return y

    def _rewrite_for(self, row: int, expert: int, held: int, widths: list[int]) -> None:
        """Put a pinned expert into one form that serves every width it runs at in this call: the nibble
        form if one is 3-4 bits, the LUT form only if all are 2, planes instead of the LUT form else."""
        if self.cache.rewrite is None:
            return
        widest = NIBBLE_BITS[-1] if any(b in NIBBLE_BITS for b in widths) else max(widths)
        want = wanted_form(widest, int(self.cache.form[row, expert]), NIBBLE_BITS[0], NIBBLE_BITS[-1],
                           self.cache.lut)
        self.cache.rewrite_pinned(row, expert, held, want)

    @functools.cache  # noqa: B019 - a few small arrays per top-k, for the pipeline's life
    def _one_token_csr(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ptr, tokens) of k experts on token 0, one pair each."""
        return np.arange(k + 1), np.zeros(k, np.int64)

    def _target(self, w: Want) -> int:
        return w.want if self.request.wait else w.must

    def _take_ready(self, layer: int, pending: list[Routed]):
        """([(routed, chunks held)] ready to compute, the rest); waits for the hottest when none is."""
        held = self.reader.poll(layer, [(r.want.expert, r.want.must, self._target(r.want)) for r in pending])
        if all(h is None for h in held):
            t0 = time.perf_counter()
            w = pending[0].want
            held[0] = self.reader.wait_for(layer, w.expert, w.must, self._target(w))
            self.stats.stall_s += time.perf_counter() - t0
        ready = [(r, h) for r, h in zip(pending, held, strict=True) if h is not None]
        return ready, [r for r, h in zip(pending, held, strict=True) if h is None]

    def _compute(self, row: int, ready: list[tuple[Routed, int]], x: torch.Tensor,
                 resident: dict[int, int]) -> torch.Tensor:
        """One kernel call over the ready experts; an expert's pairs split by width, each capped by
        the levels held (never below `must`)."""
        units, bits, ptr, tokens, weights, forms = [], [], [0], [], [], []
        for r, held in ready:
            assert held >= r.want.must, (r.want, held)
            widths = _by_width(r, held)
            self._rewrite_for(row, r.want.expert, held, [b for b, _ in widths])
            expert_units = self.cache.units[row, r.want.expert]  # chunks < held stay while pinned
            for b, sel in widths:
                n = len(r.tokens[sel])
                units.append(expert_units)
                forms.append(self.cache.form[row, r.want.expert])
                bits.append(b)
                tokens.append(r.tokens[sel])
                weights.append(r.weights[sel])
                ptr.append(ptr[-1] + n)
                self.stats.record(b, resident[r.want.expert] >= b, int(r.bits[sel].max()), n=n)
        t0 = time.perf_counter()
        form = {"form": np.array(forms, np.int8)} if self.cache.rewrite is not None else {}
        y = self.backend.moe_ffn_units(self.cache.layout, self.cache.arena.data, np.stack(units),
                                       np.array(bits, np.int64), x, np.array(ptr, np.int64),
                                       np.concatenate(tokens), np.concatenate(weights).astype(np.float32),
                                       **form)
        self.stats.expert_compute_s += time.perf_counter() - t0
        return y

    def _unpin(self, row: int, experts: list[int]) -> None:
        with self.cache.lock:
            for e in experts:
                self.cache.pins[row, e] -= 1
                if not self.keep and self.cache.pins[row, e] == 0:
                    self.cache.drop(row, e)
            self.cache.lock.notify_all()

    def _prefetch(self, layer: int, x: torch.Tensor) -> None:
        nxt = self.next_layer.get(layer)
        if not self.prefetch or nxt is None or x.shape[0] > PREFETCH_MAX_TOKENS:
            return
        if (self.cache.held[self.cache.row[nxt]] >= self.request.max_bits).all():
            return  # the whole next layer is resident at the widest width asked for: nothing to guess
        routed, _ = self._route(*route(x, self.routers[nxt], self.cfg))
        self.reader.submit(nxt, [r.want for r in routed], prefetch=True)
