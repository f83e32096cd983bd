"""Ops by name and backend: `reference` (numpy/torch, the oracle); faster backends register here."""

from __future__ import annotations

from edge_moe.errors import UsageError
from edge_moe.kernels import reference

BACKENDS = {"reference": reference}
BACKENDS["cpu"] = __import__("edge_moe.kernels.cpu", fromlist=["cpu"])  # numba; cached compile at first call
BACKENDS["cuda"] = __import__("edge_moe.kernels.cuda", fromlist=["cuda"])  # builds at first use


def get_backend(name: str):
    if name not in BACKENDS:
        raise UsageError(f"unknown kernel backend {name!r}; available: {', '.join(BACKENDS)}")
    return BACKENDS[name]
