"""Ops by name and backend: `reference` (numpy/torch, the oracle), `cpu` (numba), `cuda` (native/).
Backends are imported when asked for: the cpu kernels' compile children import no torch."""

from __future__ import annotations

import importlib

from edge_moe.errors import UsageError

BACKENDS = ("reference", "cpu", "cuda")  # cuda builds its extension lazily, at first use


def get_backend(name: str):
    if name not in BACKENDS:
        raise UsageError(f"unknown kernel backend {name!r}; available: {', '.join(BACKENDS)}")
    return importlib.import_module(f"edge_moe.kernels.{name}")
