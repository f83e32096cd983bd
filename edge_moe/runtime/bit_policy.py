"""Per-request knobs and the training-free dual routing that gives each (token, expert) its bits.

HOBBIT-style rule: rank a token's experts by gate weight; those whose preceding cumulative weight
is below `quality` get `max_bits`, the tail gets `min_bits`. quality=1 gives every expert max_bits,
quality=0 gives min_bits. A fixed `bits` sets every expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_moe.errors import UsageError
from edge_moe.format.nested import BASE_BITS, MAX_BITS
from edge_moe.runtime.bookkeeping import assign_bits


@dataclass(frozen=True)
class BitRequest:
    """What one call asks for; `wait` says whether to wait for late levels or use what is resident."""

    bits: int | None = None
    quality: float | None = None
    min_bits: int = BASE_BITS
    max_bits: int = MAX_BITS
    wait: bool = True

    @classmethod
    def make(cls, bits=None, quality=None, min_bits=None, max_bits=None, wait=None) -> BitRequest:
        """Validate the knobs; fixed bits wait for their levels, a quality target computes with
        what is resident above min_bits unless wait=True."""
        if bits is not None and quality is not None:
            raise UsageError("give either bits or quality, not both")
        if bits is not None:
            _check("bits", bits)
            return cls(bits=int(bits), min_bits=int(bits), max_bits=int(bits), wait=True)
        if quality is None and (min_bits is not None or max_bits is not None):
            raise UsageError("--min-bits and --max-bits bound the widths --quality picks; give --quality too, "
                             "or --bits for one width")
        lo, hi = int(min_bits or BASE_BITS), int(max_bits or MAX_BITS)
        _check("min_bits", lo), _check("max_bits", hi)
        if lo > hi:
            raise UsageError(f"min_bits={lo} is above max_bits={hi}")
        if quality is not None and not 0.0 <= float(quality) <= 1.0:
            raise UsageError(f"quality={quality} is out of range; choose a value in [0, 1]")
        q = None if quality is None else float(quality)
        return cls(quality=q, min_bits=lo, max_bits=hi, wait=bool(wait) if wait is not None else q is None)

    def assign(self, weights: np.ndarray) -> np.ndarray:
        """Bits int64 [T, K] for gate weights [T, K] (any order)."""
        if self.quality is None:
            return np.full(np.shape(weights), self.max_bits, dtype=np.int64)
        return assign_bits(np.asarray(weights, dtype=np.float64), self.quality, self.min_bits, self.max_bits)


def _check(name: str, value) -> None:
    if not BASE_BITS <= int(value) <= MAX_BITS:
        raise UsageError(f"{name}={value} is out of range; choose {BASE_BITS}..{MAX_BITS}")
