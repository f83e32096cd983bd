"""A whole prompt's forward, `chunk` tokens at a time (scoring: logits of every position); generation
runs through runtime.batch."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edge_moe.runtime.moe import Call

Forward = Callable[..., np.ndarray]  # (ids [T], kv, call, all_logits) -> logits [T or 1, V]


def prefill(forward: Forward, ids: list[int], kv, call: Call, chunk: int,
            all_logits: bool = False) -> np.ndarray:
    """Run the prompt `chunk` tokens at a time; logits [T, V] of every position, or [1, V] of the last."""
    outs = [forward(ids[i:i + chunk], kv, call, all_logits) for i in range(0, len(ids), chunk)]
    return np.concatenate(outs) if all_logits else outs[-1]
