"""Counters of one generation: speed, I/O stalls, bytes read, cache hits and bits used per level."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_moe.format.nested import MAX_BITS
from edge_moe.runtime.bookkeeping import count


@dataclass
class RunStats:
    """Filled by the MoE pipeline and the API; `as_dict()` is what `model.stats` returns."""

    stall_s: float = 0.0  # compute thread waiting for expert reads
    expert_compute_s: float = 0.0
    expert_calls: int = 0
    hits: np.ndarray = field(default_factory=lambda: np.zeros(MAX_BITS + 1, np.int64))  # by bits used
    misses: np.ndarray = field(default_factory=lambda: np.zeros(MAX_BITS + 1, np.int64))
    bits_used: np.ndarray = field(default_factory=lambda: np.zeros(MAX_BITS + 1, np.int64))
    degraded: int = 0  # (token, expert) pairs computed below the bits wanted (levels late or no room)
    wanted: int = 0  # bits wanted, summed over the pairs

    def record(self, bits: int, was_resident: bool, wanted: int, n: int = 1) -> None:
        """One expert computation at `bits` over n (token, expert) pairs."""
        self.expert_calls += 1
        self.bits_used[bits] += n
        (self.hits if was_resident else self.misses)[bits] += n
        self.degraded += n if bits < wanted else 0
        self.wanted += wanted * n

    def record_resident(self, bits: np.ndarray) -> None:
        """One computation per entry of bits (one pair each), every expert resident at its width."""
        self.expert_calls += len(bits)
        count(bits, self.bits_used, self.hits)
        self.wanted += int(bits.sum())

    def merge(self, other: RunStats) -> None:
        """Add another's counters (a batched step's, to each request that took part in it)."""
        self.stall_s += other.stall_s
        self.expert_compute_s += other.expert_compute_s
        self.expert_calls += other.expert_calls
        for name in ("hits", "misses", "bits_used"):
            getattr(self, name)[:] += getattr(other, name)
        self.degraded += other.degraded
        self.wanted += other.wanted

    def as_dict(self) -> dict:
        used = {b: int(n) for b, n in enumerate(self.bits_used) if n}  # (token, expert) pairs per width
        pairs = max(int(self.bits_used.sum()), 1)
        return {"stall_s": self.stall_s, "expert_compute_s": self.expert_compute_s,
                "expert_calls": self.expert_calls, "hit_rate": float(self.hits.sum()) / pairs,
                "hits_by_bits": {b: int(n) for b, n in enumerate(self.hits) if n},
                "bits_histogram": used, "degraded_pairs": self.degraded,
                "mean_bits": float(sum(b * n for b, n in used.items()) / pairs),
                "wanted_mean_bits": self.wanted / pairs}

    def degradation(self) -> str | None:
        """What the budget cost in width, in words, or None when every pair ran at the width wanted."""
        if not self.degraded:
            return None
        d = self.as_dict()
        return (f"{self.degraded} of {int(self.bits_used.sum())} expert computations ran below the width "
                f"asked (mean {d['mean_bits']:.2f} bits, {d['wanted_mean_bits']:.2f} asked)")
