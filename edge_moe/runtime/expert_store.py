"""Expert levels held in memory, keyed by (layer, expert); more levels are read as a prefix extension."""

from __future__ import annotations

import numpy as np

from edge_moe.format.container import Container


class ExpertStore:
    """Reads each expert's first levels from the container on first use and keeps them resident."""

    def __init__(self, container: Container):
        self.container = container
        self._held: dict[tuple[int, int], tuple[int, np.ndarray]] = {}
        self.bytes_read = 0

    def levels_held(self, layer: int, expert: int) -> int:
        return self._held.get((layer, expert), (0, None))[0]

    @property
    def resident_bytes(self) -> int:
        return sum(self.container.expert_nbytes(k) for k, _ in self._held.values())

    def get(self, layer: int, expert: int, levels: int) -> np.ndarray:
        """A buffer holding at least `levels` levels of the expert (reads only the missing ones)."""
        held, buf = self._held.get((layer, expert), (0, None))
        if held >= levels:
            return buf
        full = np.empty(self.container.expert_nbytes(levels), dtype=np.uint8)
        if held:
            full[:buf.nbytes] = buf
        self.container.read_expert(layer, expert, levels, out=full, first_level=held + 1)
        self.bytes_read += full.nbytes - (buf.nbytes if held else 0)
        self._held[(layer, expert)] = (levels, full)
        return full
