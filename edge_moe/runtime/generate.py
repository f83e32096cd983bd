"""The generation loop as plain functions: prefill a prompt in chunks, decode one token, decode n."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from edge_moe.model.layers import KVCache
from edge_moe.runtime.moe import Call

Forward = Callable[..., torch.Tensor]  # (ids [T], kv, call, all_logits) -> logits [T or 1, V]


def prefill(forward: Forward, ids: list[int], kv: KVCache, call: Call, chunk: int,
            all_logits: bool = False) -> torch.Tensor:
    """Run the prompt `chunk` tokens at a time; logits [T, V] of every position, or [1, V] of the last."""
    outs = [forward(torch.tensor(ids[i:i + chunk]), kv, call, all_logits) for i in range(0, len(ids), chunk)]
    return torch.cat(outs) if all_logits else outs[-1]


def decode_one_token(forward: Forward, token: int, kv: KVCache, call: Call) -> torch.Tensor:
    """Logits [V] of the position after `token`."""
    return forward(torch.tensor([token]), kv, call, False)[-1]


def decode_tokens(forward: Forward, logits: torch.Tensor, kv: KVCache, call: Call, max_tokens: int,
                  pick: Callable[[torch.Tensor], int], stop: set[int]) -> Iterator[int]:
    """Yield up to max_tokens ids, the first picked from the prefill's `logits` [V]; ends after a stop id."""
    for n in range(1, max_tokens + 1):
        token = pick(logits)
        yield token
        if token in stop or n == max_tokens:
            return
        logits = decode_one_token(forward, token, kv, call)
