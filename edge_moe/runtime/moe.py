"""The MoE layer pipeline: route -> bits -> HEBF reads -> compute each expert as its levels land.

The compute thread pins the layer's experts, hands the reader their wanted levels (hottest expert
first), computes each expert as soon as it holds what it must, unpins it, and finally asks the
reader to prefetch the next MoE layer's likely experts by applying that layer's router to this
layer's input (its best available guess of the next hidden state).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from edge_moe.model.layers import route
from edge_moe.runtime.bit_policy import BitRequest
from edge_moe.runtime.expert_cache import ExpertCache
from edge_moe.runtime.reader import Reader, Want
from edge_moe.runtime.stats import RunStats

PREFETCH_MAX_TOKENS = 4  # prefetch during decode; a prefill chunk routes too widely to guess


STREAMING = {  # name -> (eviction, prefetch, keep experts after use)
    "hebf": ("value", True, True),  # ours: bit-granular eviction, HEBF reads, next-layer prefetch
    "lru": ("lru", False, True),  # baseline: whole-expert LRU, no prefetch (mixtral-offloading, EdgeMoE)
    "on-demand": ("value", False, False),  # baseline: read each expert when routed, keep nothing
}


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

    def _wants(self, experts: torch.Tensor, weights: torch.Tensor, bits: torch.Tensor):
        """Per routed expert: its tokens, slots and each pair's bits, and a Want (must/want, heat)."""
        groups = []
        for e in torch.unique(experts).tolist():
            tokens, slots = torch.where(experts == e)
            pair_bits = bits[tokens, slots]
            want = int(pair_bits.max())
            heat = len(tokens) + float(weights[tokens, slots].sum()) / (len(tokens) + 1)
            must = max(min(self.request.min_bits, want), 2)
            groups.append((Want(e, must, want, heat), tokens, slots, pair_bits))
        return sorted(groups, key=lambda g: -g[0].heat)

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor,
                 experts: torch.Tensor) -> torch.Tensor:
        cache, row = self.cache, self.cache.row[layer]
        weights_d, experts, weights = weights, experts.cpu(), weights.cpu()  # bookkeeping on the host
        groups = self._wants(experts, weights, self.request.assign(weights))
        resident = {}
        with cache.lock:
            for w, *_ in groups:
                cache.pins[row, w.expert] += 1
                resident[w.expert] = int(cache.held[row, w.expert])
        cache.record_routing(layer, np.bincount(experts.flatten().numpy(), minlength=self.cfg.num_experts))
        self.reader.submit(layer, [g[0] for g in groups], wait_upper=self.request.wait)
        out, pinned = torch.zeros_like(x), [g[0].expert for g in groups]
        try:
            for w, tokens, slots, pair_bits in groups:
                for _bits, y, sub in self._compute(layer, row, w, x, tokens, pair_bits, resident[w.expert]):
                    t_d = tokens[sub].to(x.device)
                    out.index_add_(0, t_d, y.to(x.device) * weights_d[t_d, slots[sub].to(x.device), None])
                self._unpin(row, [pinned.pop(0)])
        finally:
            self._unpin(row, pinned)  # only after an error: normal exits hold no pins here
        self._prefetch(layer, x)
        return out

    def _compute(self, layer: int, row: int, w: Want, x: torch.Tensor, tokens: torch.Tensor,
                 pair_bits: torch.Tensor, resident: int):
        """Yield (bits, y, token subset) per distinct width among the expert's (token, expert) pairs,
        each capped by the levels held once the wait ends (never below `must`)."""
        t0 = time.perf_counter()
        held = self.reader.wait_for(layer, w.expert, w.must, w.want if self.request.wait else w.must)
        t1 = time.perf_counter()
        units = self.cache.units[row, w.expert].copy()  # chunks below `held` never move while pinned
        assert held >= w.must, (layer, w, held)
        used = torch.clamp(pair_bits, max=held)
        for bits in torch.unique(used).tolist():
            sub = torch.where(used == bits)[0]
            xs = x[tokens[sub].to(x.device)]
            y = self.backend.expert_ffn_units(self.cache.layout, self.cache.arena.data, units, xs, bits)
            self.stats.record(bits, resident >= bits, int(pair_bits[sub].max()), n=len(sub))
            yield bits, y, sub
        self.stats.stall_s += t1 - t0
        self.stats.expert_compute_s += time.perf_counter() - t1

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
        weights, experts = (t.cpu() for t in route(x, self.routers[nxt], self.cfg))
        groups = self._wants(experts, weights, self.request.assign(weights))
        self.reader.submit(nxt, [g[0] for g in groups], prefetch=True)
