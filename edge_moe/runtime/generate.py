"""The generation loop as plain functions: prefill a prompt in chunks, decode one token, decode n."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from edge_moe.runtime.moe import Call

Forward = Callable[..., np.ndarray]  # (ids [T], kv, call, all_logits) -> logits [T or 1, V]


def prefill(forward: Forward, ids: list[int], kv, call: Call, chunk: int,
            all_logits: bool = False) -> np.ndarray:
    """Run the prompt `chunk` tokens at a time; logits [T, V] of every position, or [1, V] of the last."""
    outs = [forward(ids[i:i + chunk], kv, call, all_logits) for i in range(0, len(ids), chunk)]
    return np.concatenate(outs) if all_logits else outs[-1]


def decode_one_token(forward: Forward, token: int, kv, call: Call) -> np.ndarray:
    """Logits [V] of the position after `token`."""
    return forward([token], kv, call, False)[-1]


def decode_tokens(forward: Forward, logits: np.ndarray, kv, call: Call, max_tokens: int,
                  pick: Callable[[np.ndarray], int], stop: set[int]) -> Iterator[int]:
    """Yield up to max_tokens ids, the first picked from the prefill's `logits` [V]; ends after a stop id."""
    for n in range(1, max_tokens + 1):
        token = pick(logits)
        yield token
        if token in stop or n == max_tokens:
            return
        logits = decode_one_token(forward, token, kv, call)
