"""Next-token sampling: greedy, temperature, top-p (nucleus), reproducible with a seed."""

from __future__ import annotations

import numpy as np

from edge_moe.errors import UsageError


def check_sampling(temperature: float, top_p: float, max_tokens: int) -> None:
    """Refuse sampling values that have no meaning (a negative temperature, a top_p outside (0, 1])."""
    if not temperature >= 0:  # also NaN
        raise UsageError(f"--temperature {temperature}: use 0 (greedy) or a positive value")
    if not 0 < top_p <= 1:
        raise UsageError(f"--top-p {top_p}: use a value in (0, 1] (1 keeps every token)")
    if int(max_tokens) < 0:
        raise UsageError(f"--max-tokens {max_tokens}: use 0 or more")


def generator(seed: int | None) -> np.random.Generator:
    """The random source of one request: seeded (reproducible), or from the OS."""
    return np.random.default_rng(seed)


def sample(logits: np.ndarray, temperature: float = 0.0, top_p: float = 1.0,
           rng: np.random.Generator | None = None) -> int:
    """One token id from logits [V]; temperature 0 is greedy."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = np.asarray(logits, np.float64) / temperature
    probs = np.exp(z - z.max())
    ids = None
    if top_p < 1.0:  # the smallest prefix, by probability, whose mass reaches top_p
        ids = np.argsort(-probs, kind="stable")
        ranked = probs[ids] / probs.sum()
        keep = int(np.searchsorted(np.cumsum(ranked), top_p)) + 1
        ids, probs = ids[:keep], ranked[:keep]
    cdf = np.cumsum(probs)
    k = min(int(np.searchsorted(cdf, (rng or generator(None)).random() * cdf[-1], side="right")), len(cdf) - 1)
    return k if ids is None else int(ids[k])
