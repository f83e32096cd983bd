"""Ops by name and backend: `reference` (numpy/torch, the oracle), `cpu` (numba), `cuda` (native/)."""

from __future__ import annotations

from edge_moe.errors import UsageError
from edge_moe.kernels import cpu, cuda, reference  # cuda builds its extension lazily, at first use

BACKENDS = {"reference": reference, "cpu": cpu, "cuda": cuda}


def get_backend(name: str):
    if name not in BACKENDS:
        raise UsageError(f"unknown kernel backend {name!r}; available: {', '.join(BACKENDS)}")
    return BACKENDS[name]
